"""The grain input pipeline over the prepared TFDS dataset.

Training: a per-process slice of the split, either shuffled with the config seed (a new order every
epoch) and repeated, or drawn class-balanced (`balance_alpha`, `bmcc.data.sampling`); each example
decoded and augmented (`bmcc.data.augment`: random resized crop at reduced JPEG scale, rotations
and flips, stain jitter, blur) with a generator seeded by its position in the stream; batched by
position. Batches are formed before grain's worker processes split the work (each worker computes
whole batches, which are put back in order), so the same seed gives the same batches for any
`num_workers`, and the iterator state, which goes into every checkpoint, resumes on exactly the
next batch. `prefetch_to_device` moves batches to the devices in a background thread and keeps that
state exact.

Evaluation: every example of the split exactly once, in file order, in fixed-size batches; the last
batch is padded and carries a `mask` that is False on the padding. Images are resized
deterministically (`decode_image`), never augmented.

Images leave the pipeline as uint8 [H, W, 3]; normalisation happens on the device
(`normalize_images`), which makes the host-to-device copy four times smaller.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from bmcc.data import augment as augment_lib
from bmcc.data import classes, sampling, splits
from bmcc.data.normalization import (  # noqa: F401  (re-exported)
  MEAN_RGB,
  STDDEV_RGB,
  normalize_images,
)

# Threads per process (the main process, or each grain worker) computing batches, and how many
# batches each process reads ahead. OpenCV and libjpeg release the GIL, so two threads keep two
# cores busy without worker processes.
READ_THREADS = 2
READ_AHEAD_BATCHES = 4


@dataclasses.dataclass(frozen=True)
class ClassMapping:
  """Which of the 21 dataset labels a run trains on, and their new label numbers."""

  codes: tuple[str, ...]  # the run's classes, in the run's label order

  @classmethod
  def create(cls, codes: Sequence[str] | None) -> ClassMapping:
    return cls(classes.CODES if codes is None else classes.validate_codes(codes))

  @property
  def num_classes(self) -> int:
    return len(self.codes)

  @property
  def is_identity(self) -> bool:
    return self.codes == classes.CODES

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(classes.NAMES[c] for c in self.codes)

  def lookup_table(self) -> np.ndarray:
    """int32 [21]: the run label of each dataset label, -1 for classes left out."""
    table = np.full(classes.NUM_CLASSES, -1, np.int32)
    for new, code in enumerate(self.codes):
      table[classes.CODES.index(code)] = new
    return table


def decode_image(data: bytes, size: int) -> np.ndarray:
  """JPEG (or any PIL-readable) bytes -> uint8 [size, size, 3].

  Uses libjpeg's DCT scaling (`draft`) to decode at the smallest scale not below `size`, then a
  bilinear resize with antialiasing; greyscale and RGBA are converted to RGB.
  """
  with Image.open(io.BytesIO(data)) as image:
    image.draft("RGB", (size, size))
    image = image.convert("RGB")
    if image.size != (size, size):
      image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(image, dtype=np.uint8)


def random_dihedral(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """One of the 8 rotations/flips of a square image, uniformly."""
  image = np.rot90(image, k=int(rng.integers(4)))
  if rng.integers(2):
    image = image[:, ::-1]
  return np.ascontiguousarray(image)



class _Parse:
  """Record -> {'image': bytes, 'label': run label}, or None for a file the run leaves out
  (a class not in the mapping, or a file outside the run's fold selection)."""

  def __init__(self, mapping: ClassMapping, selection: splits.Selection | None = None):
    self._table = mapping.lookup_table()
    self._selection = selection if selection is not None and selection.uses_folds else None

  @property
  def filters(self) -> bool:
    return self._selection is not None or not np.array_equal(
        self._table, np.arange(classes.NUM_CLASSES))

  def __call__(self, record: dict) -> dict | None:
    label = int(self._table[int(record["label"])])
    if label < 0:
      return None
    if self._selection is not None:
      file_name = record["file_name"]
      if isinstance(file_name, bytes):
        file_name = file_name.decode("utf-8")
      if not self._selection(file_name):
        return None
    return {"image": record["image"], "label": label}


class ConcatSource:
  """Several random-access sources read as one (the prepared splits, for k-fold runs)."""

  def __init__(self, sources: Sequence):
    self._sources = list(sources)
    self._offsets = np.cumsum([0] + [len(s) for s in self._sources])

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def __getitem__(self, index: int):
    if not 0 <= index < len(self):
      raise IndexError(index)
    which = int(np.searchsorted(self._offsets, index, side="right") - 1)
    return self._sources[which][index - int(self._offsets[which])]


class _TrainTransform:
  """Decode and augment one example; picklable for grain's worker processes."""

  def __init__(self, image_size: int, augment: augment_lib.AugmentConfig | None):
    self.image_size = image_size
    self.augment = augment

  def __call__(self, element: dict, rng: np.random.Generator) -> dict:
    if self.augment is None:
      image = decode_image(element["image"], self.image_size)
    else:
      image = augment_lib.augment_image(element["image"], self.image_size, self.augment, rng)
    return {"image": image, "label": np.int32(element["label"])}


class _Subset:
  """The records of `source` at `indices`, as a random-access source."""

  def __init__(self, source, indices: np.ndarray):
    self._source = source
    self._indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int):
    return self._source[int(self._indices[index])]


