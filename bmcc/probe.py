"""Probes of frozen backbone features: DinoBloom's logistic regression and kNN, DINOv2's kNN.

Works on the feature files of a split, `features_<split>.npz` with `embeddings` (float32 [N, D]),
`labels` (int [N], bmcc class ids) and `file_names` (str [N]). Every probe is fitted once, on the
features of the `fit_on` splits together, and gives class probabilities [N, num_classes] for any
split, so `bmcc.metrics.classification_report(labels, probs, codes)` gives the usual report:

- `linear`: scikit-learn `LogisticRegression` (L-BFGS, multinomial, `max_iter` 1000) on the raw
  features, with DinoBloom's regularisation C = D * K / 100 for D features
  and K fitted classes (L2 coefficient 100 / (D K)); or a given C; or C chosen by a sweep:
  fitted on "train" for each C of a log grid, the C with the best validation balanced accuracy
  refitted on `fit_on` (DINOv2's rule, `dinov2/eval/log_regression.py`).
- `knn<k>`: scikit-learn `KNeighborsClassifier(n_neighbors=k)` with its defaults, Euclidean
  distance and uniform votes on the raw features (DinoBloom uses k = 1 and k = 20).

Both sklearn probes get float64 copies of the float32 features: DinoBloom's evaluation reads its
stored features into float64 arrays, and sklearn >= 1.8 would otherwise fit the logistic
regression in float32.
- `weighted_knn<k>`: DINOv2's kNN (`dinov2/eval/knn.py`): cosine similarity of L2-normalised
  features, the k most similar fitted examples vote with weights softmax(similarity / 0.07).

Each report gets a `probe` block saying how it was made: `kind` ("linear" or "knn"), `settings`
(k, metric, weights; C, max_iter, n_iter, converged), `fit_on` (split names) and `n_fit`
(examples fitted). Classes absent from the fitted examples get probability 0.

Memory: features are float32, 171,374 x 1,536 (all images, ViT-G) is 1.05 GB; each sklearn
probe holds a float64 copy of the fitted examples (about 1.7 GB for the ~80% outside DinoBloom's
test list).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from bmcc import metrics

# DINOv2's sweep grid of C (`C_POWER_RANGE`): 45 powers of ten from 1e-6 to 1e5.
DINOV2_C_SWEEP = (-6.0, 5.0, 45)
DEFAULT_TEMPERATURE = 0.07  # DINOv2's kNN vote temperature


@dataclasses.dataclass(frozen=True)
class Features:
  """The backbone features of one split (or of several, concatenated)."""

  embeddings: np.ndarray  # float32 [N, D]
  labels: np.ndarray  # int64 [N]
  file_names: np.ndarray  # str [N]


@dataclasses.dataclass(frozen=True)
class FittedProbe:
  """A probe fitted once: its name, its report block and its probabilities for any features."""

  name: str  # "linear", "knn20", "weighted_knn20", ...
  block: dict[str, Any]  # the report's `probe` block
  predict: Callable[[np.ndarray], np.ndarray]  # embeddings [N, D] -> probabilities [N, C]


def load_features(path: str | os.PathLike) -> Features:
  """Reads a `features_<split>.npz` file, checking its keys and shapes."""
  with np.load(path, allow_pickle=False) as data:
    missing = {"embeddings", "labels", "file_names"} - set(data.files)
    if missing:
      raise ValueError(f"{path}: missing arrays {sorted(missing)} (has {sorted(data.files)}).")
    features = Features(np.asarray(data["embeddings"], np.float32),
                        np.asarray(data["labels"]).astype(np.int64),
                        np.asarray(data["file_names"]).astype(str))
  n = features.labels.shape[0]
  if features.embeddings.ndim != 2 or features.embeddings.shape[0] != n or (
      features.file_names.shape != (n,)) or features.labels.shape != (n,):
    raise ValueError(f"{path}: embeddings {features.embeddings.shape}, labels "
                     f"{features.labels.shape} and file_names {features.file_names.shape} do not "
                     "describe the same N examples.")
  return features


def concatenate(parts: Sequence[Features]) -> Features:
  """The examples of `parts`, in order, as one `Features`."""
  return Features(np.concatenate([p.embeddings for p in parts]),
                  np.concatenate([p.labels for p in parts]),
                  np.concatenate([p.file_names for p in parts]))


def probe_c(num_features: int, num_classes: int) -> float:
  """DinoBloom's inverse L2 strength of the linear probe: D * K / 100."""
  return num_features * num_classes / 100.0


def c_grid(sweep: Sequence[float] = DINOV2_C_SWEEP) -> np.ndarray:
  """The C values of a sweep (lowest power of ten, highest, number of points)."""
  low, high, points = sweep
  return 10.0 ** np.linspace(float(low), float(high), int(points))


