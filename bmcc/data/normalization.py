"""Pixel normalisation, applied on the device to the uint8 images the pipeline delivers."""

from __future__ import annotations

import numpy as np

# Per-channel mean and standard deviation (0..255 scale): fixed round values near the colours of
# May-Grunwald-Giemsa-stained smears, not fitted to any data. A fixed normaliser keeps checkpoints
# independent of the data a run happened to see.
MEAN_RGB = (200.0, 180.0, 200.0)
STDDEV_RGB = (50.0, 55.0, 45.0)

# The dataset's own statistics (`input_normalization='matek'`): every pixel of the 3,662 real
# images of the development subset (Matek et al. 2021, every class, 250 px), measured once and
# fixed here, so that checkpoints still do not depend on the data a run saw. The fixed stain
# values above are 50 grey levels brighter in red and green than these cells.
MATEK_MEAN_RGB = (145.5, 127.0, 188.0)
MATEK_STDDEV_RGB = (62.1, 73.5, 44.5)


def normalize_images(images, dtype=np.float32, mean=MEAN_RGB, std=STDDEV_RGB):
  """uint8 images -> (x - mean) / std in `dtype`; works on numpy and jax arrays alike.

  `mean` and `std` (0..255 scale) default to the stain statistics above; a model carries its own
  as `input_mean` / `input_std` (`bmcc.steps.normalize_input`).
  """
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return ((images.astype(np.float32) - mean) / std).astype(dtype)
