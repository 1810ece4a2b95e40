"""Linear-probe and k-nearest-neighbour evaluation of frozen backbone features.

Works on the feature files of a split, `features_<split>.npz` with `embeddings` (float32 [N, D]),
`labels` (int [N], bmcc class ids) and `file_names` (str [N]). Both probes return class
probabilities [N, num_classes], so `bmcc.metrics.classification_report(labels, probs, codes)`
gives the usual report:

- `linear_probe`: multinomial logistic regression (scikit-learn, L-BFGS, up to 1000 iterations)
  on the raw features with DinoBloom's regularisation, C = D * K / 100 for D features and K
  training classes (L2 coefficient 100 / (D K)).
- `knn_probe`: DINOv2's weighted kNN: cosine similarity of L2-normalised features, the k = 20
  most similar training examples vote with weights softmax(similarity / 0.07).

Classes absent from the training split get probability 0 from both.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression

from bmcc import metrics


@dataclasses.dataclass(frozen=True)
class Features:
  """The backbone features of one split."""

  embeddings: np.ndarray  # float32 [N, D]
  labels: np.ndarray  # int64 [N]
  file_names: np.ndarray  # str [N]


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


def probe_c(num_features: int, num_classes: int) -> float:
  """DinoBloom's inverse L2 strength of the linear probe: D * K / 100."""
  return num_features * num_classes / 100.0


def linear_probe(train: Features, test: Features, num_classes: int, *,
                 c: float | None = None, max_iter: int = 1000) -> np.ndarray:
  """Probabilities [N_test, num_classes] of a logistic regression fitted on `train`.

  Args:
    train, test: features of the training and the evaluated split.
    num_classes: the number of classes of the label space (columns of the result).
    c: inverse L2 strength; default `probe_c(D, classes present in train)`.
    max_iter: L-BFGS iterations.
  """
  present = np.unique(train.labels)
  if c is None:
    c = probe_c(train.embeddings.shape[1], present.size)
  model = LogisticRegression(C=c, max_iter=max_iter, solver="lbfgs")
  model.fit(train.embeddings.astype(np.float64), train.labels)
  probabilities = np.zeros((test.embeddings.shape[0], num_classes))
  probabilities[:, model.classes_] = model.predict_proba(test.embeddings.astype(np.float64))
  return probabilities


def _normalise(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_probe(train: Features, test: Features, num_classes: int, *, k: int = 20,
              temperature: float = 0.07, batch_size: int = 1024) -> np.ndarray:
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


def evaluate_probes(features_dir: str | os.PathLike, class_codes: Sequence[str], *,
                    train_split: str = "train", eval_splits: Sequence[str] = ("val", "test"),
                    k: int = 20) -> dict[str, dict[str, dict[str, Any]]]:
  """Both probes fitted on `train_split`, reported on each split in `eval_splits`.

  Reads `features_<split>.npz` from `features_dir`; returns {"linear": {split: report},
  "knn": {split: report}} of `bmcc.metrics.classification_report` dicts.
  """
  def load(split: str) -> Features:
    return load_features(os.path.join(features_dir, f"features_{split}.npz"))

  train = load(train_split)
  num_classes = len(class_codes)
  reports: dict[str, dict[str, dict[str, Any]]] = {"linear": {}, "knn": {}}
  for split in eval_splits:
    test = load(split)
    for name, probabilities in (("linear", linear_probe(train, test, num_classes)),
                                ("knn", knn_probe(train, test, num_classes, k=k))):
      reports[name][split] = metrics.classification_report(test.labels, probabilities,
                                                            class_codes)
  return reports
