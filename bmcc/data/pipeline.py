"""grain datasets over any random-access source of records {image: JPEG bytes, label, file_name}.

Training (`train_dataset`): this process's share of the records, shuffled with the seed (a new
order every epoch) and repeated, or drawn class-balanced (`balance_alpha`, `bmcc.data.sampling`);
each example decoded and augmented (`bmcc.data.augment`) with a generator seeded by its position in
the stream, then batched by position, before grain's worker processes split the work. So the same
seed gives the same batches for any `num_workers`, and the iterator state (saved in every
checkpoint) resumes on exactly the next batch. `device_iterator` puts batches on the devices ahead
of the step, keeping that state exact.

Evaluation (`eval_batches`): every selected record once, in order, in fixed-size batches of
{image, label, file_name, mask}; the last is padded (file name '') and its `mask` is False on the
padding. Images are resized by the one decoder
(`bmcc.data.decode`), never augmented. Images stay uint8 until the device normalises them.

`bmcc.data.input_pipeline` builds these from a config and the prepared dataset.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from bmcc.data import augment as augment_lib
from bmcc.data import classes, sampling
from bmcc.data.decode import decode_image

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


def select_records(source, mapping: ClassMapping, keep=None,
                   index_cache: str | os.PathLike | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(record indices, run labels) of the records of `source` a run uses.

  Those of the mapping's classes and, if given, those where `keep(file_names, labels)` (a role's
  `bmcc.data.splits.Selection.keep`) is True. Reads every record's label and file name once
  (`sampling.read_record_index`, cached in `index_cache` if given).
  """
  labels, file_names = sampling.read_record_index(source, index_cache)
  run_labels = mapping.lookup_table()[labels]
  kept = run_labels >= 0
  if keep is not None:
    kept &= np.asarray(keep(file_names, labels), bool)
  indices = np.flatnonzero(kept)
  return indices, run_labels[indices].astype(np.int32)


class _Record:
  """Record index -> {'image': bytes, 'label': run label[, 'file_name': str]}; picklable for
  grain's workers."""

  def __init__(self, source, mapping: ClassMapping, file_names: bool = False):
    self._source = source
    self._table = mapping.lookup_table()
    self._file_names = file_names

  def __call__(self, index: int) -> dict:
    record = self._source[int(index)]
    element = {"image": record["image"], "label": int(self._table[int(record["label"])])}
    if self._file_names:
      name = record.get("file_name", b"")
      element["file_name"] = name.decode("utf-8") if isinstance(name, bytes) else str(name)
    return element


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


class _EvalTransform:
  def __init__(self, image_size: int):
    self.image_size = image_size

  def __call__(self, element: dict) -> dict:
    return {"image": decode_image(element["image"], self.image_size),
            "label": np.int32(element["label"]), "file_name": element["file_name"]}


def _records(source, mapping: ClassMapping, records: tuple[np.ndarray, np.ndarray] | None
             ) -> tuple[np.ndarray, np.ndarray] | None:
  """The explicit selection to read: as given, or the mapping's classes (None: every record)."""
  if records is None and not mapping.is_identity:
    return select_records(source, mapping)
  return records


