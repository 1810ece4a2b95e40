"""Writes synthetic images in the exact on-disk layouts of the real download (Kaggle or TCIA).

- Kaggle mirror: `<root>/bone_marrow_cell_dataset/<CODE>/<range>/<CODE>_<5 digits>.jpg` plus
  `<root>/abbreviations.csv` (`;`-separated); zipped: `<root>/bone-marrow-cell-classification.zip`.
- TCIA release: `<root>/BM_cytomorphology_data/<CODE>/<range>/<CODE>_<5 digits>.jpg` (zipped:
  `<root>/BM_cytomorphology_data.zip`).

Classes in `FLAT_CLASSES` (fewer than 1,000 real images) have no range folder; the others use range
folders of `range_size` files ('0001-1000', ..., the last ending at the class's file count).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import pathlib
import shutil
import zipfile
from collections.abc import Iterator, Mapping

import numpy as np

from bmcc.data.classes import CODES, FLAT_CLASSES, FULL_COUNTS, NAMES, validate_codes
from bmcc.synthetic.cells import IMAGE_SIZE, image_bytes

LAYOUT_FOLDERS: dict[str, str] = {
    "kaggle": "bone_marrow_cell_dataset",
    "tcia": "BM_cytomorphology_data",
}
ZIP_NAMES: dict[str, str] = {
    "kaggle": "bone-marrow-cell-classification.zip",
    "tcia": "BM_cytomorphology_data.zip",
}
ABBREVIATIONS_FILE = "abbreviations.csv"
DEFAULT_SCALE = 0.017
DEFAULT_MINIMUM = 20
TEXT_NOT_JPEG = b"This is not a JPEG image. Planted by bmcc.synthetic as a corrupt file.\n"

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # Fixed member times: the same call gives the same zip bytes.
_CHUNK = 48  # Images per task handed to a worker process.


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
  """What `write_synthetic_dataset` wrote.

  Attributes:
    path: the folder holding the class folders (e.g. `<root>/bone_marrow_cell_dataset`), or the zip
      file when `zip_archive` was set.
    counts: valid images written per class code (corrupt files not included).
    corrupt: the planted corrupt files, as POSIX paths relative to the class-folder root, e.g.
      'NGS/0401-0442/NGS_00441.jpg'. Inside a zip they sit under `folder_name + '/'`.
    layout: 'kaggle' or 'tcia'.
    folder_name: the name of the class-folder root ('bone_marrow_cell_dataset' or
      'BM_cytomorphology_data'), also the top folder inside the zip.
    zip_archive: whether `path` is a zip file.
  """

  path: pathlib.Path
  counts: dict[str, int]
  corrupt: tuple[str, ...]
  layout: str
  folder_name: str
  zip_archive: bool

  @property
  def num_images(self) -> int:
    """The number of valid images written."""
    return sum(self.counts.values())


# ------------------------------------------------------------------------------------------------
# Layout.


def default_counts(scale: float = DEFAULT_SCALE, minimum: int = DEFAULT_MINIMUM) -> dict[str, int]:
  """Images per class: the real counts times `scale`, rounded, never below `minimum`.

  The default (scale 0.015, minimum 20) gives about 3,000 images with the real imbalance (441
  NGS, 20 ABE) and every class present.
  """
  if scale < 0 or minimum < 0:
    raise ValueError(f"scale and minimum must be >= 0, got {scale} and {minimum}")
  return {code: max(minimum, round(FULL_COUNTS[code] * scale)) for code in CODES}


def range_name(index: int, count: int, range_size: int = 1000) -> str:
  """The range folder of 1-based file `index` in a class of `count` files, e.g. '0051-0100'.

  With `range_size` 1,000 this is the published layout ('9001-9968': the last folder ends at the
  class count; numbers zero-padded to 4 digits).
  """
  start = (index - 1) // range_size * range_size + 1
  end = min(start + range_size - 1, count)
  return f"{start:04d}-{end:04d}"


def relative_path(code: str, index: int, count: int, range_size: int = 1000) -> str:
  """Path of file `index` of class `code` relative to the class-folder root (POSIX separators).

  `count` is the number of files in the class folder; classes in `FLAT_CLASSES` have no range
  folder.
  """
  name = f"{code}_{index:05d}.jpg"
  if code in FLAT_CLASSES:
    return f"{code}/{name}"
  return f"{code}/{range_name(index, count, range_size)}/{name}"


def abbreviations_csv() -> str:
  """The text of the Kaggle mirror's `abbreviations.csv`: 'Abbreviation;Meaning', then one line
  per class."""
  return "".join(["Abbreviation;Meaning\n"] + [f"{c};{NAMES[c]}\n" for c in CODES])


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Which files go where: per class, the valid count and the corrupt files after them."""

  counts: dict[str, int]
  corrupt: dict[str, tuple[str, ...]]  # code -> kinds ('empty', 'truncated', 'text'), in order.
  range_size: int

  def total(self, code: str) -> int:
    return self.counts[code] + len(self.corrupt.get(code, ()))

  def path(self, code: str, index: int) -> str:
    return relative_path(code, index, self.total(code), self.range_size)

  def directories(self) -> list[str]:
    dirs = []
    for code in self.counts:
      dirs.append(code)
      if code not in FLAT_CLASSES:
        seen = dict.fromkeys(self.path(code, i).rsplit("/", 1)[0]
                             for i in range(1, self.total(code) + 1, self.range_size))
        dirs.extend(d for d in seen if d != code)
    return dirs

  def corrupt_files(self) -> list[tuple[str, int, str]]:
    """(code, index, kind) of every corrupt file."""
    return [(code, self.counts[code] + k + 1, kind)
            for code, kinds in self.corrupt.items() for k, kind in enumerate(kinds)]


