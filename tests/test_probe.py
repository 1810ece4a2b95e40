"""Tests of bmcc.probe: DinoBloom's sklearn kNN (Euclidean, uniform) and DINOv2's weighted kNN
against hand-computed probabilities, all probes on well-separated synthetic clusters (perfect
reports), class columns when the training split lacks classes, DinoBloom's regularisation
constant, one fit per probe whatever the number of evaluated splits, the probe blocks, DINOv2's
sweep of C, and the features_<split>.npz files."""

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
  probs = probe.weighted_knn_probe(train, test, num_classes=3, k=2, temperature=1.0)
  # Query [2, 0]: cosine 1 with class 0, 1/sqrt(2) with [1, 1] (class 1); [0, 1] is not among k=2.
  w0, w1 = math.exp(1.0), math.exp(1 / math.sqrt(2))
  np.testing.assert_allclose(probs[0], [w0 / (w0 + w1), w1 / (w0 + w1), 0.0], rtol=1e-12)
  # Query [0, 3]: both neighbours ([0, 1] and [1, 1]) are class 1.
  np.testing.assert_allclose(probs[1], [0.0, 1.0, 0.0], rtol=1e-12)
  # Cosine similarity: rescaling the features changes nothing.
  scaled = _features(10 * train.embeddings, train.labels)
  np.testing.assert_allclose(probe.weighted_knn_probe(scaled, test, 3, k=2, temperature=1.0), probs,
                             rtol=1e-12)


def test_knn_temperature_and_k_larger_than_bank():
  train = _features([[1, 0], [0.6, 0.8]], [0, 1])
  test = _features([[1, 0]], [0])
  probs = probe.weighted_knn_probe(train, test, num_classes=2, k=20)  # k clipped to the 2 examples
  w0, w1 = math.exp(1 / 0.07), math.exp(0.6 / 0.07)  # default temperature 0.07
  # (0.6 and 0.8 are rounded to float32 in the features: 1e-6 relative.)
  np.testing.assert_allclose(probs[0], [w0 / (w0 + w1), w1 / (w0 + w1)], rtol=1e-6)


@pytest.mark.parametrize("probe_fn", [probe.knn_probe, probe.weighted_knn_probe,
                                      probe.linear_probe])
def test_separated_clusters_give_perfect_reports(probe_fn):
  train, test = _clusters(30), _clusters(10, seed=1)
  probs = probe_fn(train, test, len(CODES))
  assert probs.shape == (50, 5)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-9)
  report = metrics.classification_report(test.labels, probs, CODES)
  assert report["accuracy"] == 1.0 and report["balanced_accuracy"] == 1.0
  assert report["macro_f1"] == 1.0


@pytest.mark.parametrize("probe_fn", [probe.knn_probe, probe.weighted_knn_probe,
                                      probe.linear_probe])
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


def test_sklearn_knn_is_euclidean_with_uniform_votes():
  # Query [1, 0]: Euclidean distances 0.1 to [0.9, 0] (class 0), 1.005 to [2, 0.1] (class 1),
  # 3.61 to [3, 3] (class 1), 4.005 to [5, 0.2] (class 2). By cosine, [5, 0.2] (0.9992) would
  # come before [3, 3] (0.707).
  train = _features([[0.9, 0.0], [2.0, 0.1], [5.0, 0.2], [3.0, 3.0]], [0, 1, 2, 1])
  test = _features([[1.0, 0.0]], [0])
  np.testing.assert_array_equal(probe.knn_probe(train, test, 3, k=1), [[1.0, 0.0, 0.0]])
  np.testing.assert_array_equal(probe.knn_probe(train, test, 3, k=2), [[0.5, 0.5, 0.0]])
  np.testing.assert_array_equal(probe.knn_probe(train, test, 3, k=3), [[1 / 3, 2 / 3, 0.0]])
  # Raw features: scaling [3, 3] by 10 moves it behind [5, 0.2] (normalised ones would not move).
  far = _features([[0.9, 0.0], [2.0, 0.1], [5.0, 0.2], [30.0, 30.0]], [0, 1, 2, 1])
  np.testing.assert_array_equal(probe.knn_probe(far, test, 3, k=3), [[1 / 3, 1 / 3, 1 / 3]])


def _write_splits(path, sizes=(("train", 0, 30), ("validation", 1, 6), ("test", 2, 8))):
  for split, seed, n in sizes:
    features = _clusters(n, seed=seed)
    np.savez(path / f"features_{split}.npz", embeddings=features.embeddings,
             labels=features.labels.astype(np.int32), file_names=features.file_names)


