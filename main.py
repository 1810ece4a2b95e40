"""bmcc entry point: train, evaluate, predict or prepare the dataset.

  python main.py --config configs/demo.py --workdir runs/demo               # train (resumes)
  python main.py --config configs/demo.py --workdir runs/demo --mode=evaluate --split=test
  python main.py --config configs/default.py --workdir runs/x --mode=prepare
  python main.py --config configs/demo.py --workdir runs/demo --mode=predict cell.jpg cells/
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, TensorBoard events and reports.")
flags.DEFINE_enum("mode", "train", ["train", "evaluate", "predict", "explain", "prepare"],
                  "train (resumes from --workdir), evaluate a checkpoint, predict the image files "
                  "and folders given as arguments, or prepare the dataset.")
flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "Split for --mode=evaluate.")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                  "Checkpoint for --mode=evaluate and --mode=predict.")
flags.DEFINE_bool("tta", False,
                  "--mode=predict/evaluate: average over the 8 rotations/flips of each image.")
flags.DEFINE_integer("top_k", 3, "--mode=predict: how many classes each prediction lists.")
flags.DEFINE_string("output_csv", None, "--mode=predict: also write the predictions to this CSV.")
flags.DEFINE_string("method", "integrated_gradients,gradcam,occlusion",
                    "--mode=explain: comma-separated methods, each name[:key=value...] "
                    "(integrated_gradients, smoothgrad, gradcam, occlusion; see bmcc.explain).")
flags.DEFINE_string("target", None,
                    "--mode=explain: explain this class code instead of the predicted class.")
flags.DEFINE_string("output_dir", None,
                    "--mode=explain: output folder (default <workdir>/explain/<date-time>).")
flags.DEFINE_integer("num_examples", 24, "--mode=explain without image arguments: explain this "
                     "many examples of --split (commonest confusions, then each class).")
flags.mark_flags_as_required(["config"])


def _initialize_distributed() -> None:
  """Joins a multi-process run when the environment describes one; a single process otherwise.

  Explicit: BMCC_COORDINATOR_ADDRESS (host:port of process 0), BMCC_NUM_PROCESSES and
  BMCC_PROCESS_ID. Otherwise jax's own detection (SLURM with more than one task, among others).
  """
  import os

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


def main(argv: list[str]) -> int:
  # Imported here so that --help and flag errors come back fast.

  from bmcc import config_validation
  from bmcc.data import discovery
  from bmcc.preemption import TrainingInterrupted

  config = FLAGS.config
  if FLAGS.mode in ("train", "evaluate"):
    _initialize_distributed()
  try:
    if FLAGS.mode == "prepare":
      from bmcc.data import loading
      builder = loading.load_builder(config.data)
      logging.info("The dataset is prepared in %s: %s", builder.data_dir,
                   {k: v.num_examples for k, v in builder.info.splits.items()})
      return 0
    if FLAGS.workdir is None:
      raise app.UsageError("--workdir is required for --mode=train and --mode=evaluate.")
    if FLAGS.mode == "train":
      from bmcc import train
      train.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "evaluate":
      from bmcc import evaluate
      evaluate.evaluate_workdir(config, FLAGS.workdir, split=FLAGS.split,
                                           checkpoint=FLAGS.checkpoint, tta=FLAGS.tta)
    elif FLAGS.mode == "predict":
      if len(argv) < 2:
        raise app.UsageError("--mode=predict needs image files or folders as arguments.")
      from bmcc import predict
      return predict.predict_paths(
          FLAGS.workdir, argv[1:], checkpoint=FLAGS.checkpoint,
          batch_size=config.eval_batch_size, top_k=FLAGS.top_k, tta=FLAGS.tta,
          output_csv=FLAGS.output_csv)
    elif FLAGS.mode == "explain":
      from bmcc.explain import driver
      options = dict(methods=FLAGS.method, target=FLAGS.target, out_dir=FLAGS.output_dir,
                     checkpoint=FLAGS.checkpoint)
      if len(argv) > 1:
        return driver.explain_paths(FLAGS.workdir, argv[1:], **options)
      return driver.explain_split(config, FLAGS.workdir, split=FLAGS.split,
                                  num_examples=FLAGS.num_examples, **options)
  except (config_validation.ConfigError, discovery.DatasetNotFoundError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    return 2
  except FloatingPointError as e:  # a diverged run: the last good checkpoint is kept
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    return 4
  except TrainingInterrupted as e:  # SIGTERM/SIGINT: a checkpoint was saved; rerun to resume
    logging.warning("%s", e)
    print(f"interrupted: {e}", file=sys.stderr)
    return 3
  return 0


if __name__ == "__main__":
  app.run(main)
