"""Tests of the synthetic dataset writer: exact on-disk layout, zip, determinism, corrupt files and
class-dependent image content."""

from __future__ import annotations

import io
import os
import pathlib
import re
import zipfile

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from bmcc import synthetic
from bmcc.data import classes
from bmcc.synthetic import cli as synthetic_cli

# Written by the module-scoped fixtures below with range_size=50 and corrupt=True. NGS and EBO have
# range folders; ABE and BAS are flat. The zero-byte and the truncated file go to the largest
# range-folder class (NGS: valid 1-120, corrupt 121-122), the text file to the largest flat class
# (BAS: valid 1-12, corrupt 13).
COUNTS = {"NGS": 120, "EBO": 55, "ABE": 5, "BAS": 12}
RANGE_SIZE = 50
FILE_NAME = re.compile(r"^(?P<code>[A-Z]{3})_(?P<num>\d{5})\.jpg$")


def _write(root: pathlib.Path, **kwargs) -> synthetic.SyntheticDataset:
  args = dict(counts=COUNTS, corrupt=True, range_size=RANGE_SIZE, seed=0)
  args.update(kwargs)
  return synthetic.write_synthetic_dataset(root, **args)


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory) -> synthetic.SyntheticDataset:
  return _write(tmp_path_factory.mktemp("kaggle"))


@pytest.fixture(scope="module")
def kaggle_zip(tmp_path_factory) -> synthetic.SyntheticDataset:
  return _write(tmp_path_factory.mktemp("kaggle_zip"), zip_archive=True)


def _tree(root: pathlib.Path) -> tuple[set[str], set[str]]:
  """(files, directories) under root, as POSIX paths relative to it."""
  files, dirs = set(), set()
  for dirpath, dirnames, filenames in os.walk(root):
    rel = pathlib.Path(dirpath).relative_to(root)
    dirs.update((rel / d).as_posix() for d in dirnames)
    files.update((rel / f).as_posix() for f in filenames)
  return files, dirs


def test_kaggle_layout_is_exact(kaggle):
  root = kaggle.path.parent
  assert kaggle.path == root / "bone_marrow_cell_dataset"
  assert sorted(p.name for p in root.iterdir()) == ["abbreviations.csv", "bone_marrow_cell_dataset"]
  files, dirs = _tree(kaggle.path)
  assert dirs == {
      "NGS", "NGS/0001-0050", "NGS/0051-0100", "NGS/0101-0122",  # Last ends at 120 + 2 corrupt.
      "EBO", "EBO/0001-0050", "EBO/0051-0055",
      "ABE", "BAS",  # Flat classes: no range folder.
  }
  expected = set()
  for code, n in {"NGS": 122, "EBO": 55, "ABE": 5, "BAS": 13}.items():
    for i in range(1, n + 1):
      if code in ("ABE", "BAS"):
        expected.add(f"{code}/{code}_{i:05d}.jpg")
      else:
        start = (i - 1) // 50 * 50 + 1
        expected.add(f"{code}/{start:04d}-{min(start + 49, n):04d}/{code}_{i:05d}.jpg")
  assert files == expected
  for rel in files:
    match = FILE_NAME.match(rel.rsplit("/", 1)[1])
    assert match and match["code"] == rel.split("/")[0], rel
  assert kaggle.counts == COUNTS
  assert kaggle.num_images == 192
  assert kaggle.layout == "kaggle" and not kaggle.zip_archive


def test_abbreviations_csv(kaggle):
  lines = (kaggle.path.parent / "abbreviations.csv").read_text(encoding="utf-8").splitlines()
  assert lines[0] == "Abbreviation;Meaning"
  assert lines[1] == "ABE;Abnormal eosinophil"
  assert lines[1:] == [f"{c.code};{c.name}" for c in classes.CLASSES]
  assert len(lines) == 22