def _plan(counts: Mapping[str, int], corrupt: bool, range_size: int) -> _Plan:
  codes = validate_codes(list(counts))
  clean: dict[str, int] = {}
  for code in CODES:  # Canonical class order.
    if code in codes:
      n = counts[code]
      if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"count for {code} must be a non-negative int, got {n!r}")
      clean[code] = int(n)
  planted: dict[str, tuple[str, ...]] = {}
  if corrupt:
    large = [c for c in clean if c not in FLAT_CLASSES and clean[c] > 0]
    flat = [c for c in clean if c in FLAT_CLASSES and clean[c] > 0]
    if not large and not flat:
      raise ValueError("corrupt=True needs at least one class with images")
    big = max(large, key=lambda c: clean[c]) if large else None
    small = max(flat, key=lambda c: clean[c]) if flat else None
    if big and small:
      planted = {big: ("empty", "truncated"), small: ("text",)}
    else:
      planted = {big or small: ("empty", "truncated", "text")}
  return _Plan(clean, planted, range_size)


def _corrupt_bytes(kind: str, code: str, index: int, seed: int, image_size: int) -> bytes:
  if kind == "empty":
    return b""
  if kind == "truncated":
    data = image_bytes(code, index, seed=seed, image_size=image_size)
    return data[: int(len(data) * 0.4)]
  if kind == "text":
    return TEXT_NOT_JPEG
  raise ValueError(kind)


def _render_chunk(task: tuple[list[tuple], int, int, str | None]) -> list[bytes]:
  """Worker: renders (code, index, relative path) items; writes each under `folder` if given,
  else returns the JPEG bytes in order."""
  items, seed, image_size, folder = task
  out = []
  for item in items:
    data = image_bytes(item[0], item[1], seed=seed, image_size=image_size)
    if folder is None:
      out.append(data)
    else:
      pathlib.Path(folder, item[2]).write_bytes(data)
  return out


def _chunks(items: list, n: int) -> Iterator[list]:
  for i in range(0, len(items), n):
    yield items[i:i + n]


def _render_all(items: list, seed: int, image_size: int, folder: str | None,
                num_workers: int) -> Iterator[bytes]:
  """Renders every item in order, in this process or a process pool; yields bytes if no folder."""
  tasks = [(chunk, seed, image_size, folder) for chunk in _chunks(items, _CHUNK)]
  if num_workers <= 1 or len(tasks) <= 1:
    for task in tasks:
      yield from _render_chunk(task)
    return
  # 'spawn': safe even when the caller has threads (JAX); workers import only this module.
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
    for result in pool.map(_render_chunk, tasks):
      yield from result


