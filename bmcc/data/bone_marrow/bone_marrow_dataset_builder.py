"""TFDS builder `bone_marrow`: the Matek et al. (Blood 2021) bone-marrow cell images.

Manual download (see README.md beside this file, the dataset card). Prepared as ArrayRecord shards
without TensorFlow. Each example holds the original JPEG bytes (validated, never re-encoded), the
label (all 21 class codes, alphabetical) and the file name relative to the class root. Splits are
stratified 80/10/10 within each class over the files found, less the known bad ones
(`bmcc.data.splits.assign_splits`). Unreadable files are skipped and listed.

Written shard by shard (`tfds.core.ShardBasedBuilder`, `_SHARD_SIZE` images each), so memory stays
flat whatever the download's size: TFDS's `GeneratorBasedBuilder` holds a whole split in memory up
to 1 GB and then spills it through `tf.io.gfile`, importing TensorFlow (about 1.8 GiB peak for the
full dataset). Within a split, images are ordered by a hash of their file name (classes mixed,
independent of which other files exist), as the generator-based writer's key-hash shuffle did.
The ArrayRecord shards are uncompressed (JPEG bytes do not compress; readers need no option).

After a build, `build_report.json` (counts, skipped, ignored and missing) and `splits.csv` (the
split of every file) are written next to the shards by `prepare()`.
"""

from __future__ import annotations

import collections
import csv
import functools
import hashlib
import io
import json
import logging
import os
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator

import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.core import writer as writer_lib

from bmcc.atomic import atomic_write
from bmcc.data import classes, discovery, splits
from bmcc.data.validation import BadImageError, validate_jpeg
from bmcc.parallel import ordered_map

# Files other projects delete as bad or duplicated (reason unpublished; DATASET.md). Our choice:
# leave them out of the prepared dataset, list them in the build report as excluded. They are 10
# of 171,374 images, so the choice cannot move any published comparison.
KNOWN_BAD_FILES = frozenset({
    "NGB_09454", "ART_07788", "EBO_06999", "BLA_09522", "MYB_05527",
    "NGS_04035", "NGS_18642", "NGS_15228", "LYT_19975", "EOS_02571",
})

# Images per shard. TFDS's ShardWriter holds all examples of the shard it writes in memory (it
# counts them through an itertools.tee), so this bounds the build's memory: 2,000 images of 10-40
# KB are 20-80 MB.
_SHARD_SIZE = 2000
# Images read and validated ahead of the writer by the thread pool (JPEG decoding releases the GIL).
_WINDOW = 64
_THREADS = max(2, min(8, os.cpu_count() or 2))


class _ExampleWriter(writer_lib.ExampleWriter):
  """TFDS's example writer, but ArrayRecord shards are written uncompressed: the records are
  JPEGs, which do not compress, so TFDS's default compression only costs time (writing and every
  read in training)."""

  def write(self, path: os.PathLike | str, examples: Iterable[tuple[object, bytes]]) -> None:
    if self.file_format != tfds.core.FileFormat.ARRAY_RECORD:
      return super().write(path, examples)
    writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1,uncompressed")
    try:
      for _, serialized in examples:
        writer.write(serialized)
    finally:
      writer.close()
    return None


def _order_key(entry: discovery.ImageEntry) -> bytes:
  """Where an image goes in its split: a hash of its file name (classes mixed in every shard)."""
  return hashlib.sha256(entry.file_name.encode("utf-8")).digest()


