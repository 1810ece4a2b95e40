"""Synthetic cell images: one drawing recipe per class, rendered as 250 x 250 RGB.

Each class has a fixed recipe (cell size, cytoplasm colour, nucleus shape, size, colour and
chromatin texture, granules, vacuoles, Auer rods, ...) drawn on a May-Grunwald-Giemsa-like
background with red blood cells, plus per-image random jitter. Every image is a pure function of
(seed, class, file number, image size).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from bmcc.data.classes import CODES

IMAGE_SIZE = 250
JPEG_QUALITY = 90

# ------------------------------------------------------------------------------------------------
# Class recipes.


@dataclasses.dataclass(frozen=True)
class _Recipe:
  """How to draw one class. Lengths are in pixels of a 250 px image, colours are RGB 0-255."""

  kind: str = "cell"  # 'cell', 'smudge' (KSC) or 'debris' (ART).
  radius: float = 38.0  # Cell radius.
  elongation: float = 0.08  # Largest relative difference of the two cell axes.
  wobble: float = 0.03  # Low-frequency irregularity of the cell outline.
  hairy: float = 0.0  # Amplitude of thin cytoplasmic projections (hairy cell).
  cyto: tuple[float, float, float] = (200.0, 190.0, 215.0)
  cyto_alpha: float = 0.93
  nucleus: str = "round"  # 'round', 'oval', 'kidney', 'band', 'lobes' or 'multi'.
  nuc_size: float = 0.6  # Nucleus radius over cell radius.
  nuc_offset: float = 0.1  # Nucleus centre offset over cell radius.
  lobes: tuple[int, int] = (3, 4)  # Lobe count range for 'lobes' and 'multi'.
  nuc: tuple[float, float, float] = (110.0, 65.0, 145.0)
  chromatin: float = 0.12  # Relative amplitude of the chromatin texture.
  chromatin_grain: int = 10  # Chromatin clumps are 62 / grain px apart: higher is finer.
  nucleoli: int = 0
  granules: int = 0
  granule_rgb: tuple[float, float, float] = (130.0, 55.0, 140.0)
  granule_alpha: float = 0.8
  granule_size: int = 1  # 0: one pixel, 1: plus-shaped (~3 px), 2: 3 x 3 with soft corners.
  granules_over_nucleus: bool = False
  granules2: int = 0  # A second granule population (ABE: basophilic granules).
  granule2_rgb: tuple[float, float, float] = (75.0, 30.0, 95.0)
  vacuoles: int = 0
  auer_rods: int = 0
  hof: bool = False  # Pale perinuclear zone (plasma cell).
  smear: float = 0.0  # Strength of the smearing blur over the whole cell (not identifiable).


_RECIPES: dict[str, _Recipe] = {
    # Abnormal eosinophil: eosinophil granules mixed with large dark basophilic ones, round nucleus.
    "ABE": _Recipe(radius=54, cyto=(228, 175, 150), nucleus="round", nuc_size=0.45,
                   nuc_offset=0.3, nuc=(100, 55, 130), granules=540, granule_rgb=(225, 115, 70),
                   granule_size=2, granules2=120, granule2_rgb=(70, 25, 90)),
    # Artefact: debris, irregular fragments, no intact cell.
    "ART": _Recipe(kind="debris", radius=52),
    # Basophil: dark purple granules over a pale lobulated nucleus.
    "BAS": _Recipe(radius=44, cyto=(210, 185, 215), nucleus="kidney", nuc_size=0.55,
                   nuc_offset=0.05, nuc=(140, 100, 165), granules=300, granule_rgb=(60, 20, 80),
                   granule_alpha=0.9, granule_size=2, granules_over_nucleus=True),
    # Blast: large round nucleus with fine open chromatin and nucleoli, thin blue rim.
    "BLA": _Recipe(radius=55, cyto=(140, 155, 215), nucleus="round", nuc_size=0.8,
                   nuc_offset=0.08, nuc=(150, 105, 178), chromatin=0.08, chromatin_grain=18,
                   nucleoli=2),
    # Erythroblast: small cell, very dark dense round nucleus, greyish cytoplasm.
    "EBO": _Recipe(radius=31, elongation=0.05, cyto=(180, 160, 185), nucleus="round",
                   nuc_size=0.6, nuc_offset=0.1, nuc=(50, 25, 70), chromatin=0.2,
                   chromatin_grain=6),
    # Eosinophil: bilobed nucleus, cytoplasm packed with orange granules.
    "EOS": _Recipe(radius=54, cyto=(235, 165, 130), nucleus="lobes", lobes=(2, 2), nuc_size=0.55,
                   nuc_offset=0.0, nuc=(95, 50, 130), granules=700, granule_rgb=(235, 125, 75),
                   granule_size=2, granule_alpha=0.9),
    # Faggot cell: blast with bundles of Auer rods.
    "FGC": _Recipe(radius=58, cyto=(168, 172, 225), nucleus="oval", nuc_size=0.62, nuc_offset=0.3,
                   nuc=(145, 95, 170), chromatin=0.08, chromatin_grain=16, nucleoli=1,
                   auer_rods=9),
    # Hairy cell: pale grey-blue cytoplasm with thin projections, oval nucleus.
    "HAC": _Recipe(radius=46, hairy=0.22, wobble=0.05, cyto=(185, 195, 225), cyto_alpha=0.85,
                   nucleus="oval", nuc_size=0.52, nuc_offset=0.15, nuc=(120, 85, 155)),
    # Smudge cell: a crushed nucleus smeared out, no cytoplasm.
    "KSC": _Recipe(kind="smudge", radius=62, wobble=0.2, nuc=(150, 98, 178)),
    # Immature lymphocyte: medium cell, round nucleus with a nucleolus, moderate blue rim.
    "LYI": _Recipe(radius=39, cyto=(115, 140, 215), nucleus="round", nuc_size=0.75,
                   nuc_offset=0.12, nuc=(120, 75, 160), chromatin=0.1, chromatin_grain=14,
                   nucleoli=1),
    # Lymphocyte: small, dense round nucleus nearly filling the cell, thin light-blue rim.
    "LYT": _Recipe(radius=29, elongation=0.05, cyto=(150, 180, 230), nucleus="round",
                   nuc_size=0.82, nuc_offset=0.12, nuc=(75, 35, 110), chromatin=0.18,
                   chromatin_grain=7),
    # Metamyelocyte: kidney-shaped nucleus, pinkish cytoplasm with fine granules.
    "MMZ": _Recipe(radius=52, cyto=(236, 206, 192), nucleus="kidney", nuc_size=0.58,
                   nuc_offset=0.15, nuc=(115, 70, 145), granules=200, granule_rgb=(190, 130, 160),
                   granule_size=0, granule_alpha=0.6),
    # Monocyte: large, grey-blue vacuolated cytoplasm, folded lighter nucleus.
    "MON": _Recipe(radius=64, wobble=0.06, cyto=(178, 178, 208), nucleus="kidney", nuc_size=0.58,
                   nuc_offset=0.12, nuc=(150, 110, 175), chromatin=0.08, chromatin_grain=12,
                   vacuoles=7),
    # Myelocyte: eccentric oval nucleus, beige-pink granular cytoplasm.
    "MYB": _Recipe(radius=52, cyto=(222, 180, 172), nucleus="oval", nuc_size=0.5, nuc_offset=0.38,
                   nuc=(110, 65, 140), granules=340, granule_rgb=(165, 95, 150), granule_size=1,
                   granule_alpha=0.6),
    # Band neutrophil: horseshoe-shaped nucleus, pale pink cytoplasm.
    "NGB": _Recipe(radius=46, cyto=(236, 208, 212), nucleus="band", nuc_size=0.66, nuc_offset=0.0,
                   nuc=(95, 50, 130), granules=170, granule_rgb=(205, 160, 185), granule_size=0,
                   granule_alpha=0.5),
    # Segmented neutrophil: 3-4 lobes joined by thin strands, pale pink cytoplasm.
    "NGS": _Recipe(radius=47, cyto=(238, 212, 220), nucleus="lobes", lobes=(3, 4), nuc_size=0.7,
                   nuc_offset=0.0, nuc=(85, 40, 120), granules=170, granule_rgb=(205, 160, 185),
                   granule_size=0, granule_alpha=0.5),
    # Not identifiable: a cell smeared beyond recognition.
    "NIF": _Recipe(radius=46, elongation=0.35, wobble=0.1, cyto=(205, 192, 218), nucleus="oval",
                   nuc_size=0.6, nuc=(150, 125, 180), smear=4.5),
    # Other: a large binucleate / multinucleate vacuolated cell.
    "OTH": _Recipe(radius=70, wobble=0.05, cyto=(218, 184, 214), nucleus="multi", lobes=(2, 3),
                   nuc_size=0.3, nuc=(110, 70, 150), vacuoles=10),
    # Proerythroblast: large, deep blue cytoplasm, large round nucleus with nucleoli.
    "PEB": _Recipe(radius=60, cyto=(80, 95, 180), nucleus="round", nuc_size=0.7, nuc_offset=0.1,
                   nuc=(115, 60, 150), chromatin=0.14, chromatin_grain=10, nucleoli=2),
    # Plasma cell: oval, deep blue cytoplasm, eccentric coarse nucleus, pale hof.
    "PLM": _Recipe(radius=47, elongation=0.25, cyto=(82, 92, 172), nucleus="round",
                   nuc_size=0.5, nuc_offset=0.45, nuc=(80, 40, 110), chromatin=0.25,
                   chromatin_grain=6, hof=True),
    # Promyelocyte: large, many purple azurophilic granules, eccentric round nucleus.
    "PMO": _Recipe(radius=64, cyto=(215, 172, 202), nucleus="round", nuc_size=0.52,
                   nuc_offset=0.3, nuc=(130, 85, 160), nucleoli=1, granules=640,
                   granule_rgb=(125, 45, 135), granule_size=1, granule_alpha=0.85),
}
assert set(_RECIPES) == set(CODES)

_DEBRIS_PALETTE = ((80, 40, 100), (140, 95, 110), (150, 150, 185), (110, 70, 120), (185, 150, 175))


# ------------------------------------------------------------------------------------------------
# Drawing primitives. Images are float32 (3, H, W) arrays in 0-255: channel-first keeps every
# numpy operation on contiguous 2-D planes, several times faster than broadcasting over a trailing
# RGB axis. Masks are float32 (H, W) coverages in [0, 1]. Small shapes are drawn inside their own
# bounding box only.


class _Draws:
  """The random numbers of one image. Scalars are served from pre-drawn blocks (a numpy call costs
  microseconds and an image takes about a hundred scalars); arrays come from `rng`."""

  def __init__(self, rng: np.random.Generator) -> None:
    self.rng = rng
    self._buf: list[float] = []
    self._i = 0

  def uniform(self, lo: float = 0.0, hi: float = 1.0) -> float:
    if self._i == len(self._buf):
      self._buf = self.rng.random(64).tolist()
      self._i = 0
    x = self._buf[self._i]
    self._i += 1
    return lo + (hi - lo) * x

  def integers(self, lo: int, hi: int) -> int:
    """An int in [lo, hi)."""
    return min(hi - 1, lo + int(self.uniform() * (hi - lo)))

  def normal(self, sigma: float = 1.0) -> float:
    return sigma * math.sqrt(-2.0 * math.log(1.0 - self.uniform())) * math.cos(
        2 * math.pi * self.uniform())

  def jitter(self, rgb: Sequence[float], amount: float) -> list[float]:
    return [float(c) + self.uniform(-amount, amount) for c in rgb]


def _soft(signed_distance: np.ndarray, width: float = 1.2) -> np.ndarray:
  """Coverage in [0, 1] from a signed distance in px (positive inside), anti-aliased."""
  m = signed_distance * (1.0 / width)
  m += 0.5
  return np.clip(m, 0.0, 1.0, out=m)


def _blend(img: np.ndarray, rgb, alpha: np.ndarray, mul: np.ndarray | None = None,
           add: np.ndarray | None = None) -> None:
  """Paints colour `rgb[c] * mul + add` over the (3, H, W) `img` with coverage `alpha`, in place.

  `rgb` is three numbers or a (3, H, W) array.
  """
  for c in range(3):
    x = img[c]
    target = rgb[c] if mul is None else rgb[c] * mul
    if add is not None:
      target = target + add
    x += (target - x) * alpha


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, a: float, b: float,
             width: float = 1.2) -> np.ndarray:
  """Soft mask of an axis-aligned (in u, v) ellipse centred at (cu, cv) with semi-axes a, b."""
  du = u - cu
  du *= 1.0 / a
  du *= du
  dv = v - cv
  dv *= 1.0 / b
  dv *= dv
  q = du + dv
  np.sqrt(q, out=q)
  k = 0.5 * (a + b) / width
  q *= -k
  q += k + 0.5
  return np.clip(q, 0.0, 1.0, out=q)


def _capsule(u: np.ndarray, v: np.ndarray, p: tuple[float, float], q: tuple[float, float],
             half_thick: float) -> np.ndarray:
  """Soft mask of a thick segment from p to q with rounded ends."""
  eu, ev = q[0] - p[0], q[1] - p[1]
  inv = 1.0 / max(eu * eu + ev * ev, 1e-6)
  pu, pv = u - p[0], v - p[1]
  t = pu * (eu * inv) + pv * (ev * inv)
  np.clip(t, 0.0, 1.0, out=t)
  pu -= t * eu
  pv -= t * ev
  pu *= pu
  pv *= pv
  pu += pv
  return _soft(half_thick - np.sqrt(pu, out=pu))


def _band(u: np.ndarray, v: np.ndarray, cu: float, cv: float, radius: float, half_thick: float,
          gap: float) -> np.ndarray:
  """Soft horseshoe: a thick ring around (cu, cv) with a wedge of half-angle `gap` (< pi/2) cut
  out towards +u, and rounded ends."""
  pu, pv = u - cu, v - cv
  r = np.sqrt(pu * pu + pv * pv)
  ring = _soft(half_thick - np.abs(r - radius))
  ring *= _soft(np.abs(pv) * math.cos(gap) - pu * math.sin(gap))  # Outside the wedge.
  for sign in (-1.0, 1.0):
    end = (cu + radius * math.cos(gap), cv + sign * radius * math.sin(gap))
    np.maximum(ring, _ellipse(u, v, end[0], end[1], half_thick, half_thick), out=ring)
  return ring


@functools.lru_cache(maxsize=64)
def _smoothing_matrix(n: int, knots: int) -> np.ndarray:
  """An (n, knots) matrix that spreads `knots` values smoothly over n samples (Gaussian bumps)."""
  x = np.linspace(0.0, knots - 1.0, n)[:, None]
  w = np.exp(-(((x - np.arange(knots)[None, :]) / 0.8) ** 2))
  return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _noise_field(rng: np.random.Generator, h: int, w: int, grid: int) -> np.ndarray:
  """Smooth zero-mean noise of roughly unit amplitude over (h, w): `grid` random knots across."""
  gh = max(2, round(grid * h / max(h, w)))
  gw = max(2, round(grid * w / max(h, w)))
  knots = rng.standard_normal((gh, gw), dtype=np.float32) * np.float32(1.6)
  return _smoothing_matrix(h, gh) @ knots @ _smoothing_matrix(w, gw).T


_STAMPS = {
    0: ((0, 0, 1.0),),
    1: ((0, 0, 1.0), (1, 0, 0.7), (-1, 0, 0.7), (0, 1, 0.7), (0, -1, 0.7)),
    2: ((0, 0, 1.0), (1, 0, 1.0), (-1, 0, 1.0), (0, 1, 1.0), (0, -1, 1.0),
        (1, 1, 0.55), (-1, 1, 0.55), (1, -1, 0.55), (-1, -1, 0.55)),
}


def _dots(shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray, size: int,
          scale: float) -> np.ndarray:
  """A (H, W) float32 layer in [0, 1] with a small stamped dot at each (y, x)."""
  layer = np.zeros(shape, np.float32)
  step = max(1, round(scale))
  yi = np.rint(ys).astype(np.intp)
  xi = np.rint(xs).astype(np.intp)
  for dy, dx, w in sorted(_STAMPS[size], key=lambda t: t[2]):  # Weakest first: max-like.
    y = yi + dy * step
    x = xi + dx * step
    ok = (y >= 0) & (y < shape[0]) & (x >= 0) & (x < shape[1])
    layer[y[ok], x[ok]] = w
  return layer


_TEXTURE_TILE = 512
_TEXTURE_SPACINGS = (3, 4, 6, 9, 14, 20)  # px between random knots


@functools.cache
def _texture_tile(spacing: int) -> np.ndarray:
  """A fixed tile of smooth unit-ish noise with knots every `spacing` px (the same in every
  process); `_texture` hands out seeded windows of it."""
  rng = np.random.default_rng([20210521, spacing])
  tile = _noise_field(rng, _TEXTURE_TILE, _TEXTURE_TILE, _TEXTURE_TILE // spacing + 1)
  tile.flags.writeable = False
  return tile


def _texture(d: _Draws, h: int, w: int, spacing: float) -> np.ndarray:
  """Smooth noise over (h, w) with features about `spacing` px apart: a read-only window of a
  cached tile (no per-image cost beyond slicing)."""
  if h > _TEXTURE_TILE or w > _TEXTURE_TILE:
    return _noise_field(d.rng, h, w, max(2, round(max(h, w) / spacing)))
  tile = _texture_tile(min(_TEXTURE_SPACINGS, key=lambda sp: abs(sp - spacing)))
  oy, ox = d.integers(0, _TEXTURE_TILE - h + 1), d.integers(0, _TEXTURE_TILE - w + 1)
  return tile[oy:oy + h, ox:ox + w]


_NOISE_TILE: np.ndarray | None = None
_GRAIN = 2.5  # Standard deviation of the pixel noise, in 8-bit levels.
_MOTTLE = 3.0  # Amplitude of the low-frequency mottling, in 8-bit levels.


def _noise_tile() -> np.ndarray:
  """A fixed 1024 x 1024 tile of low-frequency mottling plus pixel grain, the same in every
  process; each image adds a seeded window of it."""
  global _NOISE_TILE
  if _NOISE_TILE is None:
    rng = np.random.default_rng(20210521)
    tile = _noise_field(rng, 1024, 1024, 18) * np.float32(_MOTTLE)
    tile += rng.standard_normal((1024, 1024), np.float32) * np.float32(_GRAIN)
    _NOISE_TILE = tile
  return _NOISE_TILE


class _Frame:
  """A rotated, cell-centred coordinate frame over a crop: u, v are the cell-local coordinates of
  every crop pixel."""

  def __init__(self, h: int, w: int, cx: float, cy: float, theta: float) -> None:
    self.shape = (h, w)
    self.cx, self.cy = cx, cy
    self.cos, self.sin = math.cos(theta), math.sin(theta)
    dx = np.arange(w, dtype=np.float32) - np.float32(cx)
    dy = np.arange(h, dtype=np.float32) - np.float32(cy)
    c, s = np.float32(self.cos), np.float32(self.sin)
    self.u = (dx * c)[None, :] + (dy * s)[:, None]
    self.v = (dy * c)[:, None] - (dx * s)[None, :]

  def to_crop(self, pu, pv):
    """Crop pixel (y, x) of cell-local point(s) (u, v)."""
    return (self.cy + pu * self.sin + pv * self.cos, self.cx + pu * self.cos - pv * self.sin)

  def box(self, cu: float, cv: float, extent: float) -> tuple[slice, slice] | None:
    """The crop slices covering a disc of radius `extent` around local (cu, cv), or None."""
    y, x = self.to_crop(cu, cv)
    y0, y1 = max(0, int(y - extent)), min(self.shape[0], int(y + extent) + 2)
    x0, x1 = max(0, int(x - extent)), min(self.shape[1], int(x + extent) + 2)
    if y1 - y0 < 2 or x1 - x0 < 2:
      return None
    return slice(y0, y1), slice(x0, x1)


# ------------------------------------------------------------------------------------------------
# Rendering.


@functools.lru_cache(maxsize=1024)
def _red_cell_sprite(a: int, b: int) -> np.ndarray:
  """Coverage of a red blood cell with semi-axes a, b px: a soft disc with a paler centre."""
  uu = (np.arange(-a - 3, a + 4, dtype=np.float32)) * np.float32(1.0 / max(a, 1))
  vv = (np.arange(-b - 3, b + 4, dtype=np.float32)) * np.float32(1.0 / max(b, 1))
  q2 = (vv * vv)[:, None] + (uu * uu)[None, :]
  alpha = _soft((1.0 - np.sqrt(q2)) * (0.5 * (a + b)), 1.5)
  pallor = np.clip(1.0 - q2 * np.float32(1.0 / 0.3), 0.0, 1.0)
  alpha *= 1.0 - 0.45 * pallor
  alpha.flags.writeable = False
  return alpha


def _background(d: _Draws, size: int,
                s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The smear without the cell: a pink/lilac tint and a few pale red blood cells (discs with a
  paler centre) as a (3, size, size) image, plus the row and column profiles of an illumination
  gradient that `_render` adds over everything at the end (with mottling and grain)."""
  t = d.uniform()
  base = [p * (1 - t) + q * t + d.uniform(-8, 8)
          for p, q in zip((238, 208, 220), (222, 208, 234), strict=True)]
  rbc = d.jitter((222, 158, 172), 8)
  ang, amp = d.uniform(0, 2 * math.pi), d.uniform(6, 22)
  x = np.arange(size, dtype=np.float32) * np.float32(1.0 / size)
  row = (x - 0.5) * np.float32(amp * math.sin(ang))
  col = (x - 0.5) * np.float32(amp * math.cos(ang))
  row += np.cos(x * np.float32(d.uniform(3, 10)) + np.float32(d.uniform(0, 6.3))) * np.float32(2)
  col += np.cos(x * np.float32(d.uniform(3, 10)) + np.float32(d.uniform(0, 6.3))) * np.float32(2)
  # Red cell coverage (pallor included): cached sprites, painted once.
  cover = np.zeros((size, size), np.float32)
  for _ in range(d.integers(1, 6)):
    r = d.uniform(28, 38) * s
    sprite = _red_cell_sprite(round(r * d.uniform(0.95, 1.08)), round(r * d.uniform(0.92, 1.0)))
    # Around the cell rather than under it: 95-190 px from the centre at 250 px.
    ang, dist = d.uniform(0, 2 * math.pi), d.uniform(0.38, 0.76) * size
    cx, cy = int(size / 2 + dist * math.cos(ang)), int(size / 2 + dist * math.sin(ang))
    opacity = np.float32(d.uniform(0.7, 0.9))
    sh, sw = sprite.shape
    x0, y0 = cx - sw // 2, cy - sh // 2
    ix0, ix1, iy0, iy1 = max(0, x0), min(size, x0 + sw), max(0, y0), min(size, y0 + sh)
    if ix1 - ix0 < 1 or iy1 - iy0 < 1:
      continue
    part = sprite[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] * opacity
    np.maximum(cover[iy0:iy1, ix0:ix1], part, out=cover[iy0:iy1, ix0:ix1])
  img = np.empty((3, size, size), np.float32)
  for c in range(3):
    np.multiply(cover, np.float32(rbc[c] - base[c]), out=img[c])
    img[c] += np.float32(base[c])
  return img, row, col