def write_synthetic_dataset(
    root: str | os.PathLike,
    counts: Mapping[str, int] | None = None,
    *,
    layout: str = "kaggle",
    zip_archive: bool = False,
    corrupt: bool = False,
    image_size: int = IMAGE_SIZE,
    seed: int = 0,
    num_workers: int = 1,
    range_size: int = 1000,
    overwrite: bool = False,
) -> SyntheticDataset:
  """Writes a synthetic dataset in the real on-disk layout.

  Args:
    root: folder to write into (created if missing).
    counts: images per class code; codes left out get no folder, a count of 0 gives an empty class
      folder. None means `default_counts()`.
    layout: 'kaggle' (`bone_marrow_cell_dataset/` plus `abbreviations.csv`) or 'tcia'
      (`BM_cytomorphology_data/`).
    zip_archive: write one zip (`ZIP_NAMES[layout]`, ZIP_STORED) holding exactly the tree the
      folder layout would hold, directory entries included, instead of the folder.
    corrupt: also plant three undecodable files after the valid files of their class: a
      zero-byte .jpg and a truncated JPEG (first 40% of a valid one) in the largest range-folder
      class, and a text file named .jpg in the largest flat class (all three in one class if only
      one kind is present).
    image_size: image side in pixels (the real data is 250).
    seed: dataset seed; image (code, i) depends only on (seed, code, i, image_size).
    num_workers: processes to render with; 1 renders in this process.
    range_size: files per range folder (1,000 in the real data; smaller values make small sets
      with several range folders). Range folders end at the number of files in the class, corrupt
      ones included.
    overwrite: replace an existing dataset folder or zip at the target; without it an existing
      one raises FileExistsError (stale files would otherwise mix with the new ones).

  Returns:
    A `SyntheticDataset` with the class-folder root (or zip path), counts and corrupt paths.
  """
  if layout not in LAYOUT_FOLDERS:
    raise ValueError(f"layout must be one of {sorted(LAYOUT_FOLDERS)}, got {layout!r}")
  if range_size < 1:
    raise ValueError(f"range_size must be >= 1, got {range_size}")
  if image_size < 16:
    raise ValueError(f"image_size must be >= 16, got {image_size}")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  plan = _plan(default_counts() if counts is None else counts, corrupt, range_size)
  root = pathlib.Path(root)
  folder_name = LAYOUT_FOLDERS[layout]
  path = root / (ZIP_NAMES[layout] if zip_archive else folder_name)
  if path.exists() or path.is_symlink():
    if not overwrite:
      raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    if path.is_dir() and not path.is_symlink():
      shutil.rmtree(path)
    else:
      path.unlink()
  root.mkdir(parents=True, exist_ok=True)
  items = [(code, i, plan.path(code, i)) for code, n in plan.counts.items()
           for i in range(1, n + 1)]
  corrupt_files = [(plan.path(code, i), _corrupt_bytes(kind, code, i, seed, image_size))
                   for code, i, kind in plan.corrupt_files()]
  corrupt_paths = tuple(p for p, _ in corrupt_files)

  if zip_archive:
    tmp = path.with_name(path.name + ".part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:

      def put(name: str, data: bytes) -> None:
        info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
        info.external_attr = (0o40755 << 16) | 0x10 if name.endswith("/") else 0o644 << 16
        zf.writestr(info, data)

      if layout == "kaggle":
        put(ABBREVIATIONS_FILE, abbreviations_csv().encode())
      put(folder_name + "/", b"")
      for d in plan.directories():
        put(f"{folder_name}/{d}/", b"")
      rendered = _render_all([it[:2] for it in items], seed, image_size, None, num_workers)
      for (_, _, rel), data in zip(items, rendered, strict=True):
        put(f"{folder_name}/{rel}", data)
      for rel, data in corrupt_files:
        put(f"{folder_name}/{rel}", data)
    os.replace(tmp, path)
  else:
    if layout == "kaggle":
      (root / ABBREVIATIONS_FILE).write_text(abbreviations_csv(), encoding="utf-8")
    for d in plan.directories():
      (path / d).mkdir(parents=True, exist_ok=True)
    for _ in _render_all(items, seed, image_size, str(path), num_workers):
      pass
    for rel, data in corrupt_files:
      (path / rel).write_bytes(data)
  return SyntheticDataset(path=path, counts=dict(plan.counts), corrupt=corrupt_paths,
                          layout=layout, folder_name=folder_name, zip_archive=zip_archive)


def write_demo_dataset(root: str | os.PathLike, *, scale: float, minimum: int,
                       seed: int) -> SyntheticDataset:
  """The dataset of `config.data.synthetic`: Kaggle layout, real imbalance scaled by `scale` (at
  least `minimum` per class), with the three planted bad files."""
  return write_synthetic_dataset(root, default_counts(scale=scale, minimum=minimum),
                                 layout="kaggle", corrupt=True, seed=seed)
