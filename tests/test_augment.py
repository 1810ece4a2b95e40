"""Training augmentation: shapes, determinism, each transform doing what it says, exact maths."""

import dataclasses
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from bmcc import synthetic
from bmcc.data import augment
from bmcc.data.decode import decode_image
from configs import default

NO_OPS = augment.AugmentConfig(dihedral=False, crop_scale=(1.0, 1.0), color_jitter=0.0,
                               hue_jitter=0.0)


@pytest.fixture(scope="module")
def jpeg():
  return synthetic.image_bytes("EOS", 3)  # 250 x 250, coloured granules: asymmetric


def _jpeg(array: np.ndarray, quality: int = 95) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, "JPEG", quality=quality)
  return buf.getvalue()


def _run(data, size, config, seed):
  return augment.augment_image(data, size, config, np.random.default_rng(seed))


@pytest.mark.parametrize("size", [224, 64, 48])
def test_shape_dtype_determinism_and_changes(jpeg, size):
  config = augment.AugmentConfig(blur_prob=0.5)
  a = _run(jpeg, size, config, 7)
  assert a.shape == (size, size, 3) and a.dtype == np.uint8 and a.flags.c_contiguous
  np.testing.assert_array_equal(a, _run(jpeg, size, config, 7))  # same seed: same image
  outputs = {_run(jpeg, size, config, seed).tobytes() for seed in range(8)}
  assert len(outputs) == 8  # every seed differs
  plain = decode_image(jpeg, size)
  assert all(not np.array_equal(np.frombuffer(o, np.uint8).reshape(a.shape), plain)
             for o in outputs)


@pytest.mark.parametrize("size", [250, 224, 100, 64, 37, 16])
def test_without_augmentation_it_is_evaluations_picture_bit_for_bit(jpeg, size):
  """No train/evaluation skew: training's decode and resize are evaluation's, at any size."""
  np.testing.assert_array_equal(_run(jpeg, size, NO_OPS, 0), decode_image(jpeg, size))
  wide = _jpeg(np.random.default_rng(size).integers(0, 255, (120, 300, 3), dtype=np.uint8))
  np.testing.assert_array_equal(_run(wide, size, NO_OPS, 0), decode_image(wide, size))
  # Only orientation and colour on: the picture is still one of evaluation's 8 views of it.
  views = {np.rot90(decode_image(jpeg, size), k)[:, ::-1 if flip else None].tobytes()
           for k in range(4) for flip in (False, True)}
  assert _run(jpeg, size, dataclasses.replace(NO_OPS, dihedral=True), 3).tobytes() in views


def test_non_square_and_greyscale_inputs():
  rng = np.random.default_rng(0)
  wide = _jpeg(rng.integers(0, 255, (120, 300, 3), dtype=np.uint8))
  grey = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (90, 90), dtype=np.uint8)).save(grey, "JPEG")
  for data in (wide, grey.getvalue()):
    out = _run(data, 64, augment.AugmentConfig(), 0)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def test_dihedral_gives_all_eight_orientations():
  rng = np.random.default_rng(1)
  image = np.kron(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
  data = _jpeg(image, quality=100)
  config = dataclasses.replace(NO_OPS, dihedral=True)
  base = _run(data, 64, NO_OPS, 0)
  views = {np.rot90(base, k)[:, ::-1 if flip else None].tobytes()
           for k in range(4) for flip in (False, True)}
  outputs = {_run(data, 64, config, seed).tobytes() for seed in range(100)}
  assert len(views) == 8 and outputs == views


def test_crop_zooms_in_and_reduced_scale_decoding(jpeg):
  # DCT scaling: the smallest of 1/1, 1/2, 1/4, 1/8 that keeps >= size pixels in the crop, the
  # crop cut at whole pixels, then bilinear: a reference made by hand.
  flags = {125: cv2.IMREAD_REDUCED_COLOR_2, 63: cv2.IMREAD_REDUCED_COLOR_4, 250: cv2.IMREAD_COLOR}
  for size, box, decoded, (top, left, side_h, side_w) in (
      (64, (0.1, 0.2, 0.6, 0.6), 125, (25, 12, 75, 75)),
      # 1/2 would leave 62.5 rows < 64; the 150 columns shrink >= 2x: area averaging.
      (64, (0.1, 0.2, 0.6, 0.5), 250, (50, 25, 125, 150)),
      (20, (0.0, 0.0, 0.5, 0.5), 63, (0, 0, 32, 32)),
      (224, (0.05, 0.0, 0.9, 0.95), 250, (0, 12, 238, 225))):
    full = cv2.imdecode(np.frombuffer(jpeg, np.uint8), flags[decoded])[..., ::-1]
    assert full.shape == (decoded, decoded, 3)
    crop = full[top:top + side_h, left:left + side_w]
    area = max(side_h, side_w) >= 2 * size
    reference = cv2.resize(crop, (size, size),
                           interpolation=cv2.INTER_AREA if area else cv2.INTER_LINEAR)
    np.testing.assert_array_equal(decode_image(jpeg, size, box), reference)
  # A crop of ~1/4 of the area is a zoom by ~2: the output matches no full-image view.
  config = dataclasses.replace(NO_OPS, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0))
  u = np.full(augment._NUM_DRAWS, 0.5)
  assert augment._crop_box(config, u) == (0.25, 0.25, 0.5, 0.5)
  out = _run(jpeg, 64, config, 0)
  assert np.abs(out.astype(int) - decode_image(jpeg, 64)).mean() > 5


