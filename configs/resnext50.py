"""ResNeXt-50 (32x4d) as Matek et al. (Blood 2021) trained it: natural sampling, no weight average.

Default's model and schedule (224 px, bfloat16, batch 256, AdamW 1e-3 with weight decay 0.05, 2
warm-up epochs, cosine over 30 epochs of the ~137k training images, label smoothing 0.1), but
every image seen once per epoch (balance_alpha 0) and no exponential moving average: compared
with `configs/default.py` it measures what the two imbalance measures bring. Put the download in
`~/tensorflow_datasets/downloads/manual/` (or pass --config.data.manual_dir), then:

  python main.py --config configs/resnext50.py --workdir runs/resnext50

Matek et al. used 5-fold cross-validation at the image level; to follow it, run all five folds
(stratified; one after another, resumable) and their summary:

  python main.py --config configs/resnext50.py --workdir runs/resnext50-cv --mode=cross_validate

and compare the pooled per-class recall and precision (`cv_summary.json`, `pooled.per_class`)
with their Table 1 (mean strict recall about 0.69, mean strict precision about 0.51; see
/shared/DATASET.md).

Time per epoch: as `configs/default.py` (the same model and batch), not yet measured on any GPU.
Expected metrics: not yet measured.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Default's ResNeXt-50 recipe without class-balanced sampling and weight averaging."""
  config = default.get_config()
  config.model = "resnext50_32x4d"
  config.data.balance_alpha = 0.0
  config.ema_decay = None
  return config
