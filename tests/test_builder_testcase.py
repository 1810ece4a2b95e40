"""TFDS's own builder test (`tfds.testing.DatasetBuilderTestCase`) for `bone_marrow`.

The dummy data in `bmcc/data/bone_marrow/dummy_data/` is a tiny Kaggle download, unzipped: the
folder `bone_marrow_cell_dataset/` with range folders for two large classes (BLA, NGS, including
NGS's last range folder `29001-29424`), flat files for two small classes (ABE with all 8 images,
like the real class, and BAS), and `abbreviations.csv` beside it. The 32 x 32 JPEGs are synthetic
(`bmcc.synthetic`). One file has a stem from the known-bad list (a valid image, left out) and one
is a truncated JPEG (skipped). The splits are what `bmcc.data.splits.assign_splits` gives the files
found less the known bad one (ABE 6 / 1 / 1).
DatasetBuilderTestCase points the builder's manual dir at that folder (the builder has
MANUAL_DOWNLOAD_INSTRUCTIONS), and the builder discovers the download there like a real one.

DatasetBuilderTestCase builds with TFDS's default file format, TFRecord (TensorFlow writes and
reads it), because it reads every split back with `as_dataset`, which TFDS does not implement for
ArrayRecord. `test_array_record_build` builds the same dummy data as ArrayRecord, the format
`prepare()` uses, and reads it back with `as_data_source`, the project's read path.

`tfds.testing` imports `dill` at module level (tensorflow_datasets/testing/feature_test_case.py,
TFDS 4.9.10): it is in the `test` extras for that reason alone.

Regenerate the dummy data with `PYTHONPATH=. python tests/test_builder_testcase.py`
(deterministic for one Pillow version).
"""

from __future__ import annotations

import pathlib
import sys

import tensorflow_datasets as tfds

from bmcc import synthetic
from bmcc.data import bone_marrow, splits

DUMMY_DATA = pathlib.Path(bone_marrow.__file__).parent / "dummy_data"
CLASS_ROOT = "bone_marrow_cell_dataset"
IMAGE_SIZE = 32
# The valid images (file names relative to the class root) and the split `assign_splits` gives each.
VALID = {
    "ABE/ABE_00001.jpg": "train",
    "ABE/ABE_00002.jpg": "train",
    "ABE/ABE_00003.jpg": "train",
    "ABE/ABE_00004.jpg": "train",
    "ABE/ABE_00005.jpg": "train",
    "ABE/ABE_00006.jpg": "test",
    "ABE/ABE_00007.jpg": "train",
    "ABE/ABE_00008.jpg": "validation",
    "BAS/BAS_00012.jpg": "train",
    "BLA/0001-1000/BLA_00001.jpg": "train",
    "BLA/0001-1000/BLA_00002.jpg": "train",
    "BLA/0001-1000/BLA_00012.jpg": "validation",
    "NGS/0001-1000/NGS_00001.jpg": "train",
    "NGS/0001-1000/NGS_00005.jpg": "validation",
    "NGS/0001-1000/NGS_00007.jpg": "train",
    "NGS/29001-29424/NGS_29424.jpg": "train",
}
KNOWN_BAD = "NGS/4001-5000/NGS_04035.jpg"  # valid JPEG, left out by the builder
TRUNCATED = "BAS/BAS_00002.jpg"  # first 40% of a valid JPEG, skipped by the builder
SPLIT_SIZES = {s: sum(v == s for v in VALID.values()) for s in splits.SPLITS}


def write_dummy_data(root: pathlib.Path = DUMMY_DATA) -> None:
  """Writes the dummy download into `root` (the files listed above, and abbreviations.csv)."""
  (root / synthetic.ABBREVIATIONS_FILE).parent.mkdir(parents=True, exist_ok=True)
  (root / synthetic.ABBREVIATIONS_FILE).write_text(synthetic.abbreviations_csv(), encoding="utf-8")
  for name in [*VALID, KNOWN_BAD, TRUNCATED]:
    stem = splits.file_stem(name)
    data = synthetic.image_bytes(stem[:3], int(stem[4:]), image_size=IMAGE_SIZE)
    if name == TRUNCATED:
      data = data[:len(data) * 2 // 5]
    path = root / CLASS_ROOT / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


class BoneMarrowBuilderTest(tfds.testing.DatasetBuilderTestCase):
  """Builds the dummy download with TFDS's checks (registration, info, splits, as_dataset)."""

  DATASET_CLASS = bone_marrow.Builder
  SPLITS = {"train": 12, "validation": 3, "test": 1}
  # The builder downloads nothing: it reads `dl_manager.manual_dir`, which the test case sets to
  # the dummy_data folder beside the builder (found from DATASET_CLASS.code_path); said here too.
  EXAMPLE_DIR = str(DUMMY_DATA)
  SKIP_CHECKSUMS = True  # No URL is ever downloaded, so there are no checksums to register.

  def test_dummy_data_is_as_documented(self):
    self.assertEqual(self.SPLITS, SPLIT_SIZES)
    found = sorted([*VALID, TRUNCATED])  # what the builder assigns: the known bad file left out
    assigned = dict(zip(found, splits.assign_splits(found, [n[:3] for n in found]), strict=True))
    self.assertEqual({name: assigned[name] for name in VALID}, VALID)
    files = {p.relative_to(DUMMY_DATA / CLASS_ROOT).as_posix()
             for p in (DUMMY_DATA / CLASS_ROOT).rglob("*") if p.is_file()}
    self.assertEqual(files, {*VALID, KNOWN_BAD, TRUNCATED})
    self.assertTrue((DUMMY_DATA / synthetic.ABBREVIATIONS_FILE).is_file())
    self.assertIn(splits.file_stem(KNOWN_BAD), bone_marrow.KNOWN_BAD_FILES)
    self.assertLess(sum(p.stat().st_size for p in DUMMY_DATA.rglob("*") if p.is_file()), 200_000)

  def test_array_record_build(self):
    """The project's format: ArrayRecord, read back with `as_data_source`, original bytes."""
    builder = bone_marrow.Builder(data_dir=str(pathlib.Path(self.tmp_dir, "array_record")),
                                  file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(DUMMY_DATA)))
    self.assertEqual(builder.excluded, [KNOWN_BAD])
    self.assertEqual([name for name, _ in builder.skipped], [TRUNCATED])
    self.assertTrue(builder.skipped[0][1].startswith("truncated JPEG"), builder.skipped)
    for split, size in self.SPLITS.items():
      source = builder.as_data_source(split=split,
                                      decoders={"image": tfds.decode.SkipDecoding()})
      self.assertLen(source, size)
      records = [source[i] for i in range(len(source))]
      names = {r["file_name"].decode() for r in records}
      self.assertEqual(names, {n for n, s in VALID.items() if s == split})
      for record in records:
        name = record["file_name"].decode()
        original = (DUMMY_DATA / CLASS_ROOT / name).read_bytes()
        self.assertEqual(record["image"], original, name)  # Never re-encoded.
        self.assertEqual(builder.info.features["label"].int2str(int(record["label"])), name[:3])


if __name__ == "__main__":
  if sys.argv[1:] != []:
    raise SystemExit(f"usage: python {sys.argv[0]}  (rewrites {DUMMY_DATA})")
  write_dummy_data()
  print(f"Wrote the dummy data into {DUMMY_DATA}")
