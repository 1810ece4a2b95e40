"""A synthetic bone-marrow cell dataset in the real on-disk layout, for the demo and the tests.

The real images (Matek et al., Blood 2021) are not shipped, so the demo and the tests use images
drawn here (`cells`: one recipe per class, learnable by a small CNN at 64 px in minutes) and
written in the exact Kaggle or TCIA layout, as folders or a zip (`layout`). Command line:
`python -m bmcc.synthetic OUT --scale 0.01 --layout kaggle --zip --corrupt`.
"""

from bmcc.synthetic.cells import (
  IMAGE_SIZE,
  encode_jpeg,
  image_bytes,
  render_image,
  render_with_nucleus_mask,
)
from bmcc.synthetic.layout import (
  ABBREVIATIONS_FILE,
  DEFAULT_MINIMUM,
  DEFAULT_SCALE,
  LAYOUT_FOLDERS,
  TEXT_NOT_JPEG,
  ZIP_NAMES,
  SyntheticDataset,
  abbreviations_csv,
  default_counts,
  range_name,
  relative_path,
  write_demo_dataset,
  write_synthetic_dataset,
)

__all__ = [
    "ABBREVIATIONS_FILE", "DEFAULT_MINIMUM", "DEFAULT_SCALE", "IMAGE_SIZE", "LAYOUT_FOLDERS",
    "TEXT_NOT_JPEG", "ZIP_NAMES", "SyntheticDataset", "abbreviations_csv", "default_counts",
    "encode_jpeg", "image_bytes", "range_name", "relative_path", "render_image",
    "render_with_nucleus_mask",
    "write_demo_dataset", "write_synthetic_dataset",
]
