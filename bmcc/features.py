"""`--mode=features`: a pretrained backbone's embeddings of every split, then linear and kNN probes.

  python main.py --config configs/dinobloom_s_probe.py --workdir runs/dinobloom_s --mode=features

No training: the config's `model` is built with the weights of `config.pretrained`
(`bmcc.models.pretrained.load_backbone`, the head left empty) and `model.features` (a ViT's
final-norm CLS token, a ResNet's pooled features) embeds every image of the train, validation and
test splits, resized as evaluation resizes them (no augmentation) and normalised as the weights
expect (`bmcc.steps.input_normalization`: ImageNet). Batches are sharded over all devices of all
processes, like evaluation (`bmcc.evaluate.predict_batches`); process 0 writes

- `features_<split>.npz` per split: `embeddings` float32 [N, D], `labels` int32 [N] (the run's
  class ids), `file_names` str [N], and `settings` (JSON: model, weights, image size, classes,
  protocol, normalisation). Written atomically; a rerun keeps every complete file made with the
  same settings (so an interrupted run resumes at the split it stopped in) and refuses a file made
  with other settings.
- the probes, fitted on the train split's features as DinoBloom evaluates its backbones
  (`bmcc.probe`): logistic regression (L-BFGS, C = D * K / 100) -> `eval_<split>.json`, and
  DINOv2's weighted kNN (k = 20, temperature 0.07) -> `eval_<split>_knn.json`, each with its
  per-class table and confusion matrix (`bmcc.metrics.write_report`), for validation and test.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bmcc import config_validation, metrics, probe, steps
from bmcc.atomic import atomic_write
from bmcc.data import input_pipeline, loading
from bmcc.evaluate import gather_host_batches
from bmcc.models import pretrained

SPLITS = ("train", "validation", "test")  # embedded, in this order
EVAL_SPLITS = ("validation", "test")  # reported; the probes are fitted on "train"
KNN_K = 20
_NAME_BYTES = 512  # a file name's UTF-8 bytes when gathered across processes
_LOG_SECONDS = 30.0


def features_path(workdir: str, split: str) -> str:
  return os.path.join(workdir, f"features_{split}.npz")


def load_model(config: ml_collections.ConfigDict) -> nnx.Module:
  """The config's backbone with the weights of `config.pretrained`, in eval mode."""
  try:
    model = pretrained.load_backbone(config.model, config.pretrained,
                                     **config.model_config.to_dict())
  except (pretrained.PretrainedWeightsError, OSError, ImportError, ValueError, TypeError) as e:
    raise config_validation.ConfigError(f"config.pretrained={config.pretrained!r}: {e}") from None
  model.input_mean, model.input_std = steps.input_normalization(config)
  return model


@nnx.jit
def embed_step(model: nnx.Module, images: jax.Array) -> jax.Array:
  """float32 features [N, D] of a (sharded) batch of uint8 images."""
  return model.features(steps.normalize_input(model, images)).astype(jnp.float32)


def _settings(config: ml_collections.ConfigDict, model: nnx.Module,
              codes: tuple[str, ...]) -> dict:
  """What the features depend on; stored in each file and compared on a rerun."""
  return json.loads(json.dumps({
      "model": config.model, "model_config": config.model_config.to_dict(),
      "pretrained": config.pretrained, "image_size": config.image_size, "classes": codes,
      "split": config.data.get("split"), "fold": config.data.get("fold"),
      "num_folds": config.data.get("num_folds"),
      "input_mean": model.input_mean, "input_std": model.input_std}))


def _gather_names(local: list[np.ndarray]) -> np.ndarray:
  if jax.process_count() == 1:
    return np.concatenate(local).astype(str)
  encoded = []
  for names in local:
    rows = np.zeros((len(names), _NAME_BYTES), np.uint8)
    for i, name in enumerate(names):
      raw = str(name).encode("utf-8")
      if len(raw) > _NAME_BYTES:
        raise ValueError(f"File name longer than {_NAME_BYTES} bytes: {name!r}.")
      rows[i, :len(raw)] = np.frombuffer(raw, np.uint8)
    encoded.append(rows)
  return np.array([bytes(row).rstrip(b"\0").decode("utf-8")
                   for row in gather_host_batches(encoded)])


