"""Pictures of explanations: heat-map overlays, one captioned panel per image, a contact sheet.

A panel is one row: the cell, then one overlay per method, each with a caption (true code if
known, predicted code and probability, method and the explained class). Overlays show the
evidence *for* the explained class: the positive part of the map, scaled to its 99.5th
percentile (so one extreme pixel does not wash out the rest), coloured with matplotlib's
'inferno' and blended over the cell with an opacity that grows with the value (zero is
transparent). The raw, signed maps are in the `.npy` files.
"""

from __future__ import annotations

import functools
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CAPTION_LINES = 2
PERCENTILE = 99.5
MAX_OPACITY = 0.75


@functools.cache
def _font(size: int) -> ImageFont.ImageFont:
  return ImageFont.load_default(size=size)


@functools.cache
def _colormap() -> np.ndarray:
  import matplotlib  # noqa: PLC0415 (only when pictures are drawn)
  return (matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.float32)


def heat(attribution: np.ndarray) -> np.ndarray:
  """The positive part of a map scaled to [0, 1] by its 99.5th percentile (all 0 if none)."""
  positive = np.maximum(np.nan_to_num(np.asarray(attribution, np.float32)), 0.0)
  top = float(np.percentile(positive, PERCENTILE)) if positive.size else 0.0
  if top <= 0.0:
    top = float(positive.max()) if positive.size else 0.0
  if top <= 0.0:
    return np.zeros_like(positive)
  return np.clip(positive / top, 0.0, 1.0)


def overlay(image: np.ndarray, attribution: np.ndarray) -> np.ndarray:
  """uint8 [S, S, 3]: the heat of `attribution` (any size, resized bilinearly) over `image`."""
  size = image.shape[1], image.shape[0]
  value = heat(attribution)
  value = np.asarray(Image.fromarray(value, "F").resize(size, Image.Resampling.BILINEAR))
  value = np.clip(value, 0.0, 1.0)
  colour = _colormap()[np.rint(value * 255).astype(np.int32)]
  opacity = (MAX_OPACITY * value)[..., None]
  return np.clip(image * (1.0 - opacity) + colour * opacity, 0, 255).astype(np.uint8)


def panel(image: np.ndarray, maps: list[tuple[str, np.ndarray]], *, true_code: str | None,
          predicted: str, probability: float, target: str, tile: int = 192) -> Image.Image:
  """One image's row: the cell, then an overlay per (method title, map), captioned."""
  font_size = max(9, tile // 16)
  line = font_size + 3
  cell = np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize(
      (tile, tile), Image.Resampling.BILINEAR))
  out = Image.new("RGB", (tile * (1 + len(maps)), tile + CAPTION_LINES * line + 4), "white")
  draw = ImageDraw.Draw(out)
  font = _font(font_size)
  out.paste(Image.fromarray(cell), (0, 0))
  wrong = true_code is not None and true_code != predicted
  draw.text((3, tile + 2), f"true {true_code or '?'}", fill=(0, 0, 0), font=font)
  draw.text((3, tile + 2 + line), f"pred {predicted} {probability:.2f}",
            fill=(200, 0, 0) if wrong else (0, 110, 0), font=font)
  for i, (title, attribution) in enumerate(maps, start=1):
    out.paste(Image.fromarray(overlay(cell, attribution)), (i * tile, 0))
    draw.text((i * tile + 3, tile + 2), title, fill=(0, 0, 0), font=font)
    draw.text((i * tile + 3, tile + 2 + line), f"for {target}", fill=(60, 60, 60), font=font)
  return out


def contact_sheet(panels: list[Image.Image], title: str, *, omitted: int = 0) -> Image.Image:
  """The panels stacked under the title (wrapped to the width), and a note of any left out."""
  width = max(p.width for p in panels)
  font_size = max(10, panels[0].height // 14)
  font = _font(font_size)
  lines = textwrap.wrap(title, max(20, int(width / (0.55 * font_size))))
  line = font_size + 4
  header = len(lines) * line + 6
  footer = line + 6 if omitted else 0
  sheet = Image.new("RGB", (width, header + sum(p.height for p in panels) + footer), "white")
  draw = ImageDraw.Draw(sheet)
  for i, text in enumerate(lines):
    draw.text((4, 3 + i * line), text, fill=(0, 0, 0), font=font)
  y = header
  for p in panels:
    sheet.paste(p, (0, y))
    y += p.height
  if omitted:
    draw.text((4, y + 3), f"... and {omitted} more (see the per-image PNGs)", fill=(0, 0, 0),
              font=font)
  return sheet
