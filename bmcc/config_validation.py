"""Checks a config before any compilation or data work, so a wrong run fails in seconds."""

from __future__ import annotations

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
  _check_durations(config)
  _check_finetune(config)
  if config.log_every_steps <= 0:
    raise ConfigError(f"config.log_every_steps={config.log_every_steps} must be positive.")
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


# Durations: (steps key, epochs key, whether 0 is allowed). A steps key, when set, wins.
_DURATIONS = (("num_train_steps", "num_epochs", False), ("warmup_steps", "warmup_epochs", True),
              ("eval_every_steps", "eval_every_epochs", False),
              ("checkpoint_every_steps", "checkpoint_every_epochs", False))


def _check_durations(config: ml_collections.ConfigDict) -> None:
  for steps_key, epochs_key, zero_ok in _DURATIONS:
    steps, epochs = config.get(steps_key), config.get(epochs_key)
    if steps is None and epochs is None:
      raise ConfigError(f"Set config.{steps_key} or config.{epochs_key}.")
    for key, value in ((steps_key, steps), (epochs_key, epochs)):
      if value is not None and (value < 0 or (value == 0 and not zero_ok)):
        raise ConfigError(f"config.{key}={value} must be {'>= 0' if zero_ok else 'positive'}.")
  total, warmup = config.get("num_train_steps"), config.get("warmup_steps")
  if total is not None and warmup is not None and warmup > total:
    raise ConfigError(f"config.warmup_steps={warmup} must be in 0..num_train_steps ({total}).")
  total, warmup = config.get("num_epochs"), config.get("warmup_epochs")
  if (config.get("num_train_steps") is None and config.get("warmup_steps") is None
      and warmup is not None and total is not None and warmup > total):
    raise ConfigError(f"config.warmup_epochs={warmup} must be in 0..num_epochs ({total}).")


def _check_finetune(config: ml_collections.ConfigDict) -> None:
  """`pretrained`, `input_normalization` and `finetune.*` (see configs/default.py)."""
  from bmcc import steps
  from bmcc.models import pretrained

  if config.get("input_normalization", "auto") not in ("auto", "imagenet", "stain"):
    raise ConfigError(f"config.input_normalization={config.input_normalization!r}: use auto, "
                      "imagenet or stain.")
  if config.get("pretrained") and config.model not in pretrained.ARCHS:
    raise ConfigError(f"config.pretrained is set, but there are no pretrained weights for "
                      f"{config.model!r}; supported: {', '.join(pretrained.ARCHS)}.")
  tune = config.get("finetune") or {}
  decay = tune.get("layer_decay", 1.0)
  if not isinstance(decay, int | float) or not 0 < decay <= 1:
    raise ConfigError(f"config.finetune.layer_decay={decay} must be in (0, 1] (1: off).")
  for key in ("freeze_steps", "freeze_epochs"):
    if (tune.get(key) or 0) < 0:
      raise ConfigError(f"config.finetune.{key}={tune[key]} must be >= 0.")
  head = tune.get("head_learning_rate")
  if head is not None and head <= 0:
    raise ConfigError(f"config.finetune.head_learning_rate={head} must be positive, or None.")
  if steps.uses_finetune_optimizer(config) and not config.model.startswith(("vit_", "res")):
    raise ConfigError(f"config.finetune (layer decay, freezing, head rate) needs a ViT or a "
                      f"ResNet, not {config.model!r}.")