def embed_split(model: nnx.Module, data: input_pipeline.EvalData, mesh: jax.sharding.Mesh,
                split: str) -> probe.Features:
  """The features of every example of `data` (all processes' examples, in order)."""
  sharding = NamedSharding(mesh, P("data"))
  embeddings, labels, names, masks = [], [], [], []
  start = last_log = time.time()
  pending = None  # the previous batch's features, fetched after the next batch is dispatched

  def fetch(array):
    embeddings.append(np.asarray(multihost_utils.process_allgather(array, tiled=True)))

  with jax.set_mesh(mesh):
    for batch in data.batches:
      images = jax.make_array_from_process_local_data(sharding, batch["image"])
      current = embed_step(model, images)
      if pending is not None:
        fetch(pending)
      pending = current
      labels.append(batch["label"])
      names.append(batch["file_name"])
      masks.append(batch["mask"])
      now = time.time()
      if now - last_log > _LOG_SECONDS:
        done = min(data.num_examples, len(masks) * len(batch["mask"]) * jax.process_count())
        logging.info("Features of %s: %d / %d images (%.0f images/s).", split, done,
                     data.num_examples, done / (now - start))
        last_log = now
    if pending is not None:
      fetch(pending)
  if not embeddings:
    raise ValueError(f"The {split} split is empty: there is nothing to embed.")
  keep = gather_host_batches(masks).astype(bool)
  features = probe.Features(np.concatenate(embeddings)[keep],
                            gather_host_batches(labels)[keep], _gather_names(names)[keep])
  seconds = time.time() - start
  logging.info("Features of %s: %d images, %d dimensions, in %.1f s (%.0f images/s).", split,
               features.labels.size, features.embeddings.shape[1], seconds,
               features.labels.size / max(seconds, 1e-9))
  return features


def _is_complete(path: str, settings: dict, num_examples: int) -> bool:
  """Whether `path` holds this split's features made with `settings`.

  Raises ConfigError for a file made with other settings (another model, weights, size, classes).
  """
  if not os.path.exists(path):
    return False
  try:
    features = probe.load_features(path)
    with np.load(path, allow_pickle=False) as data:
      saved = json.loads(str(data["settings"]))
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    logging.warning("Recomputing %s, which cannot be read: %s", path, e)
    return False
  if saved != settings:
    differ = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    raise config_validation.ConfigError(
        f"{path} was made with other settings ({', '.join(differ)}: "
        f"{ {k: saved.get(k) for k in differ} }). Use another --workdir, or delete the file.")
  return features.labels.size == num_examples


def _write(path: str, features: probe.Features, settings: dict) -> None:
  atomic_write(path, lambda f: np.savez(
      f, embeddings=features.embeddings.astype(np.float32),
      labels=features.labels.astype(np.int32), file_names=features.file_names.astype(str),
      settings=np.array(json.dumps(settings))))


def features_and_probes(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes `features_<split>.npz` for every split, then the probes' reports (process 0).

  Returns {"linear": {split: report}, "knn": {split: report}} for the validation and test splits
  (on process 0; {} on the others).
  """
  config_validation.validate(config, workdir)
  if not config.get("pretrained"):
    raise config_validation.ConfigError(
        "--mode=features embeds with pretrained weights: set config.pretrained to a weight file "
        "or an hf-hub: id (README, 'Pretrained backbones').")
  workdir = os.path.abspath(workdir)
  builder = loading.load_builder(config.data)
  os.makedirs(workdir, exist_ok=True)
  mesh = steps.create_mesh()
  model = load_model(config)
  logging.info("Features of %s from %s (%s), %d px, on %d device(s): %d dimensions.",
               config.model, model.pretrained.path, model.pretrained.layout, config.image_size,
               mesh.size, model.num_features)
  nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(mesh, P())))
  codes = None
  for split in SPLITS:
    data = input_pipeline.create_eval_iter(config, builder, split)
    codes = data.mapping.codes
    settings = _settings(config, model, codes)
    path = features_path(workdir, split)
    complete = jax.process_index() == 0 and _is_complete(path, settings, data.num_examples)
    if jax.process_count() > 1:
      complete = bool(multihost_utils.broadcast_one_to_all(np.int32(complete)))
    if complete:
      logging.info("Keeping %s (complete).", path)
      continue
    features = embed_split(model, data, mesh, split)
    if jax.process_index() == 0:
      _write(path, features, settings)
      logging.info("Wrote %s.", path)
  if jax.process_index() > 0:
    return {}
  return write_probe_reports(workdir, codes, config)


def write_probe_reports(workdir: str, codes: tuple[str, ...],
                        config: ml_collections.ConfigDict) -> dict:
  """Fits both probes on `features_train.npz`; writes eval_<split>[_knn].json and friends."""
  start = time.time()
  reports = probe.evaluate_probes(workdir, codes, train_split="train", eval_splits=EVAL_SPLITS,
                                  k=KNN_K)
  logging.info("Fitted the linear and kNN probes in %.1f s.", time.time() - start)
  about = {"linear": "logistic regression on the train split's features, C = D * K / 100",
           "knn": f"weighted kNN over the train split's features, k = {KNN_K}, temperature 0.07"}
  for name, by_split in reports.items():
    for split, report in by_split.items():
      report.update(probe=about[name], model=config.model, pretrained=config.pretrained)
      paths = metrics.write_report(report, workdir, split if name == "linear" else f"{split}_knn")
      logging.info("%s probe on %s: accuracy %.4f, balanced accuracy %.4f, macro F1 %.4f (%s).",
                   name, split, report["accuracy"], report["balanced_accuracy"],
                   report["macro_f1"], paths["json"])
  logging.info("Linear probe on test:\n%s",
               metrics.format_per_class_table(reports["linear"]["test"]))
  return reports
