"""Checks a config before any compilation or data work, so a wrong run fails in seconds."""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from bmcc import models, steps
from bmcc.data import augment, classes, splits
from bmcc.errors import ConfigError
from bmcc.models import pretrained, resnet, simple_cnn, vit, weight_files

# Compute dtypes the models accept (parameters stay float32).
DTYPES = ("float32", "bfloat16", "float16")
# The keyword arguments `config.model_config` may set, per model: the constructor's own, less
# those the registry fixes for that model.
_RESNET_FIXED = {"num_classes", "rngs", "block"}


def _model_keywords(name: str) -> set[str]:
  if name == "simple_cnn":
    keywords = set(inspect.signature(models.SimpleCNN.__init__).parameters)
    return keywords - {"self", "num_classes", "rngs"}
  if name.startswith("vit_"):  # the size's width, depth and heads may be overridden too
    keywords = set(inspect.signature(vit.VisionTransformer.__init__).parameters)
    return keywords - {"self", "num_classes", "rngs"}
  keywords = set(inspect.signature(resnet.ResNet.__init__).parameters) - {"self"} - _RESNET_FIXED
  if name.startswith("resnext"):
    keywords -= {"groups", "group_width"}
  return keywords


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return (isinstance(value, int | float) and not isinstance(value, bool)
          and math.isfinite(value))


def _require(ok: bool, key: str, value: Any, requirement: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key}={value!r} {requirement}.")


def _check_int(config: Any, key: str, low: int, *, optional: bool = False,
               path: str = "") -> None:
  value = config.get(key)
  if optional and value is None:
    return
  _require(_is_int(value) and value >= low, path + key, value,
           f"must be an integer >= {low}" + (", or None" if optional else ""))


def _check_number(config: Any, key: str, low: float, high: float, *, low_open: bool = False,
                  high_open: bool = False, optional: bool = False, path: str = "",
                  note: str = "") -> None:
  value = config.get(key)
  if optional and value is None:
    return
  ok = _is_number(value) and (value > low if low_open else value >= low) and (
      value < high if high_open else value <= high)
  upper = "inf)" if high == math.inf else f"{high:g}" + (")" if high_open else "]")
  interval = ("(" if low_open else "[") + f"{low:g}, " + upper
  _require(ok, path + key, value, f"must be a number in {interval}" +
           (", or None" if optional else "") + note)


def _check_choice(config: Any, key: str, choices: Sequence[str], path: str = "") -> None:
  value = config.get(key)
  _require(value in choices, path + key, value, f"must be one of {', '.join(choices)}")


def _check_pair(data: Any, key: str) -> tuple[float, float]:
  value = data.get(key)
  ok = (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
        and all(_is_number(v) for v in value))
  _require(ok, "data." + key, value, "must be a pair of numbers (low, high)")
  return float(value[0]), float(value[1])


