"""bmcc entry point: train, evaluate, predict or prepare the dataset.

  python main.py --config configs/demo.py --workdir runs/demo               # train (resumes)
  python main.py --workdir runs/demo --mode=evaluate --split=test            # the run's config.json
  python main.py --workdir runs/demo --mode=predict cell.jpg cells/
  python main.py --config configs/default.py --mode=prepare                  # only the dataset
  python main.py --config configs/dinobloom_s_probe.py --workdir runs/dbs --mode=features  # probes
  python main.py --workdir runs/demo --mode=export                          # ONNX, StableHLO, card
  python main.py --mode=predict --model=runs/demo/export/model.onnx cells/  # no JAX, no workdir

--mode=evaluate and --mode=predict read the configuration the training run saved in
<workdir>/config.json unless --config is given. Override any config value with
--config.<key>=<value>, e.g. --config.batch_size=64 --config.data.balance_alpha=0.5.

Exit status: 0 done; 1 some files could not be predicted, or an unexpected error; 2 a bad command
line, config or workdir, or no dataset (one line `error: ...` on stderr); 3 stopped by SIGTERM or
Ctrl-C with a checkpoint (rerun to resume); 4 the training diverged (non-finite loss).
--verbosity=1 also shows the libraries' INFO messages.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from typing import NoReturn

from absl import app, flags
from ml_collections import config_flags

REPO = os.path.dirname(os.path.abspath(__file__))
CONFIGS_DIR = os.path.join(REPO, "configs")
MODES = ("train", "evaluate", "predict", "explain", "prepare", "cross_validate", "features",
         "export")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Configuration file, e.g. configs/demo.py (see the list below). Optional for "
    "--mode=evaluate and --mode=predict, which read <workdir>/config.json by default.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, TensorBoard events and reports.")
flags.DEFINE_enum("mode", "train", list(MODES),
                  "train (resumes from --workdir), evaluate a checkpoint, predict the image files "
                  "and folders given as arguments, prepare the dataset, cross_validate (every "
                  "fold into <workdir>/fold_<i>, then cv_summary.json), or features (embed every "
                  "split with the pretrained backbone, then linear and kNN probes), or export "
                  "(the best checkpoint as ONNX and StableHLO with a model card).")
flags.DEFINE_enum("split", "test", ["train", "validation", "test"],
                  "Split for --mode=evaluate, and for --mode=explain without image arguments.")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                  "Checkpoint for --mode=evaluate and --mode=predict.")
flags.DEFINE_bool("tta", False,
                  "--mode=predict/evaluate: average over the 8 rotations/flips of each image.")
flags.DEFINE_integer("top_k", 3, "--mode=predict: how many classes each prediction lists.")
flags.DEFINE_string("output_csv", None, "--mode=predict: also write the predictions to this CSV.")
flags.DEFINE_list("folds", None, "--mode=cross_validate: the folds to run, e.g. 0,3 or "
                  "$SLURM_ARRAY_TASK_ID; default all (config.data.num_folds, or 5); empty: only "
                  "the summary.")
flags.DEFINE_string("method", None,
                    "--mode=explain: comma-separated methods, each name[:key=value...] "
                    "(integrated_gradients, smoothgrad, gradcam, occlusion, attention_rollout; "
                    "see bmcc.explain); default integrated_gradients,gradcam,occlusion, with "
                    "attention_rollout for Grad-CAM on a ViT.")
flags.DEFINE_string("target", None,
                    "--mode=explain: explain this class code instead of the predicted class.")
flags.DEFINE_string("output_dir", None,
                    "--mode=explain: output folder (default <workdir>/explain/<date-time>); "
                    "--mode=export: default <workdir>/export.")
flags.DEFINE_list("format", ["onnx", "stablehlo"],
                  "--mode=export: onnx, stablehlo or both (onnx needs pip install 'bmcc[export]').")
flags.DEFINE_string("model", None, "--mode=predict: an exported model.onnx to run with ONNX "
                    "Runtime instead of a workdir's checkpoint (needs pip install 'bmcc[export]'; "
                    "no JAX).")
flags.DEFINE_integer("num_examples", 24, "--mode=explain without image arguments: explain this "
                     "many examples of --split (commonest confusions, then each class).")

_HELP_ARGS = {"--help", "-help", "-h", "-?", "--helpshort", "-helpshort", "--helpfull",
              "-helpfull"}


# ------------------------------------------------------------------------------------------------
# The command line: help, and one-line errors (exit status 2) before any heavy import.


def fail(message: str) -> NoReturn:
  """Prints `error: <message>` (one line) on stderr and exits with status 2."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(2)


