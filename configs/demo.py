"""Demo: a small synthetic dataset in the real on-disk layout, trained on the CPU in minutes.

  python main.py --config configs/demo.py --workdir workdirs/demo      # or: make demo

Writes ~2,300 synthetic 250 x 250 JPEGs (three planted bad files) in the Kaggle layout into
~/.cache/bmcc on first use, prepares them with the TFDS builder (dataset 2.0.0: stratified
splits), trains SimpleCNN at 48 px for 400 steps of batch 32 (about 7 epochs of the 1,866
training images) and evaluates on the test split (232 images).

Measured on 2 CPU cores (another test job on them), data cached, 4 December 2026: 59 s; test
accuracy 0.996, balanced accuracy 0.988, macro F1 0.990. With 4 fake devices (XLA_FLAGS=
--xla_force_host_platform_device_count=4): 48 s; 0.983 / 0.969 / 0.972 (rounding differs; a few
images per rare class move the balanced accuracy). Before evaluation decoded its pictures as
training does (one decode + resize, 4 December) the same run gave 0.978 / 0.943 / 0.946.
tests/test_end_to_end.py holds the 1-device run to BALANCED_ACCURACY_BAND.
"""

import ml_collections

from configs import simple_cnn

# The test balanced accuracy the command above must reach (README states the same band).
BALANCED_ACCURACY_BAND = (0.92, 1.00)


def get_config() -> ml_collections.ConfigDict:
  config = simple_cnn.get_config()
  config.data.synthetic = ml_collections.ConfigDict({
      "scale": 0.012,  # images per class as a fraction of the real class sizes
      "minimum": 40,  # but at least this many per class
      "seed": 0,  # seed of the synthetic images
  })
  config.label_smoothing = 0.0  # the numbers above were measured without it
  config.input_normalization = "auto"  # and with the stain statistics (ImageNet if pretrained)
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
