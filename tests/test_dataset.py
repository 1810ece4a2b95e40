"""Tests of the dataset path from a download to batches: discovery of every layout (folder, zip,
class root), JPEG validation, the TFDS builder via `prepare()` (stratified splits, build report,
splits.csv, skipped and known-bad files, original bytes) and the class subset mapping of the
evaluation pipeline. The split functions themselves: tests/test_splits.py."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pathlib
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from bmcc import synthetic
from bmcc.data import classes, decode, discovery, input_pipeline, pipeline, splits
from bmcc.data.bone_marrow import KNOWN_BAD_FILES, Builder, prepare
from bmcc.data.validation import BadImageError, validate_jpeg

# Every download below is written with these counts, range_size=5 and corrupt=True. BLA, EOS and
# NGS have range folders, ABE and BAS are flat, MON is an empty class folder. The zero-byte and the
# truncated file go to the largest range-folder class (BLA: valid 1-12, corrupt 13-14, so its last
# range folder is 0011-0014), the text file to the largest flat class (BAS: valid 1-5, corrupt 6).
COUNTS = {"ABE": 3, "BAS": 5, "BLA": 12, "EOS": 6, "MON": 0, "NGS": 9}
RANGE_SIZE = 5
LAST_INDEX = {"BLA": 14, "EOS": 6, "NGS": 9}  # Range folders end at the file count.
CORRUPT = {  # file name -> the start of the reason the builder gives for skipping it
    "BLA/0011-0014/BLA_00013.jpg": "empty",
    "BLA/0011-0014/BLA_00014.jpg": "truncated",
    "BAS/BAS_00006.jpg": "not a JPEG",
}
# A valid image copied to a known bad stem before preparing: it must be left out.
KNOWN_BAD = "EOS/0001-0005/EOS_02571.jpg"
PRESENT = ("ABE", "BAS", "BLA", "EOS", "NGS")
MISSING = [c for c in classes.CODES if c not in PRESENT]  # MON included: its folder is empty.
# The valid files outside train. The builder assigns the 38 files it finds (the known bad one
# left out, the 3 corrupt ones included: they turn out unreadable only when read) with
# `splits.assign_splits`; per class 80/10/10 to within one file, e.g. BLA's 14 files 11/2/1 (the 2
# corrupt BLA files are in train). Every layout must prepare exactly this.
NOT_TRAIN = {
    "ABE/ABE_00002.jpg": "validation",
    "BAS/BAS_00001.jpg": "test",
    "BLA/0001-0005/BLA_00003.jpg": "validation",
    "BLA/0001-0005/BLA_00005.jpg": "validation",
    "BLA/0011-0014/BLA_00012.jpg": "test",
    "EOS/0001-0005/EOS_00002.jpg": "test",
    "NGS/0001-0005/NGS_00005.jpg": "test",
    "NGS/0006-0009/NGS_00007.jpg": "validation",
}
EXPECTED_COUNTS = {
    "train": {"ABE": 2, "BAS": 4, "BLA": 9, "EOS": 5, "NGS": 7},
    "validation": {"ABE": 1, "BLA": 2, "NGS": 1},
    "test": {"BAS": 1, "BLA": 1, "EOS": 1, "NGS": 1},
}
SPLIT_SIZES = {"train": 27, "validation": 4, "test": 4}

# Case -> (layout name discovery reports, read from a zip, class root inside the container).
CASES = {
    "kaggle": ("kaggle", False, "bone_marrow_cell_dataset"),
    "kaggle_zip": ("kaggle", True, "bone_marrow_cell_dataset"),
    "tcia": ("tcia", False, "BM_cytomorphology_data"),
    "tcia_zip_file": ("tcia", True, "BM_cytomorphology_data"),  # the zip path given directly
    "class_root": ("plain", False, ""),  # the folder holding the class folders given directly
}


def _valid_names() -> set[str]:
  names = set()
  for code, n in COUNTS.items():
    for i in range(1, n + 1):
      if code in LAST_INDEX:
        start = (i - 1) // RANGE_SIZE * RANGE_SIZE + 1
        end = min(start + RANGE_SIZE - 1, LAST_INDEX[code])
        names.add(f"{code}/{start:04d}-{end:04d}/{code}_{i:05d}.jpg")
      else:
        names.add(f"{code}/{code}_{i:05d}.jpg")
  return names


VALID = _valid_names()
ALL_FILES = VALID | set(CORRUPT) | {KNOWN_BAD}
SPLIT_OF = {name: NOT_TRAIN.get(name, "train") for name in VALID}


def _expected_split(split: str) -> set[str]:
  return {name for name in VALID if SPLIT_OF[name] == split}


# ------------------------------------------------------------------------------------------------
# Fixtures: each download is written once and prepared once per module.


def _add_known_bad(ds: synthetic.SyntheticDataset) -> None:
  """Copies EOS_00001 to the known bad stem EOS_02571, in the folder or inside the zip."""
  source = "EOS/0001-0005/EOS_00001.jpg"
  if ds.zip_archive:
    with zipfile.ZipFile(ds.path, "a") as zf:
      data = zf.read(f"{ds.folder_name}/{source}")
      zf.writestr(f"{ds.folder_name}/{KNOWN_BAD}", data)
  else:
    shutil.copyfile(ds.path / source, ds.path / KNOWN_BAD)


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> dict[str, tuple[str, synthetic.SyntheticDataset]]:
  """Case -> (what to pass as the manual dir, the dataset written)."""
  written = {}
  for name, layout, zipped in (("kaggle", "kaggle", False), ("kaggle_zip", "kaggle", True),
                               ("tcia", "tcia", False), ("tcia_zip", "tcia", True)):
    ds = synthetic.write_synthetic_dataset(
        tmp_path_factory.mktemp(f"download_{name}"), COUNTS, layout=layout, zip_archive=zipped,
        corrupt=True, range_size=RANGE_SIZE, seed=0)
    _add_known_bad(ds)
    written[name] = ds
  return {
      "kaggle": (str(written["kaggle"].path.parent), written["kaggle"]),
      "kaggle_zip": (str(written["kaggle_zip"].path.parent), written["kaggle_zip"]),
      "tcia": (str(written["tcia"].path.parent), written["tcia"]),
      "tcia_zip_file": (str(written["tcia_zip"].path), written["tcia_zip"]),
      "class_root": (str(written["kaggle"].path), written["kaggle"]),
  }


@pytest.fixture(scope="module")
def prepared(downloads, tmp_path_factory) -> dict[str, object]:
  """Case -> the prepared builder."""
  return {name: prepare(str(tmp_path_factory.mktemp(f"tfds_{name}")), manual)
          for name, (manual, _) in downloads.items()}


def _report(builder) -> dict:
  with open(os.path.join(builder.data_dir, "build_report.json"), encoding="utf-8") as f:
    return json.load(f)


def _records(builder, split: str) -> list[dict]:
  source = input_pipeline.data_source(builder, split)
  return [source[i] for i in range(len(source))]


def _original_bytes(ds: synthetic.SyntheticDataset, file_name: str) -> bytes:
  if ds.zip_archive:
    with zipfile.ZipFile(ds.path) as zf:
      return zf.read(f"{ds.folder_name}/{file_name}")
  return (ds.path / file_name).read_bytes()


def _jpeg(width: int, height: int, fmt: str = "JPEG") -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (width, height), (200, 120, 180)).save(buf, format=fmt)
  return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# Discovery.


def test_expected_file_list_is_what_the_writer_wrote(downloads):
  _, ds = downloads["kaggle"]
  on_disk = {p.relative_to(ds.path).as_posix() for p in ds.path.rglob("*") if p.is_file()}
  assert on_disk == ALL_FILES
  assert len(VALID) == 35 and len(ALL_FILES) == 39
  assert set(ds.corrupt) == set(CORRUPT)
  assert (ds.path / "MON").is_dir() and not any((ds.path / "MON").iterdir())
  assert {"BLA/0001-0005/BLA_00001.jpg", "BLA/0011-0014/BLA_00012.jpg",
          "EOS/0006-0006/EOS_00006.jpg", "NGS/0006-0009/NGS_00009.jpg", "ABE/ABE_00003.jpg",
          "BAS/BAS_00005.jpg"} <= VALID


@pytest.mark.parametrize("case", sorted(CASES))
def test_discover_every_layout_finds_the_same_entries(downloads, case):
  manual, ds = downloads[case]
  layout, is_zip, class_root = CASES[case]
  found = discovery.discover(manual)
  assert found.layout == layout
  assert found.is_zip is is_zip
  assert found.class_root == class_root
  assert found.container == (str(ds.path) if is_zip else manual)
  assert {(e.file_name, e.code) for e in found.entries} == {
      (name, name.split("/")[0]) for name in ALL_FILES}
  assert len(found.entries) == 39
  assert found.ignored == [] and found.duplicates == []
  assert found.counts() == {c: {"ABE": 3, "BAS": 6, "BLA": 14, "EOS": 7, "NGS": 9}.get(c, 0)
                            for c in classes.CODES}
  assert found.missing_classes() == MISSING
  by_name = {e.file_name: e for e in found.entries}
  for name in ("BLA/0006-0010/BLA_00007.jpg", "ABE/ABE_00002.jpg", "BAS/BAS_00006.jpg"):
    entry = by_name[name]
    if is_zip:
      assert entry.location == f"{ds.folder_name}/{name}"
    else:
      assert entry.location == os.path.join(manual, class_root, name)
    assert found.read(entry) == _original_bytes(ds, name)
  assert found.read(by_name["BLA/0011-0014/BLA_00013.jpg"]) == b""


def test_discover_reads_a_zip_in_place(downloads):
  manual, ds = downloads["kaggle_zip"]
  assert os.listdir(manual) == [ds.path.name]  # Nothing extracted, before or after.
  found = discovery.discover(manual)
  entry = next(e for e in found.entries if e.file_name == "NGS/0001-0005/NGS_00004.jpg")
  assert found.read(entry) == downloads["kaggle"][1].path.joinpath(entry.file_name).read_bytes()
  assert os.listdir(manual) == [ds.path.name]


def _extras_tree() -> dict[str, bytes]:
  """A Kaggle-style download with files that are not images of a known class."""
  top = "bone_marrow_cell_dataset"
  return {
      "abbreviations.csv": b"Abbreviation;Meaning\n",  # A known extra: not even listed.
      f"{top}/BLA/0001-0005/BLA_00001.jpg": b"a",
      f"{top}/BLA/0001-0005/BLA_00002.JPG": b"b",  # Mixed-case extension.
      f"{top}/BLA/notes.txt": b"c",
      f"{top}/BLA/.DS_Store": b"d",  # Skipped silently.
      f"{top}/ABE/ABE_00001.Jpeg": b"e",
      f"{top}/XYZ/XYZ_00001.jpg": b"f",  # Unknown class.
      f"{top}/NGS/BLA_00009.jpg": b"g",  # A BLA image outside any BLA folder.
      f"__MACOSX/{top}/BLA/0001-0005/._BLA_00001.jpg": b"h",  # macOS zip debris: skipped.
  }


EXTRAS_ENTRIES = {
    ("BLA/0001-0005/BLA_00001.jpg", "BLA"),
    ("BLA/0001-0005/BLA_00002.JPG", "BLA"),
    ("ABE/ABE_00001.Jpeg", "ABE"),
}
EXTRAS_IGNORED = [
    "bone_marrow_cell_dataset/BLA/notes.txt",
    "bone_marrow_cell_dataset/NGS/BLA_00009.jpg",
    "bone_marrow_cell_dataset/XYZ/XYZ_00001.jpg",
]


def test_discover_lists_unknown_files_as_ignored_in_a_folder(tmp_path):
  for rel, data in _extras_tree().items():
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_bytes(data)
  found = discovery.discover(tmp_path)
  assert found.layout == "kaggle"
  assert {(e.file_name, e.code) for e in found.entries} == EXTRAS_ENTRIES
  assert found.ignored == EXTRAS_IGNORED
  assert found.counts()["BLA"] == 2 and found.counts()["ABE"] == 1
  assert "NGS" in found.missing_classes() and "BLA" not in found.missing_classes()
  entry = next(e for e in found.entries if e.file_name.endswith(".JPG"))
  assert found.read(entry) == b"b"


def test_discover_lists_unknown_files_as_ignored_in_a_zip(tmp_path):
  path = tmp_path / "download.zip"
  with zipfile.ZipFile(path, "w") as zf:
    for rel, data in _extras_tree().items():
      zf.writestr(rel, data)
  for manual in (tmp_path, path):
    found = discovery.discover(manual)
    assert found.is_zip and found.container == str(path)
    assert found.layout == "kaggle"
    assert {(e.file_name, e.code) for e in found.entries} == EXTRAS_ENTRIES
    assert found.ignored == EXTRAS_IGNORED


def test_discover_keeps_the_first_of_duplicate_stems(tmp_path):
  for rel in ("BLA/0001-0005/BLA_00001.jpg", "BLA/BLA_00001.jpg", "BLA/BLA_00002.jpg"):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_bytes(b"x")
  found = discovery.discover(tmp_path)
  assert found.layout == "plain" and found.class_root == ""
  assert [e.file_name for e in found.entries] == ["BLA/0001-0005/BLA_00001.jpg",
                                                  "BLA/BLA_00002.jpg"]
  assert found.duplicates == ["BLA/BLA_00001.jpg"]


def test_discover_prefers_a_folder_over_a_zip_beside_it(tmp_path, downloads):
  shutil.copytree(downloads["tcia"][1].path, tmp_path / "BM_cytomorphology_data")
  shutil.copyfile(downloads["kaggle_zip"][1].path, tmp_path / "kaggle.zip")
  found = discovery.discover(tmp_path)
  assert not found.is_zip and found.layout == "tcia"
  assert len(found.entries) == 39


def test_discover_follows_a_symlinked_download(tmp_path, downloads):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "bone_marrow_cell_dataset").symlink_to(downloads["kaggle"][1].path)
  (manual / "loop").symlink_to(manual)  # A link loop must not recurse forever.
  found = discovery.discover(manual)
  assert not found.is_zip and found.layout == "kaggle"
  assert {e.file_name for e in found.entries} == ALL_FILES
  assert found.ignored == []
  entry = next(e for e in found.entries if e.file_name == "ABE/ABE_00001.jpg")
  assert found.read(entry) == (downloads["kaggle"][1].path / "ABE/ABE_00001.jpg").read_bytes()
  # A zip inside a linked folder is found too.
  (tmp_path / "zipped").mkdir()
  (tmp_path / "zipped" / "inner").symlink_to(downloads["kaggle_zip"][1].path.parent)
  found = discovery.discover(tmp_path / "zipped")
  assert found.is_zip and len(found.entries) == 39


def _assert_instructions(message: str, manual: str) -> None:
  assert repr(manual) in message
  assert "bone_marrow_cell_dataset/" in message and "BM_cytomorphology_data/" in message
  assert "andrewmvd/bone-marrow-cell-classification" in message
  assert "--config.data.manual_dir" in message


def test_discover_raises_with_instructions_for_an_empty_manual_dir(tmp_path):
  with pytest.raises(discovery.DatasetNotFoundError) as info:
    discovery.discover(tmp_path)
  assert isinstance(info.value, FileNotFoundError)
  _assert_instructions(str(info.value), str(tmp_path))
  assert "No bone-marrow cell images were found" in str(info.value)
  (tmp_path / "notes.txt").write_text("hello")  # Still nothing usable.
  (tmp_path / "BLA").mkdir()
  with pytest.raises(discovery.DatasetNotFoundError):
    discovery.discover(tmp_path)


def test_discover_raises_with_instructions_for_a_missing_manual_dir(tmp_path):
  manual = str(tmp_path / "does_not_exist")
  with pytest.raises(discovery.DatasetNotFoundError) as info:
    discovery.discover(manual)
  assert str(info.value).startswith(f"The manual dir {manual!r} does not exist.")
  _assert_instructions(str(info.value), manual)


def test_prepare_raises_without_a_download(tmp_path):
  (tmp_path / "manual").mkdir()
  with pytest.raises(discovery.DatasetNotFoundError):
    prepare(str(tmp_path / "tfds"), str(tmp_path / "manual"))
  with pytest.raises(discovery.DatasetNotFoundError):
    prepare(str(tmp_path / "tfds"), str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------------
# Builder via prepare().


def test_prepare_explains_an_empty_split(tmp_path):
  # 3 images: cuts at round(2.4) = 2 and round(2.7) = 3, so 2 / 1 / 0 and no test image.
  names = [f"ABE/ABE_{i:05d}.jpg" for i in (1, 2, 3)]
  assert splits.assign_splits(names, ["ABE"] * 3) == ["train", "validation", "train"]
  synthetic.write_synthetic_dataset(tmp_path / "manual", {"ABE": 3})
  with pytest.raises(discovery.DatasetNotFoundError) as info:
    prepare(str(tmp_path / "tfds"), str(tmp_path / "manual"))
  message = str(info.value)
  assert "No usable image falls into the 'test' split" in message
  assert "3 images were found" in message and "0 of them were assigned" in message
  assert not Builder(data_dir=str(tmp_path / "tfds"), file_format="array_record").is_prepared()


def test_prepare_explains_a_split_of_only_unreadable_files(tmp_path):
  # 8 files, 6 / 1 / 1: KSC_00003 -> test; validation is the planted corrupt KSC_00008 alone.
  ds = synthetic.write_synthetic_dataset(tmp_path / "manual", {"KSC": 5}, corrupt=True)
  assert ds.corrupt == ("KSC/KSC_00006.jpg", "KSC/KSC_00007.jpg", "KSC/KSC_00008.jpg")
  names = [f"KSC/KSC_{i:05d}.jpg" for i in range(1, 9)]
  assert splits.assign_splits(names, ["KSC"] * 8) == [
      "train", "train", "test", "train", "train", "train", "train", "validation"]
  with pytest.raises(discovery.DatasetNotFoundError) as info:
    prepare(str(tmp_path / "tfds"), str(tmp_path / "manual"))
  message = str(info.value)
  assert "No usable image falls into the 'validation' split" in message
  assert "8 images were found" in message and "1 of them were assigned" in message


def test_expected_counts_follow_assign_splits():
  names = sorted(VALID | set(CORRUPT))
  assigned = dict(zip(names, splits.assign_splits(names, [n[:3] for n in names]), strict=True))
  assert {name: assigned[name] for name in VALID} == SPLIT_OF
  assert {assigned[name] for name in CORRUPT} == {"train"}
  for split in splits.SPLITS:
    got = {}
    for name in _expected_split(split):
      got[name.split("/")[0]] = got.get(name.split("/")[0], 0) + 1
    assert got == EXPECTED_COUNTS[split]
    assert sum(got.values()) == SPLIT_SIZES[split]


@pytest.mark.parametrize("case", sorted(CASES))
def test_build_report(prepared, downloads, case):
  manual, ds = downloads[case]
  layout, is_zip, class_root = CASES[case]
  report = _report(prepared[case])
  assert report["source"] == (str(ds.path) if is_zip else manual)
  assert report["source_is_zip"] is is_zip
  assert report["layout"] == layout
  assert report["class_root"] == class_root
  assert report["images_found"] == 39
  assert report["images_prepared"] == 35
  assert report["counts"] == {
      split: {c: EXPECTED_COUNTS[split].get(c, 0) for c in classes.CODES}
      for split in splits.SPLITS}
  assert report["missing_classes"] == MISSING
  assert [(s["file_name"], s["reason"].split(" (")[0]) for s in report["skipped"]] == [
      ("BAS/BAS_00006.jpg", "not a JPEG"),
      ("BLA/0011-0014/BLA_00013.jpg", "empty file"),
      ("BLA/0011-0014/BLA_00014.jpg", "truncated JPEG"),
  ]
  assert report["skipped"][0]["reason"] == "not a JPEG (starts with b'This is ')"
  assert report["skipped"][1]["reason"] == "empty file (0 bytes)"
  assert report["excluded_known_bad"] == [KNOWN_BAD]
  assert report["duplicates"] == [] and report["ignored"] == []
  info = prepared[case].info
  assert {s: info.splits[s].num_examples for s in splits.SPLITS} == SPLIT_SIZES


@pytest.mark.parametrize("split", splits.SPLITS)
def test_every_layout_prepares_the_same_files(prepared, split):
  expected = _expected_split(split)
  assert not expected & (set(CORRUPT) | {KNOWN_BAD})
  for case, builder in prepared.items():
    names = [r["file_name"].decode() for r in _records(builder, split)]
    assert len(names) == len(set(names)), case
    assert set(names) == expected, case


@pytest.mark.parametrize("case", ["kaggle", "kaggle_zip", "class_root"])
def test_prepared_records_hold_the_original_bytes_and_labels(prepared, downloads, case):
  _, ds = downloads[case]
  seen = 0
  for split in splits.SPLITS:
    for record in _records(prepared[case], split):
      name = record["file_name"].decode()
      assert isinstance(record["image"], bytes)
      assert record["image"] == _original_bytes(ds, name), name  # Never re-encoded.
      assert validate_jpeg(record["image"]) == (250, 250)
      assert int(record["label"]) == classes.CODES.index(name.split("/")[0]), name
      assert SPLIT_OF[name] == split
      seen += 1
  assert seen == 35


def test_known_bad_file_is_valid_but_left_out(prepared, downloads):
  _, ds = downloads["kaggle"]
  assert splits.file_stem(KNOWN_BAD) in KNOWN_BAD_FILES
  assert validate_jpeg((ds.path / KNOWN_BAD).read_bytes()) == (250, 250)  # Not left out as bad.
  names = {r["file_name"].decode() for s in splits.SPLITS for r in _records(prepared["kaggle"], s)}
  assert KNOWN_BAD not in names and not names & set(CORRUPT)


@pytest.mark.parametrize("case", sorted(CASES))
def test_splits_csv(prepared, case):
  path = os.path.join(prepared[case].data_dir, "splits.csv")
  with open(path, encoding="utf-8", newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["file_name", "code", "label", "split"]
  expected = sorted(
      [name, name[:3], str(classes.CODES.index(name[:3])), SPLIT_OF[name]] for name in VALID)
  assert rows[1:] == expected
  assert ["BLA/0011-0014/BLA_00012.jpg", "BLA", "3", "test"] in rows
  assert ["ABE/ABE_00002.jpg", "ABE", "0", "validation"] in rows


def test_prepare_twice_reuses_the_prepared_dataset(prepared, tmp_path):
  builder = prepared["kaggle"]
  # Already prepared: the manual dir is not even looked at.
  again = prepare(os.path.dirname(os.path.dirname(builder.data_dir)), str(tmp_path / "nowhere"))
  assert again.data_dir == builder.data_dir
  assert {s: again.info.splits[s].num_examples for s in splits.SPLITS} == SPLIT_SIZES
  assert len(input_pipeline.data_source(again, "test")) == 4


# ------------------------------------------------------------------------------------------------
# JPEG validation.


def test_validate_jpeg_accepts_a_valid_jpeg():
  assert validate_jpeg(_jpeg(40, 24)) == (24, 40)  # (height, width)
  assert validate_jpeg(synthetic.image_bytes("BLA", 1, seed=0, image_size=250)) == (250, 250)


def test_validate_jpeg_rejects_an_empty_file():
  with pytest.raises(BadImageError, match=r"^empty file \(0 bytes\)$"):
    validate_jpeg(b"")


def test_validate_jpeg_rejects_text():
  with pytest.raises(BadImageError, match=r"^not a JPEG \(starts with b'This is '\)$"):
    validate_jpeg(synthetic.TEXT_NOT_JPEG)


@pytest.mark.parametrize("keep", [0.1, 0.4, 0.9])
@pytest.mark.parametrize("pil_loads_truncated", [False, True])
def test_validate_jpeg_rejects_a_truncated_jpeg(keep, pil_loads_truncated, monkeypatch):
  # TFDS sets ImageFile.LOAD_TRUNCATED_IMAGES process-wide in some paths; validation must not care.
  from PIL import ImageFile
  monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", pil_loads_truncated)
  data = synthetic.image_bytes("NGS", 3, seed=0, image_size=250)
  with pytest.raises(BadImageError, match=r"^truncated JPEG \(no end-of-image marker\)$"):
    validate_jpeg(data[: int(len(data) * keep)])


def test_validate_jpeg_rejects_a_png_and_a_tiny_image():
  with pytest.raises(BadImageError, match=r"^not a JPEG"):
    validate_jpeg(_jpeg(32, 32, fmt="PNG"))
  with pytest.raises(BadImageError, match=r"^image too small \(8x8 px\)$"):
    validate_jpeg(_jpeg(8, 8))
  assert issubclass(BadImageError, ValueError)


# ------------------------------------------------------------------------------------------------
# Class mapping and evaluation batches.


def test_class_mapping_subset_renumbers_in_the_given_order():
  mapping = pipeline.ClassMapping.create(("NGS", "BLA"))
  assert mapping.codes == ("NGS", "BLA")
  assert mapping.num_classes == 2 and not mapping.is_identity
  assert mapping.names == ("Segmented neutrophil", "Blast")
  expected = np.full(21, -1, np.int32)
  expected[15] = 0  # NGS
  expected[3] = 1  # BLA
  table = mapping.lookup_table()
  assert table.dtype == np.int32
  np.testing.assert_array_equal(table, expected)
  full = pipeline.ClassMapping.create(None)
  assert full.is_identity and full.num_classes == 21
  np.testing.assert_array_equal(full.lookup_table(), np.arange(21, dtype=np.int32))


def test_class_mapping_unknown_code_lists_the_valid_codes():
  with pytest.raises(ValueError) as info:
    pipeline.ClassMapping.create(("NGS", "XYZ"))
  assert "XYZ" in str(info.value)
  assert "Valid codes are: " + ", ".join(classes.CODES) in str(info.value)
  with pytest.raises(ValueError, match="more than once"):
    pipeline.ClassMapping.create(("NGS", "NGS"))


def test_eval_batches_with_a_class_subset(prepared):
  source = input_pipeline.data_source(prepared["kaggle"], "train")
  assert len(source) == 27
  mapping = pipeline.ClassMapping.create(("NGS", "BLA"))
  size, batch_size = 32, 4
  kept = [r for r in (source[i] for i in range(len(source)))
          if classes.CODES[int(r["label"])] in mapping.codes]
  assert len(kept) == 16  # 7 NGS + 9 BLA in train.
  batches = list(pipeline.eval_batches(source, mapping=mapping, image_size=size,
                                       batch_size=batch_size))
  assert len(batches) == 4  # 16 / 4: one process, so no all-padding batches are needed.
  for batch in batches:
    assert batch["image"].shape == (batch_size, size, size, 3)
    assert batch["image"].dtype == np.uint8
    assert batch["label"].shape == (batch_size,) and batch["mask"].shape == (batch_size,)
    assert batch["mask"].dtype == bool
    assert not batch["image"][~batch["mask"]].any() and not batch["label"][~batch["mask"]].any()
  assert [int(b["mask"].sum()) for b in batches] == [4, 4, 4, 4]
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  images = np.concatenate([b["image"][b["mask"]] for b in batches])
  assert set(labels.tolist()) == {0, 1}
  assert int((labels == 0).sum()) == 7 and int((labels == 1).sum()) == 9
  # Each kept example exactly once, in source order.
  expected_labels = [mapping.codes.index(classes.CODES[int(r["label"])]) for r in kept]
  assert labels.tolist() == expected_labels
  digests = [hashlib.sha256(im.tobytes()).hexdigest() for im in images]
  expected = [hashlib.sha256(decode.decode_image(r["image"], size).tobytes()).hexdigest()
              for r in kept]
  assert digests == expected
  assert len(set(digests)) == 16


def test_eval_batches_identity_mapping_covers_the_split(prepared):
  source = input_pipeline.data_source(prepared["tcia"], "validation")
  mapping = pipeline.ClassMapping.create(None)
  batches = list(pipeline.eval_batches(source, mapping=mapping, image_size=16, batch_size=3))
  assert [int(b["mask"].sum()) for b in batches] == [3, 1]
  labels = sorted(np.concatenate([b["label"][b["mask"]] for b in batches]).tolist())
  assert labels == sorted(classes.CODES.index(c) for c in ("ABE", "BLA", "BLA", "NGS"))


def test_paths_are_posix_relative(prepared):
  for builder in prepared.values():
    for record in _records(builder, "validation"):
      name = record["file_name"].decode()
      assert not pathlib.PurePosixPath(name).is_absolute() and "\\" not in name
      assert name.count("/") in (1, 2)
