"""SimpleCNN, the old project's design, at native resolution (250 px) on the real dataset.

Default's recipe: five conv blocks (32..512 channels), dense 256 with dropout 0.3, AdamW at 1e-3
with 1,000 warm-up steps and cosine decay, batch 128, 32,000 steps (about 30 epochs of the ~137k
training images), float32. Put the download in `~/tensorflow_datasets/downloads/manual/` (or pass
--config.data.manual_dir), then:

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
  """Default's recipe, named for the model; more decoding workers for a GPU machine."""
  config = default.get_config()
  config.model = "simple_cnn"
  config.image_size = 250  # native resolution: no resize beyond the random crop
  config.data.num_workers = 8  # grain worker processes decoding JPEGs (a GPU machine's cores)
  return config
