"""Checks that a file is a decodable JPEG before it goes into the prepared dataset."""

from __future__ import annotations

import io

from PIL import Image

# The smallest side we accept; the real images are 250 x 250.
MIN_SIDE = 16


class BadImageError(ValueError):
  """A file that cannot be used as an image, with the reason in its message."""


def validate_jpeg(data: bytes) -> tuple[int, int]:
  """Returns (height, width) of a decodable JPEG, or raises BadImageError saying why not.

  Decodes at 1/8 scale (libjpeg's DCT scaling), which reads the whole entropy-coded stream, so
  truncated and corrupt files fail, at a fraction of the cost of a full decode.
  """
  if not data:
    raise BadImageError("empty file (0 bytes)")
  if not data.startswith(b"\xff\xd8"):
    raise BadImageError(f"not a JPEG (starts with {data[:8]!r})")
  # A complete JPEG ends with the end-of-image marker (some writers pad after it). Checked here
  # too because PIL accepts truncated files when ImageFile.LOAD_TRUNCATED_IMAGES is set, which
  # other libraries (TFDS among them) do process-wide.
  if b"\xff\xd9" not in data[-1024:]:
    raise BadImageError("truncated JPEG (no end-of-image marker)")
  try:
    with Image.open(io.BytesIO(data)) as image:
      if image.format != "JPEG":
        raise BadImageError(f"not a JPEG (PIL reads it as {image.format})")
      width, height = image.size
      image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
      image.load()
  except BadImageError:
    raise
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data.
    raise BadImageError(f"undecodable JPEG ({type(e).__name__}: {e})") from e
  if min(width, height) < MIN_SIDE:
    raise BadImageError(f"image too small ({width}x{height} px)")
  return height, width
