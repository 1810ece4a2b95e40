"""The evaluation report: accuracy, balanced accuracy, F1, calibration and the confusion matrix.

Pure numpy (no jax): the evaluation loop gathers labels and softmax probabilities on the host and
calls `classification_report`, which returns a JSON-serialisable dict (plain floats, ints, lists,
strings and None only). `write_report` stores it in the workdir as `eval_<split>.json`, a Markdown
per-class table and a PNG of the confusion matrix; `summary_scalars` and `confusion_matrix_image`
give the same numbers and picture to TensorBoard.

Conventions, chosen for a dataset whose classes range from 8 to 29,424 images, where a split may
lack a class entirely:

- The prediction is the argmax of the probabilities (ties go to the lower class index).
- precision = TP / predicted, and 0.0 for a class that is never predicted (sklearn's
  `zero_division=0`).
- recall = TP / support, and None for a class with no support in the split: it is undefined, and
  such a class is listed in `absent_classes`.
- f1 = 2 TP / (support + predicted), the harmonic mean of the two above; None for a class with
  neither support nor predictions, 0.0 for a class with predictions but no support.
- `balanced_accuracy` = `macro_recall` = mean recall over the classes with support > 0
  (sklearn's `balanced_accuracy_score`).
- `macro_precision` and `macro_f1` average over the classes with support > 0 OR predictions > 0,
  i.e. sklearn's default label set for `average="macro"` (the union of true and predicted labels).
  Predicting a class that is absent from the split therefore costs macro F1, as it should.
- `weighted_f1` weights each class's F1 by its support (absent classes weigh nothing).
- `top_<k>_accuracy` for each k in `top_k` with 1 < k < C (top-1 is `accuracy`): the label is among
  the k most probable classes, ties broken towards the lower class index, as for the argmax.
- `expected_calibration_error`: the standard ECE over `ece_bins` equal-width bins of the top
  probability, bins (lo, hi]: sum over bins of (bin size / N) * |accuracy - mean confidence|.
- `negative_log_likelihood`: mean of -log p(label), p floored at 1e-12.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from bmcc.atomic import atomic_write
from bmcc.data import classes

_NLL_FLOOR = 1e-12
_DPI = 100


def _apply_mask(mask: np.ndarray | None, n: int, *arrays: np.ndarray) -> list[np.ndarray]:
  """Returns `arrays` restricted to the examples where `mask` is true (all of them if None)."""
  if mask is None:
    return list(arrays)
  mask = np.asarray(mask)
  if mask.shape != (n,):
    raise ValueError(f"mask has shape {mask.shape}, expected ({n},) to match the labels.")
  keep = mask.astype(bool)
  return [a[keep] for a in arrays]


def _check_classes(name: str, values: np.ndarray, num_classes: int) -> np.ndarray:
  """Returns integer class ids as int64, or raises ValueError if any is outside [0, C)."""
  if values.size and not np.issubdtype(values.dtype, np.integer):
    raise ValueError(f"{name} must be integer class ids, got dtype {values.dtype}.")
  values = values.astype(np.int64)
  bad = values[(values < 0) | (values >= num_classes)]
  if bad.size:
    raise ValueError(
        f"{name} hold class id(s) {sorted(set(bad.tolist()))[:10]} outside [0, {num_classes})."
    )
  return values


def confusion_matrix(
    labels: np.ndarray,
    predictions: np.ndarray,
    num_classes: int,
    mask: np.ndarray | None = None,
) -> np.ndarray:
  """Counts examples by (true class, predicted class).

  Args:
    labels: int [N] true class ids.
    predictions: int [N] predicted class ids.
    num_classes: C, the size of the matrix.
    mask: optional bool or 0/1 [N]; examples where it is false (padding) are not counted.

  Returns:
    int64 [C, C], rows indexed by the true class and columns by the predicted class.
  """
  labels = np.asarray(labels).reshape(-1)
  predictions = np.asarray(predictions).reshape(-1)
  if labels.shape != predictions.shape:
    raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in size.")
  labels, predictions = _apply_mask(mask, labels.size, labels, predictions)
  labels = _check_classes("labels", labels, num_classes)
  predictions = _check_classes("predictions", predictions, num_classes)
  flat = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
  return flat.reshape(num_classes, num_classes).astype(np.int64)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """Elementwise num / den as float64, 0.0 where den == 0."""
  num = np.asarray(num, np.float64)
  den = np.asarray(den, np.float64)
  out = np.zeros(np.broadcast_shapes(num.shape, den.shape))
  np.divide(num, den, out=out, where=den > 0)
  return out


def _calibration(confidence: np.ndarray, correct: np.ndarray, num_bins: int) -> dict[str, Any]:
  """Equal-width reliability bins (lo, hi] over [0, 1] and the expected calibration error."""
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  bins = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, num_bins - 1)
  counts = np.bincount(bins, minlength=num_bins)
  mean_conf = _safe_div(np.bincount(bins, confidence, minlength=num_bins), counts)
  accuracy = _safe_div(np.bincount(bins, correct, minlength=num_bins), counts)
  ece = float(np.sum(counts / confidence.size * np.abs(accuracy - mean_conf)))
  return {
      "ece": ece,
      "num_bins": num_bins,
      "counts": counts.tolist(),
      "confidence": [float(v) if k else None for v, k in zip(mean_conf, counts, strict=True)],
      "accuracy": [float(v) if k else None for v, k in zip(accuracy, counts, strict=True)],
  }


def _codes_and_names(class_codes: Sequence[str], class_names: Sequence[str] | None
                     ) -> tuple[list[str], list[str]]:
  """The class codes as strings and their names (by default from `bmcc.data.classes.NAMES`)."""
  codes = [str(c) for c in class_codes]
  names = list(class_names) if class_names is not None else [
      classes.NAMES.get(c, c) for c in codes
  ]
  if len(names) != len(codes):
    raise ValueError(f"Got {len(names)} class names for {len(codes)} class codes.")
  return codes, names


def confusion_report(counts: np.ndarray, class_codes: Sequence[str], *,
                     class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """The part of `classification_report` that a confusion matrix determines.

  Args:
    counts: int [C, C] confusion matrix, rows the true class, columns the predicted class (e.g.
      several splits' matrices summed, to pool their predictions).
    class_codes: the C class codes in label order.
    class_names: the C class names; by default looked up in `bmcc.data.classes.NAMES`.

  Returns:
    A JSON-serialisable dict: `num_examples`, `num_classes`, `accuracy`, `balanced_accuracy`,
    `macro_precision`, `macro_recall`, `macro_f1`, `weighted_f1`, `absent_classes`, `per_class`
    and `confusion_matrix`, with the conventions of the module docstring.
  """
  codes, names = _codes_and_names(class_codes, class_names)
  num_classes = len(codes)
  cm = np.asarray(counts)
  if cm.shape != (num_classes, num_classes) or (cm.size and (cm < 0).any()):
    raise ValueError(f"counts must be a non-negative [{num_classes}, {num_classes}] matrix, got "
                     f"shape {cm.shape}.")
  cm = cm.astype(np.int64)
  n = int(cm.sum())
  if n == 0:
    raise ValueError("No examples to evaluate (the confusion matrix is all zeros).")
  tp = np.diag(cm).astype(np.float64)
  support = cm.sum(axis=1)
  predicted = cm.sum(axis=0)
  precision = _safe_div(tp, predicted)
  recall = _safe_div(tp, support)
  f1 = _safe_div(2 * tp, support + predicted)
  present = support > 0
  seen = present | (predicted > 0)
  return {
      "num_examples": n,
      "num_classes": num_classes,
      "accuracy": float(tp.sum() / n),
      "balanced_accuracy": float(recall[present].mean()),
      "macro_precision": float(precision[seen].mean()),
      "macro_recall": float(recall[present].mean()),
      "macro_f1": float(f1[seen].mean()),
      "weighted_f1": float(np.sum(f1 * support) / n),
      "absent_classes": [c for c, p in zip(codes, present, strict=True) if not p],
      "per_class": {
          code: {
              "name": names[i],
              "precision": float(precision[i]),
              "recall": float(recall[i]) if present[i] else None,
              "f1": float(f1[i]) if seen[i] else None,
              "support": int(support[i]),
              "predicted": int(predicted[i]),
          }
          for i, code in enumerate(codes)
      },
      "confusion_matrix": {
          "class_order": codes,
          "counts": cm.tolist(),
          "row_normalized": _safe_div(cm, support[:, None]).tolist(),
      },
  }


def classification_report(
    labels: np.ndarray,
    probabilities: np.ndarray,
    class_codes: Sequence[str],
    *,
    mask: np.ndarray | None = None,
    top_k: Sequence[int] = (1, 3, 5),
    ece_bins: int = 15,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
  """Builds the evaluation report of one split (see the module docstring for the conventions).

  Args:
    labels: int [N] true class ids, in the order of `class_codes`.
    probabilities: float [N, C] softmax probabilities.
    class_codes: the C class codes in label order, e.g. `bmcc.data.classes.CODES`.
    mask: optional bool or 0/1 [N]; examples where it is false (batch padding) are ignored.
    top_k: the k of the `top_<k>_accuracy` entries; k == 1 and k >= C are skipped.
    ece_bins: the number of equal-width confidence bins of the expected calibration error.
    class_names: the C class names; by default looked up in `bmcc.data.classes.NAMES`.

  Returns:
    A JSON-serialisable dict: `num_examples`, `num_classes`, `accuracy`, `balanced_accuracy`,
    `macro_precision`, `macro_recall`, `macro_f1`, `weighted_f1`, `top_<k>_accuracy`,
    `expected_calibration_error`, `negative_log_likelihood`, `absent_classes` (codes with no
    support), `per_class` (code -> name, precision, recall, f1, support, predicted),
    `confusion_matrix` (class_order, counts, row_normalized) and `calibration` (reliability bins).
  """
  codes, names = _codes_and_names(class_codes, class_names)
  num_classes = len(codes)
  labels = np.asarray(labels).reshape(-1)
  probs = np.asarray(probabilities)
  if probs.shape != (labels.size, num_classes):
    raise ValueError(
        f"probabilities have shape {probs.shape}, expected ({labels.size}, {num_classes}) "
        f"for {labels.size} labels and {num_classes} class codes."
    )
  labels, probs = _apply_mask(mask, labels.size, labels, probs)
  labels = _check_classes("labels", labels, num_classes)
  probs = probs.astype(np.float64)
  n = labels.size
  if n == 0:
    raise ValueError("No examples to evaluate (the split is empty or fully masked).")

  predictions = np.argmax(probs, axis=1)
  cm = confusion_matrix(labels, predictions, num_classes)

  # Rank of the true class in a descending sort, ties to the lower index (consistent with argmax).
  p_label = probs[np.arange(n), labels]
  rank = (probs > p_label[:, None]).sum(axis=1) + (
      (probs == p_label[:, None]) & (np.arange(num_classes) < labels[:, None])
  ).sum(axis=1)

  confidence = probs.max(axis=1)
  calibration = _calibration(confidence, (predictions == labels).astype(np.float64), ece_bins)

  report = confusion_report(cm, codes, class_names=names)
  by_class = {key: report.pop(key) for key in ("absent_classes", "per_class", "confusion_matrix")}
  for k in top_k:
    if 1 < k < num_classes:
      report[f"top_{k}_accuracy"] = float(np.mean(rank < k))
  report["expected_calibration_error"] = calibration.pop("ece")
  report["negative_log_likelihood"] = float(-np.mean(np.log(np.maximum(p_label, _NLL_FLOOR))))
  report.update(by_class)  # after the scalars, as before
  report["calibration"] = calibration
  return report


def _fmt(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.4f}"


def format_per_class_table(report: dict[str, Any]) -> str:
  """Renders the report as Markdown: a summary list, then one table row per class."""
  lines = [f"- examples: {report['num_examples']}"]
  for key, label in (
      ("accuracy", "accuracy"),
      ("balanced_accuracy", "balanced accuracy"),
      ("macro_f1", "macro F1"),
      ("weighted_f1", "weighted F1"),
  ):
    lines.append(f"- {label}: {_fmt(report[key])}")
  for key, value in report.items():
    if key.startswith("top_") and key.endswith("_accuracy"):
      lines.append(f"- top-{key[4:-9]} accuracy: {_fmt(value)}")
  lines.append(f"- expected calibration error: {_fmt(report['expected_calibration_error'])}")
  lines.append(f"- negative log-likelihood: {_fmt(report['negative_log_likelihood'])}")
  if report["absent_classes"]:
    lines.append(f"- absent from this split: {', '.join(report['absent_classes'])}")
  lines += [
      "",
      "| code | name | support | precision | recall | f1 |",
      "|---|---|---:|---:|---:|---:|",
  ]
  for code, row in report["per_class"].items():
    lines.append(
        f"| {code} | {row['name']} | {row['support']} | {_fmt(row['precision'])} "
        f"| {_fmt(row['recall'])} | {_fmt(row['f1'])} |"
    )
  return "\n".join(lines) + "\n"


def _confusion_figure(report: dict[str, Any], normalize: bool, title: str | None) -> Any:
  """The confusion-matrix figure, drawn on a non-interactive Agg canvas (no pyplot state)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  cm_info = report["confusion_matrix"]
  codes = cm_info["class_order"]
  values = np.asarray(cm_info["row_normalized" if normalize else "counts"], np.float64)
  num_classes = len(codes)
  side = 3.0 + 0.42 * num_classes
  fig = Figure(figsize=(side, side - 0.8), dpi=_DPI)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  vmax = 1.0 if normalize else max(float(values.max()), 1.0)
  image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  fontsize = 8 if num_classes > 12 else 10
  for (i, j), v in np.ndenumerate(values):
    if v > 0:
      text = f"{v:.2f}" if normalize else f"{int(v)}"
      color = "white" if v > 0.5 * vmax else "black"
      ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color=color)
  row_labels = [f"{c} ({report['per_class'][c]['support']})" for c in codes]
  ax.set_xticks(range(num_classes), codes, rotation=90, fontsize=fontsize + 1)
  ax.set_yticks(range(num_classes), row_labels, fontsize=fontsize + 1)
  ax.set_xlabel("Predicted class")
  ax.set_ylabel("True class (support)")
  if title is None:
    kind = "row-normalised" if normalize else "counts"
    title = (
        f"Confusion matrix ({kind}): n={report['num_examples']}, "
        f"accuracy {report['accuracy']:.3f}, balanced {report['balanced_accuracy']:.3f}"
    )
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  return fig


