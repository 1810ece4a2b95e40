"""ResNeXt-50 (32x4d) from scratch at 224 px, bfloat16: Matek et al. (Blood 2021)'s architecture.

The recipe of `configs/resnet50.py` (which starts from `configs/default.py`) with the 32-group
bottlenecks: batch 256, AdamW 1e-3 (weight decay 0.05), 2 warm-up epochs, cosine over 30 epochs of
the ~137k training images, label smoothing 0.1. Put the download in
`~/tensorflow_datasets/downloads/manual/` (or pass --config.data.manual_dir), then:

  python main.py --config configs/resnext50.py --workdir runs/resnext50

Matek et al. used 5-fold cross-validation at the image level; to follow it, run each fold:

  python main.py --config configs/resnext50.py --workdir runs/resnext50-fold0 \\
      --config.data.num_folds=5 --config.data.fold=0

and compare the per-class recall and precision with their Table 1 (mean strict recall about 0.69,
mean strict precision about 0.51; see /shared/DATASET.md).

Time per epoch: not yet measured on any GPU. Estimate only: XLA's cost analysis of the compiled
training step, measured on the CPU, gives 25.8 GFLOP per image (8.5 GFLOP for the forward pass),
about 3.5e15 FLOP per epoch: 3.6 s at the H100 SXM's dense bf16 peak (989 TFLOP/s). Grouped
convolutions reach a smaller fraction of peak than ResNet-50's dense ones, so expect it to be
slower per epoch than ResNet-50. Expected metrics: not yet measured.
"""

import ml_collections

from configs import resnet50


def get_config() -> ml_collections.ConfigDict:
  """ResNet-50's recipe with the ResNeXt-50 32x4d model."""
  config = resnet50.get_config()
  config.model = "resnext50_32x4d"
  return config