def _validate_data(data: Any) -> None:
  """The `data` block: paths, synthetic dataset, folds, augmentation, sampling, workers."""
  for key in ("data_dir", "manual_dir", "cache_dir"):
    value = data.get(key)
    _require(value is None or (isinstance(value, str) and value), f"data.{key}", value,
             "must be a folder path, or None")
  if data.get("classes") is not None:
    value = data.classes
    if isinstance(value, str):
      raise ConfigError(f"config.data.classes={value!r} must be a tuple of class codes, e.g. "
                        "--config.data.classes='(\"BLA\",\"EBO\")'.")
    try:
      codes = classes.validate_codes(value)
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config.data.classes: {e}") from None
    if len(codes) < 2:
      raise ConfigError("config.data.classes needs at least two classes.")
  synthetic = data.get("synthetic")
  if synthetic is not None:
    _require(isinstance(synthetic, ml_collections.ConfigDict | dict), "data.synthetic",
             synthetic, "must be None (the real dataset) or a block with scale, minimum, seed")
    unknown = set(synthetic) - {"scale", "minimum", "seed"}
    _require(not unknown, "data.synthetic", synthetic,
             f"has unknown key(s) {sorted(unknown)}; it takes scale, minimum and seed")
    _check_number(synthetic, "scale", 0, math.inf, low_open=True, path="data.synthetic.")
    _check_int(synthetic, "minimum", 0, path="data.synthetic.")
    _check_int(synthetic, "seed", 0, path="data.synthetic.")
  for key in ("fold", "num_folds"):
    _check_int(data, key, 0, optional=True, path="data.")
  if (data.get("fold") is None) != (data.get("num_folds") is None):
    raise ConfigError(f"config.data.fold={data.get('fold')!r} and config.data.num_folds="
                      f"{data.get('num_folds')!r}: set both (test on fold i of k) or neither.")
  try:
    splits.Selection("train", data.get("fold"), data.get("num_folds"), data.get("split"))
  except ValueError as e:
    raise ConfigError(f"config.{e}" if str(e).startswith("data.") else str(e)) from None
  _require(isinstance(data.get("augment"), bool), "data.augment", data.get("augment"),
           "must be True or False")
  pairs = {key: _check_pair(data, key) for key in ("crop_scale", "crop_ratio", "blur_sigma")}
  for key in ("color_jitter", "hue_jitter", "blur_prob"):
    _require(_is_number(data.get(key)), "data." + key, data.get(key), "must be a number")
  try:  # the ranges, as the training augmentation checks them
    augment.AugmentConfig(
        color_jitter=float(data.color_jitter), hue_jitter=float(data.hue_jitter),
        blur_prob=float(data.blur_prob), **pairs)
  except ValueError as e:
    raise ConfigError(f"config.data.{e}") from None
  _check_number(data, "balance_alpha", 0, math.inf, path="data.",
                note=" (0: natural sampling, 1: uniform over classes)")
  _check_number(data, "loss_weight_alpha", 0, math.inf, path="data.",
                note=" (0: no class weights)")
  _check_int(data, "num_workers", 0, path="data.")


def _validate_model(config: Any) -> None:
  """`model`, `model_config` and `image_size`."""
  if config.model not in models.available():
    raise ConfigError(
        f"Unknown model {config.model!r} (config.model); available: "
        f"{', '.join(models.available())}.")
  model_config = config.get("model_config")
  _require(isinstance(model_config, ml_collections.ConfigDict | dict), "model_config",
           model_config, "must be a block of the model's keyword arguments")
  unknown = set(model_config) - _model_keywords(config.model)
  if unknown:
    raise ConfigError(
        f"config.model_config has key(s) {sorted(unknown)} that {config.model} does not take; "
        f"it takes: {', '.join(sorted(_model_keywords(config.model)))}.")
  if "dtype" in model_config:
    _check_choice(model_config, "dtype", DTYPES, path="model_config.")
  if "dropout" in model_config:
    _check_number(model_config, "dropout", 0, 1, high_open=True, path="model_config.")
  for key in ("drop_path_rate",):
    if key in model_config:
      _check_number(model_config, key, 0, 1, high_open=True, path="model_config.")
  for key in ("mlp_ratio", "layer_scale"):
    if key in model_config:
      _check_number(model_config, key, 0, math.inf, low_open=True, path="model_config.")
  if "ffn" in model_config:
    _check_choice(model_config, "ffn", ("mlp", "swiglu"), path="model_config.")
  if "pooling" in model_config:
    _check_choice(model_config, "pooling", vit.POOLINGS, path="model_config.")
  if "pos_embed_resampling" in model_config:
    _check_choice(model_config, "pos_embed_resampling", ("auto", *vit.RESAMPLING),
                  path="model_config.")
  if "num_registers" in model_config:
    _check_int(model_config, "num_registers", 0, path="model_config.")
  if "features" in model_config:
    value = model_config.features
    _require(isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
             and all(_is_int(v) and v > 0 for v in value), "model_config.features", value,
             "must be a non-empty tuple of positive channel counts")
  if "dense" in model_config:  # SimpleCNN: 0 is no dense layer before the head
    _check_int(model_config, "dense", 0, path="model_config.")
  if "init" in model_config:
    _check_choice(model_config, "init", tuple(simple_cnn.INITS), path="model_config.")
  for key in ("width", "embed_dim", "depth", "num_heads", "image_size"):
    if key in model_config:
      _check_int(model_config, key, 1, path="model_config.")
  if "stage_sizes" in model_config:
    value = model_config.stage_sizes
    _require(isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
             and all(_is_int(v) and v > 0 for v in value), "model_config.stage_sizes", value,
             "must be a non-empty tuple of positive block counts")
  if "in_features" in model_config:
    _require(model_config.in_features == 3, "model_config.in_features",
             model_config.in_features, "must be 3 (the images are RGB)")
  if "zero_init_residual" in model_config:
    _require(isinstance(model_config.zero_init_residual, bool),
             "model_config.zero_init_residual", model_config.zero_init_residual,
             "must be True or False")
  if not _is_int(config.image_size) or not 16 <= config.image_size <= 1024:
    raise ConfigError(f"config.image_size={config.image_size} must be an integer in 16..1024.")
  smallest = models.min_image_size(config.model, model_config.to_dict()
                                   if isinstance(model_config, ml_collections.ConfigDict)
                                   else dict(model_config))
  if config.image_size < smallest:
    raise ConfigError(
        f"config.image_size={config.image_size} is too small for {config.model}, whose blocks "
        f"each halve the size: use at least {smallest}, or fewer blocks "
        "(config.model_config.features).")
  if config.model.startswith("vit_"):
    # A ViT would silently ignore the last rows and columns of a size between multiples.
    for key, size in (("image_size", config.image_size),
                      ("model_config.image_size", model_config.get("image_size"))):
      if size is not None and size % vit.PATCH_SIZE:
        raise ConfigError(
            f"config.{key}={size} is not a multiple of {config.model}'s {vit.PATCH_SIZE} px "
            f"patch (its last {size % vit.PATCH_SIZE} px rows and columns would be ignored): use "
            f"{' or '.join(map(str, vit.valid_sizes_near(size)))}.")


