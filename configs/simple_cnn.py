"""SimpleCNN, the old project's design, at native resolution (250 px) on the real dataset.

Five conv blocks (32..512 channels), dense 256 with dropout 0.3, float32; AdamW at 1e-3 (weight
decay 1e-4) with 1,000 warm-up steps and cosine decay, batch 128, 32,000 steps (about 30 epochs of
the ~137k training images), natural sampling, no label smoothing, no weight average. Put the
download in `~/tensorflow_datasets/downloads/manual/` (or pass --config.data.manual_dir), then:

  python main.py --config configs/simple_cnn.py --workdir runs/simple_cnn

Time per epoch: not yet measured on any GPU (`bench/gpu.sh` measures the step). Estimate only:
XLA's cost analysis of the compiled training step, measured on the CPU, gives 23.3 GFLOP per image
(7.7 GFLOP for the forward pass: two full-width 3x3 convolutions at every scale from 250 px make it
as costly as ResNet-50 at 224 px), so an epoch of 137k images is about 3.2e15 FLOP: 6.4 s at the
H100 SXM's dense TF32 peak (495 TFLOP/s; float32 convolutions run as TF32 by default), so about
30 s at a plausible 20% of peak, if the input pipeline keeps up.
Expected metrics: not yet measured.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Default's keys with the simple CNN and the plain recipe; `demo.py` and `tiny.py` start here."""
  config = default.get_config()
  config.image_size = 250  # native resolution: no resize beyond the random crop
  config.model = "simple_cnn"
  # Replaces default's ResNeXt keys: only what SimpleCNN's constructor accepts.
  config.model_config = ml_collections.ConfigDict({
      "features": (32, 64, 128, 256, 512),  # channels of each conv block (each halves the size)
      "dense": 256,  # width of the dense layer before the classifier
      "dropout": 0.3,  # dropout rate before the classifier
      "dtype": "float32",  # compute dtype; parameters stay float32
  })
  config.data.balance_alpha = 0.0  # natural sampling: shuffled epochs
  config.batch_size = 128
  config.eval_batch_size = 256
  config.num_train_steps = 32_000  # about 30 epochs of ~137k training images at batch 128
  config.learning_rate = 1e-3
  config.warmup_steps = 1_000
  config.weight_decay = 1e-4
  config.label_smoothing = 0.0
  config.ema_decay = None
  config.eval_every_steps = 2_000
  config.checkpoint_every_steps = 1_000
  return config