def available_configs() -> list[tuple[str, str]]:
  """(path relative to the repository, first line of its docstring) of every configs/*.py.

  Read with `ast`, without importing anything.
  """
  found = []
  for name in sorted(os.listdir(CONFIGS_DIR)):
    if not name.endswith(".py") or name.startswith("_"):
      continue
    try:
      with open(os.path.join(CONFIGS_DIR, name)) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError):
      doc = ""
    found.append((f"configs/{name}", doc.strip().splitlines()[0] if doc.strip() else ""))
  return found


def help_text(full: bool = False) -> str:
  """The usage (this module's docstring), the flags, and the configs with their first lines."""
  flag_help = FLAGS.get_help() if full else FLAGS.main_module_help()
  configs = available_configs()
  width = max((len(path) for path, _ in configs), default=0)
  lines = [__doc__.strip(), "", "flags:", flag_help, "", "configs:"]
  lines += [f"  {path.ljust(width)}  {first}" for path, first in configs]
  if not full:
    lines += ["", "--helpfull lists the flags of the libraries as well (logging, ...)."]
  return "\n".join(lines) + "\n"


def _config_argument(argv: list[str]) -> str | None:
  """The value of --config in `argv` (before any `--`), or None."""
  for i, arg in enumerate(argv):
    if arg == "--":
      break
    match = re.fullmatch(r"--?config(?:=(.*))?", arg)
    if match:
      if match.group(1) is not None:
        return match.group(1)
      return argv[i + 1] if i + 1 < len(argv) else ""
  return None


def _override_error(argv: list[str], error: Exception) -> str:
  """One line for an unknown key in a --config.<path>=<value> override."""
  text = str(error).replace("\\'", "'").replace('\\"', '"').replace("\\n", "\n")
  keys = re.findall(r"'([A-Za-z_][\w]*)'", text)
  suggestion = re.search(r'Did you mean "([\w.]+)"', text)
  key = keys[0] if keys else None
  for arg in argv:
    name = arg.split("=", 1)[0].lstrip("-")
    if key and name.startswith("config.") and name.split(".")[-1] == key:
      hint = ""
      if suggestion:
        hint = f"; did you mean --{name.rsplit('.', 1)[0]}.{suggestion.group(1)}?"
      return f"--{name}: the config has no key {key!r}{hint}"
  return f"a --config.<key>=<value> override names a key the config does not have: {text}"


def _take_none_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """(`argv` without its --config.<key>=None overrides, those keys).

  ml_collections parses an override with the type of the key's default (float('None') fails), so
  main.py sets these keys to None itself; validation then says whether None is allowed.
  """
  end = argv.index("--") if "--" in argv else len(argv)
  keys, kept = [], []
  for i, arg in enumerate(argv):
    match = re.fullmatch(r"--config\.([\w.]+)=None", arg) if i < end else None
    if match:
      keys.append(match.group(1))
    else:
      kept.append(arg)
  return kept, keys


