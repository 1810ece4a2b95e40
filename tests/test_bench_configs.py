"""Every config in configs/ loads, validates and builds its model; bench/train_step.py runs.

The models are built abstractly (`nnx.eval_shape`: no initialisation, no compilation), and their
forward pass is traced on the config's image size, so a model_config key the constructor does not
take, or an image size the network cannot handle, fails here in seconds. The benchmark runs as a
subprocess on configs/tiny.py with the four fake CPU devices of conftest.py.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from bmcc import config_validation, models, steps
from bmcc.data import classes
from tests.helpers import CONFIG_NAMES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name: str):
  return importlib.import_module(f"configs.{name}").get_config()


def test_the_new_configs_are_found():
  assert {"default", "demo", "tiny", "simple_cnn", "resnet50", "resnext50", "dinobloom_s_probe",
          "dinobloom_b_finetune", "resnet50_imagenet"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_has_the_keys_the_outside_relies_on(name):
  config = _config(name)
  for key in ("data.manual_dir", "data.data_dir", "data.classes", "image_size", "model",
              "batch_size", "num_epochs", "num_train_steps", "seed"):
    node = config
    for part in key.split("."):
      assert part in node, f"configs/{name}.py has no {key}"
      node = node[part]


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_validates(name, tmp_path):
  config_validation.validate(_config(name), str(tmp_path / "workdir"))


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_model_builds_abstractly_and_maps_images_to_logits(name):
  config = _config(name)
  num_classes = len(config.data.classes) if config.data.classes else classes.NUM_CLASSES
  model = nnx.eval_shape(lambda: models.create_model(
      config.model, num_classes=num_classes, rngs=nnx.Rngs(0), **config.model_config.to_dict()))
  model.eval()
  images = jax.ShapeDtypeStruct((2, config.image_size, config.image_size, 3), jnp.float32)
  graphdef, state = nnx.split(model)
  logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, images)
  assert logits.shape == (2, num_classes)
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize("name", ["default", "resnet50", "resnext50"])
def test_resnet_recipes(name):
  config = _config(name)
  assert config.image_size == 224 and config.batch_size == 256
  assert config.model_config.dtype == "bfloat16"
  assert set(config.model_config) <= {"dtype", "dropout", "width", "zero_init_residual"}
  assert config.optimizer == "adamw" and config.lr_schedule == "cosine"
  assert config.weight_decay == 0.05 and config.label_smoothing == 0.1
  assert (config.num_epochs, config.warmup_epochs) == (30.0, 2.0)
  assert (config.eval_every_epochs, config.checkpoint_every_epochs) == (2.0, 1.0)
  for key in ("num_train_steps", "warmup_steps", "eval_every_steps", "checkpoint_every_steps"):
    assert config.get(key) is None, key  # durations in epochs: nothing to scale by hand


def test_default_is_the_argued_recipe_and_the_variants_differ_from_it_as_documented():
  default, resnet, resnext, simple = (_config(n) for n in
                                      ("default", "resnet50", "resnext50", "simple_cnn"))
  assert default.model == "resnext50_32x4d"
  assert default.data.balance_alpha == 0.5 and default.ema_decay == 0.999
  # resnet50.py: only the model differs.
  resnet.model = default.model
  assert resnet.to_dict() == default.to_dict()
  # resnext50.py: Matek's model without the two imbalance measures.
  assert resnext.data.balance_alpha == 0.0 and resnext.ema_decay is None
  resnext.data.balance_alpha, resnext.ema_decay = 0.5, 0.999
  assert resnext.to_dict() == default.to_dict()
  # simple_cnn.py: the plain recipe (demo.py and tiny.py start from it).
  assert simple.model == "simple_cnn" and simple.image_size == 250
  assert simple.data.balance_alpha == 0.0 and simple.ema_decay is None
  assert simple.label_smoothing == 0.1 and simple.model_config.dtype == "float32"  # real cells
  assert steps.input_normalization(simple)[0] == (145.5, 127.0, 188.0)  # 'matek', real cells
  for name in ("demo", "tiny"):
    small = _config(name)
    assert small.ema_decay is None and small.data.balance_alpha == 0.0
    assert small.label_smoothing == 0.0  # their measured numbers are without it
    assert steps.input_normalization(small)[0] == (200.0, 180.0, 200.0)  # and with the stain's
    assert small.data.synthetic is not None


def test_pretrained_recipes_are_as_documented():
  probe, tune, resnet = (_config(n) for n in
                         ("dinobloom_s_probe", "dinobloom_b_finetune", "resnet50_imagenet"))
  for config in (probe, tune, resnet):
    assert config.pretrained.startswith("hf-hub:") and config.image_size == 224
    assert steps.input_normalization(config)[0] == (123.675, 116.28, 103.53)  # ImageNet
  assert probe.model == "vit_small_patch14" and "dinobloom" in probe.pretrained
  assert probe.finetune.freeze_epochs == probe.num_epochs  # --mode=train: the head alone
  assert tune.model == "vit_base_patch14" and tune.model_config.dtype == "bfloat16"
  assert tune.model_config.drop_path_rate == 0.1 and tune.finetune.layer_decay == 0.75
  assert tune.finetune.head_learning_rate == 10 * tune.learning_rate
  assert tune.finetune.freeze_epochs == 1.0 and tune.num_epochs == 10.0
  assert tune.optimizer == "adamw" and tune.lr_schedule == "cosine"
  assert tune.data.balance_alpha == 0.5
  # resnet50_imagenet.py: resnet50.py from ImageNet weights, with the documented changes.
  changed = {"pretrained", "learning_rate", "num_epochs"}
  assert resnet.finetune.to_dict() == {"freeze_epochs": 1.0, "freeze_steps": None,
                                       "layer_decay": 0.8,
                                       "head_learning_rate": 10 * resnet.learning_rate,
                                         "freeze_backbone": False}
  plain = _config("resnet50").to_dict()
  assert {k for k, v in resnet.to_dict().items() if plain[k] != v} == changed | {"finetune"}


def test_train_step_benchmark_runs_without_tensorflow():
  # Skipping LLVM's optimisations makes the CPU compilations several times faster; the cost
  # analysis is of the HLO, so the FLOPs are unchanged.
  xla_flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", XLA_FLAGS=xla_flags.strip())
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "bench", "train_step.py"),
       "--config", os.path.join(REPO, "configs", "tiny.py"), "--steps", "2", "--warmup", "1"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert re.fullmatch(r"images_per_second=\d+(\.\d+)?", lines[-1]), lines[-3:]
  assert float(lines[-1].split("=")[1]) > 0
  assert "tensorflow_imported=False" in lines
  assert any(line.startswith("device=cpu x4 ") for line in lines), lines[:3]
  forward = [line for line in lines if line.startswith("forward_images_per_second=")]
  assert forward and float(forward[0].split("=")[1].split()[0]) > 0  # the features pass alone
  flops = [line for line in lines if line.startswith("train_flops_per_image=")]
  assert flops and float(flops[0].split("=")[1].split()[0]) > 0
