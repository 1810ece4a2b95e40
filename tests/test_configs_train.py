"""Every config in configs/ trains a few steps on the CPU through `train.train_and_evaluate`.

Each config keeps its model (full size: ResNeXt-50 has its 23M parameters), compute dtype,
optimizer, schedule shape, label smoothing, class-balanced sampling and weight average; only the
scale shrinks (the tiny synthetic dataset, 32 px, batch 4 over the four fake CPU devices, 2 steps,
no worker processes), so a key the training loop or the model does not handle, or a recipe that
breaks in validation, checkpointing or the final test, fails here rather than an hour into a GPU
run. (Exact resume, with the weight average on, is tested in tests/test_end_to_end.py.)

A config with `pretrained` weights gets the tiny fixture file of its architecture instead
(tests/fixtures/pretrained: never a hub id, no network) and that fixture's small width and depth,
so loading, freezing and layer decay run as configured.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from bmcc import checkpointing, steps, train
from bmcc.data import classes
from bmcc.models import pretrained
from configs import tiny
from tests.helpers import CONFIG_NAMES

FIXTURES = Path(__file__).parent / "fixtures" / "pretrained"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())["fixtures"]
# The fixture standing in for each architecture's pretrained weights.
PRETRAINED_FIXTURES = {"vit_small_patch14": "vit_plain", "vit_base_patch14": "vit_registers",
                       "resnet50": "resnet", "resnext50_32x4d": "resnext"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("bmcc-cache"))


def _shrunk(name: str, cache_dir: str):
  config = importlib.import_module(f"configs.{name}").get_config()
  small = tiny.get_config()
  config.data.synthetic = small.data.synthetic
  config.data.cache_dir = cache_dir
  config.data.num_workers = 0
  # One image per fake device; evaluation in batches of 16. A ViT takes multiples of its 14 px
  # patch.
  config.image_size = 28 if config.model.startswith("vit_") else 32
  config.batch_size = 4
  config.eval_batch_size = 16
  config.num_train_steps = 2
  config.warmup_steps = 1
  for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
    config[key] = 2
  if config.get("pretrained"):
    name = PRETRAINED_FIXTURES[config.model]
    config.pretrained = str(FIXTURES / MANIFEST[name]["files"][0])
    config.model_config.update(MANIFEST[name]["model_config"])
    if name == "vit_registers":
      config.model_config.num_registers = 4
  return config


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_trains_a_few_steps(name, cache_dir, tmp_path, caplog):
  caplog.set_level(logging.INFO)
  config = _shrunk(name, cache_dir)
  workdir = str(tmp_path / name)
  report = train.train_and_evaluate(config, workdir)
  # A person can read the progress in the log: images/s, time per epoch, time left.
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Progress: ")]
  assert len(lines) == 1, lines
  assert re.fullmatch(r"Progress: step 2/2 \(100\.0%\), epoch \d+\.\d\d of \d+\.\d\d: "
                      r"\d+\.\d images/s, \d+\.\d s per epoch, 0s left \(.* elapsed.*\)",
                      lines[0]), lines[0]
  assert report["checkpoint_step"] == 2
  assert report["num_examples"] > 0
  assert all(math.isfinite(report[k]) for k in ("accuracy", "balanced_accuracy", "macro_f1"))
  # The checkpoint holds the config's whole model (the weight average when it keeps one), every
  # parameter finite, and the metadata to rebuild it.
  model, meta, step = checkpointing.restore_model(workdir, "latest")
  assert step == 2
  assert meta["model"] == config.model and meta["ema_decay"] == (config.ema_decay or None)
  codes = list(config.data.classes or classes.CODES)  # cpu_quick.py: the 8 large classes
  assert meta["classes"] == codes and meta["image_size"] == config.image_size
  if config.pretrained:  # loaded, and normalised as the weights expect
    assert meta["pretrained_weights"]["tensors"] > 0
    assert model.input_mean == pretrained.IMAGENET.mean
  restored = nnx.state(model, nnx.Param)
  expected = nnx.state(nnx.eval_shape(lambda: steps.create_model(config, len(codes))), nnx.Param)
  assert jax.tree.map(np.shape, restored) == jax.tree.map(np.shape, expected)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model_config"] == json.loads(config.model_config.to_json())