def _validate_schedule(config: Any) -> None:
  """Steps, optimizer, learning-rate schedule, regularisation, evaluation and checkpoints."""
  _check_int(config, "seed", 0)
  _check_durations(config)
  _check_finetune(config)
  _check_int(config, "log_every_steps", 1)
  _check_int(config, "keep_checkpoints", 1)
  _check_int(config, "stop_at_step", 1, optional=True)
  _check_choice(config, "optimizer", ("adam", "adamw"))
  _check_number(config, "learning_rate", 0, math.inf, low_open=True)
  _check_choice(config, "lr_schedule", ("cosine", "linear", "exponential", "constant"))
  _check_number(config, "end_learning_rate_factor", 0, 1,
                note=" (the final learning rate as a fraction of the peak)")
  _check_number(config, "weight_decay", 0, math.inf)
  _check_number(config, "grad_clip_norm", 0, math.inf, optional=True, note=" (0 or None: off)")
  _check_number(config, "label_smoothing", 0, 1, high_open=True)
  ema_decay = config.get("ema_decay")
  if ema_decay is not None and not (_is_number(ema_decay) and 0 <= ema_decay < 1):
    raise ConfigError(f"config.ema_decay={ema_decay!r} must be in [0, 1) (0 or None: off).")
  for key in ("plateau_patience", "early_stopping_patience"):
    _check_int(config, key, 1, optional=True)
  _check_number(config, "plateau_factor", 0, 1, low_open=True, high_open=True)
  _check_number(config, "min_delta", 0, 1,
                note=" (the smallest change of validation balanced accuracy that counts)")
  _check_choice(config, "final_eval_checkpoint", ("best", "latest"))


