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
import zipfile
from pathlib import Path

import grain
import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from bmcc import checkpointing, config_validation, evaluate, features, predict, probe, steps, train
from bmcc.data import classes, input_pipeline, loading, sampling, splits
from bmcc.data.normalization import MEAN_RGB, STDDEV_RGB
from bmcc.models import pretrained
from configs import dinobloom_s_probe, tiny
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


def _probe_config(cache_dir: str, weights: str | os.PathLike):
  """configs/dinobloom_s_probe.py on the tiny synthetic dataset, DinoBloom's split, tiny ViT."""
  config = dinobloom_s_probe.get_config()
  config.data = tiny.get_config().data
  config.data.cache_dir = cache_dir
  config.data.split = "dinobloom"
  config.model_config.update(VIT_CONFIG["model_config"])
  config.pretrained = str(weights)
  config.image_size = 28  # a 2 x 2 patch grid; the 16 x 16 position grid is resampled
  config.eval_batch_size = 32
  return config


def _sklearn_predictions(fit: probe.Features, test: probe.Features, num_classes: int):
  """DinoBloom's probes, fitted here with sklearn directly: {name: predicted class ids}."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.neighbors import KNeighborsClassifier

  d, k = fit.embeddings.shape[1], np.unique(fit.labels).size
  linear = LogisticRegression(C=d * k / 100, max_iter=1000).fit(
      fit.embeddings.astype(np.float64), fit.labels)
  out = {"linear": linear.predict(test.embeddings.astype(np.float64))}
  for n in (1, 20):  # DinoBloom's code reads its stored features into float64 arrays
    out[f"knn{n}"] = KNeighborsClassifier(n_neighbors=n).fit(
        fit.embeddings.astype(np.float64), fit.labels).predict(test.embeddings.astype(np.float64))
  return out, linear


def test_features_mode_probes_equal_sklearn_fitted_on_train_and_validation(tmp_path, cache_dir):
  """The issue's done-when on the tiny ViT in DinoBloom's .pth layout, DinoBloom's split."""
  weights = tmp_path / "DinoBloom-tiny.pth"
  shutil.copy(FIXTURES / "vit_plain_dinobloom.pth", weights)
  config = _probe_config(cache_dir, weights)
  workdir = tmp_path / "probe"
  reports = features.features_and_probes(config, str(workdir))

  # DinoBloom's split: test is the listed files, train + validation every other one, once each.
  builder = loading.load_builder(config.data)
  prepared = [sampling.read_record_index(input_pipeline.data_source(builder, split))
              for split in features.SPLITS]
  label_of = dict(zip(np.concatenate([names for _, names in prepared]),
                      np.concatenate([labels for labels, _ in prepared]), strict=True))
  found = {split: probe.load_features(workdir / f"features_{split}.npz")
           for split in features.SPLITS}
  listed = splits.dinobloom_test_stems()
  for split, part in found.items():
    assert part.embeddings.shape == (len(part.labels), 16) and part.embeddings.dtype == np.float32
    assert np.isfinite(part.embeddings).all()
    np.testing.assert_array_equal(part.labels, [label_of[n] for n in part.file_names])
    stems = {Path(n).stem for n in part.file_names}
    assert (stems <= listed) if split == "test" else not (stems & listed), split
  names = np.concatenate([part.file_names for part in found.values()])
  assert sorted(names) == sorted(label_of) and len(found["test"].labels) > 20

  # The stored features are the backbone's CLS token, on ImageNet-normalised pixels.
  batch = next(input_pipeline.create_eval_iter(config, builder, "test").batches)
  model = pretrained.load_backbone(config.model, weights, **VIT_CONFIG["model_config"])
  norm = pretrained.IMAGENET
  x = (batch["image"][:4].astype(np.float32) - np.float32(norm.mean)) / np.float32(norm.std)
  np.testing.assert_allclose(found["test"].embeddings[:4], model.features(x), rtol=1e-5,
                             atol=1e-5)

  # Every probe: fitted once on train + validation, its reports equal to sklearn's own fit.
  fit = probe.concatenate([found["train"], found["validation"]])
  assert set(reports) == {"linear", "knn1", "knn20", "weighted_knn20"}
  for split in features.EVAL_SPLITS:
    test = found[split]
    expected, linear = _sklearn_predictions(fit, test, 21)
    for name, predictions in expected.items():
      report = reports[name][split]
      counts = np.zeros((21, 21), np.int64)
      np.add.at(counts, (test.labels, predictions), 1)
      assert report["confusion_matrix"]["counts"] == counts.tolist(), (name, split)
      assert report["accuracy"] == np.mean(predictions == test.labels)
      block = report["probe"]
      assert block["fit_on"] == ["train", "validation"] and block["n_fit"] == fit.labels.size
      assert block["in_fit"] == (split == "validation")
    assert reports["linear"][split]["probe"]["settings"] == {
        "solver": "lbfgs", "C": 16 * np.unique(fit.labels).size / 100, "max_iter": 1000,
        "n_iter": int(linear.n_iter_[0]), "converged": bool(linear.n_iter_[0] < 1000),
        "dtype": "float64", "C_rule": "D * K / 100 (DinoBloom)"}
    for k in (1, 20):
      assert reports[f"knn{k}"][split]["probe"]["settings"] == {
          "k": k, "metric": "euclidean", "weights": "uniform", "dtype": "float64"}
    assert reports["weighted_knn20"][split]["probe"]["settings"]["metric"] == "cosine"
    for name, by_split in reports.items():
      with open(workdir / f"eval_{features.report_name(name, split)}.json") as f:
        assert json.load(f) == by_split[split]
  assert (workdir / "eval_test_knn20_per_class.md").exists()

  # The same weight file elsewhere: every feature file is kept (content, not name, counts).
  stamps = {s: os.stat(workdir / f"features_{s}.npz").st_mtime_ns for s in features.SPLITS}
  moved = tmp_path / "moved" / "DinoBloom-S.pth"
  moved.parent.mkdir()
  shutil.move(weights, moved)
  config.pretrained = str(moved)
  again = features.features_and_probes(config, str(workdir))
  for split in features.EVAL_SPLITS:  # the same numbers; the report names the new source
    new, old = dict(again["knn20"][split]), dict(reports["knn20"][split])
    assert (new.pop("pretrained"), old.pop("pretrained")) == (str(moved), str(weights))
    assert new == old
  for split in features.SPLITS:
    assert os.stat(workdir / f"features_{split}.npz").st_mtime_ns == stamps[split]

  # Other weights at the same path are never mixed with the old features.
  with zipfile.ZipFile(moved) as archive:
    entries = {name: archive.read(name) for name in archive.namelist()}
  last = max((n for n in entries if "/data/" in n), key=lambda n: int(n.rsplit("/", 1)[1]))
  entries[last] = (np.frombuffer(entries[last], np.float32) + 1).tobytes()  # one tensor changed
  with zipfile.ZipFile(moved, "w") as archive:
    for name, data in entries.items():
      archive.writestr(name, data)
  assert pretrained.read_state_dict(moved)[1].startswith("DINOv2 training checkpoint")
  with pytest.raises(config_validation.ConfigError, match="other settings.*weights"):
    features.features_and_probes(config, str(workdir))

  # Features made with other settings are never mixed in.
  config.pretrained = str(FIXTURES / "vit_plain_dinobloom.pth")
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
  for choice in ("imagenet", "matek"):
    config.input_normalization = choice
    with pytest.raises(config_validation.ConfigError, match="input_mean"):
      checkpointing.check_compatible(old, checkpointing.run_metadata(config, classes.CODES), "w")
  assert checkpointing.run_metadata(config, classes.CODES)["input_mean"] == [145.5, 127.0, 188.0]


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
