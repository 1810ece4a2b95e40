"""Tests of bmcc.metrics: hand-computed reports, sklearn cross-checks, the written files."""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from bmcc import metrics
from bmcc.data import classes

# The hand-worked example: 6 classes, 10 real examples and 2 padded ones.
CODES = ("BLA", "EBO", "LYT", "NGS", "PLM", "PMO")
LABELS = [0, 0, 0, 1, 1, 2, 2, 2, 3, 2]
PREDICTIONS = [0, 0, 1, 1, 2, 2, 2, 4, 2, 2]
# Rank (1 = most probable) of the true label in each row's probabilities.
LABEL_RANKS = [1, 1, 2, 1, 4, 1, 1, 3, 6, 1]
RANKED_PROBS = (0.45, 0.2, 0.15, 0.1, 0.06, 0.04)
# Padding rows: label NGS predicted NGS. Counting them would make NGS predicted and change all.
PAD_LABEL, PAD_PREDICTION = 3, 3

# Confusion matrix by hand (rows true, columns predicted):
#        BLA EBO LYT NGS PLM PMO | support
#   BLA    2   1   0   0   0   0 | 3
#   EBO    0   1   1   0   0   0 | 2
#   LYT    0   0   3   0   1   0 | 4
#   NGS    0   0   1   0   0   0 | 1   <- never predicted: precision 0
#   PLM    0   0   0   0   0   0 | 0   <- absent, but predicted once
#   PMO    0   0   0   0   0   0 | 0   <- absent and never predicted
#   predicted: 2 2 5 0 1 0; TP: 2 1 3 0 0 0; accuracy 6/10.
EXPECTED_CM = [
    [2, 1, 0, 0, 0, 0],
    [0, 1, 1, 0, 0, 0],
    [0, 0, 3, 0, 1, 0],
    [0, 0, 1, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],
]
# precision = TP/predicted: BLA 2/2, EBO 1/2, LYT 3/5, NGS 0 (none predicted), PLM 0/1, PMO 0.
# recall = TP/support:      BLA 2/3, EBO 1/2, LYT 3/4, NGS 0/1, PLM None, PMO None (absent).
# f1 = 2TP/(support+pred):  BLA 4/5, EBO 2/4, LYT 6/9, NGS 0/1, PLM 0/1, PMO None (neither).
EXPECTED_PER_CLASS = {
    "BLA": (1.0, 2 / 3, 4 / 5, 3, 2),
    "EBO": (1 / 2, 1 / 2, 1 / 2, 2, 2),
    "LYT": (3 / 5, 3 / 4, 2 / 3, 4, 5),
    "NGS": (0.0, 0.0, 0.0, 1, 0),
    "PLM": (0.0, None, 0.0, 0, 1),
    "PMO": (0.0, None, None, 0, 0),
}
# balanced accuracy = mean recall over BLA, EBO, LYT, NGS = (2/3 + 1/2 + 3/4 + 0) / 4 = 23/48.
# macro precision over the 5 classes with support or predictions: (1 + 1/2 + 3/5 + 0 + 0)/5 = 21/50.
# macro F1 over the same 5 = (4/5 + 1/2 + 2/3 + 0 + 0) / 5 = (59/30) / 5 = 59/150.
# weighted F1 = (3 * 4/5 + 2 * 1/2 + 4 * 2/3 + 1 * 0) / 10 = (91/15) / 10 = 91/150.
# top-3: ranks <= 3 in 8 of 10 rows; top-5: ranks <= 5 in 9 of 10 rows.
# ECE: every confidence is 0.45 (one bin), accuracy 0.6 -> |0.6 - 0.45| = 0.15.


def _probabilities(labels, predictions, label_ranks):
  """Rows with RANKED_PROBS in an order that puts the prediction first and the label at its rank."""
  rows = []
  for label, pred, rank in zip(labels, predictions, label_ranks, strict=True):
    assert (rank == 1) == (label == pred)
    order = [pred] + [c for c in range(len(CODES)) if c not in (pred, label)]
    if label != pred:
      order.insert(rank - 1, label)
    row = np.zeros(len(CODES))
    row[order] = RANKED_PROBS
    rows.append(row)
  return np.stack(rows)