def check_files(config: ml_collections.ConfigDict) -> None:
  """ConfigError if a file the config names is not there: `pretrained` (a local file, or a
  well-formed `hf-hub:` id; whether the hub has it is found when it is fetched). No file is read."""
  source = config.get("pretrained")
  if not source:
    return
  prefix = weight_files.HUB_PREFIX
  if not source.startswith(prefix):
    if not os.path.isfile(source):
      raise ConfigError(f"config.pretrained={source!r}: no such file (give a .pth/.safetensors "
                        f"file, or a hub id written {prefix}owner/repo[/file]).")
    if not os.access(source, os.R_OK):
      raise ConfigError(f"config.pretrained={source!r}: the file is not readable.")
    return
  parts = source[len(prefix):].split("/")
  if len(parts) < 2 or not all(parts):
    raise ConfigError(f"config.pretrained={source!r} is not of the form "
                      f"{prefix}owner/repo[/file].")


def _has_checkpoint(workdir: str) -> bool:
  folder = os.path.join(workdir, "checkpoints")
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def validate(config: ml_collections.ConfigDict, workdir: str | None = None, *,
             training: bool = True) -> None:
  """Raises ConfigError naming the first problem found in `config` (and `workdir`).

  Every key of the configs in `configs/` is checked: its type and its range. `training=False`
  (evaluating a finished run) does not require the training batch size to divide over this
  machine's devices. `workdir=None` (preparing the dataset) skips the workdir check. In
  training, the files the config names (`check_files`) must be there, unless the workdir has a
  checkpoint to resume from (a resumed run does not read them).
  """
  devices = jax.device_count()
  _validate_model(config)
  _validate_data(config.data)
  for key in ("batch_size", "eval_batch_size") if training else ("eval_batch_size",):
    value = config[key]
    if not _is_int(value) or value <= 0 or value % devices:
      raise ConfigError(
          f"config.{key}={value} must be a positive multiple of the device count ({devices}).")
  _validate_schedule(config)
  _validate_probe(config.get("probe"))
  _validate_sharding(config, devices if training else 1)
  if workdir is None:
    return
  workdir = os.path.abspath(workdir)
  parent = workdir
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.access(parent, os.W_OK) or (os.path.exists(workdir) and not os.path.isdir(workdir)):
    raise ConfigError(f"The workdir {workdir!r} is not a writable folder.")
  if training and not _has_checkpoint(workdir):
    check_files(config)


def _validate_sharding(config: Any, devices: int) -> None:
  """`sharding`, `fsdp_min_bytes` and `accumulate_steps` (the batch splits into whole
  micro-batches on every device)."""
  # Runs saved before these keys existed (config.json) were data-parallel without accumulation.
  value = config.get("sharding", "data")
  _require(value in ("data", "fsdp"), "sharding", value, "must be one of data, fsdp")
  value = config.get("fsdp_min_bytes", 0)
  _require(_is_int(value) and value >= 0, "fsdp_min_bytes", value, "must be an integer >= 0")
  k = config.get("accumulate_steps", 1)
  _require(_is_int(k) and k >= 1, "accumulate_steps", k, "must be an integer >= 1")
  if k > 1 and (not _is_int(config.batch_size) or config.batch_size % (k * devices)):
    raise ConfigError(
        f"config.accumulate_steps={k} must divide the batch into micro-batches split over the "
        f"{devices} device(s): batch_size={config.batch_size} is not a multiple of {k * devices}.")


# Durations: (steps key, epochs key, smallest value). A `*_steps` value, when set, wins.
_DURATIONS = (("num_train_steps", "num_epochs", 1), ("warmup_steps", "warmup_epochs", 0),
              ("eval_every_steps", "eval_every_epochs", 1),
              ("checkpoint_every_steps", "checkpoint_every_epochs", 1))


