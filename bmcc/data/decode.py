"""The one image decoder: training's evaluation resize, prediction and explanation all use it.

JPEG DCT scaling (`draft`) decodes at the smallest scale not below the target size, any PIL mode
becomes RGB (16-bit and float scaled to 8 bits, transparency composited onto white, the light
background of a smear), then a bilinear resize with antialiasing to a square of `size` pixels.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB: 16-bit and float scaled to 8 bits, transparency composited on white."""
  mode = image.mode
  if mode == "RGB":
    return image
  if mode.startswith("I") or mode == "F":  # I;16, I;16B, I (32-bit int), F (32-bit float)
    values = np.asarray(image, dtype=np.float64)
    top = float(values.max()) if values.size else 0.0
    if mode == "F" and top <= 1.0:
      values = values * 255.0
    elif mode.startswith("I;16") or top > 255.0:
      values = values / 257.0  # 65535 -> 255
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")
  if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return image.convert("RGB")


def check_pixels(width: int, height: int) -> None:
  """Raises DecompressionBombError above PIL's pixel limit (`Image.MAX_IMAGE_PIXELS`, read now).

  PIL itself only warns between 1x and 2x the limit; here both count as a refusal.
  """
  limit = Image.MAX_IMAGE_PIXELS
  if limit and width * height > limit:
    raise Image.DecompressionBombError(
        f"image size ({width}x{height} = {width * height} pixels) exceeds the limit of {limit} "
        "pixels (PIL.Image.MAX_IMAGE_PIXELS)")


def _decode_open(image: Image.Image, size: int) -> np.ndarray:
  image.draft("RGB", (size, size))
  image.load()
  rgb = to_rgb(image)
  if rgb.size != (size, size):
    rgb = rgb.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
  return np.asarray(rgb, dtype=np.uint8)


def decode_image(data: bytes, size: int) -> np.ndarray:
  """Encoded image bytes (a record of the prepared dataset) -> uint8 [size, size, 3]."""
  with Image.open(io.BytesIO(data)) as image:
    return _decode_open(image, size)


def read_image(path: str | os.PathLike, size: int) -> tuple[np.ndarray, tuple[int, int]]:
  """(uint8 [size, size, 3], original (width, height)) of the image file at `path`.

  Raises on any problem: OSError (missing, unreadable, truncated), UnidentifiedImageError (not an
  image), DecompressionBombError (more pixels than `Image.MAX_IMAGE_PIXELS`), ...
  """
  with Image.open(path) as image:
    width, height = image.size
    check_pixels(width, height)
    return _decode_open(image, size), (width, height)
