"""ResNet-50 (v1.5) from scratch at 224 px, bfloat16 compute, on the real dataset.

Batch 256; AdamW (weight decay 0.05 on kernels) at 1e-3 per 256 images, 2 epochs of linear
warm-up then cosine decay to 1% over 30 epochs of the ~137k training images (535 steps each);
label smoothing 0.1; 8 decoding workers. Put the download in
`~/tensorflow_datasets/downloads/manual/` (or pass --config.data.manual_dir), then:

  python main.py --config configs/resnet50.py --workdir runs/resnet50

If you change --config.batch_size, scale num_train_steps, warmup_steps, eval_every_steps,
checkpoint_every_steps and learning_rate with it (they are plain numbers here).

Time per epoch: not yet measured on any GPU (`bench/gpu.sh` measures the step and the input
pipeline). Estimate only: XLA's cost analysis of the compiled training step, measured on the CPU,
gives 24.1 GFLOP per image (7.9 GFLOP for the forward pass), so an epoch of 137k images is about
3.3e15 FLOP: 3.3 s at the H100 SXM's dense bf16 peak (989 TFLOP/s), so about 35 s at a plausible
10% of peak, if the input pipeline keeps up. Expected metrics: not yet measured.
"""

import ml_collections

from configs import default

TRAIN_IMAGES = 137_000  # about 80% of the 171,374 images (the prepared train split)
EPOCHS = 30


def get_config() -> ml_collections.ConfigDict:
  """ResNet-50 recipe; `configs/resnext50.py` reuses it."""
  config = default.get_config()
  config.image_size = 224  # random 70-100% crops of the 250 px cells, resized to 224
  config.model = "resnet50"
  # Replaces default's SimpleCNN keys: only what ResNet's constructor accepts.
  config.model_config = ml_collections.ConfigDict({
      "dtype": "bfloat16",  # compute dtype; parameters and batch-norm statistics stay float32
      "dropout": 0.0,  # dropout rate before the head
      "zero_init_residual": True,  # each residual block starts as the identity
  })
  config.data.num_workers = 8  # grain worker processes decoding and augmenting JPEGs

  config.batch_size = 256
  config.eval_batch_size = 512
  steps_per_epoch = TRAIN_IMAGES // config.batch_size  # 535
  config.num_train_steps = EPOCHS * steps_per_epoch  # 16,050
  config.warmup_steps = 2 * steps_per_epoch  # 2 epochs

  config.optimizer = "adamw"
  config.learning_rate = 1e-3 * config.batch_size / 256  # 1e-3 per 256 images (linear scaling)
  config.lr_schedule = "cosine"
  config.end_learning_rate_factor = 0.01
  config.weight_decay = 0.05  # decoupled, on kernels only
  config.label_smoothing = 0.1

  config.eval_every_steps = 2 * steps_per_epoch  # validation every 2 epochs
  config.checkpoint_every_steps = steps_per_epoch  # and a checkpoint every epoch
  return config
