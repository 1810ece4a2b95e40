"""Tests of bmcc.probe: DINOv2's weighted kNN against hand-computed probabilities, both probes on
well-separated synthetic clusters (perfect reports), class columns when the training split lacks
classes, DinoBloom's regularisation constant and the features_<split>.npz files."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bmcc import metrics, probe

CODES = ["A", "B", "C", "D", "E"]


def _features(embeddings, labels) -> probe.Features:
  labels = np.asarray(labels, np.int64)
  return probe.Features(np.asarray(embeddings, np.float32), labels,
                        np.array([f"img_{i}.jpg" for i in range(labels.size)]))


def _clusters(n_per_class: int, classes=(0, 1, 2, 3, 4), seed: int = 0, dim: int = 16):
  """Tight clusters around random unit directions, one per class."""
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(99).normal(size=(max(classes) + 1, dim))
  labels = np.repeat(np.asarray(classes), n_per_class)
  embeddings = 5.0 * centres[labels] + 0.1 * rng.normal(size=(labels.size, dim))
  return _features(embeddings, labels)


def test_knn_probabilities_by_hand():
  train = _features([[1, 0], [0, 1], [1, 1]], [0, 1, 1])
  test = _features([[2, 0], [0, 3]], [0, 1])
  probs = probe.knn_probe(train, test, num_classes=3, k=2, temperature=1.0)
  # Query [2, 0]: cosine 1 with class 0, 1/sqrt(2) with [1, 1] (class 1); [0, 1] is not among k=2.
  w0, w1 = math.exp(1.0), math.exp(1 / math.sqrt(2))
  np.testing.assert_allclose(probs[0], [w0 / (w0 + w1), w1 / (w0 + w1), 0.0], rtol=1e-12)
  # Query [0, 3]: both neighbours ([0, 1] and [1, 1]) are class 1.
  np.testing.assert_allclose(probs[1], [0.0, 1.0, 0.0], rtol=1e-12)
  # Cosine similarity: rescaling the features changes nothing.
  scaled = _features(10 * train.embeddings, train.labels)
  np.testing.assert_allclose(probe.knn_probe(scaled, test, 3, k=2, temperature=1.0), probs,
                             rtol=1e-12)


def test_knn_temperature_and_k_larger_than_bank():
  train = _features([[1, 0], [0.6, 0.8]], [0, 1])
  test = _features([[1, 0]], [0])
  probs = probe.knn_probe(train, test, num_classes=2, k=20)  # k clipped to the 2 examples
  w0, w1 = math.exp(1 / 0.07), math.exp(0.6 / 0.07)  # default temperature 0.07
  # (0.6 and 0.8 are rounded to float32 in the features: 1e-6 relative.)
  np.testing.assert_allclose(probs[0], [w0 / (w0 + w1), w1 / (w0 + w1)], rtol=1e-6)


@pytest.mark.parametrize("probe_fn", [probe.knn_probe, probe.linear_probe])
def test_separated_clusters_give_perfect_reports(probe_fn):
  train, test = _clusters(30), _clusters(10, seed=1)
  probs = probe_fn(train, test, len(CODES))
  assert probs.shape == (50, 5)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-9)
  report = metrics.classification_report(test.labels, probs, CODES)
  assert report["accuracy"] == 1.0 and report["balanced_accuracy"] == 1.0
  assert report["macro_f1"] == 1.0


@pytest.mark.parametrize("probe_fn", [probe.knn_probe, probe.linear_probe])
def test_classes_missing_from_train_get_zero_probability(probe_fn):
  train = _clusters(20, classes=(0, 2, 4))
  test = _clusters(5, classes=(0, 2, 4), seed=1)
  probs = probe_fn(train, test, len(CODES))
  assert probs.shape == (15, 5)
  assert not probs[:, [1, 3]].any()
  # Columns are class ids, not positions among the training classes.
  np.testing.assert_array_equal(probs.argmax(axis=1), test.labels)


def test_linear_probe_regularisation():
  assert probe.probe_c(384, 21) == pytest.approx(80.64)
  train = _features([[0.0], [0.1], [1.0], [1.1]], [0, 0, 1, 1])
  test = _features([[0.55]], [0])
  # Strong regularisation pulls the probabilities towards 1/2; weak lets them separate.
  strong = probe.linear_probe(train, test, 2, c=1e-6)
  assert abs(strong[0, 0] - 0.5) < 1e-3
  weak = probe.linear_probe(train, _features([[1.05]], [1]), 2, c=1e6)
  assert weak[0, 1] > 0.99


def test_feature_files_and_evaluate_probes(tmp_path):
  for split, seed, n in (("train", 0, 30), ("val", 1, 6), ("test", 2, 8)):
    features = _clusters(n, seed=seed)
    np.savez(tmp_path / f"features_{split}.npz", embeddings=features.embeddings,
             labels=features.labels.astype(np.int32), file_names=features.file_names)
  loaded = probe.load_features(tmp_path / "features_val.npz")
  assert loaded.embeddings.dtype == np.float32 and loaded.labels.dtype == np.int64
  assert loaded.file_names[3] == "img_3.jpg"
  reports = probe.evaluate_probes(tmp_path, CODES)
  assert set(reports) == {"linear", "knn"}
  for name in ("linear", "knn"):
    assert reports[name]["val"]["num_examples"] == 30
    assert reports[name]["test"]["accuracy"] == 1.0


def test_bad_feature_files(tmp_path):
  np.savez(tmp_path / "features_x.npz", embeddings=np.zeros((3, 4), np.float32),
           labels=np.zeros(3, np.int64))
  with pytest.raises(ValueError, match=r"missing arrays \['file_names'\]"):
    probe.load_features(tmp_path / "features_x.npz")
  np.savez(tmp_path / "features_y.npz", embeddings=np.zeros((3, 4), np.float32),
           labels=np.zeros(2, np.int64), file_names=np.array(["a", "b", "c"]))
  with pytest.raises(ValueError, match="same N examples"):
    probe.load_features(tmp_path / "features_y.npz")
