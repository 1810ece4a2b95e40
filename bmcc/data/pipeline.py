"""The grain input pipeline over the prepared TFDS dataset.

Training: a per-process slice of the split, shuffled with the config seed (a new order every
epoch), repeated, decoded at reduced JPEG scale where the target size allows, randomly flipped and
rotated by multiples of 90 degrees (cells have no orientation), batched. Its iterator state goes
into every checkpoint: a resumed run sees exactly the batches the interrupted one would have.

Evaluation: every example of the split exactly once, in file order, in fixed-size batches; the last
batch is padded and carries a `mask` that is False on the padding.

Images leave the pipeline as uint8 [H, W, 3]; normalisation happens on the device
(`normalize_images`), which makes the host-to-device copy four times smaller.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Iterator, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from bmcc.data import classes, splits

# Per-channel mean and standard deviation (0..255 scale) of stained bone-marrow cells, measured on
# the synthetic set and close to the values commonly used for this stain; a fixed normaliser keeps
# checkpoints independent of the data the run happened to see.
MEAN_RGB = (200.0, 180.0, 200.0)
STDDEV_RGB = (50.0, 55.0, 45.0)


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


def normalize_images(images, dtype=np.float32):
  """uint8 images -> (x - mean) / std in `dtype`; works on numpy and jax arrays alike."""
  mean = np.asarray(MEAN_RGB, np.float32)
  std = np.asarray(STDDEV_RGB, np.float32)
  return ((images.astype(np.float32) - mean) / std).astype(dtype)


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
  """Decode, random dihedral transform; picklable for grain's worker processes."""

  def __init__(self, image_size: int, augment: bool):
    self.image_size = image_size
    self.augment = augment

  def __call__(self, element: dict, rng: np.random.Generator) -> dict:
    image = decode_image(element["image"], self.image_size)
    if self.augment:
      image = random_dihedral(image, rng)
    return {"image": image, "label": np.int32(element["label"])}


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


def train_dataset(source, *, mapping: ClassMapping, image_size: int, batch_size: int, seed: int,
                  augment: bool = True, process_index: int = 0, process_count: int = 1,
                  num_workers: int = 0, selection: splits.Selection | None = None
                  ) -> grain.IterDataset:
  """The infinite, shuffled, augmented training stream of this process's batches.

  `batch_size` is the per-process batch. The same seed gives the same batches; the order of
  examples and the augmentation of each depend only on (seed, position in the stream).
  """
  ds = grain.MapDataset.source(source)[process_index::process_count]
  parse = _Parse(mapping, selection)
  ds = ds.shuffle(seed=seed).repeat(None).map(parse)
  if parse.filters:
    ds = ds.filter(_is_kept)
  ds = ds.random_map(_TrainTransform(image_size, augment), seed=seed + 1)
  ids = ds.to_iter_dataset().batch(batch_size, drop_remainder=True)
  if num_workers > 0:
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
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
