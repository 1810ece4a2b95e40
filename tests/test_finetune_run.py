"""Pretrained backbones in runs: `--mode=features` with its probes, fine-tuning through
`train.train_and_evaluate` (frozen start, layer decay, resume without the weight file), and the
input normalisation that travels with the checkpoint.

Everything runs on the tiny synthetic dataset with the tiny ViT fixture of tests/test_pretrained.py
(width 16, 2 blocks, stored for 224 px and run at 28 px), on the four fake CPU devices; nothing
touches the network.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import grain
import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from bmcc import checkpointing, config_validation, evaluate, features, predict, probe, steps, train
from bmcc.data import classes, input_pipeline, loading, sampling
from bmcc.data.normalization import MEAN_RGB, STDDEV_RGB
from bmcc.models import pretrained
from configs import tiny
from tests import helpers

FIXTURES = Path(__file__).parent / "fixtures" / "pretrained"
VIT_FILE = FIXTURES / "vit_plain_timm.safetensors"
VIT_CONFIG = json.loads((FIXTURES / "manifest.json").read_text())["fixtures"]["vit_plain"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("bmcc-cache"))


def _vit_config(cache_dir: str, weights: str | os.PathLike = VIT_FILE):
  config = tiny.get_config()
  config.data.cache_dir = cache_dir
  config.model = VIT_CONFIG["arch"]
  config.model_config = ml_collections.ConfigDict(
      dict(VIT_CONFIG["model_config"], dtype="float32"))
  config.pretrained = str(weights)
  config.image_size = 28  # a 2 x 2 patch grid; the 16 x 16 position grid is resampled
  return config


def _backbone(flat_state) -> dict:
  """{path: array} of the parameters outside the head."""
  return {path: np.asarray(value[...]) for path, value in flat_state if path[0] != "head"}


def _model_params(state: dict) -> dict:
  """{path: array} of a checkpoint's model state (a pure dict)."""
  return {tuple(k.key for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(state["model"])[0]}


def test_features_mode_writes_features_and_probe_reports(tmp_path, cache_dir):
  config = _vit_config(cache_dir)
  workdir = tmp_path / "probe"
  reports = features.features_and_probes(config, str(workdir))

  builder = loading.load_builder(config.data)
  for split in features.SPLITS:
    found = probe.load_features(workdir / f"features_{split}.npz")
    source = input_pipeline.data_source(builder, split)
    labels, names = sampling.read_record_index(source)
    assert found.embeddings.shape == (len(source), 16)  # every example once, padding dropped
    assert np.isfinite(found.embeddings).all()
    np.testing.assert_array_equal(found.labels, labels)
    np.testing.assert_array_equal(found.file_names, names)  # the files, in record order

  # The stored features are the backbone's, on ImageNet-normalised pixels.
  batch = next(input_pipeline.create_eval_iter(config, builder, "test").batches)
  model = pretrained.load_backbone(config.model, VIT_FILE, **VIT_CONFIG["model_config"])
  norm = pretrained.IMAGENET
  x = (batch["image"][:4].astype(np.float32) - np.float32(norm.mean)) / np.float32(norm.std)
  test = probe.load_features(workdir / "features_test.npz")
  np.testing.assert_allclose(test.embeddings[:4], model.features(x), rtol=1e-5, atol=1e-5)

  for split in features.EVAL_SPLITS:
    n = builder.info.splits[split].num_examples
    for name, suffix in (("linear", ""), ("knn", "_knn")):
      with open(workdir / f"eval_{split}{suffix}.json") as f:
        report = json.load(f)
      assert report == reports[name][split]
      assert report["num_examples"] == n and 0 <= report["balanced_accuracy"] <= 1
      assert report["probe"].startswith({"linear": "logistic", "knn": "weighted kNN"}[name])
      assert (workdir / f"eval_{split}{suffix}_per_class.md").exists()

  # A rerun keeps the complete files; a missing one is recomputed, the same.
  stamps = {s: os.stat(workdir / f"features_{s}.npz").st_mtime_ns for s in features.SPLITS}
  os.remove(workdir / "features_test.npz")
  assert features.features_and_probes(config, str(workdir)) == reports
  for split in ("train", "validation"):
    assert os.stat(workdir / f"features_{split}.npz").st_mtime_ns == stamps[split]
  again = probe.load_features(workdir / "features_test.npz")
  np.testing.assert_array_equal(again.embeddings, test.embeddings)

  # Features made with other settings are never mixed in.
  config.image_size = 42
  with pytest.raises(config_validation.ConfigError, match="other settings.*image_size"):
    features.features_and_probes(config, str(workdir))


def test_features_mode_needs_pretrained_weights(tmp_path, cache_dir):
  config = _vit_config(cache_dir)
  config.pretrained = None
  with pytest.raises(config_validation.ConfigError, match="config.pretrained"):
    features.features_and_probes(config, str(tmp_path / "w"))
  # The command line dispatches --mode=features and reports the bad config with exit status 2.
  proc = helpers.run_main("tiny.py", str(tmp_path / "cli"), "--mode=features", timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "--mode=features embeds with pretrained weights" in proc.stderr


def test_finetune_freezes_then_trains_and_resumes_without_the_weight_file(tmp_path, cache_dir):
  weights = tmp_path / "weights.safetensors"
  shutil.copy(VIT_FILE, weights)
  config = _vit_config(cache_dir, weights)
  config.finetune.freeze_steps = 2
  config.finetune.layer_decay = 0.75
  config.finetune.head_learning_rate = 2 * config.learning_rate
  config.num_train_steps = 4
  config.warmup_steps = 1
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.final_eval_checkpoint = "latest"
  workdir = str(tmp_path / "run")

  loaded = pretrained.load_backbone(config.model, VIT_FILE, **VIT_CONFIG["model_config"])
  expected = _backbone(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
  initial_head = np.asarray(steps.create_model(config, 21).head.kernel[...])

  config.stop_at_step = 2  # the end of the frozen steps
  assert train.train_and_evaluate(config, workdir) is None
  step, state = helpers.final_state(workdir, config)
  assert step == 2
  by_path = _model_params(state)
  assert set(expected) < set(by_path)
  for path, value in expected.items():
    assert np.array_equal(by_path[path], value), path  # bit-identical while frozen
  assert not np.array_equal(by_path[("head", "kernel")], initial_head)  # the head learnt

  os.remove(weights)  # the rerun resumes from the checkpoint and never reads the file
  config.stop_at_step = None
  report = train.train_and_evaluate(config, workdir)
  step, state = helpers.final_state(workdir, config)
  assert step == 4
  by_path = _model_params(state)
  moved = [p for p, v in expected.items() if not np.array_equal(by_path[p], v)]
  assert ("blocks", 1, "attn", "qkv", "kernel") in moved and ("patch_embed", "kernel") in moved

  # The checkpoint carries the normalisation and what the run started from.
  model, meta, _ = checkpointing.restore_model(workdir, "latest")
  assert meta["input_mean"] == list(pretrained.IMAGENET.mean)
  assert meta["pretrained"] == str(weights)
  assert meta["pretrained_weights"]["layout"] == "timm ViT layout"
  assert meta["pretrained_weights"]["tensors"] == len(expected)
  assert model.input_mean == pretrained.IMAGENET.mean
  assert model.input_std == pretrained.IMAGENET.std

  # evaluate reproduces the trained model's test report (probabilities: NLL, ECE) exactly ...
  assert evaluate.evaluate_workdir(config, workdir, checkpoint="latest") == report
  # ... which the stain statistics would not.
  builder = loading.load_builder(config.data)
  images = next(input_pipeline.create_eval_iter(config, builder, "test").batches)["image"][:4]
  probabilities = np.asarray(steps.eval_step(model, images))
  model.input_mean, model.input_std = MEAN_RGB, STDDEV_RGB
  assert not np.allclose(np.asarray(steps.eval_step(model, images)), probabilities, atol=1e-4)

  # predict reads the same statistics from the checkpoint.
  paths = []
  for i, image in enumerate(images):
    paths.append(str(tmp_path / f"cell_{i}.png"))
    Image.fromarray(image).save(paths[-1])
  out = tmp_path / "predictions.csv"
  assert predict.predict_paths(workdir, paths, checkpoint="latest", output_csv=str(out),
                               stdout=io.StringIO()) == 0
  with open(out) as f:
    rows = list(csv.DictReader(f))
  np.testing.assert_allclose([float(r["probability"]) for r in rows], probabilities.max(axis=1),
                             atol=2e-6)


def test_checkpoint_without_normalisation_restores_with_the_stain_statistics(tmp_path):
  config = tiny.get_config()
  model = nnx.eval_shape(lambda: steps.create_model(config, 21))
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state)
  model = nnx.merge(graphdef, state)
  optimizer = nnx.Optimizer(model, steps.create_optimizer(config, steps.create_learning_rate_fn(
      config, steps.Durations(4, 0, 1, 1))), wrt=nnx.Param)
  metadata = checkpointing.run_metadata(config, classes.CODES)
  assert metadata["input_mean"] == list(MEAN_RGB)  # no pretrained weights: stain statistics
  old = json.loads(json.dumps(
      {k: v for k, v in metadata.items() if not k.startswith(("input_", "pretrained"))}))
  ckpt = checkpointing.Checkpointer(tmp_path / "checkpoints")
  ckpt.save(1, model=model, optimizer=optimizer, ema_model=None,
            data_iterator=iter(grain.MapDataset.range(2).to_iter_dataset()), metadata=old)
  ckpt.close()
  restored, _, _ = checkpointing.restore_model(str(tmp_path), "latest")
  assert restored.input_mean == MEAN_RGB and restored.input_std == STDDEV_RGB
  # Such a checkpoint resumes under a config that normalises the same way, and only that.
  checkpointing.check_compatible(old, metadata, "w")
  config.input_normalization = "imagenet"
  with pytest.raises(config_validation.ConfigError, match="input_mean"):
    checkpointing.check_compatible(old, checkpointing.run_metadata(config, classes.CODES), "w")


@pytest.mark.parametrize("override, message", [
    ({"pretrained": "w.pth"}, "no pretrained weights for 'simple_cnn'"),
    ({"input_normalization": "lab"}, "input_normalization"),
    ({"finetune.layer_decay": 0.0}, "layer_decay"),
    ({"finetune.freeze_steps": -1}, "freeze_steps"),
    ({"finetune.head_learning_rate": 0.0}, "head_learning_rate"),
    ({"finetune.freeze_epochs": 1.0}, "needs a ViT or a ResNet"),
])
def test_bad_finetune_configs_fail_before_any_work(tmp_path, override, message):
  config = tiny.get_config()
  for key, value in override.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  with pytest.raises(config_validation.ConfigError, match=message):
    config_validation.validate(config, str(tmp_path))


def test_durations_resolve_the_freeze_and_the_optimizer_follows_the_config():
  config = _vit_config("unused")
  assert steps.resolve_durations(config, 10).freeze == 0
  assert not steps.uses_finetune_optimizer(config)
  config.finetune.freeze_epochs = 1.5
  assert steps.resolve_durations(config, 10).freeze == 15
  config.finetune.freeze_steps = 3  # steps win
  assert steps.resolve_durations(config, 10).freeze == 3
  assert steps.uses_finetune_optimizer(config)
  config.finetune.freeze_steps, config.finetune.freeze_epochs = None, 0.0
  config.finetune.layer_decay = 0.9
  assert steps.uses_finetune_optimizer(config)
  with pytest.raises(ValueError, match="needs the model"):
    steps.create_optimizer(config, lambda step: 0.1)