def _hand_example(padded: bool):
  labels, predictions, ranks = LABELS, PREDICTIONS, LABEL_RANKS
  mask = None
  if padded:
    labels = labels[:4] + [PAD_LABEL] + labels[4:] + [PAD_LABEL]
    predictions = predictions[:4] + [PAD_PREDICTION] + predictions[4:] + [PAD_PREDICTION]
    ranks = ranks[:4] + [1] + ranks[4:] + [1]
    mask = np.ones(len(labels), np.int32)  # 0/1, not bool: both are accepted.
    mask[[4, len(labels) - 1]] = 0
  probs = _probabilities(labels, predictions, ranks)
  return np.array(labels), probs, mask


def test_confusion_matrix_by_hand_with_mask():
  labels, probs, mask = _hand_example(padded=True)
  cm = metrics.confusion_matrix(labels, probs.argmax(1), len(CODES), mask=mask)
  assert cm.dtype == np.int64
  np.testing.assert_array_equal(cm, EXPECTED_CM)
  unmasked = metrics.confusion_matrix(labels, probs.argmax(1), len(CODES))
  assert unmasked[3, 3] == 2


def test_confusion_matrix_rejects_out_of_range_and_ignores_masked_garbage():
  with pytest.raises(ValueError, match="outside"):
    metrics.confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
  # Padding may carry any label (e.g. -1): masked examples are never checked nor counted.
  cm = metrics.confusion_matrix(np.array([0, -1]), np.array([1, 0]), 2, mask=np.array([1, 0]))
  np.testing.assert_array_equal(cm, [[0, 1], [0, 0]])


@pytest.mark.parametrize("padded", [False, True])
def test_report_by_hand(padded):
  labels, probs, mask = _hand_example(padded)
  report = metrics.classification_report(labels, probs, CODES, mask=mask)
  assert report["num_examples"] == 10
  assert report["num_classes"] == 6
  assert report["accuracy"] == pytest.approx(6 / 10)
  assert report["balanced_accuracy"] == pytest.approx(23 / 48)
  assert report["macro_recall"] == pytest.approx(23 / 48)
  assert report["macro_precision"] == pytest.approx(21 / 50)
  assert report["macro_f1"] == pytest.approx(59 / 150)
  assert report["weighted_f1"] == pytest.approx(91 / 150)
  assert report["top_3_accuracy"] == pytest.approx(8 / 10)
  assert report["top_5_accuracy"] == pytest.approx(9 / 10)
  assert "top_1_accuracy" not in report  # That is `accuracy`.
  assert report["expected_calibration_error"] == pytest.approx(0.15)
  expected_nll = -(
      6 * math.log(0.45) + math.log(0.2) + math.log(0.1) + math.log(0.15) + math.log(0.04)
  ) / 10
  assert report["negative_log_likelihood"] == pytest.approx(expected_nll)
  assert report["absent_classes"] == ["PLM", "PMO"]
  assert list(report["per_class"]) == list(CODES)
  for code, (precision, recall, f1, support, predicted) in EXPECTED_PER_CLASS.items():
    row = report["per_class"][code]
    assert row["name"] == classes.NAMES[code]
    assert row["precision"] == pytest.approx(precision), code
    assert row["recall"] == (None if recall is None else pytest.approx(recall)), code
    assert row["f1"] == (None if f1 is None else pytest.approx(f1)), code
    assert (row["support"], row["predicted"]) == (support, predicted), code
  cm = report["confusion_matrix"]
  assert cm["class_order"] == list(CODES)
  assert cm["counts"] == EXPECTED_CM
  expected_rows = [[v / sum(r) if sum(r) else 0.0 for v in r] for r in EXPECTED_CM]
  np.testing.assert_allclose(cm["row_normalized"], expected_rows)
  assert cm["row_normalized"][4] == [0.0] * 6