class Builder(tfds.core.ShardBasedBuilder):
  """The bone-marrow cytomorphology dataset, from a manual download."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "First release: original JPEGs, 80/10/10 stem-hash splits.",
      "2.0.0": "Stratified splits: 80/10/10 within each class to within one image (files ranked "
               "by a hash of their stem), so every class of 8 or more images is in every split.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the dataset from Kaggle (andrewmvd/bone-marrow-cell-classification: one zip) or from
  The Cancer Imaging Archive (Bone-Marrow-Cytomorphology_MLL_Helmholtz_Fraunhofer) and put the
  zip as downloaded, or the extracted `bone_marrow_cell_dataset/` or `BM_cytomorphology_data/`
  folder, into the manual dir.
  """

  def __init__(self, *args, discovered: discovery.DiscoveredDataset | None = None, **kwargs):
    super().__init__(*args, **kwargs)
    self._discovered = discovered
    self.skipped: list[tuple[str, str]] = []  # (file_name, reason)
    self.excluded: list[str] = []  # known bad files left out
    self.assignments: list[tuple[str, str, str]] = []  # (file_name, code, split)
    self._yielded: collections.Counter[str] = collections.Counter()  # images written per split
    self._progress: dict = {}  # split -> its progress bar

  def _example_writer(self) -> writer_lib.ExampleWriter:
    return _ExampleWriter(file_format=self.info.file_format)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=list(classes.CODES)),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://doi.org/10.7937/TCIA.AXH3-T579",
        license="CC BY 4.0",
    )

  def _shard_iterators_per_split(self, dl_manager: tfds.download.DownloadManager
                                 ) -> dict[str, list[Callable[[], Iterator[tuple[str, dict]]]]]:
    if self._discovered is None:
      self._discovered = discovery.discover(dl_manager.manual_dir)
    found = self._discovered
    per_split: dict[str, list[discovery.ImageEntry]] = collections.defaultdict(list)
    kept = []
    for entry in found.entries:
      if splits.file_stem(entry.file_name) in KNOWN_BAD_FILES:
        self.excluded.append(entry.file_name)
      else:
        kept.append(entry)
    assigned = splits.assign_splits([e.file_name for e in kept], [e.code for e in kept])
    for entry, split in zip(kept, assigned, strict=True):
      per_split[split].append(entry)
    shards = {}
    for name in splits.SPLITS:
      entries = sorted(per_split[name], key=_order_key)
      # An empty split still gets one (empty) shard, whose generator explains the problem.
      chunks = [entries[i:i + _SHARD_SIZE] for i in range(0, len(entries), _SHARD_SIZE)] or [[]]
      shards[name] = [
          functools.partial(self._generate_examples, chunk, name, len(entries),
                            i == len(chunks) - 1)
          for i, chunk in enumerate(chunks)]
    return shards

  def _generate_examples(self, entries: list[discovery.ImageEntry], split: str, split_size: int,
                         last_shard: bool) -> Iterator[tuple[str, dict]]:
    """The examples of one shard: `entries` read and validated by a thread pool, in order."""
    found = self._discovered

    def load(entry: discovery.ImageEntry) -> tuple[discovery.ImageEntry, bytes | None, str]:
      try:
        data = found.read(entry)
        validate_jpeg(data)
        return entry, data, ""
      except (BadImageError, OSError, zipfile.BadZipFile, zlib.error) as e:
        return entry, None, str(e)

    if split not in self._progress:
      self._progress[split] = tfds.core.utils.tqdm(
          total=split_size, desc=f"Preparing {split} images...", unit=" images", leave=False,
          mininterval=1.0)
    progress = self._progress[split]
    for entry, data, reason in ordered_map(load, entries, num_threads=_THREADS, window=_WINDOW,
                                           thread_name_prefix="bmcc-prepare"):
      progress.update(1)
      if data is None:
        logging.warning("Skipping %s: %s", entry.file_name, reason)
        self.skipped.append((entry.file_name, reason))
        continue
      self.assignments.append((entry.file_name, entry.code, split))
      self._yielded[split] += 1
      yield entry.file_name, {
          "image": data,
          "label": entry.code,
          "file_name": entry.file_name,
      }
    if not last_shard:
      return
    progress.close()
    if not self._yielded[split]:  # TFDS would write an empty split without complaint.
      raise discovery.DatasetNotFoundError(
          f"No usable image falls into the {split!r} split: {len(found.entries)} images were "
          f"found in {found.container!r} and {split_size} of them were assigned to {split!r} "
          f"(all unreadable, or none). Every split ({', '.join(splits.SPLITS)}) needs at least "
          "one image; add more images to the download.")


def _report(builder: Builder) -> dict:
  found = builder._discovered  # pylint: disable=protected-access
  counts = {name: collections.Counter() for name in splits.SPLITS}
  for _, code, split in builder.assignments:
    counts[split][code] += 1
  missing = found.missing_classes()
  return {
      "source": found.container,
      "source_is_zip": found.is_zip,
      "class_root": found.class_root,
      "layout": found.layout,
      "images_found": len(found.entries),
      "images_prepared": len(builder.assignments),
      "counts": {s: {c: counts[s].get(c, 0) for c in classes.CODES} for s in splits.SPLITS},
      "missing_classes": missing,
      "skipped": [{"file_name": f, "reason": r} for f, r in sorted(builder.skipped)],
      "excluded_known_bad": sorted(builder.excluded),
      "duplicates": found.duplicates,
      "ignored": found.ignored,
  }


def _write_manifest(path: str, assignments: list[tuple[str, str, str]]) -> None:
  text = io.StringIO(newline="")
  writer = csv.writer(text)
  writer.writerow(["file_name", "code", "label", "split"])
  for file_name, code, split in sorted(assignments):
    writer.writerow([file_name, code, classes.CODES.index(code), split])
  atomic_write(path, text.getvalue())


def prepare(data_dir: str, manual_dir: str) -> Builder:
  """Prepares the dataset from `manual_dir` into `data_dir` (once) and returns the builder.

  Finds the download first (a clear DatasetNotFoundError if there is none), then builds with TFDS's
  progress bars, then writes `build_report.json` and `splits.csv` beside the shards and logs a
  summary: per-class counts, skipped files with reasons, missing classes.
  """
  builder = Builder(data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    return builder
  found = discovery.discover(manual_dir)
  logging.info(
      "Preparing bone_marrow from %s (%s layout, %s): %d images found, %d files ignored.",
      found.container, found.layout, "zip" if found.is_zip else "folder",
      len(found.entries), len(found.ignored))
  for path in found.ignored[:20]:
    logging.warning("Ignored (not an image of a known class): %s", path)
  if len(found.ignored) > 20:
    logging.warning("... and %d more ignored files.", len(found.ignored) - 20)
  builder = Builder(data_dir=data_dir, file_format="array_record", discovered=found)
  manual = manual_dir if os.path.isdir(manual_dir) else os.path.dirname(manual_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual))
  report = _report(builder)
  atomic_write(os.path.join(builder.data_dir, "build_report.json"), json.dumps(report, indent=2))
  _write_manifest(os.path.join(builder.data_dir, "splits.csv"), builder.assignments)
  logging.info("Prepared %d images into %s.", report["images_prepared"], builder.data_dir)
  if report["missing_classes"]:
    logging.warning("Classes with no images in the download: %s", report["missing_classes"])
  for item in report["skipped"]:
    logging.warning("Skipped %s: %s", item["file_name"], item["reason"])
  if report["excluded_known_bad"]:
    logging.info("Left out %d known bad files: %s", len(report["excluded_known_bad"]),
                 report["excluded_known_bad"])
  return builder
