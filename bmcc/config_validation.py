"""Checks a config before any compilation or data work, so a wrong run fails in seconds."""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from bmcc import models
from bmcc.data import classes, splits


class ConfigError(ValueError):
  """A configuration that cannot run, with what to change in its message."""


def validate(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ConfigError naming the first problem found in `config` (and `workdir`)."""
  devices = jax.device_count()
  if config.model not in models.available():
    raise ConfigError(
        f"Unknown model {config.model!r}; available: {', '.join(models.available())}.")
  if config.data.classes is not None:
    try:
      codes = classes.validate_codes(config.data.classes)
    except ValueError as e:
      raise ConfigError(f"config.data.classes: {e}") from None
    if len(codes) < 2:
      raise ConfigError("config.data.classes needs at least two classes.")
  try:
    splits.Selection("train", config.data.fold, config.data.num_folds)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  for key in ("batch_size", "eval_batch_size"):
    value = config[key]
    if not isinstance(value, int) or value <= 0 or value % devices:
      raise ConfigError(
          f"config.{key}={value} must be a positive multiple of the device count ({devices}).")
  if not isinstance(config.image_size, int) or not 16 <= config.image_size <= 1024:
    raise ConfigError(f"config.image_size={config.image_size} must be an integer in 16..1024.")
  smallest = models.min_image_size(config.model, config.model_config.to_dict())
  if config.image_size < smallest:
    raise ConfigError(
        f"config.image_size={config.image_size} is too small for {config.model}, whose blocks "
        f"each halve the size: use at least {smallest}, or fewer blocks "
        "(config.model_config.features).")
  if config.num_train_steps <= 0:
    raise ConfigError(f"config.num_train_steps={config.num_train_steps} must be positive.")
  if not 0 <= config.warmup_steps <= config.num_train_steps:
    raise ConfigError(f"config.warmup_steps={config.warmup_steps} must be in "
                      f"0..num_train_steps ({config.num_train_steps}).")
  for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
    if config[key] <= 0:
      raise ConfigError(f"config.{key}={config[key]} must be positive.")
  if config.stop_at_step is not None and config.stop_at_step <= 0:
    raise ConfigError(f"config.stop_at_step={config.stop_at_step} must be positive or None.")
  if config.lr_schedule not in ("cosine", "linear", "exponential", "constant"):
    raise ConfigError(f"config.lr_schedule={config.lr_schedule!r}: use cosine, linear, "
                      "exponential or constant.")
  for key in ("plateau_patience", "early_stopping_patience"):
    if config.get(key) is not None and config[key] < 1:
      raise ConfigError(f"config.{key}={config[key]} must be at least 1, or None.")
  if not 0 < config.get("plateau_factor", 0.5) < 1:
    raise ConfigError(f"config.plateau_factor={config.plateau_factor} must be in (0, 1).")
  ema_decay = config.get("ema_decay")
  if ema_decay is not None and not (isinstance(ema_decay, int | float) and 0 <= ema_decay < 1):
    raise ConfigError(f"config.ema_decay={ema_decay!r} must be in [0, 1) (0 or None: off).")
  if config.optimizer not in ("adam", "adamw"):
    raise ConfigError(f"config.optimizer={config.optimizer!r}: use adam or adamw.")
  if config.final_eval_checkpoint not in ("best", "latest"):
    raise ConfigError(
        f"config.final_eval_checkpoint={config.final_eval_checkpoint!r}: use best or latest.")
  if config.learning_rate <= 0:
    raise ConfigError(f"config.learning_rate={config.learning_rate} must be positive.")
  if config.data.num_workers < 0:
    raise ConfigError(f"config.data.num_workers={config.data.num_workers} must be >= 0.")
  workdir = os.path.abspath(workdir)
  parent = workdir
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.access(parent, os.W_OK) or (os.path.exists(workdir) and not os.path.isdir(workdir)):
    raise ConfigError(f"The workdir {workdir!r} is not a writable folder.")


def check_checkpoint_metadata(saved: dict, current: dict, workdir: str) -> None:
  """Raises ConfigError if the checkpoint in `workdir` was made by an incompatible config."""
  current = json.loads(json.dumps(current))  # tuples -> lists, as the saved JSON has them
  for key in ("model", "model_config", "classes", "image_size", "fold", "num_folds",
              "ema_decay"):
    if saved.get(key) != current.get(key):
      raise ConfigError(
          f"The checkpoint in {workdir!r} was made with {key}={saved.get(key)!r}, but the config "
          f"says {current.get(key)!r}. Use another --workdir, or the config that made it.")