def test_report_matches_sklearn_on_padded_hand_example():
  labels, probs, mask = _hand_example(padded=True)
  report = metrics.classification_report(labels, probs, CODES, mask=mask)
  keep = mask.astype(bool)
  y, p = labels[keep], probs[keep].argmax(1)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # sklearn warns about PLM being predicted but absent.
    assert report["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p))
  assert report["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro"))
  assert report["macro_precision"] == pytest.approx(
      skm.precision_score(y, p, average="macro", zero_division=0)
  )


def test_ece_by_hand():
  # All confidences 0.8, half of them correct: ECE = |0.5 - 0.8| = 0.3.
  probs = np.tile([0.8, 0.2], (10, 1))
  labels = np.array([0] * 5 + [1] * 5)
  report = metrics.classification_report(labels, probs, ("BLA", "EBO"))
  assert report["expected_calibration_error"] == pytest.approx(0.3)
  # Two bins: 4 at 0.9 with 3 correct (|0.75 - 0.9| = 0.15), 6 at 0.6 with 3 correct
  # (|0.5 - 0.6| = 0.1): ECE = 0.4 * 0.15 + 0.6 * 0.1 = 0.12.
  probs = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 6)
  labels = np.array([0, 0, 0, 1] + [0, 0, 0, 1, 1, 1])
  report = metrics.classification_report(labels, probs, ("BLA", "EBO"), ece_bins=10)
  assert report["expected_calibration_error"] == pytest.approx(0.12)
  cal = report["calibration"]
  assert sum(cal["counts"]) == 10
  assert cal["counts"][8] == 4 and cal["counts"][5] == 6  # bins (0.8, 0.9] and (0.5, 0.6].
  assert cal["accuracy"][8] == pytest.approx(0.75) and cal["accuracy"][0] is None


def _random_example(seed=0, n=600):
  """21 classes, imbalanced, ABE and FGC absent from the labels, a noisy but informative model."""
  rng = np.random.default_rng(seed)
  num_classes = classes.NUM_CLASSES
  weights = rng.uniform(0.1, 1.0, num_classes) ** 3
  weights[[0, 6]] = 0
  present = np.flatnonzero(weights)  # Each at least once, the rest drawn with skewed weights.
  drawn = rng.choice(num_classes, n - present.size, p=weights / weights.sum())
  labels = np.concatenate([present, drawn])
  logits = rng.normal(size=(n, num_classes)) * 1.5
  logits[np.arange(n), labels] += 2.0
  probs = np.exp(logits - logits.max(1, keepdims=True))
  return labels, probs / probs.sum(1, keepdims=True)


def test_report_matches_sklearn_on_random_21_classes():
  labels, probs = _random_example()
  report = metrics.classification_report(labels, probs, classes.CODES)
  predictions = probs.argmax(1)
  all_labels = list(range(classes.NUM_CLASSES))
  seen = sorted(set(labels) | set(predictions))
  assert report["absent_classes"] == ["ABE", "FGC"]
  assert report["accuracy"] == pytest.approx(skm.accuracy_score(labels, predictions))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    balanced = skm.balanced_accuracy_score(labels, predictions)
  assert report["balanced_accuracy"] == pytest.approx(balanced)
  assert report["macro_f1"] == pytest.approx(
      skm.f1_score(labels, predictions, labels=seen, average="macro", zero_division=0)
  )
  assert report["weighted_f1"] == pytest.approx(
      skm.f1_score(labels, predictions, labels=all_labels, average="weighted", zero_division=0)
  )
  for k in (3, 5):
    assert report[f"top_{k}_accuracy"] == pytest.approx(
        skm.top_k_accuracy_score(labels, probs, k=k, labels=all_labels)
    )
  assert report["negative_log_likelihood"] == pytest.approx(
      skm.log_loss(labels, probs, labels=all_labels)
  )
  np.testing.assert_array_equal(
      report["confusion_matrix"]["counts"],
      skm.confusion_matrix(labels, predictions, labels=all_labels),
  )
  precision, recall, f1, support = skm.precision_recall_fscore_support(
      labels, predictions, labels=all_labels, zero_division=0
  )
  for i, code in enumerate(classes.CODES):
    row = report["per_class"][code]
    assert row["precision"] == pytest.approx(precision[i])
    assert row["support"] == support[i]
    if support[i]:
      assert row["recall"] == pytest.approx(recall[i])
      assert row["f1"] == pytest.approx(f1[i])
    else:
      assert row["recall"] is None


