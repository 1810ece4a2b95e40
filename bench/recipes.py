"""Recipe study on real cells: recipe variants by stratified k-fold cross-validation, one command.

  python bench/recipes.py DATA_DIR --out /tmp/recipes [--folds=3] [--epochs=6] \\
      [--variants=base,depth5,...]

DATA_DIR is a prepared dataset folder (the `--config.data.data_dir` of `--mode=prepare`, holding
`bone_marrow/`) or a download (Kaggle or TCIA layout), which is then prepared into `<out>/tfds`.
Every variant is the study's base, `configs/cpu_quick.py` (the 8 large classes, 64 px,
SimpleCNN) with bmcc's fixed stain statistics instead of the real cells' ones the study adopted
(`BASE`), with one choice changed (`VARIANTS`; `matek_norm` is `cpu_quick.py` as it stands),
trained and tested by bmcc's own `--mode=cross_validate` (one `main.py` process per variant, one
after another) into `<out>/<variant>/`; a finished variant is not run again. `all20` is the base
recipe over every class present. After each variant the table is
rewritten: `<out>/recipes.md` and `<out>/recipes.json`, mean and standard deviation over the folds
of the test balanced accuracy and accuracy, the change of mean balanced accuracy from `base`, and
the wall time of the variant. The rows of `bench/torch_baseline.py` are added from
`<out>/torch_*.json` (the baseline and its twins of bmcc variants).

`--export_folds` writes the folds (the same files bmcc trains, validates and tests on for each
fold: `<out>/folds_k<K>/fold_<i>.json`) for `bench/torch_baseline.py`, and stops.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# name -> (what changes from the base recipe, config overrides)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "base": ("configs/cpu_quick.py with the fixed stain statistics (the study's base)", []),
    "simple_cnn": ("configs/simple_cnn.py's recipe at 64 px: 5 blocks, AdamW 1e-4, crop 0.7-1, "
                   "colour jitter 0.1 / hue 0.02, clip 1.0",
                   ["--config.model_config.features=(32,64,128,256,512)",
                    "--config.optimizer=adamw", "--config.weight_decay=1e-4",
                    "--config.data.crop_scale=(0.7,1.0)", "--config.data.color_jitter=0.1",
                    "--config.data.hue_jitter=0.02", "--config.grad_clip_norm=1.0"]),
    "depth5": ("5 conv blocks (32..512)", ["--config.model_config.features=(32,64,128,256,512)"]),
    "wide": ("4 blocks, twice as wide (64..512)",
             ["--config.model_config.features=(64,128,256,512)"]),
    "crop07": ("random resized crop 0.7-1", ["--config.data.crop_scale=(0.7,1.0)"]),
    "colour": ("colour jitter 0.1, hue 0.02",
               ["--config.data.color_jitter=0.1", "--config.data.hue_jitter=0.02"]),
    "adamw": ("AdamW, weight decay 0.05", ["--config.optimizer=adamw",
                                           "--config.weight_decay=0.05"]),
    "clip1": ("gradient clipping at norm 1.0", ["--config.grad_clip_norm=1.0"]),
    "smooth01": ("label smoothing 0.1", ["--config.label_smoothing=0.1"]),
    "balanced": ("class-balanced sampling, alpha 0.5", ["--config.data.balance_alpha=0.5"]),
    "ema": ("weight average, decay 0.99 (warmed up: bmcc.steps.ema_decay_at)",
            ["--config.ema_decay=0.99"]),
    "cos0": ("cosine decay to 0 (not 1% of the peak), as the PyTorch baseline",
             ["--config.end_learning_rate_factor=0.0"]),
    "dense_head": ("the old simple_cnn.py head: dense 256 + ReLU, dropout 0.3, before the linear "
                   "head",
                   ["--config.model_config.dense=256", "--config.model_config.dropout=0.3"]),
    "pytorch_init": ("PyTorch's default initialisation (uniform, variance 1 / (3 fan_in))",
                     ["--config.model_config.init=pytorch"]),
    "matek_norm": ("inputs normalised by the real cells' statistics (input_normalization=matek), "
                   "as the PyTorch baseline by its training images': configs/cpu_quick.py as is",
                   ["--config.input_normalization=matek"]),
    "all20": ("base recipe, every class present (20)", ["--config.data.classes=None"]),
}
# The study's base: configs/cpu_quick.py without the one choice the study adopted (matek_norm), so
# that every variant, run before or after the adoption, changes one choice of the same recipe.
BASE = ["--config.input_normalization=stain"]
METRICS = ("balanced_accuracy", "accuracy")


def _data_flags(data_dir: str, out: str) -> list[str]:
  """The config overrides that point at the prepared dataset (DATA_DIR or `<out>/tfds`)."""
  if os.path.isdir(os.path.join(data_dir, "bone_marrow")):
    return [f"--config.data.data_dir={os.path.abspath(data_dir)}"]
  return [f"--config.data.manual_dir={os.path.abspath(data_dir)}",
          f"--config.data.data_dir={os.path.abspath(os.path.join(out, 'tfds'))}"]


def _finished(workdir: str) -> bool:
  summary_path = os.path.join(workdir, "cv_summary.json")
  if not (os.path.exists(summary_path) and os.path.exists(os.path.join(workdir, "run.json"))):
    return False
  with open(summary_path) as f:
    return json.load(f)["complete"]


def run_variant(name: str, data_flags: list[str], args: argparse.Namespace) -> bool:
  """Cross-validates one variant into `<out>/<name>` unless finished; whether it succeeded."""
  workdir = os.path.join(args.out, name)
  if _finished(workdir):
    return True
  command = [sys.executable, os.path.join(REPO, "main.py"), "--config",
             os.path.join(REPO, "configs", "cpu_quick.py"), "--mode=cross_validate",
             f"--workdir={workdir}", f"--config.data.num_folds={args.folds}",
             f"--config.num_epochs={args.epochs}", f"--config.seed={args.seed}", *data_flags,
             *BASE, *VARIANTS[name][1]]
  print(f"== {name}: {' '.join(command)}", flush=True)
  start = time.time()
  with open(os.path.join(args.out, f"{name}.log"), "a") as log:
    result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  if result.returncode != 0:
    print(f"error: variant {name} failed (exit {result.returncode}); see {log.name}", flush=True)
    return False
  with open(os.path.join(workdir, "run.json"), "w") as f:
    json.dump({"seconds": time.time() - start, "epochs": args.epochs, "command": command}, f)
  return True


def read_row(name: str, out: str) -> dict | None:
  """The table row of a finished variant in `out`; None if it is not finished."""
  workdir = os.path.join(out, name)
  if not _finished(workdir):
    return None
  with open(os.path.join(workdir, "cv_summary.json")) as f:
    summary = json.load(f)
  with open(os.path.join(workdir, "run.json")) as f:
    run = json.load(f)
  row = {"variant": name, "change": VARIANTS[name][0], "folds": summary["num_folds"],
         "epochs": run["epochs"], "minutes": run["seconds"] / 60}
  for key in METRICS:
    row[key] = {k: summary["metrics"][key][k] for k in ("mean", "std", "folds")}
  return row


def _cell(stats: dict) -> str:
  return f"{stats['mean']:.3f} ± {stats['std']:.3f}" if stats.get("std") is not None else (
      f"{stats['mean']:.3f}")


def format_table(rows: list[dict]) -> str:
  """The markdown table of the finished rows (base first, its difference in the Δ column)."""
  base = next((r for r in rows if r["variant"] == "base"), None)
  lines = ["| variant | change from base | folds x epochs | balanced accuracy | accuracy | "
           "Δ balanced accuracy | minutes |", "|---|---|---|---|---|---|---|"]
  for row in rows:
    delta = ""
    if base is not None and row["variant"] not in ("base", "all20"):
      delta = (f"{row['balanced_accuracy']['mean'] - base['balanced_accuracy']['mean']:+.3f}")
    lines.append(f"| {row['variant']} | {row['change']} | {row['folds']} x {row['epochs']} | "
                 f"{_cell(row['balanced_accuracy'])} | {_cell(row['accuracy'])} | {delta} | "
                 f"{row['minutes']:.1f} |")
  return "\n".join(lines) + "\n"


def write_table(rows: list[dict], out: str) -> None:
  rows = list(rows)
  for torch_path in sorted(glob.glob(os.path.join(out, "torch_*.json"))):
    with open(torch_path) as f:
      rows.append(json.load(f)["row"])
  with open(os.path.join(out, "recipes.json"), "w") as f:
    json.dump(rows, f, indent=2)
  table = format_table(rows)
  with open(os.path.join(out, "recipes.md"), "w") as f:
    f.write(table)
  print(table, flush=True)


def export_folds(data_flags: list[str], args: argparse.Namespace) -> str:
  """Writes `<out>/folds_k<K>/fold_<i>.json`: each role's files (path in the download, class)."""
  from ml_collections import config_flags  # noqa: F401  (absl flags for the config)

  from bmcc.data import input_pipeline, loading, pipeline, sampling
  from configs import cpu_quick

  config = cpu_quick.get_config()
  for flag in data_flags:
    key, value = flag.removeprefix("--config.").split("=", 1)
    setattr(config.data, key.removeprefix("data."), value)
  if args.all_classes:
    config.data.classes = None
  builder = loading.load_builder(config.data)
  mapping = pipeline.ClassMapping.create(config.data.classes)
  directory = os.path.join(args.out, f"folds_k{args.folds}" + ("_all" if args.all_classes else ""))
  os.makedirs(directory, exist_ok=True)
  config.data.num_folds = args.folds
  for fold in range(args.folds):
    config.data.fold = fold
    roles = {}
    for role in ("train", "validation", "test"):
      source, (indices, labels), _ = input_pipeline._select(config, builder, role, mapping,
                                                            force=True)
      chosen = input_pipeline.selection(config, role)
      _, names = sampling.read_record_index(source, input_pipeline._index_cache(builder, chosen))
      roles[role] = [[str(names[i]), mapping.codes[label]]
                     for i, label in zip(indices, labels, strict=True)]
    with open(os.path.join(directory, f"fold_{fold}.json"), "w") as f:
      json.dump({"fold": fold, "num_folds": args.folds, "classes": list(mapping.codes),
                 **roles}, f)
  print(f"folds written to {directory}")
  return directory


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("data_dir", help="prepared dataset folder, or the download to prepare")
  parser.add_argument("--out", default="runs/recipes", help="where runs and tables go")
  parser.add_argument("--folds", type=int, default=3, help="k of the k-fold cross-validation")
  parser.add_argument("--epochs", type=float, default=6.0, help="training epochs per fold")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"comma-separated, in order; of {', '.join(VARIANTS)}")
  parser.add_argument("--export_folds", action="store_true",
                      help="write the folds' file lists for bench/torch_baseline.py and stop")
  parser.add_argument("--all_classes", action="store_true",
                      help="with --export_folds: the folds over every class present")
  args = parser.parse_args()
  names = [n for n in args.variants.split(",") if n]
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    print(f"error: unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}", file=sys.stderr)
    sys.exit(2)
  if not os.path.isdir(args.data_dir):
    print(f"error: {args.data_dir} is not a folder", file=sys.stderr)
    sys.exit(2)
  os.makedirs(args.out, exist_ok=True)
  data_flags = _data_flags(args.data_dir, args.out)
  if args.export_folds:
    export_folds(data_flags, args)
    return
  for name in names:
    if run_variant(name, data_flags, args):
      write_table([r for n in VARIANTS if (r := read_row(n, args.out)) is not None], args.out)


if __name__ == "__main__":
  main()
