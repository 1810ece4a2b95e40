"""Training-time augmentation of stained single-cell images: decode, crop, orient, recolour, blur.

One call per example, `augment_image(jpeg_bytes, size, config, rng)`, turns JPEG bytes into a uint8
[size, size, 3] RGB image. Everything runs on uint8 with OpenCV (each step is one C call that
releases the GIL), in this order:

1. Random resized crop: a box of `crop_scale` of the image area with aspect ratio (width / height)
   in `crop_ratio` (log-uniform), at a uniform position; `crop_scale=(1, 1)` keeps the whole image.
2. Decoding and resizing by the one decoder (`bmcc.data.decode.decode_image` with the crop box):
   libjpeg-turbo's DCT scaling decodes at 1/2, 1/4 or 1/8 of the stored size whenever the crop
   still has at least `size` pixels a side there (a 250 px image at `size` 64 is decoded at 125
   px), the crop is cut, then resized to `size` with bilinear interpolation. Without a crop this
   is exactly evaluation's and prediction's picture, bit for bit.
3. One of the 8 rotations by multiples of 90 degrees and flips, uniformly (cells have no
   orientation).
4. Stain (colour) jitter as ONE affine colour map, applied in one pass with rounding and clipping
   to 0..255: brightness x -> b x, contrast x -> c x + (1 - c) mean, saturation (blend with the
   luminance) and a hue rotation about the grey axis (the SVG `hueRotate` matrix: it keeps
   luminance and greys). b, c and the saturation factor are uniform in [1 - color_jitter,
   1 + color_jitter], the hue angle uniform in +-hue_jitter turns (0.02 = +-7.2 degrees). Unlike
   applying the four steps one after another, nothing is clipped between them.
5. With probability `blur_prob`, a Gaussian blur with sigma uniform in `blur_sigma` (output pixels).

Randomness comes only from the `np.random.Generator` passed in (grain's `random_map` gives one per
example from the pipeline seed and the example's position), and every example draws the same
number of values whatever the settings, so turning one augmentation on or off does not change the
others. Evaluation does not come here: it is the same decode and resize of the whole image.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from bmcc.data import decode

# Luminance weights of the SVG/CSS colour filters (Rec. 709, rounded so that they sum to 1).
_LUMA = np.array([0.213, 0.715, 0.072])
# The SVG `hueRotate` matrix is _HUE_A + cos(angle) _HUE_B + sin(angle) _HUE_C.
_HUE_A = np.tile(_LUMA, (3, 1))
_HUE_B = np.array([[0.787, -0.715, -0.072], [-0.213, 0.285, -0.072], [-0.213, -0.715, 0.928]])
_HUE_C = np.array([[-0.213, -0.715, 0.928], [0.143, 0.140, -0.283], [-0.787, 0.715, 0.072]])
# The same as 3 x 4 affine maps (zero offset), and the offset column alone.
_HUE_A4, _HUE_B4, _HUE_C4 = (np.pad(m, ((0, 0), (0, 1))) for m in (_HUE_A, _HUE_B, _HUE_C))
_OFFSET4 = np.pad(np.ones((3, 1)), ((0, 0), (3, 0)))

_CROP_TRIES = 10  # random-resized-crop proposals per example before falling back to the full box
# Uniform draws per example: crop area and log-ratio proposals, crop position (2), orientation,
# colour factors (brightness, contrast, saturation, hue), blur (apply?, sigma).
_NUM_DRAWS = 2 * _CROP_TRIES + 2 + 1 + 4 + 2

_ROTATIONS = (None, cv2.ROTATE_90_COUNTERCLOCKWISE, cv2.ROTATE_180, cv2.ROTATE_90_CLOCKWISE)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """What `augment_image` does to each training example (see the module docstring)."""

  dihedral: bool = True  # random rotations by multiples of 90 degrees and flips
  crop_scale: tuple[float, float] = (0.7, 1.0)  # crop area, fraction of the image; (1, 1): no crop
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio (width / height) range
  color_jitter: float = 0.1  # brightness, contrast and saturation factors in 1 +- this
  hue_jitter: float = 0.02  # hue rotation in +- this fraction of a full turn
  blur_prob: float = 0.0  # probability of a Gaussian blur
  blur_sigma: tuple[float, float] = (0.1, 1.0)  # blur sigma range, pixels of the output image

  def __post_init__(self):
    lo, hi = self.crop_scale
    if not 0 < lo <= hi <= 1:
      raise ValueError(f"crop_scale={self.crop_scale} must satisfy 0 < low <= high <= 1.")
    lo, hi = self.crop_ratio
    if not 0 < lo <= hi:
      raise ValueError(f"crop_ratio={self.crop_ratio} must satisfy 0 < low <= high.")
    if not 0 <= self.color_jitter < 1:
      raise ValueError(f"color_jitter={self.color_jitter} must be in [0, 1).")
    if not 0 <= self.hue_jitter <= 0.5:
      raise ValueError(f"hue_jitter={self.hue_jitter} must be in [0, 0.5] (turns).")
    if not 0 <= self.blur_prob <= 1:
      raise ValueError(f"blur_prob={self.blur_prob} must be in [0, 1].")
    lo, hi = self.blur_sigma
    if not 0 < lo <= hi:
      raise ValueError(f"blur_sigma={self.blur_sigma} must satisfy 0 < low <= high.")

  @classmethod
  def from_config(cls, data_config: Any) -> AugmentConfig | None:
    """The augmentation of a config's `data` block; None when `data.augment` is False."""
    if not data_config.augment:
      return None
    return cls(crop_scale=tuple(data_config.crop_scale),
               crop_ratio=tuple(data_config.crop_ratio),
               color_jitter=float(data_config.color_jitter),
               hue_jitter=float(data_config.hue_jitter),
               blur_prob=float(data_config.blur_prob),
               blur_sigma=tuple(data_config.blur_sigma))

  @property
  def crops(self) -> bool:
    return self.crop_scale != (1.0, 1.0)

  @property
  def recolours(self) -> bool:
    return self.color_jitter > 0 or self.hue_jitter > 0

  @property
  def is_identity(self) -> bool:
    """Whether every example comes out exactly as the plain resize would make it."""
    return not (self.dihedral or self.crops or self.recolours or self.blur_prob > 0)


