"""The one image decoder: training (augmented or not), evaluation, prediction and explanation.

`decode_image(data, size, box)`: the region `box` of the image (fractions of it: training's random
crop, or the whole image) as a uint8 [size, size, 3] RGB square, made in the same way everywhere:

1. Decoding at reduced JPEG scale: libjpeg-turbo's DCT scaling decodes at 1/2, 1/4 or 1/8 of the
   stored size whenever the region still has at least `size` pixels a side there (a 250 px image
   at `size` 64 is decoded at 125 px). Complete grey or colour JPEGs go through OpenCV (faster);
   anything else (other formats, CMYK, truncated files) through PIL (`draft` is the same DCT
   scaling), where any mode becomes RGB (16-bit and float scaled to 8 bits, transparency
   composited onto white, the light background of a smear) and a broken file raises.
2. The region cut at whole pixels, then OpenCV's bilinear resize to `size` (area averaging for a
   2x or larger shrink). After DCT scaling the shrink left is under 2x, where bilinear barely
   aliases; PIL's antialiased bilinear costs ~10x more per resize (README, "Input pipeline").

So a training picture without augmentation is bit for bit the picture evaluation and prediction
make, at any size (`tests/test_augment.py`).
"""

from __future__ import annotations

import io
import math
import os

import cv2
import numpy as np
from PIL import Image

_cv2_configured = False
# Decoding flags per DCT scale factor; EXIF orientation is ignored, as PIL does.
_REDUCED_FLAGS = {f: flag | cv2.IMREAD_IGNORE_ORIENTATION for f, flag in (
    (1, cv2.IMREAD_COLOR), (2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4),
    (8, cv2.IMREAD_REDUCED_COLOR_8))}


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


# A crop box: (left, top, width, height) as fractions of the image's width and height.
Box = tuple[float, float, float, float]
FULL: Box = (0.0, 0.0, 1.0, 1.0)


def configure_cv2() -> None:
  """One OpenCV thread per process: grain's threads and worker processes do the parallelism."""
  global _cv2_configured
  if not _cv2_configured:
    cv2.setNumThreads(1)
    _cv2_configured = True


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, C] -> [size, size, C]: OpenCV bilinear, area averaging for a 2x or larger
  shrink of either side."""
  height, width = image.shape[:2]
  if (height, width) == (size, size):
    return image
  configure_cv2()
  shrink_2x = height >= 2 * size or width >= 2 * size
  return cv2.resize(image, (size, size),
                    interpolation=cv2.INTER_AREA if shrink_2x else cv2.INTER_LINEAR)


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
  """(height, width, components) from a JPEG's frame header, or None if `data` is not a JPEG.

  Reads only the marker segments up to the first start-of-frame (a few microseconds).
  """
  if data[:2] != b"\xff\xd8":
    return None
  pos, end = 2, len(data)
  while pos + 4 <= end:
    if data[pos] != 0xFF:
      return None
    marker = data[pos + 1]
    if marker == 0xFF:  # fill byte
      pos += 1
      continue
    if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
      pos += 2
      continue
    length = int.from_bytes(data[pos + 2:pos + 4], "big")
    if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
      if pos + 10 > end:
        return None
      return (int.from_bytes(data[pos + 5:pos + 7], "big"),
              int.from_bytes(data[pos + 7:pos + 9], "big"), data[pos + 9])
    pos += 2 + length
  return None


def _dct_factor(height: int, width: int, size: int, box: Box) -> int:
  """The largest of 8, 4, 2, 1 at which the box still has at least `size` pixels a side."""
  for factor in (8, 4, 2):
    if (math.ceil(width / factor) * box[2] >= size
        and math.ceil(height / factor) * box[3] >= size):
      return factor
  return 1


def _crop(image: np.ndarray, box: Box) -> np.ndarray:
  if box == FULL:
    return image
  x0, y0, w, h = box
  height, width = image.shape[:2]
  left, top = round(x0 * width), round(y0 * height)
  crop_w = min(max(1, round(w * width)), width - left)
  crop_h = min(max(1, round(h * height)), height - top)
  return image[top:top + crop_h, left:left + crop_w]


def _decode_cv2(data: bytes, size: int, box: Box) -> np.ndarray | None:
  """A complete 8-bit grey or colour JPEG decoded by libjpeg-turbo at reduced DCT scale; None for
  anything else (PIL then decodes it, and raises on a truncated or broken file)."""
  header = jpeg_header(data)
  complete = data[-64:].rstrip(b"\0").endswith(b"\xff\xd9")  # end-of-image marker
  if header is None or header[2] not in (1, 3) or not complete:
    return None
  configure_cv2()
  factor = _dct_factor(header[0], header[1], size, box)
  bgr = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED_FLAGS[factor])
  if bgr is None:
    return None
  return cv2.cvtColor(_crop(bgr, box), cv2.COLOR_BGR2RGB)


def _decode_open(image: Image.Image, size: int, box: Box = FULL) -> np.ndarray:
  """The PIL path: any format and mode; `draft` is the same DCT scaling for JPEGs."""
  image.draft("RGB", (math.ceil(size / box[2]), math.ceil(size / box[3])))
  image.load()
  return np.ascontiguousarray(resize(_crop(np.asarray(to_rgb(image), np.uint8), box), size))


def decode_image(data: bytes, size: int, box: Box = FULL) -> np.ndarray:
  """Encoded image bytes (a record of the prepared dataset) -> uint8 [size, size, 3].

  `box` (fractions of the image, `FULL` by default) is the region resized: training's random crop.
  """
  rgb = _decode_cv2(data, size, box)
  if rgb is not None:
    return np.ascontiguousarray(resize(rgb, size))
  with Image.open(io.BytesIO(data)) as image:
    return _decode_open(image, size, box)


def read_image(path: str | os.PathLike, size: int) -> tuple[np.ndarray, tuple[int, int]]:
  """(uint8 [size, size, 3], original (width, height)) of the image file at `path`.

  Raises on any problem: OSError (missing, unreadable, truncated), UnidentifiedImageError (not an
  image), DecompressionBombError (more pixels than `Image.MAX_IMAGE_PIXELS`), ...
  """
  with open(path, "rb") as f:
    data = f.read()
  with Image.open(io.BytesIO(data)) as image:
    width, height = image.size
    check_pixels(width, height)
  return decode_image(data, size), (width, height)
