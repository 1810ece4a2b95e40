"""Real cells (tests/fixtures/real_cells): decoded exactly as recorded, predicted and explained.

20 real images of the Bone Marrow Cytomorphology dataset (Matek et al. 2021, CC BY 4.0; see the
fixture's README), one per class, in the Kaggle layout. Prediction and explanation use a small
model with seeded random weights (`tests/test_predict.py`'s checkpoint): what is tested is that
real files go through, not what is learnt.
"""

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bmcc import predict
from bmcc.data import augment, decode, normalization
from bmcc.explain import driver
from tests.test_predict import IMAGE_SIZE, _write_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "real_cells"
ROOT = FIXTURES / "bone_marrow_cell_dataset"
REFERENCE = json.loads((FIXTURES / "decoded.json").read_text())
FILES = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.jpg"))
NO_OPS = augment.AugmentConfig(dihedral=False, crop_scale=(1.0, 1.0), color_jitter=0.0,
                               hue_jitter=0.0)


def test_fixture_is_one_real_cell_per_class_in_the_kaggle_layout():
  assert sorted(REFERENCE) == FILES and len(FILES) == 20
  codes = [Path(f).name.split("_")[0] for f in FILES]
  assert codes == [f.split("/")[0] for f in FILES] and len(set(codes)) == 20
  for f in FILES:  # range folders for classes of 1,000+ images in the full set, none otherwise
    assert len(Path(f).parts) == (2 if codes[FILES.index(f)] in
                                  ("ABE", "BAS", "FGC", "HAC", "KSC", "LYI") else 3), f
  assert sum((ROOT / f).stat().st_size for f in FILES) < 700_000


def test_matek_statistics_normalise_real_cells_and_the_stain_ones_do_not():
  pixels = np.concatenate([decode.read_image(ROOT / name, 64)[0].reshape(-1, 3) for name in FILES])
  matek = normalization.normalize_images(pixels, mean=normalization.MATEK_MEAN_RGB,
                                         std=normalization.MATEK_STDDEV_RGB)
  # One cell per class (rare dark ones included): near zero mean and unit spread, not exactly.
  assert np.all(np.abs(matek.mean(0)) < 0.7) and np.all(np.abs(matek.std(0) - 1) < 0.15)
  stain = normalization.normalize_images(pixels)  # fixed round values, 50+ grey levels brighter
  assert np.all(stain.mean(0) < -0.8)


@pytest.mark.parametrize("size", [64, 224])
def test_real_cells_decode_exactly_to_the_reference(size):
  for name in FILES:
    image, original = decode.read_image(ROOT / name, size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert list(original) == REFERENCE[name]["size"] == [250, 250]
    assert hashlib.sha256(image.tobytes()).hexdigest() == REFERENCE[name][f"sha256_{size}"], name
    if size == 64:
      np.testing.assert_allclose(image.reshape(-1, 3).mean(0), REFERENCE[name]["mean_rgb_64"],
                                 atol=1e-4)


@pytest.mark.parametrize("size", [250, 224, 100, 64, 37])
def test_training_pictures_without_augmentation_are_evaluations_on_real_cells(size):
  for name in FILES[::4]:
    data = (ROOT / name).read_bytes()
    expected = decode.read_image(ROOT / name, size)[0]
    np.testing.assert_array_equal(decode.decode_image(data, size), expected)
    np.testing.assert_array_equal(
        augment.augment_image(data, size, NO_OPS, np.random.default_rng(0)), expected)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("real_cells") / "workdir")
  _write_checkpoint(path)
  return path


def test_predict_on_real_cells(workdir):
  out, err = io.StringIO(), io.StringIO()
  status = predict.predict_paths(workdir, [str(ROOT)], stdout=out, stderr=err, top_k=3,
                                 batch_size=8)
  assert status == 0 and err.getvalue() == ""
  records = [json.loads(line) for line in out.getvalue().splitlines()]
  assert [os.path.relpath(r["path"], ROOT) for r in records] == FILES
  for r in records:
    probs = [t["probability"] for t in r["top_k"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert r["code"] == r["top_k"][0]["code"]
    assert "warning" not in r  # 250 x 250: the dataset's geometry
  # Deterministic, and batching does not change a prediction.
  again = io.StringIO()
  predict.predict_paths(workdir, [str(ROOT)], stdout=again, stderr=io.StringIO(), top_k=3,
                        batch_size=3)
  for a, b in zip(records, map(json.loads, again.getvalue().splitlines()), strict=True):
    assert a["code"] == b["code"] and abs(a["probability"] - b["probability"]) < 1e-5


def test_explain_real_cells(workdir, tmp_path):
  chosen = FILES[::4]  # 5 cells, flat and range folders: Grad-CAM, as `--mode=explain` runs it
  out, err = io.StringIO(), io.StringIO()
  status = driver.explain_paths(workdir, [str(ROOT / f) for f in chosen], methods="gradcam",
                                out_dir=str(tmp_path / "out"), stdout=out, stderr=err,
                                batch_size=8, display_size=64)
  assert status == 0, err.getvalue()
  records = [json.loads(line) for line in out.getvalue().splitlines()]
  # The true class comes from the Kaggle file name; every map is finite at the model's size.
  assert [r["true"] for r in records] == [Path(f).name.split("_")[0] for f in chosen]
  for r in records:
    assert set(r["maps"]) == {"gradcam"}
    attribution = np.load(r["maps"]["gradcam"])
    assert attribution.shape == (IMAGE_SIZE, IMAGE_SIZE) and np.isfinite(attribution).all()
    assert attribution.max() > attribution.min()  # a map, not a constant
    assert Image.open(r["picture"]).width == 64 * 2  # the cell and its overlay
  assert (tmp_path / "out" / "contact_sheet.png").exists()


def test_integrated_gradients_is_complete_on_real_cells(workdir):
  """IG's map sums to logit(x) - logit(mean colour) on real cells too (the property measured on a
  model trained on real cells in the README, `python -m tests.test_explain WORKDIR --split=test`);
  8 real cells (two shards of the 4 test devices) at the fixture model's size, 128 steps; the
  model has seeded random weights, for which completeness holds as for any model."""
  from bmcc import checkpointing  # noqa: PLC0415
  from tests.test_explain import completeness_errors  # noqa: PLC0415

  model, _, _ = checkpointing.restore_model(workdir, "latest")
  images = np.stack([decode.read_image(ROOT / f, IMAGE_SIZE)[0] for f in FILES[::2][:8]])
  errors, delta = completeness_errors(model, images, "mean", 128)
  assert np.abs(delta).min() > 0.1, delta  # a real difference to attribute
  assert errors.max() < 0.01, (errors, delta)