def test_evaluate_probes_fits_each_probe_once_on_train_and_validation(tmp_path, monkeypatch):
  _write_splits(tmp_path)
  fits = []
  for cls in (probe.LogisticRegression, probe.KNeighborsClassifier):
    original = cls.fit
    monkeypatch.setattr(cls, "fit", lambda self, x, y, _f=original: fits.append(
        (type(self).__name__, len(y))) or _f(self, x, y))
  reports = probe.evaluate_probes(tmp_path, CODES)
  # One fit per probe on the 150 + 30 non-test examples, whatever the number of splits reported.
  assert sorted(fits) == [("KNeighborsClassifier", 180)] * 2 + [("LogisticRegression", 180)]
  assert set(reports) == {"linear", "knn1", "knn20", "weighted_knn20"}
  for name, by_split in reports.items():
    assert set(by_split) == {"validation", "test"}
    assert by_split["test"]["accuracy"] == 1.0 and by_split["test"]["num_examples"] == 40
    for split, report in by_split.items():
      block = report["probe"]
      assert block["fit_on"] == ["train", "validation"] and block["n_fit"] == 180
      assert block["in_fit"] == (split == "validation")
      assert block["kind"] == ("linear" if name == "linear" else "knn")
  assert reports["knn1"]["test"]["probe"]["settings"] == {
      "k": 1, "metric": "euclidean", "weights": "uniform", "dtype": "float64"}
  assert reports["weighted_knn20"]["test"]["probe"]["settings"]["metric"] == "cosine"
  linear = reports["linear"]["test"]["probe"]["settings"]
  assert linear["C"] == pytest.approx(16 * 5 / 100) and linear["max_iter"] == 1000
  assert linear["converged"] and 0 < linear["n_iter"] < 1000
  # fit_on=("train",): the validation report is out of sample.
  only_train = probe.evaluate_probes(tmp_path, CODES, settings=probe.ProbeSettings(
      fit_on=("train",), knn_k=(20,), weighted_knn_k=()))
  assert set(only_train) == {"linear", "knn20"}
  assert only_train["knn20"]["validation"]["probe"]["n_fit"] == 150
  assert not only_train["knn20"]["validation"]["probe"]["in_fit"]


def test_linear_probe_records_iterations_and_non_convergence():
  train, test = _clusters(20, seed=3), _clusters(2, seed=4)
  fitted = probe.fit_probes({"train": train, "test": test}, 5, probe.ProbeSettings(
      fit_on=("train",), max_iter=1, knn_k=(), weighted_knn_k=()))
  settings = fitted[0].block["settings"]
  assert (settings["n_iter"], settings["converged"], settings["max_iter"]) == (1, False, 1)


def test_c_sweep_chooses_on_validation_then_refits_on_train_and_validation():
  from sklearn.linear_model import LogisticRegression

  rng = np.random.default_rng(5)
  def noisy(n, seed):  # overlapping classes: C matters
    f = _clusters(n, seed=seed)
    return probe.Features(f.embeddings + 8 * rng.normal(size=f.embeddings.shape).astype(
        np.float32), f.labels, f.file_names)
  train, validation, test = noisy(8, 0), noisy(8, 1), noisy(8, 2)
  settings = probe.ProbeSettings(c="sweep", c_sweep=(-3.0, 1.0, 3), knn_k=(), weighted_knn_k=())
  linear = probe.fit_probes({"train": train, "validation": validation, "test": test}, 5,
                            settings)[0]
  sweep = linear.block["settings"]["C_sweep"]
  grid = [1e-3, 0.1, 10.0]
  np.testing.assert_allclose(sweep["grid"], grid, rtol=1e-12)
  scores = []
  for c in grid:  # balanced accuracy on validation of sklearn fitted on train alone
    predicted = LogisticRegression(C=c, max_iter=1000).fit(
        train.embeddings.astype(np.float64), train.labels).predict(validation.embeddings)
    scores.append(np.mean([np.mean(predicted[validation.labels == k] == k) for k in range(5)]))
  np.testing.assert_allclose(sweep["validation_balanced_accuracy"], scores, rtol=1e-12)
  assert len(set(scores)) > 1 and sweep["chosen"] == grid[int(np.argmax(scores))]
  assert linear.block["settings"]["C"] == sweep["chosen"]
  # The final fit: the chosen C on train + validation.
  both = probe.concatenate([train, validation])
  final = LogisticRegression(C=sweep["chosen"], max_iter=1000).fit(
      both.embeddings.astype(np.float64), both.labels)
  np.testing.assert_allclose(linear.predict(test.embeddings),
                             final.predict_proba(test.embeddings.astype(np.float64)), rtol=1e-12)
  assert linear.block["n_fit"] == 80


def test_feature_files(tmp_path):
  _write_splits(tmp_path)
  loaded = probe.load_features(tmp_path / "features_validation.npz")
  assert loaded.embeddings.dtype == np.float32 and loaded.labels.dtype == np.int64
  assert loaded.file_names[3] == "img_3.jpg"


def test_bad_feature_files(tmp_path):
  np.savez(tmp_path / "features_x.npz", embeddings=np.zeros((3, 4), np.float32),
           labels=np.zeros(3, np.int64))
  with pytest.raises(ValueError, match=r"missing arrays \['file_names'\]"):
    probe.load_features(tmp_path / "features_x.npz")
  np.savez(tmp_path / "features_y.npz", embeddings=np.zeros((3, 4), np.float32),
           labels=np.zeros(2, np.int64), file_names=np.array(["a", "b", "c"]))
  with pytest.raises(ValueError, match="same N examples"):
    probe.load_features(tmp_path / "features_y.npz")