def test_crop_box_respects_scale_and_ratio_ranges():
  config = augment.AugmentConfig(crop_scale=(0.3, 0.9), crop_ratio=(0.5, 2.0))
  rng = np.random.default_rng(0)
  for _ in range(500):
    x0, y0, w, h = augment._crop_box(config, rng.random(augment._NUM_DRAWS))
    assert 0 <= x0 and 0 <= y0 and x0 + w <= 1 + 1e-9 and y0 + h <= 1 + 1e-9
    assert 0.3 - 1e-9 <= w * h <= 0.9 + 1e-9 and 0.5 - 1e-9 <= w / h <= 2.0 + 1e-9
  # No proposal fits (area 1 with a ratio of 2): the largest box of the nearest allowed ratio.
  wide = augment.AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(2.0, 2.0))
  assert augment._crop_box(wide, np.full(augment._NUM_DRAWS, 0.0)) == (0.0, 0.0, 1.0, 0.5)


def test_color_matrix_is_exact():
  config = augment.AugmentConfig(color_jitter=0.2, hue_jitter=0.25)
  mean = np.array([200.0, 100.0, 50.0])
  # Draws of 0.5 mean factors of 1 and no hue rotation: the identity.
  identity = augment._color_matrix(config, np.full(4, 0.5), mean)
  np.testing.assert_allclose(identity, np.concatenate([np.eye(3), np.zeros((3, 1))], 1),
                             atol=1e-12)
  # Brightness 1.2 only (u=1 for brightness): x -> 1.2 x.
  bright = augment._color_matrix(config, np.array([1.0, 0.5, 0.5, 0.5]), mean)
  np.testing.assert_allclose(bright[:, :3], 1.2 * np.eye(3), atol=1e-12)
  # Contrast 0.8 only: x -> 0.8 x + 0.2 * mean luminance.
  low = augment._color_matrix(config, np.array([0.5, 0.0, 0.5, 0.5]), mean)
  luminance = 0.213 * 200 + 0.715 * 100 + 0.072 * 50
  np.testing.assert_allclose(low[:, 3], 0.2 * luminance)
  # Saturation 0 (greyscale) and any hue: grey stays grey, luminance is kept.
  grey_config = augment.AugmentConfig(color_jitter=0.999, hue_jitter=0.5)
  for u in np.random.default_rng(0).random((20, 4)):
    matrix = augment._color_matrix(grey_config, np.array([0.5, 0.5, u[2], u[3]]), mean)
    np.testing.assert_allclose(matrix[:, :3] @ np.ones(3), np.ones(3), atol=1e-9)
    np.testing.assert_allclose(augment._LUMA @ matrix[:, :3], augment._LUMA, atol=2e-3)


def test_hue_and_saturation_change_colours_but_keep_greys():
  grey = _jpeg(np.full((64, 64, 3), 128, np.uint8), quality=100)
  config = dataclasses.replace(NO_OPS, color_jitter=0.0, hue_jitter=0.5)
  for seed in range(5):
    out = _run(grey, 32, config, seed).astype(int)
    assert np.abs(out - 128).max() <= 1
  colourful = synthetic.image_bytes("EBO", 1)
  changed = [_run(colourful, 32, config, seed) for seed in range(3)]
  base = _run(colourful, 32, NO_OPS, 0)
  assert all(np.abs(c.astype(int) - base).mean() > 2 for c in changed)


def test_blur_only_smooths_and_draws_stay_aligned(jpeg):
  sharp = _run(jpeg, 64, augment.AugmentConfig(blur_prob=0.0), 3)
  blurred = _run(jpeg, 64, augment.AugmentConfig(blur_prob=1.0, blur_sigma=(1.5, 1.5)), 3)

  def roughness(x):
    return np.abs(np.diff(x.astype(int), axis=0)).mean()

  assert roughness(blurred) < 0.8 * roughness(sharp)
  # The same crop, orientation and colours: the blurred image is close to the sharp one.
  assert np.abs(blurred.astype(int) - sharp).mean() < 12


def test_config_defaults_validation_and_resolve():
  data = default.get_config().data
  assert augment.AugmentConfig.from_config(data) == augment.AugmentConfig()
  data.augment = False
  assert augment.AugmentConfig.from_config(data) is None
  assert augment.resolve(True) == augment.AugmentConfig()
  assert augment.resolve(False) is None and augment.resolve(NO_OPS) is None
  with pytest.raises(TypeError):
    augment.resolve("yes")
  for bad in (dict(crop_scale=(0.0, 1.0)), dict(crop_scale=(0.9, 0.5)), dict(crop_ratio=(0, 1)),
              dict(color_jitter=1.0), dict(hue_jitter=0.6), dict(blur_prob=1.5),
              dict(blur_sigma=(0.0, 1.0))):
    with pytest.raises(ValueError):
      augment.AugmentConfig(**bad)


def test_eval_path_is_deterministic(jpeg):
  np.testing.assert_array_equal(decode_image(jpeg, 64), decode_image(jpeg, 64))