def resolve(augment: AugmentConfig | bool | None) -> AugmentConfig | None:
  """`train_dataset`'s `augment` argument -> an AugmentConfig, or None for no augmentation.

  True is the default `AugmentConfig()` (the defaults of `configs/default.py`), False/None none.
  """
  if augment is None or augment is False:
    return None
  config = AugmentConfig() if augment is True else augment
  if not isinstance(config, AugmentConfig):
    raise TypeError(f"augment must be an AugmentConfig or a bool, not {type(augment).__name__}.")
  return None if config.is_identity else config


def _crop_box(config: AugmentConfig, u: Sequence[float]) -> tuple[float, float, float, float]:
  """(x0, y0, width, height) of the crop as fractions of the image, from uniform draws `u`."""
  if not config.crops and config.crop_ratio[0] <= 1 <= config.crop_ratio[1]:
    return 0.0, 0.0, 1.0, 1.0
  lo, hi = config.crop_scale
  log_lo, log_hi = math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1])
  for i in range(_CROP_TRIES):  # plain floats: ~10x faster than numpy on 10 values
    area = lo + (hi - lo) * u[i]
    ratio = math.exp(log_lo + (log_hi - log_lo) * u[_CROP_TRIES + i])
    w, h = math.sqrt(area * ratio), math.sqrt(area / ratio)
    if w <= 1 and h <= 1:
      break
  else:  # the whole image, or the largest box of the nearest allowed ratio
    ratio = min(max(1.0, config.crop_ratio[0]), config.crop_ratio[1])
    w, h = (1.0, 1.0 / ratio) if ratio >= 1 else (ratio, 1.0)
  x_pos, y_pos = u[2 * _CROP_TRIES], u[2 * _CROP_TRIES + 1]
  return (1 - w) * x_pos, (1 - h) * y_pos, w, h


def _color_matrix(config: AugmentConfig, u: Sequence[float], mean_rgb: Sequence[float]
                  ) -> np.ndarray:
  """The 3 x 4 affine colour map (RGB in, RGB out) of colour draws `u` (4 uniforms).

  Brightness b, contrast c, saturation s (S = s I + (1 - s) A, A: rows of luminance weights) and
  hue rotation H = A + cos B + sin C compose to c b H S + offset. Since H keeps greys and luminance
  (H A = A), H S = A + s cos B + s sin C. Contrast pulls towards the mean luminance of the
  brightened image; saturation and hue keep greys, so that offset passes through them unchanged.
  """
  jitter = config.color_jitter
  b, c, s = (1 + jitter * (2 * u[i] - 1) for i in range(3))
  angle = 2 * math.pi * config.hue_jitter * (2 * u[3] - 1)
  luminance = _LUMA[0] * mean_rgb[0] + _LUMA[1] * mean_rgb[1] + _LUMA[2] * mean_rgb[2]
  return (c * b * (_HUE_A4 + (s * math.cos(angle)) * _HUE_B4 + (s * math.sin(angle)) * _HUE_C4)
          + ((1 - c) * b * luminance) * _OFFSET4)


def augment_image(data: bytes, size: int, config: AugmentConfig,
                  rng: np.random.Generator) -> np.ndarray:
  """JPEG bytes -> augmented uint8 [size, size, 3] RGB image (see the module docstring)."""
  decode.configure_cv2()
  u = rng.random(_NUM_DRAWS).tolist()
  image = decode.decode_image(data, size, _crop_box(config, u))  # RGB
  k = 2 * _CROP_TRIES + 2
  if config.dihedral:
    orientation = min(int(u[k] * 8), 7)
    if orientation % 4:
      image = cv2.rotate(image, _ROTATIONS[orientation % 4])
    if orientation >= 4:
      image = cv2.flip(image, 1)
  if config.recolours:
    image = cv2.transform(image, _color_matrix(config, u[k + 1:k + 5], cv2.mean(image)[:3]))
  if u[k + 5] < config.blur_prob:
    lo, hi = config.blur_sigma
    image = cv2.GaussianBlur(image, (0, 0), sigmaX=lo + (hi - lo) * u[k + 6],
                             borderType=cv2.BORDER_REFLECT_101)
  return np.ascontiguousarray(image)
