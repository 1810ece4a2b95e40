"""Tiny: the smallest useful run, for tests and smoke checks (seconds on a CPU).

  python main.py --config configs/tiny.py --workdir /tmp/tiny

A synthetic dataset of ~380 images (at least 8 per class), 32 px, a two-block CNN, 24 steps. It
checks that everything runs, not that anything is learnt.
"""

import ml_collections

from configs import demo


def get_config() -> ml_collections.ConfigDict:
  config = demo.get_config()
  config.data.synthetic.scale = 0.002
  config.data.synthetic.minimum = 8
  config.image_size = 32
  config.model_config.features = (8, 16)
  config.model_config.dense = 16
  config.batch_size = 16
  config.eval_batch_size = 32
  config.num_train_steps = 24
  config.warmup_steps = 4
  config.log_every_steps = 4
  config.eval_every_steps = 8
  config.checkpoint_every_steps = 4
  return config
