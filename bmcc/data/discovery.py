"""Finds the bone-marrow dataset in what a user downloaded, whatever its form.

Accepted under the manual dir (or given directly): the Kaggle zip as downloaded (read in place,
never extracted), the extracted Kaggle folder `bone_marrow_cell_dataset/`, the TCIA folder
`BM_cytomorphology_data/`, or the folder that holds the class folders itself. Inside a class folder
`<CODE>/`, images `<CODE>_<digits>.jpg` (any case of `.jpg`/`.jpeg`) may sit directly (the small
classes) or in range folders (`0001-1000/`, at any depth). Every other file is ignored and counted.

Each image gets a `file_name` relative to the folder holding the class folders, e.g.
`BLA/0001-1000/BLA_00001.jpg`, the same for every layout.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import threading
import zipfile
from collections.abc import Iterable, Iterator

from bmcc.data import classes

_IMAGE_RE = re.compile(r"^([A-Za-z]{3})_(\d+)\.jpe?g$", re.IGNORECASE)
# Files that come with the downloads and are not images; ignored without a warning.
_KNOWN_EXTRAS = {"abbreviations.csv", "readme.txt", "readme.md", "license.txt"}
_SKIP_PARTS = {"__MACOSX", ".DS_Store", "Thumbs.db"}


class DatasetNotFoundError(FileNotFoundError):
  """Raised when no bone-marrow images can be found where the user said they are."""


@dataclasses.dataclass(frozen=True)
class ImageEntry:
  """One image file found in the download."""

  file_name: str  # relative to the class root, '/'-separated: 'BLA/0001-1000/BLA_00001.jpg'
  code: str  # class code, 'BLA'
  location: str  # absolute path on disk, or the member name inside the zip


@dataclasses.dataclass
class DiscoveredDataset:
  """The images found, where they are, and what was ignored."""

  container: str  # the folder walked, or the zip file
  is_zip: bool
  class_root: str  # folder (or zip prefix) holding the class folders; '' for a zip's top level
  layout: str  # 'kaggle', 'tcia' or 'plain'
  entries: list[ImageEntry]
  ignored: list[str]  # files that are not images of a known class, relative to `container`
  duplicates: list[str]  # images whose stem was already seen (kept: the first in sorted order)
  # One zip handle shared by the reading threads, used under the lock (zipfile's own reference
  # counting is not thread-safe); opening one per thread re-parsed the central directory each time.
  _archive: zipfile.ZipFile | None = dataclasses.field(default=None, repr=False)
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

  def counts(self) -> dict[str, int]:
    """Images found per class code (every code present, 0 where missing)."""
    counter = collections.Counter(e.code for e in self.entries)
    return {code: counter.get(code, 0) for code in classes.CODES}

  def missing_classes(self) -> list[str]:
    return [code for code, n in self.counts().items() if n == 0]

  def read(self, entry: ImageEntry) -> bytes:
    """The raw bytes of one image. Thread-safe; a zip is opened once and read under a lock (only
    the read and CRC check: callers validate the bytes in parallel)."""
    if not self.is_zip:
      with open(entry.location, "rb") as f:
        return f.read()
    with self._lock:
      if self._archive is None:
        self._archive = zipfile.ZipFile(self.container)
      return self._archive.read(entry.location)


def _classify(parts: list[str]) -> tuple[str, str, str] | None:
  """(class_root, code, file_name) if `parts` is a path to an image of a known class."""
  match = _IMAGE_RE.match(parts[-1])
  if not match:
    return None
  code = match.group(1).upper()
  if code not in classes.NAMES:
    return None
  # The class folder is the nearest ancestor named like the code; range folders may sit between.
  for i in range(len(parts) - 2, -1, -1):
    if parts[i].upper() == code:
      return "/".join(parts[:i]), code, "/".join(parts[i:])
  return None


def _layout_of(class_root: str) -> str:
  last = class_root.rstrip("/").split("/")[-1] if class_root else ""
  if last == "bone_marrow_cell_dataset":
    return "kaggle"
  if last == "BM_cytomorphology_data":
    return "tcia"
  return "plain"


def _collect(paths: Iterable[str]) -> tuple[dict[str, list[tuple[str, str, str]]], list[str]]:
  by_root: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
  ignored = []
  for rel in paths:
    parts = [p for p in rel.replace("\\", "/").split("/") if p]
    if not parts or any(p in _SKIP_PARTS or p.startswith("._") for p in parts):
      continue
    found = _classify(parts)
    if found is None:
      if parts[-1].lower() not in _KNOWN_EXTRAS:
        ignored.append("/".join(parts))
      continue
    root, code, file_name = found
    by_root[root].append((code, file_name, rel))
  return by_root, ignored


def _walk_tree(folder: str) -> Iterator[tuple[str, list[str]]]:
  """(dirpath, filenames) of every folder under `folder`, following symlinked folders (a download
  linked into the manual dir) but entering each real folder once, so a link loop cannot recurse."""
  seen = set()
  for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen:
      dirnames[:] = []
      continue
    seen.add(real)
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_PARTS)
    yield dirpath, filenames


def _walk(folder: str) -> list[str]:
  paths = []
  for dirpath, filenames in _walk_tree(folder):
    rel_dir = os.path.relpath(dirpath, folder)
    for name in filenames:
      if name.lower().endswith(".zip"):
        continue
      paths.append(name if rel_dir == "." else os.path.join(rel_dir, name))
  return paths


def _build(container: str, is_zip: bool, paths: list[str]) -> DiscoveredDataset | None:
  by_root, ignored = _collect(paths)
  if not by_root:
    return None
  # Several class roots (say, a second copy in a sub-folder): take the one with most images.
  root = max(sorted(by_root), key=lambda r: len(by_root[r]))
  for other in sorted(by_root):
    if other != root:
      logging.warning(
          "Ignoring %d images under %r: another copy of the dataset under %r has more.",
          len(by_root[other]), other or ".", root or ".")
      ignored.extend(rel for _, _, rel in by_root[other])
  entries, duplicates, seen = [], [], set()
  for code, file_name, rel in sorted(by_root[root], key=lambda t: t[1]):
    stem = os.path.splitext(os.path.basename(file_name))[0].upper()
    if stem in seen:
      duplicates.append(file_name)
      continue
    seen.add(stem)
    location = rel if is_zip else os.path.join(container, rel)
    entries.append(ImageEntry(file_name=file_name, code=code, location=location))
  return DiscoveredDataset(
      container=container, is_zip=is_zip, class_root=root, layout=_layout_of(root),
      entries=entries, ignored=sorted(ignored), duplicates=duplicates)


def _instructions(manual_dir: str) -> str:
  return (
      f"No bone-marrow cell images were found in {manual_dir!r}. Download the dataset (Kaggle: "
      "andrewmvd/bone-marrow-cell-classification, or TCIA: Bone-Marrow-Cytomorphology_MLL_"
      "Helmholtz_Fraunhofer, doi:10.7937/TCIA.AXH3-T579) and put the zip as downloaded, or the "
      "extracted 'bone_marrow_cell_dataset/' or 'BM_cytomorphology_data/' folder, in that folder "
      "(set it with --config.data.manual_dir=PATH). Expected files look like "
      "'<CODE>/0001-1000/<CODE>_00001.jpg' or '<CODE>/<CODE>_00001.jpg'.")


def discover(manual_dir: str | os.PathLike) -> DiscoveredDataset:
  """Finds the dataset under `manual_dir` (a folder or a zip file).

  A folder with images is preferred over a zip beside it (reading a folder is faster); among zips,
  the one with most images wins. Raises DatasetNotFoundError with instructions when nothing is
  found.
  """
  manual_dir = os.fspath(manual_dir)
  if not os.path.exists(manual_dir):
    raise DatasetNotFoundError(
        f"The manual dir {manual_dir!r} does not exist. " + _instructions(manual_dir))
  if os.path.isfile(manual_dir):
    zips = [manual_dir] if zipfile.is_zipfile(manual_dir) else []
    folder_result = None
  else:
    folder_result = _build(manual_dir, False, _walk(manual_dir))
    zips = sorted(
        os.path.join(dirpath, name)
        for dirpath, names in _walk_tree(manual_dir)
        for name in names if name.lower().endswith(".zip"))
  if folder_result is not None:
    if zips:
      logging.info("Using the folder %s; ignoring zip file(s) %s.",
                   folder_result.class_root, zips)
    return folder_result
  best = None
  for path in zips:
    try:
      with zipfile.ZipFile(path) as archive:
        names = [i.filename for i in archive.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError) as e:
      logging.warning("Skipping %s: not a readable zip file (%s).", path, e)
      continue
    result = _build(path, True, names)
    if result is not None and (best is None or len(result.entries) > len(best.entries)):
      best = result
  if best is None:
    raise DatasetNotFoundError(_instructions(manual_dir))
  return best