def _columns(probabilities: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
  """Probabilities over the fitted `classes` spread into `num_classes` columns by class id."""
  out = np.zeros((probabilities.shape[0], num_classes))
  out[:, classes] = probabilities
  return out


def fit_logistic_regression(fit: Features, *, c: float | None = None,
                            max_iter: int = 1000) -> tuple[LogisticRegression, dict[str, Any]]:
  """sklearn's `LogisticRegression(C=c, max_iter=max_iter)` fitted on `fit` (in float64).

  `c=None`: DinoBloom's `probe_c(D, classes present)`. Returns the model and its settings:
  C, max_iter, n_iter (L-BFGS iterations run) and converged (no ConvergenceWarning).
  """
  if fit.labels.size == 0:
    raise ValueError("There are no examples to fit the probe on.")
  present = np.unique(fit.labels)
  if c is None:
    c = probe_c(fit.embeddings.shape[1], present.size)
  model = LogisticRegression(C=float(c), max_iter=max_iter, solver="lbfgs")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", ConvergenceWarning)
    model.fit(fit.embeddings.astype(np.float64), fit.labels)
  converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
  settings = {"solver": "lbfgs", "C": float(c), "max_iter": max_iter,
              "n_iter": int(np.max(model.n_iter_)), "converged": converged, "dtype": "float64"}
  return model, settings


def linear_probe(train: Features, test: Features, num_classes: int, *,
                 c: float | None = None, max_iter: int = 1000) -> np.ndarray:
  """Probabilities [N_test, num_classes] of a logistic regression fitted on `train`.

  Args:
    train, test: features of the fitted and the evaluated examples.
    num_classes: the number of classes of the label space (columns of the result).
    c: inverse L2 strength; default `probe_c(D, classes present in train)`.
    max_iter: L-BFGS iterations.
  """
  model, _ = fit_logistic_regression(train, c=c, max_iter=max_iter)
  return _columns(model.predict_proba(test.embeddings.astype(np.float64)), model.classes_,
                  num_classes)


def sweep_c(train: Features, validation: Features, num_classes: int, *,
            grid: Sequence[float], max_iter: int = 1000) -> dict[str, Any]:
  """DINOv2's choice of C: a logistic regression fitted on `train` per C, scored on `validation`.

  Returns {"grid", "validation_balanced_accuracy" (one per C), "chosen"}: the C of the best
  validation balanced accuracy (the smallest such C on a tie: the strongest regularisation).
  """
  if validation.labels.size == 0:
    raise ValueError("The validation split is empty: there is nothing to choose C on.")
  present = np.unique(validation.labels)
  scores = []
  for c in grid:
    predictions = linear_probe(train, validation, num_classes, c=float(c),
                               max_iter=max_iter).argmax(axis=1)
    recalls = [np.mean(predictions[validation.labels == label] == label) for label in present]
    scores.append(float(np.mean(recalls)))
  best = int(np.argmax(scores))
  return {"grid": [float(c) for c in grid], "validation_balanced_accuracy": scores,
          "chosen": float(grid[best]), "fit_on": ["train"], "scored_on": "validation"}


def knn_probe(train: Features, test: Features, num_classes: int, *, k: int = 20) -> np.ndarray:
  """Probabilities [N_test, num_classes] of sklearn's `KNeighborsClassifier(n_neighbors=k)`.

  DinoBloom's kNN: Euclidean distance, uniform votes, raw features (k clipped to the number of
  fitted examples).
  """
  model, _ = fit_knn(train, k)
  return _columns(model.predict_proba(test.embeddings.astype(np.float64)), model.classes_,
                  num_classes)


def fit_knn(fit: Features, k: int) -> tuple[KNeighborsClassifier, dict[str, Any]]:
  """sklearn's `KNeighborsClassifier(n_neighbors=k)` (its defaults) fitted on `fit`'s raw
  features (in float64), k clipped to the number of examples; returns it and its settings."""
  used = min(k, fit.labels.size)
  model = KNeighborsClassifier(n_neighbors=used).fit(fit.embeddings.astype(np.float64),
                                                     fit.labels)
  return model, {"k": used, "metric": "euclidean", "weights": "uniform", "dtype": "float64"}


def _normalise(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def weighted_knn_probe(train: Features, test: Features, num_classes: int, *, k: int = 20,
                       temperature: float = DEFAULT_TEMPERATURE,
                       batch_size: int = 1024) -> np.ndarray:
  """Probabilities [N_test, num_classes] of DINOv2's temperature-weighted cosine kNN.

  Each test example's k most cosine-similar training examples (all of them if fewer) vote for
  their class with weights softmax(similarity / temperature) over those k.
  """
  if train.labels.size == 0:
    raise ValueError("The training split has no examples.")
  bank = _normalise(train.embeddings.astype(np.float64))
  queries = _normalise(test.embeddings.astype(np.float64))
  k = min(k, bank.shape[0])
  probabilities = np.zeros((queries.shape[0], num_classes))
  for start in range(0, queries.shape[0], batch_size):
    sims = queries[start:start + batch_size] @ bank.T
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    top_sims = np.take_along_axis(sims, top, axis=1) / temperature
    weights = np.exp(top_sims - top_sims.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    rows = np.repeat(np.arange(top.shape[0]), k)
    np.add.at(probabilities[start:start + batch_size], (rows, train.labels[top].reshape(-1)),
              weights.reshape(-1))
  return probabilities


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
  """Which probes `fit_probes` fits, and how (`config.probe`, configs/default.py)."""

  fit_on: tuple[str, ...] = ("train", "validation")
  c: float | str | None = None  # None: D * K / 100; a number; "sweep"
  c_sweep: tuple[float, float, int] = DINOV2_C_SWEEP
  max_iter: int = 1000
  knn_k: tuple[int, ...] = (1, 20)
  weighted_knn_k: tuple[int, ...] = (20,)
  temperature: float = DEFAULT_TEMPERATURE


def fit_probes(splits: dict[str, Features], num_classes: int,
               settings: ProbeSettings = ProbeSettings()) -> list[FittedProbe]:
  """Fits every probe of `settings` once on the `fit_on` splits of `splits` together.

  `splits` maps split names to features; it needs the `fit_on` splits, and "train" and
  "validation" for `c="sweep"`.
  """
  fit_on = list(settings.fit_on)
  fit = concatenate([splits[s] for s in fit_on])
  if fit.labels.size == 0:
    raise ValueError(f"The probes' fitting splits {fit_on} have no examples.")
  common = {"fit_on": fit_on, "n_fit": int(fit.labels.size),
            "num_features": int(fit.embeddings.shape[1]),
            "fitted_classes": int(np.unique(fit.labels).size)}
  probes = []

  sweep = None
  c = settings.c
  if c == "sweep":
    sweep = sweep_c(splits["train"], splits["validation"], num_classes,
                    grid=c_grid(settings.c_sweep), max_iter=settings.max_iter)
    c = sweep["chosen"]
  model, linear = fit_logistic_regression(fit, c=c, max_iter=settings.max_iter)
  linear["C_rule"] = ("D * K / 100 (DinoBloom)" if settings.c is None else
                      "validation sweep (DINOv2), refitted" if sweep else "given")
  if sweep:
    linear["C_sweep"] = sweep
  probes.append(FittedProbe(
      "linear", {"kind": "linear", "settings": linear, **common,
                 "description": "sklearn LogisticRegression (lbfgs, multinomial) on the features"},
      lambda x, m=model: _columns(m.predict_proba(x.astype(np.float64)), m.classes_,
                                  num_classes)))

  for k in settings.knn_k:
    knn, knn_settings = fit_knn(fit, k)
    probes.append(FittedProbe(
        f"knn{k}", {"kind": "knn", "settings": knn_settings, **common,
                    "description": "sklearn KNeighborsClassifier on the raw features (DinoBloom)"},
        lambda x, m=knn: _columns(m.predict_proba(x.astype(np.float64)), m.classes_,
                                  num_classes)))

  for k in settings.weighted_knn_k:
    used = min(k, fit.labels.size)
    probes.append(FittedProbe(
        f"weighted_knn{k}",
        {"kind": "knn", "settings": {"k": used, "metric": "cosine",
                                     "weights": f"softmax(similarity / {settings.temperature})",
                                     "temperature": settings.temperature}, **common,
         "description": "DINOv2's weighted kNN on L2-normalised features"},
        lambda x, k=used: weighted_knn_probe(
            fit, Features(x, np.zeros(len(x), np.int64), np.array([""] * len(x))), num_classes,
            k=k, temperature=settings.temperature)))
  return probes


def evaluate_probes(features_dir: str | os.PathLike, class_codes: Sequence[str], *,
                    eval_splits: Sequence[str] = ("validation", "test"),
                    settings: ProbeSettings = ProbeSettings(),
                    ) -> dict[str, dict[str, dict[str, Any]]]:
  """Every probe fitted once on `settings.fit_on`, reported on each split in `eval_splits`.

  Reads `features_<split>.npz` from `features_dir`; returns {probe name: {split: report}} of
  `bmcc.metrics.classification_report` dicts, each with its `probe` block.
  """
  names = dict.fromkeys([*settings.fit_on, *eval_splits,
                         *(("train", "validation") if settings.c == "sweep" else ())])
  splits = {s: load_features(os.path.join(features_dir, f"features_{s}.npz")) for s in names}
  reports: dict[str, dict[str, dict[str, Any]]] = {}
  for fitted in fit_probes(splits, len(class_codes), settings):
    reports[fitted.name] = {}
    for split in eval_splits:
      features = splits[split]
      report = metrics.classification_report(features.labels, fitted.predict(features.embeddings),
                                             class_codes)
      report["probe"] = dict(fitted.block, in_fit=split in settings.fit_on)
      reports[fitted.name][split] = report
  return reports