def confusion_matrix_image(report: dict[str, Any], *, normalize: bool = True) -> np.ndarray:
  """The confusion-matrix figure of `write_report` as RGB uint8 [H, W, 3], for TensorBoard."""
  fig = _confusion_figure(report, normalize, None)
  fig.canvas.draw()
  return np.array(fig.canvas.buffer_rgba(), dtype=np.uint8)[..., :3]


def write_report(report: dict[str, Any], workdir: str | os.PathLike, split: str) -> dict[str, str]:
  """Writes eval_<split>.json, eval_<split>_per_class.md and eval_<split>_confusion.png.

  Each file is written atomically. `workdir` is created if needed.

  Returns:
    The written paths, keyed "json", "per_class" and "confusion".
  """
  if not split or "/" in split or os.sep in split:
    raise ValueError(f"Split name {split!r} must be a non-empty name without path separators.")
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  paths = {
      "json": os.path.join(workdir, f"eval_{split}.json"),
      "per_class": os.path.join(workdir, f"eval_{split}_per_class.md"),
      "confusion": os.path.join(workdir, f"eval_{split}_confusion.png"),
  }
  text = json.dumps(report, indent=2, allow_nan=False) + "\n"
  atomic_write(paths["json"], text)
  atomic_write(paths["per_class"], format_per_class_table(report))
  figure = _confusion_figure(report, True, None)
  atomic_write(paths["confusion"], lambda f: figure.savefig(f, format="png"))
  return paths


