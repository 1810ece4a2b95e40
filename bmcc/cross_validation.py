"""k-fold cross-validation in one command (`--mode=cross_validate`), and its summary over folds.

`run_folds` trains and tests fold i of k into `<workdir>/fold_<i>/`, one fold after another, or
only the folds asked for (one per SLURM array task: `--folds=$SLURM_ARRAY_TASK_ID`). A fold whose
`eval_test.json` exists is skipped and an unfinished one resumes, so a rerun continues fold by
fold. Each fold records the hash of its config in `fold_<i>/fold_config.json` (`config_record`:
the config without `data.fold` and the keys that do not change the result); a rerun under another
config is refused before any training, naming the keys that differ, so that no summary averages
folds of different recipes. `summarize` writes `cv_summary.json`, `.md` and `_confusion.png`
into the workdir: each metric's mean and standard deviation over the finished folds, and
precision, recall and F1 of all their test predictions pooled (each image is tested in exactly
one fold), with the pooled confusion matrix; the folds not yet finished are listed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from bmcc import metrics
from bmcc.atomic import atomic_write
from bmcc.config_validation import ConfigError

DEFAULT_NUM_FOLDS = 5  # when config.data.num_folds is not set (Matek et al. 2021 used 5)
SUMMARY = "cv_summary"
FOLD_CONFIG = "fold_config.json"
# Keys left out of a fold's config hash: the fold itself, where the data is on this machine, and
# what only changes logging or where a run pauses (SLURM array tasks on other nodes agree).
_NOT_HASHED = ("data.fold", "data.data_dir", "data.manual_dir", "data.cache_dir",
               "stop_at_step", "log_every_steps")
# Report entries averaged over folds (besides every top_<k>_accuracy).
_METRICS = ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1",
            "weighted_f1", "expected_calibration_error", "negative_log_likelihood")


def fold_dir(workdir: str, fold: int) -> str:
  """Where fold `fold` of a cross-validation in `workdir` runs: `<workdir>/fold_<fold>`."""
  return os.path.join(workdir, f"fold_{fold}")


def _flatten(value, prefix: str = "") -> dict:
  if not isinstance(value, dict):
    return {prefix[:-1]: value}
  flat = {}
  for key, item in value.items():
    flat.update(_flatten(item, f"{prefix}{key}."))
  return flat


def config_record(config: ml_collections.ConfigDict) -> dict:
  """{'config_hash': SHA-256 of the canonical JSON, 'config': {dotted key: value}} of `config`
  without the keys of `_NOT_HASHED`: the same for every fold of one cross-validation."""
  flat = _flatten(json.loads(config.to_json_best_effort()))
  flat = {k: v for k, v in sorted(flat.items()) if k not in _NOT_HASHED}
  text = json.dumps(flat, sort_keys=True, separators=(",", ":"))
  return {"config_hash": hashlib.sha256(text.encode()).hexdigest(), "config": flat}


def _recorded(directory: str) -> dict | None:
  """The fold's `fold_config.json`, else a record made from the `config.json` its training wrote
  (folds of an older bmcc), else None (a fold not started)."""
  path = os.path.join(directory, FOLD_CONFIG)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  path = os.path.join(directory, "config.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return config_record(ml_collections.ConfigDict(json.load(f)))
  return None


def check_fold_config(record: dict, directory: str) -> None:
  """ConfigError (one line, the differing keys) if the fold in `directory` ran another config."""
  saved = _recorded(directory)
  if saved is None or saved["config_hash"] == record["config_hash"]:
    return
  ours, theirs = record["config"], saved.get("config", {})
  keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k, "<absent>") !=
                theirs.get(k, "<absent>"))
  shown = "; ".join(f"{k}: {theirs.get(k, '<absent>')!r} there, {ours.get(k, '<absent>')!r} "
                    "now" for k in keys[:8]) + ("; ..." if len(keys) > 8 else "")
  raise ConfigError(f"{directory} was run under another config ({len(keys)} key(s) differ: "
                    f"{shown}): rerun with the config it was made with, or use another --workdir.")


def _fold_list(folds: Sequence[int | str] | None, num_folds: int) -> list[int]:
  if folds is None:
    return list(range(num_folds))
  chosen = []
  for fold in folds:
    try:
      chosen.append(int(fold))
    except ValueError:
      chosen.append(-1)
    if not 0 <= chosen[-1] < num_folds:
      raise ConfigError(f"--folds: {fold!r} is not a fold of {num_folds} (0..{num_folds - 1}).")
  return sorted(set(chosen))


def run_folds(config: ml_collections.ConfigDict, workdir: str,
              folds: Sequence[int | str] | None = None) -> dict:
  """Runs the folds (all by default) of `config` into `workdir`, then returns `summarize`'s dict.

  The number of folds is `config.data.num_folds`, or `DEFAULT_NUM_FOLDS` when unset;
  `config.data.fold` is ignored. Folds that already have `eval_test.json` are skipped.
  """
  from bmcc import train  # noqa: PLC0415  (TensorFlow via clu: only when training)

  if config.data.split != "stratified":
    raise ConfigError(f"config.data.split={config.data.split!r} has one fixed test set: "
                      "cross-validation needs split='stratified'.")
  num_folds = config.data.num_folds or DEFAULT_NUM_FOLDS
  if num_folds < 2:
    raise ConfigError(f"config.data.num_folds={num_folds} must be at least 2.")
  workdir = os.path.abspath(workdir)
  chosen = _fold_list(folds, num_folds)
  record = config_record(_fold_config(config, 0, num_folds))
  for fold in range(num_folds):  # every fold the summary may average, before any training
    check_fold_config(record, fold_dir(workdir, fold))
  for fold in chosen:
    directory = fold_dir(workdir, fold)
    if os.path.exists(os.path.join(directory, "eval_test.json")):
      logging.info("Fold %d of %d is finished (%s): skipped.", fold, num_folds, directory)
      continue
    logging.info("Cross-validation: fold %d of %d into %s.", fold, num_folds, directory)
    if jax.process_index() == 0 and not os.path.exists(os.path.join(directory, FOLD_CONFIG)):
      os.makedirs(directory, exist_ok=True)
      atomic_write(os.path.join(directory, FOLD_CONFIG), json.dumps(record, indent=2) + "\n")
    train.train_and_evaluate(_fold_config(config, fold, num_folds), directory)
  return summarize(workdir, num_folds)


def _fold_config(config: ml_collections.ConfigDict, fold: int, num_folds: int
                 ) -> ml_collections.ConfigDict:
  fold_config = config.copy_and_resolve_references()
  fold_config.data.fold, fold_config.data.num_folds = fold, num_folds
  return fold_config


def _metric_keys(report: dict) -> list[str]:
  return [key for key in report if key in _METRICS
          or (key.startswith("top_") and key.endswith("_accuracy"))]


def summarize(workdir: str, num_folds: int) -> dict:
  """Summarises the finished folds of `workdir` and writes cv_summary.json/.md/_confusion.png.

  Returns a dict: `num_folds`, `folds_finished`, `folds_missing`, `complete`,
  `test_images_per_fold`, `metrics` (per metric: `mean`, `std` over the finished folds, sample
  standard deviation with n - 1, None for one fold, and the per-fold values `folds`) and `pooled`
  (`bmcc.metrics.confusion_report` of the summed confusion matrices; None without finished folds).
  Raises ConfigError if a fold's report belongs to another fold, fold count or class list.
  """
  reports = {}
  for fold in range(num_folds):
    path = os.path.join(fold_dir(workdir, fold), "eval_test.json")
    if not os.path.exists(path):
      continue
    with open(path, encoding="utf-8") as f:
      reports[fold] = json.load(f)
    if (reports[fold].get("fold"), reports[fold].get("num_folds")) != (fold, num_folds):
      raise ConfigError(f"{path} is the report of fold {reports[fold].get('fold')} of "
                       f"{reports[fold].get('num_folds')}, not of fold {fold} of {num_folds}: "
                       "use another --workdir, or the number of folds it was made with.")
  finished = sorted(reports)
  summary = {
      "protocol": f"stratified {num_folds}-fold cross-validation",
      "num_folds": num_folds,
      "folds_finished": finished,
      "folds_missing": [fold for fold in range(num_folds) if fold not in reports],
      "complete": len(finished) == num_folds,
      "test_images_per_fold": {str(fold): reports[fold]["num_examples"] for fold in finished},
      "metrics": {},
      "pooled": None,
  }
  if reports:
    first = reports[finished[0]]
    order = first["confusion_matrix"]["class_order"]
    for fold in finished:
      if reports[fold]["confusion_matrix"]["class_order"] != order:
        raise ConfigError(f"Fold {fold} was evaluated on classes "
                         f"{reports[fold]['confusion_matrix']['class_order']}, fold "
                         f"{finished[0]} on {order}: the folds of one run must share the classes.")
    for key in _metric_keys(first):
      values = [float(reports[fold][key]) for fold in finished]
      summary["metrics"][key] = {
          "mean": float(np.mean(values)),
          "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
          "folds": values,
      }
    counts = sum(np.asarray(reports[fold]["confusion_matrix"]["counts"], np.int64)
                 for fold in finished)
    summary["pooled"] = metrics.confusion_report(
        counts, order, class_names=[first["per_class"][code]["name"] for code in order])
  if jax.process_index() == 0:
    _write(summary, workdir)
  if summary["folds_missing"]:
    logging.warning("Cross-validation summary over folds %s of %d; not finished: %s.", finished,
                    num_folds, summary["folds_missing"])
  return summary


def _fmt(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.4f}"


def format_summary(summary: dict) -> str:
  """The summary as Markdown: folds, the metrics over folds, the pooled per-class table."""
  num_folds = summary["num_folds"]
  lines = [f"# {summary['protocol']}", "",
           f"- folds finished: {', '.join(map(str, summary['folds_finished'])) or 'none'} "
           f"(of {num_folds})"]
  if summary["folds_missing"]:
    lines.append(f"- NOT finished: {', '.join(map(str, summary['folds_missing']))}; rerun the "
                 "command to finish them (the numbers below cover the finished folds only)")
  finished = summary["folds_finished"]
  if summary["metrics"]:
    lines += ["", "| metric | mean | std | " + " | ".join(f"fold {f}" for f in finished) + " |",
              "|---|---:|---:|" + "---:|" * len(finished)]
    for key, value in summary["metrics"].items():
      lines.append(f"| {key} | {_fmt(value['mean'])} | {_fmt(value['std'])} | "
                   + " | ".join(_fmt(v) for v in value["folds"]) + " |")
  pooled = summary["pooled"]
  if pooled is not None:
    lines += ["", f"Pooled over the {pooled['num_examples']} test images of the finished folds: "
              f"accuracy {_fmt(pooled['accuracy'])}, balanced accuracy "
              f"{_fmt(pooled['balanced_accuracy'])}, macro F1 {_fmt(pooled['macro_f1'])}, "
              f"weighted F1 {_fmt(pooled['weighted_f1'])}.", "",
              "| code | name | support | precision | recall | f1 |",
              "|---|---|---:|---:|---:|---:|"]
    for code, row in pooled["per_class"].items():
      lines.append(f"| {code} | {row['name']} | {row['support']} | {_fmt(row['precision'])} | "
                   f"{_fmt(row['recall'])} | {_fmt(row['f1'])} |")
  return "\n".join(lines) + "\n"


def _write(summary: dict, workdir: str) -> None:
  from PIL import Image  # noqa: PLC0415

  os.makedirs(workdir, exist_ok=True)
  base = os.path.join(workdir, SUMMARY)
  atomic_write(base + ".json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
  atomic_write(base + ".md", format_summary(summary))
  if summary["pooled"] is not None:
    picture = Image.fromarray(metrics.confusion_matrix_image(summary["pooled"]))
    atomic_write(base + "_confusion.png", lambda f: picture.save(f, format="PNG"))