def test_report_validates_inputs():
  with pytest.raises(ValueError, match="shape"):
    metrics.classification_report(np.array([0, 1]), np.ones((2, 3)) / 3, ("BLA", "EBO"))
  with pytest.raises(ValueError, match="No examples"):
    metrics.classification_report(
        np.array([0]), np.array([[0.5, 0.5]]), ("BLA", "EBO"), mask=np.array([False])
    )
  with pytest.raises(ValueError, match="outside"):
    metrics.classification_report(np.array([2]), np.array([[0.5, 0.5]]), ("BLA", "EBO"))


def test_report_json_round_trip_and_summary():
  labels, probs = _random_example(seed=1, n=200)
  report = metrics.classification_report(labels, probs, classes.CODES)
  assert json.loads(json.dumps(report, allow_nan=False)) == report
  scalars = metrics.summary_scalars(report)
  assert set(scalars) == {
      "accuracy", "balanced_accuracy", "macro_f1", "weighted_f1",
      "top_3_accuracy", "top_5_accuracy", "ece", "nll",
  }
  assert all(type(v) is float for v in scalars.values())
  assert scalars["nll"] == report["negative_log_likelihood"]


def test_format_per_class_table():
  labels, probs, mask = _hand_example(padded=True)
  table = metrics.format_per_class_table(
      metrics.classification_report(labels, probs, CODES, mask=mask)
  )
  assert "- balanced accuracy: 0.4792" in table  # 23/48
  assert "- macro F1: 0.3933" in table  # 59/150
  assert "| code | name | support | precision | recall | f1 |" in table
  assert "| LYT | Lymphocyte | 4 | 0.6000 | 0.7500 | 0.6667 |" in table
  assert "| PMO | Promyelocyte | 0 | 0.0000 | n/a | n/a |" in table
  assert "absent from this split: PLM, PMO" in table


def test_write_report_and_image(tmp_path):
  import matplotlib.image

  labels, probs = _random_example(seed=2, n=300)
  report = metrics.classification_report(labels, probs, classes.CODES)
  workdir = tmp_path / "work"
  paths = metrics.write_report(report, workdir, "test")
  assert paths == {
      "json": str(workdir / "eval_test.json"),
      "per_class": str(workdir / "eval_test_per_class.md"),
      "confusion": str(workdir / "eval_test_confusion.png"),
  }
  assert sorted(os.listdir(workdir)) == sorted(os.path.basename(p) for p in paths.values())
  with open(paths["json"]) as f:
    assert json.load(f) == report
  with open(paths["per_class"]) as f:
    assert f.read() == metrics.format_per_class_table(report)
  with open(paths["confusion"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  png = matplotlib.image.imread(paths["confusion"])
  assert 600 <= png.shape[0] <= 2000 and 600 <= png.shape[1] <= 2000

  image = metrics.confusion_matrix_image(report, normalize=False)
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  assert image.shape[:2] == png.shape[:2]
  assert image.min() < 50 and image.max() == 255  # Dark text and cells on a white background.

  with pytest.raises(ValueError, match="Split name"):
    metrics.write_report(report, workdir, "a/b")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_reports_get_the_mode_of_the_users_umask(tmp_path, umask):
  """Like config.json (plain open): 0o666 less the umask, not tempfile.mkstemp's 0o600."""
  labels, probs = _random_example(seed=3, n=40)
  report = metrics.classification_report(labels, probs, classes.CODES)
  previous = os.umask(umask)
  try:
    paths = metrics.write_report(report, tmp_path, "validation")
    with open(tmp_path / "plain.txt", "w") as f:
      f.write("x")
  finally:
    os.umask(previous)
  expected = 0o666 & ~umask
  assert os.stat(tmp_path / "plain.txt").st_mode & 0o777 == expected
  for path in paths.values():
    assert os.stat(path).st_mode & 0o777 == expected, (path, oct(os.stat(path).st_mode))
