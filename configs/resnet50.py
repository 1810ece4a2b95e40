"""ResNet-50 (v1.5) from scratch at 224 px, bfloat16: default's recipe with a faster model.

  python main.py --config configs/resnet50.py --workdir runs/resnet50

Everything else as `configs/default.py` (durations in epochs). Time per epoch and metrics: not yet
measured (no GPU lent).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Default's recipe with ResNet-50."""
  config = default.get_config()
  config.model = "resnet50"
  return config