def test_default_range_size_names_folders_like_the_real_data():
  for n in (1000, 1001, 3055, 9968, 29424):
    for i in sorted({1, 999, 1000, 1001, n // 2, n - 1, n}):
      if 1 <= i <= n:
        start = (i - 1) // 1000 * 1000 + 1
        expected = f"NGS/{start:04d}-{min(start + 999, n):04d}/NGS_{i:05d}.jpg"
        assert synthetic.relative_path("NGS", i, n) == expected
  assert synthetic.relative_path("NGB", 9968, 9968) == "NGB/9001-9968/NGB_09968.jpg"
  assert synthetic.relative_path("ART", 19001, 19630) == "ART/19001-19630/ART_19001.jpg"
  for code in classes.FLAT_CLASSES:
    assert synthetic.relative_path(code, 7, 400) == f"{code}/{code}_00007.jpg"


def test_tcia_layout(tmp_path):
  ds = synthetic.write_synthetic_dataset(tmp_path, {"NGS": 3, "KSC": 2}, layout="tcia")
  assert ds.path == tmp_path / "BM_cytomorphology_data"
  assert [p.name for p in tmp_path.iterdir()] == ["BM_cytomorphology_data"]  # No abbreviations.
  files, _ = _tree(ds.path)
  assert files == {"NGS/0001-0003/NGS_00001.jpg", "NGS/0001-0003/NGS_00002.jpg",
                   "NGS/0001-0003/NGS_00003.jpg", "KSC/KSC_00001.jpg", "KSC/KSC_00002.jpg"}
  assert ds.corrupt == ()


def test_zip_holds_exactly_the_folder_layout(kaggle, kaggle_zip):
  root = kaggle.path.parent
  assert kaggle_zip.path == kaggle_zip.path.parent / "bone-marrow-cell-classification.zip"
  assert [p.name for p in kaggle_zip.path.parent.iterdir()] == [kaggle_zip.path.name]
  files, dirs = _tree(root)
  with zipfile.ZipFile(kaggle_zip.path) as zf:
    infos = zf.infolist()
    names = {i.filename for i in infos}
    assert {n for n in names if not n.endswith("/")} == files
    assert {n.rstrip("/") for n in names if n.endswith("/")} == dirs
    assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
    for name in files:  # Same bytes as the folder, corrupt files included.
      assert zf.read(name) == (root / name).read_bytes(), name
  assert kaggle_zip.corrupt == kaggle.corrupt
  assert kaggle_zip.counts == kaggle.counts


def test_empty_class_folder_in_folder_and_zip(tmp_path):
  counts = {"NGS": 0, "ABE": 0, "EBO": 2}
  ds = synthetic.write_synthetic_dataset(tmp_path / "d", counts)
  assert list((ds.path / "NGS").iterdir()) == [] and list((ds.path / "ABE").iterdir()) == []
  zds = synthetic.write_synthetic_dataset(tmp_path / "z", counts, zip_archive=True)
  with zipfile.ZipFile(zds.path) as zf:
    names = set(zf.namelist())
  assert {"bone_marrow_cell_dataset/NGS/", "bone_marrow_cell_dataset/ABE/"} <= names
  assert "bone_marrow_cell_dataset/EBO/0001-0002/EBO_00002.jpg" in names


def test_corrupt_files_are_planted_and_undecodable(kaggle):
  assert kaggle.corrupt == ("NGS/0101-0122/NGS_00121.jpg", "NGS/0101-0122/NGS_00122.jpg",
                            "BAS/BAS_00013.jpg")
  empty, truncated, text = (kaggle.path / rel for rel in kaggle.corrupt)
  assert empty.stat().st_size == 0
  with pytest.raises(UnidentifiedImageError):
    Image.open(empty)
  data = truncated.read_bytes()
  whole = synthetic.image_bytes("NGS", 122, seed=0)
  assert data == whole[:len(data)] and len(data) == int(len(whole) * 0.4)
  with pytest.raises(OSError):  # The header parses; decoding the pixels fails.
    with Image.open(truncated) as im:
      im.load()
  assert text.read_bytes().startswith(b"This is not a JPEG")
  with pytest.raises(UnidentifiedImageError):
    Image.open(text)


def test_valid_files_decode_to_250px_rgb(kaggle):
  files, _ = _tree(kaggle.path)
  valid = files - set(kaggle.corrupt)
  assert len(valid) == kaggle.num_images
  for rel in sorted(valid):
    with Image.open(kaggle.path / rel) as im:
      assert im.format == "JPEG" and im.mode == "RGB" and im.size == (250, 250), rel
      im.load()


def test_same_seed_same_bytes_different_seed_different_bytes(kaggle, tmp_path):
  # Another call with other classes and another range size: the shared image is byte-identical.
  other = synthetic.write_synthetic_dataset(tmp_path, {"EBO": 3, "LYT": 1})
  assert ((other.path / "EBO/0001-0003/EBO_00002.jpg").read_bytes()
          == (kaggle.path / "EBO/0001-0050/EBO_00002.jpg").read_bytes())
  for code in ("NGS", "ART", "KSC"):
    a = synthetic.image_bytes(code, 7, seed=3)
    assert a == synthetic.image_bytes(code, 7, seed=3)
    assert a != synthetic.image_bytes(code, 7, seed=4)
    assert a != synthetic.image_bytes(code, 8, seed=3)
  assert not np.array_equal(synthetic.render_image("NGS", 1, seed=0),
                            synthetic.render_image("NGS", 1, seed=1))


def test_worker_processes_write_the_same_bytes(tmp_path):
  counts = {"LYT": 60, "HAC": 40}  # More than one chunk of work.
  one = synthetic.write_synthetic_dataset(tmp_path / "one", counts, zip_archive=True)
  two = synthetic.write_synthetic_dataset(tmp_path / "two", counts, zip_archive=True,
                                          num_workers=2)
  assert one.path.read_bytes() == two.path.read_bytes()
  folder = synthetic.write_synthetic_dataset(tmp_path / "folder", counts, num_workers=2)
  with zipfile.ZipFile(one.path) as zf:
    for name in zf.namelist():
      if name.endswith(".jpg"):
        rel = name.split("/", 1)[1]
        assert zf.read(name) == (folder.path / rel).read_bytes(), rel


def _features(code: str, index: int) -> np.ndarray:
  """The decoded JPEG's central 160 px (where the cell is), downsampled to 16 x 16 RGB."""
  with Image.open(io.BytesIO(synthetic.image_bytes(code, index, seed=0))) as im:
    small = im.crop((45, 45, 205, 205)).resize((16, 16), Image.BILINEAR)
  return np.asarray(small, np.float32).ravel() / 255.0


def test_classes_are_distinguishable_by_nearest_class_mean():
  train, test = 20, 10
  feats = np.stack([np.stack([_features(c, i) for i in range(1, train + test + 1)])
                    for c in classes.CODES])  # (21, 30, 768)
  means = feats[:, :train].mean(axis=1)  # (21, 768)
  held_out = feats[:, train:].reshape(-1, feats.shape[-1])
  labels = np.repeat(np.arange(len(classes.CODES)), test)
  dists = ((held_out[:, None, :] - means[None]) ** 2).sum(-1)
  accuracy = float((dists.argmin(1) == labels).mean())
  # Measured 0.748 (157 of 210; chance 0.048): the class recipes, not pixel noise, carry the signal.
  assert accuracy > 0.6, accuracy
  assert np.abs(means[classes.CODES.index("LYT")] - means[classes.CODES.index("PMO")]).mean() > 0.05


def test_default_counts():
  counts = synthetic.default_counts()
  assert list(counts) == list(classes.CODES)
  assert 2800 <= sum(counts.values()) <= 3200
  assert min(counts.values()) == synthetic.DEFAULT_MINIMUM
  assert counts["NGS"] == max(counts.values()) > 10 * counts["ABE"]  # Imbalance kept.
  assert synthetic.default_counts(0.01, 0) == {
      c: round(n * 0.01) for c, n in classes.FULL_COUNTS.items()}
  assert min(synthetic.default_counts(0.001, 5).values()) == 5


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="Unknown class code"):
    synthetic.write_synthetic_dataset(tmp_path, {"XYZ": 1})
  with pytest.raises(ValueError, match="non-negative"):
    synthetic.write_synthetic_dataset(tmp_path, {"NGS": -1})
  with pytest.raises(ValueError, match="layout"):
    synthetic.write_synthetic_dataset(tmp_path, {"NGS": 1}, layout="zenodo")
  with pytest.raises(ValueError, match="at least one class"):
    synthetic.write_synthetic_dataset(tmp_path, {"NGS": 0}, corrupt=True)
  synthetic.write_synthetic_dataset(tmp_path, {"NGS": 1})
  with pytest.raises(FileExistsError):
    synthetic.write_synthetic_dataset(tmp_path, {"NGS": 2})
  ds = synthetic.write_synthetic_dataset(tmp_path, {"EBO": 1}, overwrite=True)
  assert _tree(ds.path)[0] == {"EBO/0001-0001/EBO_00001.jpg"}


def test_command_line(tmp_path, capsys):
  out = tmp_path / "out"
  assert synthetic_cli.main([str(out), "--scale", "0.0002", "--minimum", "1", "--zip", "--corrupt",
                         "--layout", "tcia"]) == 0
  printed = capsys.readouterr().out
  assert "images/s" in printed and "corrupt: BM_cytomorphology_data/" in printed
  with zipfile.ZipFile(out / "BM_cytomorphology_data.zip") as zf:
    jpgs = [n for n in zf.namelist() if n.endswith(".jpg")]
  assert len(jpgs) == sum(synthetic.default_counts(0.0002, 1).values()) + 3
  with pytest.raises(SystemExit) as exit_info:  # Exists already: a usage error, not a traceback.
    synthetic_cli.main([str(out), "--scale", "0.0002", "--minimum", "1", "--zip", "--layout",
                        "tcia"])
  assert exit_info.value.code == 2
