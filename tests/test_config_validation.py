"""`config_validation.validate`: every key of every config in configs/ is checked before any work.

Each bad value must raise ConfigError whose message names the key (`config.<path>`), so that the
command line fails with one line (exit status 2) instead of deep in data preparation or training.
"""

from __future__ import annotations

import ast
import importlib
import json
import os

import ml_collections
import pytest

from bmcc import config_validation, run_config
from configs import tiny
from tests.test_bench_configs import CONFIG_NAMES


def _config(name: str = "tiny") -> ml_collections.ConfigDict:
  return importlib.import_module(f"configs.{name}").get_config()


def _set(config: ml_collections.ConfigDict, path: str, value) -> None:
  *parents, key = path.split(".")
  block = config
  for parent in parents:
    block = block[parent]
  with block.ignore_type():
    block[key] = value


def _leaf_paths(block, prefix: str = "") -> list[str]:
  paths = []
  for key, value in block.items():
    if isinstance(value, ml_collections.ConfigDict):
      paths += _leaf_paths(value, f"{prefix}{key}.")
    else:
      paths.append(prefix + key)
  return paths


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_in_configs_is_valid(name, tmp_path):
  config_validation.validate(_config(name), str(tmp_path))


# One bad value per kind of check; the message must name the key.
BAD_VALUES = [
    # Augmentation (checked by AugmentConfig only after the dataset was prepared, before).
    ("data.crop_scale", (0.5, 1.5)),
    ("data.crop_scale", (0.0, 1.0)),
    ("data.crop_scale", (0.9, 0.5)),
    ("data.crop_scale", (0.5, 0.7, 0.9)),
    ("data.crop_ratio", (1.5, 0.5)),
    ("data.color_jitter", 1.0),
    ("data.color_jitter", -0.1),
    ("data.hue_jitter", 0.6),
    ("data.blur_prob", 1.5),
    ("data.blur_sigma", (0.0, 1.0)),
    ("data.augment", "yes"),
    # Sampling and loss weighting (never checked, or only once the data was loaded, before).
    ("data.balance_alpha", -0.5),
    ("data.loss_weight_alpha", -1.0),
    ("data.loss_weight_alpha", float("nan")),
    ("data.num_workers", -1),
    ("data.fold", 5),
    ("data.classes", "BLA,EBO"),
    ("data.classes", ("BLA",)),
    ("data.data_dir", 3),
    ("data.synthetic.scale", 0.0),
    ("data.synthetic.minimum", -1),
    # Model.
    ("model", "vgg"),
    ("model_config.dtype", "float64"),
    ("model_config.dropout", 1.0),
    ("model_config.features", ()),
    ("model_config.dense", -1),
    ("model_config.init", "he"),
    ("image_size", 8),
    # Optimisation.
    ("learning_rate", 0.0),
    ("learning_rate", float("inf")),
    ("optimizer", "sgd"),
    ("lr_schedule", "step"),
    ("end_learning_rate_factor", 1.5),
    ("weight_decay", -1e-4),
    ("grad_clip_norm", -1.0),
    ("label_smoothing", 1.0),
    ("label_smoothing", -0.1),
    ("ema_decay", 1.0),
    ("seed", -1),
    ("seed", 1.5),
    # Steps, evaluation, checkpoints.
    ("num_train_steps", 0),
    ("warmup_steps", -1),
    ("warmup_steps", 10_000),
    ("log_every_steps", 0),
    ("eval_every_steps", 2.5),
    ("checkpoint_every_steps", -4),
    ("keep_checkpoints", 0),
    ("stop_at_step", 0),
    ("plateau_patience", 0),
    ("plateau_factor", 1.0),
    ("early_stopping_patience", 0),
    ("min_delta", -0.1),
    ("final_eval_checkpoint", "first"),
    ("batch_size", 6),
    ("eval_batch_size", 0),
    # Probes of --mode=features.
    ("probe.fit_on", ("train", "test")),
    ("probe.fit_on", ()),
    ("probe.fit_on", ("train", "train")),
    ("probe.c", "auto"),
    ("probe.c", 0.0),
    ("probe.c_sweep", (5.0, -6.0, 45)),
    ("probe.c_sweep", (-6.0, 5.0, 0)),
    ("probe.max_iter", 0),
    ("probe.knn_k", (0, 20)),
    ("probe.weighted_knn_k", 20),
    # Sharding and gradient accumulation (tiny: batch 16 on the 4 fake devices).
    ("sharding", "model"),
    ("fsdp_min_bytes", -1),
    ("accumulate_steps", 0),
    ("accumulate_steps", 3),
    ("finetune.freeze_backbone", "yes"),
]


@pytest.mark.parametrize("path, value", BAD_VALUES, ids=[f"{p}={v!r}" for p, v in BAD_VALUES])
def test_bad_value_is_a_config_error_naming_the_key(tmp_path, path, value):
  config = _config()
  _set(config, path, value)
  with pytest.raises(config_validation.ConfigError) as error:
    config_validation.validate(config, str(tmp_path))
  assert f"config.{path}" in str(error.value), str(error.value)