class _EvalTransform:
  def __init__(self, image_size: int):
    self.image_size = image_size

  def __call__(self, element: dict) -> dict:
    return {"image": decode_image(element["image"], self.image_size),
            "label": np.int32(element["label"])}


def _is_kept(element: dict | None) -> bool:
  return element is not None


def data_source(builder: tfds.core.DatasetBuilder, split: str):
  """Random-access source of one split, with the image left as JPEG bytes."""
  return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})


def role_source(builder: tfds.core.DatasetBuilder, selection: splits.Selection):
  """The source a role reads: its prepared split, or all splits for a k-fold selection."""
  sources = [data_source(builder, split) for split in selection.splits()]
  return sources[0] if len(sources) == 1 else ConcatSource(sources)


def training_labels(source, *, mapping: ClassMapping, selection: splits.Selection | None = None,
                    process_index: int = 0, process_count: int = 1,
                    index_cache: str | os.PathLike | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(record indices, run labels) of the records of `source` that this process trains on.

  That is, its slice `process_index::process_count`, less the classes the mapping leaves out and
  the files outside the fold selection. Reads every record's label (and file name) once; with
  `index_cache` they are cached in that `.npz` file (`sampling.read_record_index`). The run labels
  of all processes together (process_count=1) give the class counts for `sampling.class_weights`.
  """
  labels, file_names = sampling.read_record_index(source, index_cache)
  run_labels = mapping.lookup_table()[labels]
  keep = np.zeros(len(labels), bool)
  keep[process_index::process_count] = True
  keep &= run_labels >= 0
  if selection is not None and selection.uses_folds:
    keep &= np.fromiter((selection(str(name)) for name in file_names), bool, len(file_names))
  indices = np.flatnonzero(keep)
  return indices, run_labels[indices].astype(np.int32)


def train_dataset(source, *, mapping: ClassMapping, image_size: int, batch_size: int, seed: int,
                  augment: augment_lib.AugmentConfig | bool = True, process_index: int = 0,
                  process_count: int = 1, num_workers: int = 0,
                  selection: splits.Selection | None = None, balance_alpha: float = 0.0,
                  index_cache: str | os.PathLike | None = None,
                  read_threads: int = READ_THREADS) -> grain.IterDataset:
  """The infinite, shuffled (or class-balanced), augmented stream of this process's batches.

  `batch_size` is the per-process batch. `augment`: an `AugmentConfig`, True for the default one,
  False for none (the evaluation resize). `balance_alpha` > 0 draws examples with probability
  proportional to n_c^(-balance_alpha) (`sampling.BalancedSampler`; 1: uniform over classes) instead
  of shuffled epochs. Class subsets, fold selections and balancing read every record's label once
  first (`training_labels`; cached in `index_cache` if given). `num_workers` grain worker processes
  compute whole batches; `read_threads` threads do so in each process.

  The same seed gives the same batches whatever `num_workers`: the order of examples and the
  augmentation of each depend only on (seed, position in the stream).
  """
  augment = augment_lib.resolve(augment)
  if balance_alpha < 0:
    raise ValueError(f"balance_alpha={balance_alpha} must be >= 0.")
  parse = _Parse(mapping)
  if balance_alpha > 0 or _Parse(mapping, selection).filters:
    indices, labels = training_labels(source, mapping=mapping, selection=selection,
                                      process_index=process_index, process_count=process_count,
                                      index_cache=index_cache)
    if not len(indices):
      raise ValueError("This process has no training example (check the classes and folds).")
    records = _Subset(source, indices)
    if balance_alpha > 0:
      ds = sampling.BalancedSampler(labels, alpha=balance_alpha, seed=seed, stream=process_index,
                                    num_classes=mapping.num_classes).map(records.__getitem__)
    else:
      ds = grain.MapDataset.source(records).shuffle(seed=seed).repeat(None)
  else:  # every record of the slice: nothing to read up front
    ds = grain.MapDataset.source(source)[process_index::process_count]
    ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.map(parse).random_map(_TrainTransform(image_size, augment), seed=seed + 1)
  # Batching by position before the workers split the stream keeps batches worker-independent.
  ds = ds.batch(batch_size, drop_remainder=True)
  ids = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=max(read_threads, READ_AHEAD_BATCHES)))
  if num_workers > 0:
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=READ_AHEAD_BATCHES))
  return ids


def eval_batches(source, *, mapping: ClassMapping, image_size: int, batch_size: int,
                 process_index: int = 0, process_count: int = 1,
                 selection: splits.Selection | None = None) -> Iterator[dict]:
  """Every example of `source` (this process's slice) once, padded to full batches with a mask.

  With several processes, every process yields the same number of batches (from the unfiltered
  slice length), so evaluation steps stay in lock-step; the extra batches are fully masked.
  """
  ds = grain.MapDataset.source(source)[process_index::process_count]
  num_batches = math.ceil(math.ceil(len(source) / process_count) / batch_size)
  parse = _Parse(mapping, selection)
  ds = ds.map(parse)
  if parse.filters:
    ds = ds.filter(_is_kept)
  ds = ds.map(_EvalTransform(image_size))
  produced = 0
  for batch in ds.to_iter_dataset().batch(batch_size, drop_remainder=False):
    yield pad_batch(batch, batch_size)
    produced += 1
  empty = {"image": np.zeros((0, image_size, image_size, 3), np.uint8),
           "label": np.zeros((0,), np.int32)}
  if process_count == 1:
    return  # no lock-step to keep
  for _ in range(produced, num_batches):
    yield pad_batch(empty, batch_size)


def pad_batch(batch: dict, batch_size: int) -> dict:
  """Pads every array of `batch` to `batch_size` rows with zeros and adds `mask`."""
  n = len(batch["label"])
  padded = {}
  for key, value in batch.items():
    value = np.asarray(value)
    pad = np.zeros((batch_size - n, *value.shape[1:]), value.dtype)
    padded[key] = np.concatenate([value, pad])
  padded["mask"] = np.arange(batch_size) < n
  return padded


class DevicePrefetchIterator(grain.DatasetIterator):
  """Reads batches ahead in a background thread and puts them on the devices; checkpointable.

  Each batch is read from the wrapped grain iterator together with that iterator's state right
  after it, and `get_state()` is the state after the last batch handed out by `next()`, not after
  the batches read ahead. So saving this iterator (`grain.checkpoint.CheckpointSave`, or
  `get_state()`) and restoring it (`set_state`, `CheckpointRestore`) resumes on exactly the next
  unconsumed batch. `set_state` stops the reader, drops what it read ahead, and restores the wrapped
  iterator; reading starts again on the next `next()` (or `start_prefetch()`).

  With a `sharding`, every array of a batch becomes a global `jax.Array` through
  `jax.make_array_from_process_local_data` (the batch is this process's part); without, batches
  stay numpy (useful to overlap host work only).
  """

  def __init__(self, iterator: Iterator[dict], size: int = 2, sharding: Any = None):
    super().__init__()
    if size < 1:
      raise ValueError(f"size={size} must be at least 1.")
    self._iterator = iterator
    self._size = size
    self._sharding = sharding
    self._state = iterator.get_state()
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()
    self._queue: queue.Queue = queue.Queue(maxsize=size)

  def _to_device(self, batch: dict) -> dict:
    if self._sharding is None:
      return batch
    import jax  # here: grain workers, which import this module, need no jax

    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self._sharding, np.asarray(x)), batch)

  def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
    while not stop.is_set():
      try:
        batch = next(self._iterator)
        item = (self._to_device(batch), self._iterator.get_state())
      except BaseException as e:  # handed to the consumer, StopIteration included
        item = e
      while not stop.is_set():
        try:
          out.put(item, timeout=0.05)
          break
        except queue.Full:
          continue
      if isinstance(item, BaseException):
        return

  def start_prefetch(self) -> None:
    """Starts the background reader (idempotent); `next()` starts it too."""
    self._assert_not_closed()
    if self._thread is None:
      self._stop = threading.Event()
      self._queue = queue.Queue(maxsize=self._size)
      self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop),
                                      name="prefetch_to_device", daemon=True)
      self._thread.start()

  def _stop_reader(self) -> None:
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None

  def __next__(self) -> dict:
    self.start_prefetch()
    item = self._queue.get()
    if isinstance(item, BaseException):
      self._thread = None  # the reader has ended
      raise item
    batch, self._state = item
    return batch

  def get_state(self) -> dict[str, Any]:
    """The wrapped iterator's state after the last batch returned by `next()`."""
    return copy.deepcopy(self._state)

  def set_state(self, state: dict[str, Any]) -> None:
    self._stop_reader()
    self._iterator.set_state(state)
    self._state = copy.deepcopy(state)

  def close(self) -> None:
    if self._closed:
      return
    self._stop_reader()
    super().close()
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


def prefetch_to_device(iterator: Iterator[dict], size: int = 2, sharding: Any = None
                       ) -> DevicePrefetchIterator:
  """`iterator`'s batches, `size` ahead, as jax.Arrays sharded by `sharding` (see the class).

  The result replaces the grain iterator everywhere, checkpoints included:

    train_iter = pipeline.prefetch_to_device(iter(train_ds), 2, NamedSharding(mesh, P("data")))
    ckpt.restore(step, state, train_iter)      # set_state: the exact next batch
    batch = next(train_iter)                   # {"image": jax.Array, "label": jax.Array}
    ckpt.save(step, state, train_iter, ...)    # get_state: after the last consumed batch
  """
  return DevicePrefetchIterator(iterator, size, sharding)