def train_dataset(source, *, mapping: ClassMapping, image_size: int, batch_size: int, seed: int,
                  augment: augment_lib.AugmentConfig | bool = True, process_index: int = 0,
                  process_count: int = 1, num_workers: int = 0,
                  records: tuple[np.ndarray, np.ndarray] | None = None,
                  balance_alpha: float = 0.0,
                  read_threads: int = READ_THREADS) -> grain.IterDataset:
  """The infinite, shuffled (or class-balanced), augmented stream of this process's batches.

  `batch_size` is the per-process batch. `records`: (indices, run labels) from `select_records`;
  None reads every record (or the mapping's classes). This process takes every
  `process_count`-th of them. `augment`: an `AugmentConfig`, True for the default, False for none.
  `balance_alpha` > 0 draws examples with probability proportional to n_c^(-balance_alpha)
  (`sampling.BalancedSampler`; 1: uniform over classes) instead of shuffled epochs.
  """
  augment = augment_lib.resolve(augment)
  if balance_alpha < 0:
    raise ValueError(f"balance_alpha={balance_alpha} must be >= 0.")
  if balance_alpha > 0 and records is None:
    records = select_records(source, mapping)
  records = _records(source, mapping, records)
  read = _Record(source, mapping)
  if records is None:  # every record of the slice: nothing to read up front
    ds = grain.MapDataset.range(len(source))[process_index::process_count]
    ds = ds.shuffle(seed=seed).repeat(None)
  else:
    indices, labels = (a[process_index::process_count] for a in records)
    if not len(indices):
      raise ValueError("This process has no training example (check the classes and folds).")
    if balance_alpha > 0:
      positions = sampling.BalancedSampler(labels, alpha=balance_alpha, seed=seed,
                                           stream=process_index, num_classes=mapping.num_classes)
      ds = positions.map(_Lookup(indices))
    else:
      ds = grain.MapDataset.source(indices).shuffle(seed=seed).repeat(None)
  ds = ds.map(read).random_map(_TrainTransform(image_size, augment), seed=seed + 1)
  # Batching by position before the workers split the stream keeps batches worker-independent.
  ds = ds.batch(batch_size, drop_remainder=True)
  ids = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=max(read_threads, READ_AHEAD_BATCHES)))
  if num_workers > 0:
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=READ_AHEAD_BATCHES),
        worker_init_fn=_ignore_stop_signals)
  return ids


def _ignore_stop_signals(worker_index: int, worker_count: int) -> None:
  """In each grain worker: SIGTERM/SIGINT sent to the whole process group (SLURM, Ctrl-C) are
  the main process's to handle (checkpoint, then close the iterator, which ends the workers);
  a worker killed by them would fail the main process's next batch instead."""
  del worker_index, worker_count
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, signal.SIG_IGN)


class _Lookup:
  """Position among the selected records -> record index (picklable)."""

  def __init__(self, indices: np.ndarray):
    self._indices = np.asarray(indices, np.int64)

  def __call__(self, position: int) -> int:
    return int(self._indices[position])


def eval_batches(source, *, mapping: ClassMapping, image_size: int, batch_size: int,
                 process_index: int = 0, process_count: int = 1,
                 indices: np.ndarray | None = None) -> Iterator[dict]:
  """Every selected record (this process's share) once, padded to full batches with a mask.

  `indices`: the records to read (`select_records`); None: every record (or the mapping's
  classes). With several processes, every process yields the same number of batches, so the
  evaluation steps stay in lock-step; the extra batches are fully masked.
  """
  if indices is None:
    selected = _records(source, mapping, None)
    indices = np.arange(len(source)) if selected is None else selected[0]
  ds = grain.MapDataset.source(np.asarray(indices, np.int64))[process_index::process_count]
  num_batches = math.ceil(math.ceil(len(indices) / process_count) / batch_size)
  ds = ds.map(_Record(source, mapping, file_names=True)).map(_EvalTransform(image_size))
  produced = 0
  for batch in ds.to_iter_dataset().batch(batch_size, drop_remainder=False):
    yield pad_batch(batch, batch_size)
    produced += 1
  empty = {"image": np.zeros((0, image_size, image_size, 3), np.uint8),
           "label": np.zeros((0,), np.int32), "file_name": np.zeros((0,), str)}
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


class _ToGlobalArrays:
  """This process's part of a batch -> global jax.Arrays sharded by `sharding`."""

  def __init__(self, sharding: Any):
    self._sharding = sharding

  def __call__(self, batch: dict) -> dict:
    import jax  # here: grain workers, which import this module, need no jax

    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self._sharding, np.asarray(x)), batch)


def device_iterator(ds: grain.IterDataset, sharding: Any, size: int = 2
                    ) -> grain.DatasetIterator:
  """`ds`'s batches as global jax.Arrays, put on the devices `size` batches ahead by a thread.

  grain's `ThreadPrefetchIterDataset` records the state after each element it reads ahead, so
  `get_state()` (what `grain.checkpoint.CheckpointSave` saves) is the state after the last batch
  handed out, and a restored iterator resumes on exactly the next one. grain's own
  `experimental.device_put` uses `jax.device_put`, which cannot assemble a global array from
  several processes' parts; hence the `make_array_from_process_local_data` map.
  """
  if size < 1:
    raise ValueError(f"size={size} must be at least 1.")
  return iter(grain.experimental.ThreadPrefetchIterDataset(
      ds.map(_ToGlobalArrays(sharding)), prefetch_buffer_size=size))