@pytest.mark.parametrize("path", ["image_size", "model_config.image_size"])
def test_vit_image_size_off_the_patch_grid_names_the_nearest_valid_sizes(tmp_path, path):
  # 250 px (the dataset's native size) with 14 px patches would ignore the last 12 px.
  config = _config("dinobloom_b_finetune")
  config_validation.validate(config, str(tmp_path))
  _set(config, path, 250)
  with pytest.raises(config_validation.ConfigError) as error:
    config_validation.validate(config, str(tmp_path))
  assert str(error.value) == (
      f"config.{path}=250 is not a multiple of vit_base_patch14's 14 px patch (its last 12 px "
      "rows and columns would be ignored): use 238 or 252.")
  _set(config, path, 252)
  config_validation.validate(config, str(tmp_path))


def test_vit_position_resampling_rule_is_checked(tmp_path):
  config = _config("dinobloom_b_finetune")
  for rule in ("auto", "dinov2", "antialias"):
    _set(config, "model_config.pos_embed_resampling", rule)
    config_validation.validate(config, str(tmp_path))
  _set(config, "model_config.pos_embed_resampling", "bilinear")
  with pytest.raises(config_validation.ConfigError,
                     match=r"config.model_config.pos_embed_resampling='bilinear' must be one of "
                           "auto, dinov2, antialias"):
    config_validation.validate(config, str(tmp_path))


def test_unknown_model_config_key_names_the_accepted_ones(tmp_path):
  config = _config()
  with config.model_config.unlocked():
    config.model_config.groups = 32  # a ResNeXt argument, not SimpleCNN's
  with pytest.raises(config_validation.ConfigError, match=r"\['groups'\].*takes: dense, "):
    config_validation.validate(config, str(tmp_path))


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_key_of_every_config_is_checked(name, tmp_path):
  """A value of the wrong type for any key of the config is refused, naming that key."""
  unchecked = []
  for path in _leaf_paths(_config(name)):
    config = _config(name)
    _set(config, path, ["wrong"])  # of the wrong type or shape for every key
    try:
      config_validation.validate(config, str(tmp_path))
    except config_validation.ConfigError as e:
      if f"config.{path}" not in str(e) and not (path == "model" and "Unknown model" in str(e)):
        unchecked.append(f"{path}: {e}")
    else:
      unchecked.append(f"{path}: accepted")
  assert not unchecked, unchecked


def test_evaluation_does_not_need_the_training_batch_to_divide_over_this_machine(tmp_path):
  config = _config()
  config.batch_size = 6  # four fake devices in the tests
  with pytest.raises(config_validation.ConfigError, match="config.batch_size=6"):
    config_validation.validate(config, str(tmp_path))
  config_validation.validate(config, str(tmp_path), training=False)
  config_validation.validate(config, None, training=False)  # --mode=prepare: no workdir


def test_run_config_round_trips_through_config_json(tmp_path):
  config = tiny.get_config()
  config.data.classes = ("BLA", "EBO", "LYT")
  with open(tmp_path / "config.json", "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  loaded = run_config.load_run_config(str(tmp_path))
  assert loaded.data.classes == ("BLA", "EBO", "LYT")
  assert loaded.data.crop_scale == tuple(config.data.crop_scale)
  assert loaded.model_config.features == tuple(config.model_config.features)
  assert json.loads(loaded.to_json()) == json.loads(config.to_json_best_effort())
  config_validation.validate(loaded, str(tmp_path))
  with pytest.raises(AttributeError):
    loaded.batchsize = 3  # locked, as --config is


def test_run_config_errors_say_to_pass_config(tmp_path):
  with pytest.raises(config_validation.ConfigError, match="config.json' does not exist"):
    run_config.load_run_config(str(tmp_path))
  with pytest.raises(config_validation.ConfigError, match="is not a folder"):
    run_config.load_run_config(str(tmp_path / "missing"))
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(config_validation.ConfigError, match="pass --config"):
    run_config.load_run_config(str(tmp_path))


def test_config_error_has_a_module_of_its_own_so_steps_does_not_import_validation():
  """bmcc.steps raises ConfigError and bmcc.config_validation uses bmcc.steps: no cycle."""
  from bmcc import errors  # noqa: PLC0415

  assert config_validation.ConfigError is errors.ConfigError  # the re-export still works
  with open(os.path.join(os.path.dirname(errors.__file__), "steps.py")) as f:
    tree = ast.parse(f.read())
  imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
  imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
  assert "bmcc.errors" in imported
  assert not any("config_validation" in name for name in imported), imported


def test_a_missing_pretrained_file_is_a_config_error_unless_the_run_resumes(tmp_path):
  config = _config("dinobloom_s_probe")
  config.pretrained = str(tmp_path / "missing.pth")
  with pytest.raises(config_validation.ConfigError, match=r"config.pretrained=.*missing.pth': no "
                     "such file"):
    config_validation.validate(config, str(tmp_path / "w"))
  config.pretrained = "hf-hub:owner"
  with pytest.raises(config_validation.ConfigError, match="not of the form hf-hub:owner/repo"):
    config_validation.validate(config, str(tmp_path / "w"))
  # Evaluating a finished run does not read the file; resuming (a checkpoint there) does not.
  config.pretrained = str(tmp_path / "missing.pth")
  config_validation.validate(config, str(tmp_path / "w"), training=False)
  os.makedirs(tmp_path / "w" / "checkpoints" / "40")
  config_validation.validate(config, str(tmp_path / "w"))