def _set_none(config, key: str) -> None:
  """`config.<key> = None`, or a one-line error for a key the config does not have."""
  *parents, name = key.split(".")
  for part in parents:
    if part not in config:
      fail(f"--config.{key}: the config has no key {part!r}")
    if not hasattr(config[part], "keys"):
      fail(f"--config.{key}: config.{part} is not a block of keys")
    config = config[part]
  if name not in config:
    fail(f"--config.{key}: the config has no key {name!r}")
  config[name] = None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with --help on stdout (exit 0) and one-line errors (exit 2).

  Returns the arguments left after the flags (the program name first), as absl's parser does.
  `--config.<key>=None` sets a key to None whatever its type.
  """
  before_separator = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  help_args = _HELP_ARGS & set(before_separator)
  if help_args:
    sys.stdout.write(help_text(full=any("full" in a for a in help_args)))
    sys.exit(0)
  config_arg = _config_argument(argv[1:])
  if config_arg is not None:
    path = config_arg.split(":", 1)[0]
    if not os.path.isfile(path):
      names = ", ".join(p for p, _ in available_configs())
      fail(f"--config {config_arg}: no such file; the configs are: {names} "
           "(python main.py --help describes them).")
  none_keys: list[str] = []
  if config_arg is not None:
    argv, none_keys = _take_none_overrides(argv)
  sys.argv = argv  # ml_collections reads the --config.<key> overrides from sys.argv
  try:
    remaining = FLAGS(argv)
    for key in none_keys:
      _set_none(FLAGS.config, key)
    return remaining
  except flags.UnrecognizedFlagError as e:
    if config_arg is None and e.flagname.startswith("config."):
      fail(f"--{e.flagname} needs --config <file> before it: overrides change a config file "
           "(without --config, evaluate and predict use the workdir's config.json as saved).")
    fail(f"{e} (python main.py --help lists the flags).")
  except flags.Error as e:
    fail(f"{e} (python main.py --help lists the flags).")
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a key that is not there
    fail(_override_error(argv, e))
  except OSError as e:  # ml_collections: the config file could not be read
    cause = e.__cause__ or e
    fail(f"--config {config_arg}: cannot be loaded: {str(cause).strip().splitlines()[-1]}")


# ------------------------------------------------------------------------------------------------
# Running a mode.


class _LineCounter:
  """A text stream that forwards to `stream` and counts the lines written."""

  def __init__(self, stream):
    self.stream = stream
    self.lines = 0

  def write(self, text: str) -> int:
    self.lines += text.count("\n")
    return self.stream.write(text)

  def __getattr__(self, name):
    return getattr(self.stream, name)


def _initialize_distributed() -> None:
  """Joins a multi-process run when the environment describes one; a single process otherwise.

  Explicit: BMCC_COORDINATOR_ADDRESS (host:port of process 0), BMCC_NUM_PROCESSES and
  BMCC_PROCESS_ID. Otherwise jax's own detection (SLURM with more than one task, among others).
  """
  import logging

  import jax

  if os.environ.get("BMCC_COORDINATOR_ADDRESS"):
    if os.environ.get("BMCC_CPU_COLLECTIVES"):  # e.g. 'gloo' for several CPU processes
      jax.config.update("jax_cpu_collectives_implementation", os.environ["BMCC_CPU_COLLECTIVES"])
    jax.distributed.initialize(
        coordinator_address=os.environ["BMCC_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["BMCC_NUM_PROCESSES"]),
        process_id=int(os.environ["BMCC_PROCESS_ID"]))
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
  if jax.process_count() > 1:
    logging.info("Process %d of %d; %d local and %d global devices.", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def _check_export_extra(what: str, modules: tuple[str, ...]) -> None:
  """Exit 2 naming the extra to install when one of `modules` is not installed."""
  import importlib.util

  for module in modules:
    try:
      found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
      found = False
    if not found:
      fail(f"{what} needs {module}, which is not installed: pip install 'bmcc[export]'.")


def _check_usage(mode: str, paths: list[str]) -> None:
  """One-line errors (exit 2) for a command line that cannot work in `mode`."""
  if mode == "predict" and not paths:
    fail("--mode=predict needs image files or folders as arguments, e.g. "
         "python main.py --mode=predict --workdir runs/demo cells/ cell.jpg")
  if mode not in ("predict", "explain") and paths:
    fail(f"--mode={mode} takes no arguments, got {' '.join(paths)!r} (only --mode=predict and "
         "--mode=explain take image files and folders; flags are written --name=value).")
  if FLAGS.model is not None:
    if mode != "predict":
      fail(f"--model is for --mode=predict (got --mode={mode}).")
    if not FLAGS.model.endswith(".onnx"):
      fail(f"--model={FLAGS.model}: give a .onnx file written by --mode=export.")
    _check_export_extra(f"--model={FLAGS.model}", ("onnxruntime",))
    return
  if mode == "export" and (not FLAGS.format or set(FLAGS.format) - {"onnx", "stablehlo"}):
    fail(f"--format={','.join(FLAGS.format)}: use onnx, stablehlo or onnx,stablehlo.")
  if mode == "export" and "onnx" in FLAGS.format:
    _check_export_extra("--format=onnx", ("onnx", "jax2onnx"))
  if mode != "prepare" and FLAGS.workdir is None:
    what = "write the run into" if mode == "train" else "read the training run from"
    fail(f"--mode={mode} needs --workdir (the folder to {what}).")
  if mode in ("train", "prepare", "cross_validate", "features") and FLAGS.config is None:
    fail(f"--mode={mode} needs --config, e.g. --config configs/demo.py "
         "(python main.py --help lists the configs).")


def _ignore_further_signals() -> None:
  """The run is stopping: more SIGINT/SIGTERM would only interrupt the interpreter's shutdown."""
  import signal

  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, signal.SIG_IGN)


def _predict(config, paths: list[str]) -> int:
  """--mode=predict; stderr gets the error lines and one summary line."""
  from bmcc import predict

  files = predict.collect_images(paths)
  stdout = _LineCounter(sys.stdout)
  status = predict.predict_paths(
      FLAGS.workdir, paths, checkpoint=FLAGS.checkpoint, batch_size=config.eval_batch_size,
      top_k=FLAGS.top_k, tta=FLAGS.tta, output_csv=FLAGS.output_csv, stdout=stdout)
  if files:
    print(f"predicted {stdout.lines} of {len(files)} file(s); {len(files) - stdout.lines} failed",
          file=sys.stderr, flush=True)
  return status


