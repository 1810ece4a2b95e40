"""ResNet-50 (v1.5) from scratch at 224 px, bfloat16: default's recipe with a faster model.

Everything else as `configs/default.py`: batch 256, AdamW 1e-3 (weight decay 0.05 on kernels), 2
warm-up epochs then cosine decay to 1% over 30 epochs of the ~137k training images (535 steps
each), label smoothing 0.1, square-root class-balanced sampling, weight average (decay 0.999).
Put the download in `~/tensorflow_datasets/downloads/manual/` (or pass
--config.data.manual_dir), then:

  python main.py --config configs/resnet50.py --workdir runs/resnet50

If you change --config.batch_size, scale num_train_steps, warmup_steps, eval_every_steps,
checkpoint_every_steps and learning_rate with it (they are plain numbers here).

Time per epoch: not yet measured on any GPU (`bench/gpu.sh` measures the step and the input
pipeline). Estimate only: XLA's cost analysis of the compiled training step, measured on the CPU,
gives 24.1 GFLOP per image (7.9 GFLOP for the forward pass), so an epoch of 137k images is about
3.3e15 FLOP: 3.3 s at the H100 SXM's dense bf16 peak (989 TFLOP/s), so about 35 s at a plausible
10% of peak, if the input pipeline keeps up. Dense convolutions reach a larger fraction of peak
than ResNeXt's grouped ones, so expect it to be faster per epoch than the default.
Expected metrics: not yet measured.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Default's recipe with ResNet-50."""
  config = default.get_config()
  config.model = "resnet50"
  return config