def summary_scalars(report: dict[str, Any]) -> dict[str, float]:
  """The report's headline numbers as a flat dict for TensorBoard scalars."""
  scalars = {
      key: float(report[key])
      for key in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1")
  }
  for key, value in report.items():
    if key.startswith("top_") and key.endswith("_accuracy"):
      scalars[key] = float(value)
  scalars["ece"] = float(report["expected_calibration_error"])
  scalars["nll"] = float(report["negative_log_likelihood"])
  return scalars


def sample_grid(images: np.ndarray, labels: Sequence[int], predictions: Sequence[int],
                class_codes: Sequence[str], *, columns: int = 4, scale: int = 2) -> np.ndarray:
  """A grid of uint8 images [N, H, W, 3], each captioned 'true -> predicted' (red if wrong).

  For TensorBoard: returns one RGB uint8 array [H', W', 3].
  """
  from PIL import Image, ImageDraw  # noqa: PLC0415

  n, h, w = len(images), images.shape[1] * scale, images.shape[2] * scale
  rows = -(-n // columns)
  caption = 14
  grid = Image.new("RGB", (columns * w, rows * (h + caption)), "white")
  draw = ImageDraw.Draw(grid)
  for i in range(n):
    x, y = (i % columns) * w, (i // columns) * (h + caption)
    tile = Image.fromarray(np.asarray(images[i], np.uint8)).resize((w, h), Image.Resampling.NEAREST)
    grid.paste(tile, (x, y + caption))
    true, pred = class_codes[int(labels[i])], class_codes[int(predictions[i])]
    colour = (0, 110, 0) if true == pred else (200, 0, 0)
    draw.text((x + 2, y + 1), f"{true} -> {pred}", fill=colour)
  return np.asarray(grid)