def _cell(img: np.ndarray, d: _Draws, rec: _Recipe, s: float,
          nucleus: np.ndarray | None = None) -> None:
  """Draws one cell of recipe `rec` near the centre of the (3, H, W) `img`.

  If given, the (H, W) float32 `nucleus` receives the nucleus coverage (no extra random draws:
  the image is the same with or without it).
  """
  size = img.shape[1]
  radius = rec.radius * s * d.uniform(0.9, 1.1)
  cx, cy = size / 2 + d.uniform(-10, 10) * s, size / 2 + d.uniform(-10, 10) * s
  reach = radius * (1.0 + rec.elongation + 2.5 * rec.wobble + 1.6 * rec.hairy) + 4 * s
  reach += 4 * rec.smear * s
  x0, x1 = max(0, int(cx - reach)), min(size, int(cx + reach) + 1)
  y0, y1 = max(0, int(cy - reach)), min(size, int(cy + reach) + 1)
  crop = img[:, y0:y1, x0:x1].copy()
  h, w = crop.shape[1:]
  f = _Frame(h, w, cx - x0, cy - y0, d.uniform(0, 2 * math.pi))
  u, v = f.u, f.v

  # Cell body: an ellipse with a wobbly (and for hairy cells, spiky) outline.
  e = d.uniform(0, rec.elongation)
  a, b = radius * (1 + e), radius * (1 - e)
  q = (u * np.float32(1.0 / a)) ** 2
  q += (v * np.float32(1.0 / b)) ** 2
  np.sqrt(q, out=q)
  field = _texture(d, h, w, 18 * s)  # Outline wobble and cytoplasm texture.
  edge = field * np.float32(rec.wobble)
  edge += 1.0
  if rec.hairy:
    phi = np.arctan2(v, u)
    k1, k2 = d.integers(14, 22), d.integers(23, 31)
    spikes = np.sin(k1 * phi + d.uniform(0, 6.3)) + 0.7 * np.sin(k2 * phi + d.uniform(0, 6.3))
    edge += rec.hairy * 0.45 * np.clip(spikes, 0, None) ** 3
  q /= edge
  cell_mask = _soft((1.0 - q) * radius, 1.3)
  _blend(crop, d.jitter(rec.cyto, 9), cell_mask * rec.cyto_alpha, add=field * np.float32(5.0))

  # Nucleus geometry (cell-local coordinates).
  rn = radius * rec.nuc_size * d.uniform(0.9, 1.1)
  nu = rec.nuc_offset * radius + d.uniform(-0.06, 0.06) * radius
  nv = d.uniform(-0.06, 0.06) * radius
  if rec.hof:  # Pale Golgi zone on the cell-centre side of the nucleus.
    box = f.box(nu - rn * 1.05, nv, rn * 0.8 + 3)
    if box:
      m = _ellipse(u[box], v[box], nu - rn * 1.05, nv, rn * 0.6, rn * 0.75, 3.0)
      m *= cell_mask[box]
      m *= 0.55
      _blend(crop[:, box[0], box[1]], (205.0, 210.0, 238.0), m)
  if rec.granules:
    _granules(crop, d, rec.granules, rec.granule_rgb, rec.granule_alpha, rec.granule_size,
              radius, cell_mask, f, s)
  if rec.granules2:
    _granules(crop, d, rec.granules2, rec.granule2_rgb, 0.9, 2, radius, cell_mask, f, s)
  for _ in range(d.integers(rec.vacuoles // 2, rec.vacuoles + 1) if rec.vacuoles else 0):
    rr, ang = radius * math.sqrt(d.uniform(0.1, 0.7)), d.uniform(0, 2 * math.pi)
    vr = d.uniform(2.5, 6.0) * s
    vu, vv, aspect = rr * math.cos(ang), rr * math.sin(ang), d.uniform(0.8, 1.0)
    box = f.box(vu, vv, vr + 2)
    if box:
      m = _ellipse(u[box], v[box], vu, vv, vr, vr * aspect)
      m *= cell_mask[box]
      m *= 0.8
      _blend(crop[:, box[0], box[1]], (238.0, 232.0, 242.0), m)
  if rec.auer_rods:
    _auer_rods(crop, d, rec.auer_rods, radius, f, cell_mask, s)

  if rec.nucleus == "multi":
    box = (slice(0, h), slice(0, w))
  else:
    box = f.box(nu, nv, rn * 1.3 + 3) or (slice(0, 1), slice(0, 1))
  nmask = _nucleus_mask(u[box], v[box], d, rec, nu, nv, rn, radius)
  nh, nw = nmask.shape
  if nucleus is not None:
    nucleus[y0:y1, x0:x1][box] = nmask
  nuc = d.jitter(rec.nuc, 10)
  chrom = np.clip(_texture(d, nh, nw, 62 * s / rec.chromatin_grain), -2.5, 2.5)
  chrom *= rec.chromatin
  chrom += 1.0
  ncrop = crop[:, box[0], box[1]]
  _blend(ncrop, nuc, nmask * 0.97, mul=chrom)
  pale = [min(c * 1.35 + 20, 235.0) for c in nuc]
  for _ in range(rec.nucleoli):
    ang, rr = d.uniform(0, 2 * math.pi), rn * d.uniform(0.0, 0.45)
    nr = rn * d.uniform(0.13, 0.2)
    m = _ellipse(u[box], v[box], nu + rr * math.cos(ang), nv + rr * math.sin(ang), nr,
                 nr * 0.85, 2.0)
    m *= nmask
    m *= 0.75
    _blend(ncrop, pale, m)
  if rec.granules_over_nucleus:
    _granules(crop, d, rec.granules // 2, rec.granule_rgb, rec.granule_alpha,
              rec.granule_size, radius, cell_mask, f, s)

  region = img[:, y0:y1, x0:x1]
  if not rec.smear:
    region[...] = crop
    return
  # Not identifiable: smear the cell along x or y (a cheap anisotropic blur by down- and
  # up-sampling) and fade it into the background.
  long_, short = rec.smear * s * d.uniform(2.0, 3.0), rec.smear * s * d.uniform(0.6, 1.0)
  fx, fy = (long_, short) if d.uniform() < 0.5 else (short, long_)
  small = (max(2, round(w / fx)), max(2, round(h / fy)))
  for c in range(3):
    plane = Image.fromarray(crop[c]).resize(small, Image.BILINEAR, reducing_gap=2.0)
    crop[c] = np.asarray(plane.resize((w, h), Image.BICUBIC))
  xs = np.arange(w, dtype=np.float32)[None, :]
  ys = np.arange(h, dtype=np.float32)[:, None]
  fade = _ellipse(xs, ys, w / 2, h / 2, w / 2 - 1, h / 2 - 1, 12.0)
  _blend(region, crop, fade)


def _nucleus_mask(u: np.ndarray, v: np.ndarray, d: _Draws, rec: _Recipe, nu: float, nv: float,
                  rn: float, radius: float) -> np.ndarray:
  """The nucleus coverage over the (u, v) grid."""
  kind = rec.nucleus
  if kind == "round":
    return _ellipse(u, v, nu, nv, rn, rn * d.uniform(0.86, 1.0))
  if kind == "oval":
    return _ellipse(u, v, nu, nv, rn * 0.82, rn * 1.18)
  if kind == "kidney":
    body = _ellipse(u, v, nu, nv, rn * 0.95, rn * 1.08)
    bite = _ellipse(u, v, nu - rn * d.uniform(0.85, 1.0), nv, rn * 0.55, rn * 0.6, 2.0)
    bite *= -1.0
    bite += 1.0
    body *= bite
    return body
  if kind == "band":
    gap = d.uniform(0.75, 1.1)
    return _band(u, v, nu, nv, rn * 0.72, rn * 0.24 * d.uniform(0.9, 1.1), gap)
  if kind == "lobes":  # Lobes along an arc, joined by thin strands.
    n = d.integers(rec.lobes[0], rec.lobes[1] + 1)
    arc_r = rn * (0.7 if n > 2 else 0.62)
    span = (1.1 if n == 2 else 1.9) * d.uniform(0.9, 1.1)
    angles = [math.pi - span + 2 * span * i / max(n - 1, 1) + d.uniform(-0.15, 0.15)
              for i in range(n)]
    centres = [(nu + arc_r * math.cos(a), nv + arc_r * math.sin(a)) for a in angles]
    mask = np.zeros(np.broadcast_shapes(u.shape, v.shape), np.float32)
    for p, q in zip(centres[:-1], centres[1:], strict=True):
      np.maximum(mask, _capsule(u, v, p, q, rn * 0.07), out=mask)
    for cu, cv in centres:
      lr = rn * (0.42 if n == 2 else 0.34) * d.uniform(0.85, 1.15)
      np.maximum(mask, _ellipse(u, v, cu, cv, lr, lr * d.uniform(0.75, 1.0)), out=mask)
    return mask
  if kind == "multi":  # Two or three separate round nuclei.
    n = d.integers(rec.lobes[0], rec.lobes[1] + 1)
    mask = np.zeros(np.broadcast_shapes(u.shape, v.shape), np.float32)
    start = d.uniform(0, 2 * math.pi)
    for i in range(n):
      ang = start + 2 * math.pi * i / n + d.uniform(-0.3, 0.3)
      rr = radius * d.uniform(0.3, 0.45)
      r1 = rn * d.uniform(0.85, 1.15)
      one = _ellipse(u, v, rr * math.cos(ang), rr * math.sin(ang), r1, r1 * d.uniform(0.8, 1.0))
      np.maximum(mask, one, out=mask)
    return mask
  raise ValueError(f"unknown nucleus kind {kind!r}")


def _granules(crop: np.ndarray, d: _Draws, n: int, rgb: Sequence[float], alpha: float, size: int,
              radius: float, cell_mask: np.ndarray, f: _Frame, s: float) -> None:
  """`n` granules scattered uniformly over the cell."""
  rr = radius * np.sqrt(d.rng.uniform(0, 0.9, n))
  ang = d.rng.uniform(0, 2 * math.pi, n)
  ys, xs = f.to_crop(rr * np.cos(ang), rr * np.sin(ang))
  layer = _dots(crop.shape[1:], ys, xs, size, s)
  layer *= cell_mask
  layer *= alpha
  _blend(crop, d.jitter(rgb, 8), layer)


def _auer_rods(crop: np.ndarray, d: _Draws, n: int, radius: float, f: _Frame,
               cell_mask: np.ndarray, s: float) -> None:
  """A bundle of thin red-purple rods in the cytoplasm (faggot cell)."""
  layer = Image.new("L", (crop.shape[2], crop.shape[1]))
  draw = ImageDraw.Draw(layer)
  base = d.uniform(0, math.pi)
  bu, bv = -radius * 0.45, d.uniform(-0.2, 0.2) * radius  # Bundle centre, away from nucleus.
  for _ in range(n):
    ang = base + d.uniform(-0.35, 0.35)
    half = d.uniform(7, 12) * s
    mu, mv = bu + d.uniform(-6, 6) * s, bv + d.uniform(-6, 6) * s
    ya, xa = f.to_crop(mu - half * math.cos(ang), mv - half * math.sin(ang))
    yb, xb = f.to_crop(mu + half * math.cos(ang), mv + half * math.sin(ang))
    draw.line([(xa, ya), (xb, yb)], fill=255, width=max(1, round(2 * s)))
  m = np.asarray(layer, np.float32) * np.float32(0.9 / 255.0)
  m *= cell_mask
  _blend(crop, d.jitter((170, 35, 85), 10), m)


def _smudge(img: np.ndarray, d: _Draws, rec: _Recipe, s: float) -> None:
  """Smudge cell: a pale, streaky, irregular smear of nuclear material without cytoplasm."""
  size = img.shape[1]
  radius = rec.radius * s * d.uniform(0.85, 1.15)
  cx, cy = size / 2 + d.uniform(-12, 12) * s, size / 2 + d.uniform(-12, 12) * s
  reach = radius * 1.7
  x0, x1 = max(0, int(cx - reach)), min(size, int(cx + reach) + 1)
  y0, y1 = max(0, int(cy - reach)), min(size, int(cy + reach) + 1)
  crop = img[:, y0:y1, x0:x1].copy()
  h, w = crop.shape[1:]
  f = _Frame(h, w, cx - x0, cy - y0, d.uniform(0, 2 * math.pi))
  a, b = radius * d.uniform(1.0, 1.3), radius * d.uniform(0.75, 1.0)
  q = (f.u * np.float32(1.0 / a)) ** 2
  q += (f.v * np.float32(1.0 / b)) ** 2
  np.sqrt(q, out=q)
  edge = _noise_field(d.rng, h, w, 4) * np.float32(rec.wobble * 1.6)
  edge += 1.0
  q /= np.maximum(edge, 0.3, out=edge)
  mask = _soft((1.0 - q) * radius, 6.0)
  mask *= 0.85
  grid = (4, 18) if d.uniform() < 0.5 else (18, 4)
  streaks = np.array(Image.fromarray(d.rng.standard_normal(grid, dtype=np.float32)).resize(
      (w, h), Image.BICUBIC))
  np.clip(streaks, -2.5, 2.5, out=streaks)
  streaks *= 0.14
  streaks += 1.0
  colour = d.jitter(rec.nuc, 12)
  _blend(crop, colour, mask, mul=streaks)
  core = _ellipse(f.u, f.v, d.uniform(-0.2, 0.2) * radius, 0.0, radius * 0.35, radius * 0.3, 5.0)
  core *= 0.6
  _blend(crop, [c * 0.75 for c in colour], core)
  img[:, y0:y1, x0:x1] = crop


def _debris(img: np.ndarray, d: _Draws, s: float) -> None:
  """Artefact: irregular fragments and strands of stained debris, no intact cell."""
  size = img.shape[1]
  ccx, ccy = size / 2 + d.uniform(-15, 15) * s, size / 2 + d.uniform(-15, 15) * s
  for _ in range(d.integers(4, 11)):
    r = d.uniform(4, 19) * s
    cx, cy = ccx + d.normal(30) * s, ccy + d.normal(30) * s
    colour = d.jitter(_DEBRIS_PALETTE[d.integers(0, len(_DEBRIS_PALETTE))], 10)
    opacity = d.uniform(0.65, 0.95)
    reach = r * 1.8 + 3
    x0, x1 = max(0, int(cx - reach)), min(size, int(cx + reach) + 1)
    y0, y1 = max(0, int(cy - reach)), min(size, int(cy + reach) + 1)
    if x1 - x0 < 2 or y1 - y0 < 2:
      continue
    f = _Frame(y1 - y0, x1 - x0, cx - x0, cy - y0, d.uniform(0, 2 * math.pi))
    mask = np.zeros(f.shape, np.float32)
    for _ in range(d.integers(2, 5)):  # A fragment: a union of offset, squashed ellipses.
      pu, pv = d.uniform(-0.6, 0.6) * r, d.uniform(-0.6, 0.6) * r
      ea = r * d.uniform(0.35, 0.8)
      np.maximum(mask, _ellipse(f.u, f.v, pu, pv, ea, ea * d.uniform(0.3, 1.0)), out=mask)
    mask *= opacity
    _blend(img[:, y0:y1, x0:x1], colour, mask)
  strands = []
  for _ in range(d.integers(1, 5)):
    x, y, pts = ccx, ccy, []
    for _ in range(6):
      x, y = x + d.normal(11) * s, y + d.normal(11) * s
      pts.append((x, y))
    strands.append((pts, d.integers(120, 220), max(1, round(d.uniform(1, 3) * s))))
  colour = d.jitter((120, 75, 130), 15)
  xs = [p[0] for pts, _, _ in strands for p in pts]
  ys = [p[1] for pts, _, _ in strands for p in pts]
  x0, x1 = max(0, int(min(xs)) - 4), min(size, int(max(xs)) + 5)
  y0, y1 = max(0, int(min(ys)) - 4), min(size, int(max(ys)) + 5)
  if x1 - x0 < 2 or y1 - y0 < 2:
    return
  layer = Image.new("L", (x1 - x0, y1 - y0))
  draw = ImageDraw.Draw(layer)
  for pts, level, width in strands:
    draw.line([(px - x0, py - y0) for px, py in pts], fill=level, width=width)
  _blend(img[:, y0:y1, x0:x1], colour, np.asarray(layer, np.float32) * np.float32(0.7 / 255.0))


def _image_rng(seed: int, code: str, index: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([seed, CODES.index(code), index]))


def _render(code: str, index: int, seed: int, image_size: int,
            nucleus: np.ndarray | None = None) -> Image.Image:
  if code not in _RECIPES:
    raise ValueError(f"Unknown class code {code!r}. Valid codes are: {', '.join(CODES)}.")
  if index < 1:
    raise ValueError(f"image index must be >= 1, got {index}")
  d = _Draws(_image_rng(seed, code, index))
  s = image_size / IMAGE_SIZE
  rec = _RECIPES[code]
  img, row, col = _background(d, image_size, s)
  if rec.kind == "debris":
    _debris(img, d, s)
  elif rec.kind == "smudge":
    _smudge(img, d, rec, s)
  else:
    _cell(img, d, rec, s, nucleus)
  # Illumination gradient, mottling and grain over everything, then 8-bit RGB.
  tile = _noise_tile()
  oy, ox = d.integers(0, tile.shape[0] - image_size), d.integers(0, tile.shape[1] - image_size)
  light = tile[oy:oy + image_size, ox:ox + image_size] + col[None, :]
  light += row[:, None]
  planes = []
  for c in range(3):
    x = img[c]
    x += light
    planes.append(Image.fromarray(np.clip(x, 0, 255, out=x).astype(np.uint8)))
  return Image.merge("RGB", planes)


def render_image(code: str, index: int, *, seed: int = 0,
                 image_size: int = IMAGE_SIZE) -> np.ndarray:
  """Draws synthetic image number `index` of class `code`.

  Args:
    code: a class code from `CODES`.
    index: the 1-based file number (the `00001` in `NGS_00001.jpg`).
    seed: the dataset seed.
    image_size: side of the square image in pixels.

  Returns:
    An (image_size, image_size, 3) uint8 RGB array, a pure function of (seed, code, index, size).
  """
  return np.asarray(_render(code, index, seed, image_size))


def render_with_nucleus_mask(code: str, index: int, *, seed: int = 0,
                             image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """(image, nucleus mask) of synthetic image number `index` of class `code`.

  The image is `render_image`'s, bit for bit; the mask is a bool (image_size, image_size) array,
  True where the drawn nucleus covers at least half a pixel (all of them for the multinucleate
  'OTH' recipe; before the smearing blur of 'NIF'). Artefacts ('ART') and smudge cells ('KSC')
  are drawn without a nucleus recipe: their mask is all False.
  """
  coverage = np.zeros((image_size, image_size), np.float32)
  image = np.asarray(_render(code, index, seed, image_size, coverage))
  return image, coverage >= 0.5


def encode_jpeg(image: np.ndarray | Image.Image, quality: int = JPEG_QUALITY) -> bytes:
  """Encodes an (H, W, 3) uint8 array (or a PIL image) as JPEG bytes."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  buf = io.BytesIO()
  image.save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def image_bytes(code: str, index: int, *, seed: int = 0, image_size: int = IMAGE_SIZE) -> bytes:
  """The JPEG bytes of synthetic image `index` of class `code` (see `render_image`)."""
  return encode_jpeg(_render(code, index, seed, image_size))