def _predict_onnx(paths: list[str]) -> int:
  """--mode=predict --model=FILE.onnx: ONNX Runtime, without JAX or a workdir."""
  from bmcc import onnx_predict

  files = onnx_predict.predict.collect_images(paths)
  stdout = _LineCounter(sys.stdout)
  try:
    status = onnx_predict.predict_paths(FLAGS.model, paths, top_k=FLAGS.top_k, tta=FLAGS.tta,
                                        output_csv=FLAGS.output_csv, stdout=stdout)
  except onnx_predict.OnnxPredictError as e:
    fail(str(e))
  if files:
    print(f"predicted {stdout.lines} of {len(files)} file(s); {len(files) - stdout.lines} failed",
          file=sys.stderr, flush=True)
  return status


def main(argv: list[str]) -> int:
  mode = FLAGS.mode
  paths = argv[1:]
  _check_usage(mode, paths)
  # Before TensorFlow and JAX are imported (their C++ logs read the environment once).
  from bmcc import log_setup
  log_setup.configure(FLAGS.verbosity, own_info=mode != "predict")
  if FLAGS.model is not None:  # before anything that imports JAX
    return _predict_onnx(paths)

  from bmcc import config_validation, run_config
  from bmcc.data import discovery
  from bmcc.preemption import TrainingInterrupted

  try:
    config = FLAGS.config
    if config is None:
      # The run's own config, as it trained; not validated again (it may come from an older
      # bmcc with fewer keys, and evaluate and predict use only its data and batch sizes).
      config = run_config.load_run_config(FLAGS.workdir)
    if mode in ("train", "evaluate", "cross_validate", "features"):
      _initialize_distributed()
    if mode != "predict" and FLAGS.config is not None:  # before any data work
      checked = config
      if mode == "cross_validate":  # as its first fold will run
        checked = config.copy_and_resolve_references()
        checked.data.fold, checked.data.num_folds = 0, config.data.num_folds or 5
      config_validation.validate(checked, FLAGS.workdir if mode != "prepare" else None,
                                 training=mode in ("train", "cross_validate"))
      if mode == "features":  # embeds with config.pretrained: the file must be there
        config_validation.check_files(checked)
    if mode != "predict" and FLAGS.verbosity < 1:
      log_setup.quiet_dataset_preparation()
    if mode == "prepare":
      import logging

      from bmcc.data import loading
      builder = loading.load_builder(config.data)
      logging.info("The dataset is prepared in %s: %s", builder.data_dir,
                   {k: v.num_examples for k, v in builder.info.splits.items()})
    elif mode == "train":
      from bmcc import train
      train.train_and_evaluate(config, FLAGS.workdir)
    elif mode == "evaluate":
      from bmcc import evaluate
      evaluate.evaluate_workdir(config, FLAGS.workdir, split=FLAGS.split,
                                checkpoint=FLAGS.checkpoint, tta=FLAGS.tta)
    elif mode == "cross_validate":
      from bmcc import cross_validation
      cross_validation.run_folds(config, FLAGS.workdir, folds=FLAGS.folds)
    elif mode == "predict":
      return _predict(config, paths)
    elif mode == "export":
      from bmcc import export
      export.export_workdir(FLAGS.workdir, formats=tuple(FLAGS.format),
                            output_dir=FLAGS.output_dir, checkpoint=FLAGS.checkpoint)
    elif mode == "features":
      from bmcc import features
      features.features_and_probes(config, FLAGS.workdir)
    elif mode == "explain":
      from bmcc.explain import driver
      options = dict(methods=FLAGS.method, target=FLAGS.target, out_dir=FLAGS.output_dir,
                     checkpoint=FLAGS.checkpoint)
      if paths:
        return driver.explain_paths(FLAGS.workdir, paths, **options)
      return driver.explain_split(config, FLAGS.workdir, split=FLAGS.split,
                                  num_examples=FLAGS.num_examples, **options)
  except (config_validation.ConfigError, discovery.DatasetNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except FloatingPointError as e:  # a diverged run: the last good checkpoint is kept
    print(f"error: {e}", file=sys.stderr)
    return 4
  except TrainingInterrupted as e:  # SIGTERM/SIGINT: a checkpoint was saved; rerun to resume
    _ignore_further_signals()
    print(f"interrupted: {e}", file=sys.stderr)
    return 3
  except KeyboardInterrupt:  # a signal outside the training loop's handler, e.g. during clean-up
    _ignore_further_signals()
    hint = "rerun the same command to continue."
    if mode == "train":
      from bmcc import preemption
      hint = preemption.resume_hint(os.path.join(FLAGS.workdir, "checkpoints"))
    print(f"interrupted: stopped at once; {hint}", file=sys.stderr)
    return 3
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