def _check_durations(config: Any) -> None:
  """Each duration in steps (an integer) or in epochs (a number); warm-up within training."""
  for steps_key, epochs_key, low in _DURATIONS:
    _check_int(config, steps_key, low, optional=True)
    _check_number(config, epochs_key, 0, math.inf, low_open=bool(low), optional=True)
    if config.get(steps_key) is None and config.get(epochs_key) is None:
      raise ConfigError(f"Set config.{steps_key} or config.{epochs_key}.")
  total, warmup = config.get("num_train_steps"), config.get("warmup_steps")
  if total is not None and warmup is not None and warmup > total:
    raise ConfigError(f"config.warmup_steps={warmup} must be in 0..num_train_steps ({total}).")
  total, warmup = config.get("num_epochs"), config.get("warmup_epochs")
  if (config.get("num_train_steps") is None and config.get("warmup_steps") is None
      and warmup is not None and total is not None and warmup > total):
    raise ConfigError(f"config.warmup_epochs={warmup} must be in 0..num_epochs ({total}).")


def _check_finetune(config: ml_collections.ConfigDict) -> None:
  """`pretrained`, `input_normalization` and `finetune.*` (see configs/default.py)."""
  _check_choice(config, "input_normalization", ("auto", "imagenet", "stain", "matek"))
  source = config.get("pretrained")
  _require(source is None or isinstance(source, str), "pretrained", source,
           "must be None, a weight file or a hf-hub: id")
  if source and config.model not in pretrained.ARCHS:
    raise ConfigError(f"config.pretrained is set, but there are no pretrained weights for "
                      f"{config.model!r}; supported: {', '.join(pretrained.ARCHS)}.")
  tune = config.get("finetune")
  if tune is None:
    return
  _check_number(tune, "layer_decay", 0, 1, low_open=True, path="finetune.", note=" (1: off)")
  _check_int(tune, "freeze_steps", 0, optional=True, path="finetune.")
  _check_number(tune, "freeze_epochs", 0, math.inf, optional=True, path="finetune.")
  _check_number(tune, "head_learning_rate", 0, math.inf, low_open=True, optional=True,
                path="finetune.")
  _require(isinstance(tune.get("freeze_backbone", False), bool), "finetune.freeze_backbone",
           tune.get("freeze_backbone"), "must be True or False")
  if tune.get("freeze_backbone") and not config.model.startswith(("vit_", "res")):
    raise ConfigError(f"config.finetune.freeze_backbone needs a ViT or a ResNet (a `head`), not "
                      f"{config.model!r}.")
  if steps.uses_finetune_optimizer(config) and not config.model.startswith(("vit_", "res")):
    raise ConfigError(f"config.finetune (layer decay, freezing, head rate) needs a ViT or a "
                      f"ResNet, not {config.model!r}.")


def _check_ints(block: Any, key: str, low: int, path: str) -> None:
  value = block.get(key)
  _require(isinstance(value, Sequence) and not isinstance(value, str)
           and all(_is_int(v) and v >= low for v in value), path + key, value,
           f"must be a tuple of integers >= {low} (or empty)")


def _validate_probe(probe: Any) -> None:
  """The `probe` block of --mode=features (see configs/default.py); None: the defaults."""
  if probe is None:
    return
  fit_on = probe.get("fit_on")
  _require(isinstance(fit_on, Sequence) and not isinstance(fit_on, str) and len(fit_on) > 0
           and all(s in ("train", "validation") for s in fit_on)
           and len(set(fit_on)) == len(fit_on), "probe.fit_on", fit_on,
           "must name 'train' and/or 'validation' once each (never 'test')")
  c = probe.get("c")
  _require(c is None or c == "sweep" or (_is_number(c) and c > 0), "probe.c", c,
           "must be None (D * K / 100, DinoBloom's), a number > 0 or 'sweep'")
  sweep = probe.get("c_sweep")
  _require(isinstance(sweep, Sequence) and not isinstance(sweep, str) and len(sweep) == 3
           and _is_number(sweep[0]) and _is_number(sweep[1]) and sweep[0] <= sweep[1]
           and _is_int(sweep[2]) and sweep[2] >= 1, "probe.c_sweep", sweep,
           "must be (lowest power of ten, highest, number of values), e.g. (-6.0, 5.0, 45)")
  _check_int(probe, "max_iter", 1, path="probe.")
  _check_ints(probe, "knn_k", 1, "probe.")
  _check_ints(probe, "weighted_knn_k", 1, "probe.")
