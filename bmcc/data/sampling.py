"""Class imbalance: class-balanced sampling and loss weights, both with an exponent alpha.

The 21 classes hold 8 to 29,424 images. With class counts n_c and alpha in [0, 1]:

- `BalancedSampler` draws training examples independently with probability proportional to
  n_c^(-alpha) for an example of class c, so class c is drawn with probability proportional to
  n_c^(1 - alpha): alpha=0 is the natural distribution, alpha=1 uniform over classes, alpha=0.5
  proportional to sqrt(n_c).
- `class_weights(counts, alpha)` gives per-class loss weights proportional to n_c^(-alpha),
  normalised so that the mean weight over the training examples is 1 (the loss keeps its scale).

The sampler is a grain `MapDataset` over an infinite index space: element i is a pure function of
(seed, i), computed chunk by chunk with `np.random.Generator([seed, process, chunk])`, so a pipeline
built on it is deterministic, independent of the number of grain workers, and its iterator state
saves and restores exactly. It needs the label of every record: `read_record_index` reads them once
(and the file names, which k-fold selection needs) and can cache them in a `.npz` file.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Sequence

import grain
import numpy as np

from bmcc.atomic import atomic_write

_READ_BATCH = 1024  # records per read when the source supports batched reads (`__getitems__`)


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """int64 [num_classes]: how many of `labels` fall in each class."""
  return np.bincount(np.asarray(labels, np.int64), minlength=num_classes)[:num_classes]


def class_weights(counts: Sequence[int] | np.ndarray, alpha: float,
                  frequencies: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
  """float32 [C] loss weights proportional to n_c^(-alpha), with mean 1 over training examples.

  `counts` are the training examples per class (n_c). The mean is taken over the class
  `frequencies` the loss sees: by default counts / sum(counts), so that sum_c n_c w_c = sum_c n_c;
  with balanced sampling pass `class_probabilities(counts, balance_alpha)`. Classes with no
  training example get weight 0 (they never occur in the loss). alpha=0 gives all ones.
  """
  counts = np.asarray(counts, np.float64)
  if counts.ndim != 1 or (counts < 0).any() or counts.sum() <= 0:
    raise ValueError(f"counts must be non-negative with a positive sum, got {counts}.")
  present = counts > 0
  weights = np.zeros_like(counts)
  weights[present] = counts[present] ** -float(alpha)
  frequencies = counts if frequencies is None else np.asarray(frequencies, np.float64)
  if frequencies.shape != counts.shape:
    raise ValueError(f"frequencies has shape {frequencies.shape}, counts {counts.shape}.")
  weights *= frequencies.sum() / (frequencies * weights).sum()
  return weights.astype(np.float32)


def class_probabilities(counts: Sequence[int] | np.ndarray, alpha: float) -> np.ndarray:
  """float64 [C]: how often `BalancedSampler` draws each class, proportional to n_c^(1 - alpha)."""
  counts = np.asarray(counts, np.float64)
  present = counts > 0
  if not present.any():
    raise ValueError("There is no example to sample from.")
  probabilities = np.zeros_like(counts)
  probabilities[present] = counts[present] ** (1.0 - float(alpha))
  if probabilities.sum() <= 0:
    raise ValueError("There is no example to sample from.")
  return probabilities / probabilities.sum()


def _label_and_name(record: dict) -> tuple[int, str]:
  name = record.get("file_name", b"")
  return int(record["label"]), name.decode("utf-8") if isinstance(name, bytes) else str(name)


def read_record_index(source, cache_path: str | os.PathLike | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(labels int32 [N], file_names str [N]) of every record of a random-access `source`.

  With `cache_path`, a `.npz` file there is used when it holds len(source) records and agrees with
  the source on 16 spot-checked records (label and file name), and written (atomically) otherwise;
  keep one path per prepared split (or concatenation of splits).
  """
  if cache_path is not None and os.path.exists(cache_path):
    with np.load(cache_path) as cached:
      labels, file_names = cached["label"], cached["file_name"]
    if len(labels) == len(source) and all(
        _label_and_name(source[i]) == (labels[i], file_names[i])
        for i in np.linspace(0, len(labels) - 1, min(16, len(labels))).astype(int)):
      return labels, file_names
  labels = np.empty(len(source), np.int32)
  file_names = []
  getitems = getattr(source, "__getitems__", None)
  for start in range(0, len(source), _READ_BATCH):
    indices = range(start, min(start + _READ_BATCH, len(source)))
    records = getitems(list(indices)) if getitems else [source[i] for i in indices]
    for i, record in zip(indices, records, strict=True):
      labels[i], name = _label_and_name(record)
      file_names.append(name)
  file_names = np.asarray(file_names, dtype=str)
  if cache_path is not None:
    try:
      os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
      atomic_write(cache_path, lambda f: np.savez(f, label=labels, file_name=file_names))
    except OSError as e:  # e.g. a read-only dataset folder: work without the cache
      logging.warning("Could not cache the record labels in %s: %s", cache_path, e)
  return labels, file_names


class BalancedSampler(grain.MapDataset):
  """Infinite MapDataset of positions into `labels`, drawn i.i.d. with P(i) ~ n_label(i)^-alpha.

  Element `index` is `labels`-position drawn for stream position `index`: chunk `index //
  chunk_size` is drawn at once (a class by `class_probabilities`, then a uniform member of it) with
  `np.random.Generator([seed, stream, chunk])`. `stream` tells apart processes that sample their own
  slices with one seed. Only the last few chunks are cached, so memory stays bounded.
  """

  def __init__(self, labels: np.ndarray, *, alpha: float, seed: int, stream: int = 0,
               num_classes: int | None = None, chunk_size: int = 4096):
    super().__init__()
    labels = np.asarray(labels, np.int64)
    if labels.size == 0:
      raise ValueError("BalancedSampler needs at least one example.")
    if labels.min() < 0:
      raise ValueError("labels must be non-negative class numbers.")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    self._counts = class_counts(labels, num_classes)
    self._probabilities = class_probabilities(self._counts, alpha)
    order = np.argsort(labels, kind="stable")  # positions grouped by class
    self._members = order.astype(np.int64)
    self._starts = np.concatenate([[0], np.cumsum(self._counts)[:-1]]).astype(np.int64)
    self._seed, self._stream, self._chunk_size = int(seed), int(stream), int(chunk_size)
    self._cache: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  @property
  def probabilities(self) -> np.ndarray:
    """float64 [C]: the probability of drawing each class."""
    return self._probabilities.copy()

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return (f"BalancedSampler(classes={len(self._counts)}, seed={self._seed}, "
            f"stream={self._stream})")

  def __getstate__(self) -> dict:
    state = self.__dict__.copy()
    state["_cache"], state["_lock"] = {}, None  # rebuilt in the worker process
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _chunk(self, chunk: int) -> np.ndarray:
    with self._lock:
      draws = self._cache.get(chunk)
    if draws is not None:
      return draws
    rng = np.random.Generator(np.random.PCG64([self._seed, self._stream, chunk]))
    classes = rng.choice(len(self._probabilities), size=self._chunk_size, p=self._probabilities)
    offsets = rng.integers(0, self._counts[classes])
    draws = self._members[self._starts[classes] + offsets]
    with self._lock:
      self._cache[chunk] = draws
      while len(self._cache) > 4:
        self._cache.pop(min(self._cache))
    return draws

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    if index < 0:
      raise IndexError(index)
    chunk, offset = divmod(int(index), self._chunk_size)
    return int(self._chunk(chunk)[offset])
