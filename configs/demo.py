"""Demo: a small synthetic dataset in the real on-disk layout, trained on the CPU in minutes.

  python main.py --config configs/demo.py --workdir workdirs/demo      # or: make demo

Writes ~2,300 synthetic 250 x 250 JPEGs (three planted bad files) in the Kaggle layout into
~/.cache/bmcc on first use, prepares them with the TFDS builder (dataset 2.0.0: stratified
splits), trains SimpleCNN at 48 px for 400 steps of batch 32 (about 7 epochs of the 1,866
training images) and evaluates on the test split (232 images).

Measured on 2 CPU cores, nothing else running, data cached: 49 s; test accuracy 0.978, balanced
accuracy 0.943, macro F1 0.946. With 4 fake devices (XLA_FLAGS=
--xla_force_host_platform_device_count=4): 46 s; 0.983 / 0.959 / 0.960 (rounding differs; a few
images per rare class move the balanced accuracy).
tests/test_end_to_end.py holds the 1-device run to BALANCED_ACCURACY_BAND.
"""

import ml_collections

from configs import simple_cnn

# The test balanced accuracy the command above must reach (README states the same band).
BALANCED_ACCURACY_BAND = (0.90, 0.99)


def get_config() -> ml_collections.ConfigDict:
  config = simple_cnn.get_config()
  config.data.synthetic = ml_collections.ConfigDict({
      "scale": 0.012,  # images per class as a fraction of the real class sizes
      "minimum": 40,  # but at least this many per class
      "seed": 0,  # seed of the synthetic images
  })
  config.data.num_workers = 0  # decoding 48 px is cheap next to the step on 2 cores
  config.image_size = 48
  config.model_config.features = (8, 16, 32)
  config.model_config.dense = 64
  config.model_config.dropout = 0.1
  config.batch_size = 32
  config.eval_batch_size = 128
  config.num_train_steps = 400
  config.warmup_steps = 40
  config.learning_rate = 3e-3
  config.log_every_steps = 25
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 50
  return config
