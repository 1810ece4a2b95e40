"""`--mode=features`: a pretrained backbone's embeddings of every split, then probes fitted on them.

  python main.py --config configs/dinobloom_s_probe.py --workdir runs/dinobloom_s --mode=features

No training: the config's `model` is built with the weights of `config.pretrained`
(`bmcc.models.pretrained.load_backbone`, the head left empty) and `model.features` embeds every
image of the train, validation and test splits, resized as evaluation resizes them (no
augmentation) and normalised as the weights expect (`bmcc.steps.input_normalization`: ImageNet).
A ViT's features are its final-norm CLS token, or with `model_config.pooling="cls_mean_patch"`
the CLS token and the mean patch token side by side (DINOv2's linear evaluation); a ResNet's
its pooled features. Batches are sharded over all devices of all processes, like evaluation
(`bmcc.evaluate.predict_batches`); process 0 writes

- `features_<split>.npz` per split: `embeddings` float32 [N, D], `labels` int32 [N] (the run's
  class ids), `file_names` str [N], and `settings` (JSON: model, the weight file's size and
  SHA-256, image size, classes, protocol, normalisation). Written atomically; a rerun keeps every
  complete file made with the same settings (so an interrupted run resumes at the split it
  stopped in) and refuses a file made with other settings, including other weights at the same
  path (the file's content is what counts, not its name).
- the probes of `config.probe` (`bmcc.probe`), each fitted ONCE on the features of
  `probe.fit_on` (default train + validation: every image not in the test split, as DinoBloom
  fits them) and reported on validation and test: logistic regression -> `eval_<split>.json`,
  sklearn kNN for each k of `probe.knn_k` -> `eval_<split>_knn<k>.json`, DINOv2's weighted kNN
  for each k of `probe.weighted_knn_k` -> `eval_<split>_weighted_knn<k>.json`, each with its
  per-class table and confusion matrix (`bmcc.metrics.write_report`) and a `probe` block (kind,
  settings, fit_on, n_fit; `in_fit` marks a split the probe was fitted on).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zipfile
from typing import Any

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
EVAL_SPLITS = ("validation", "test")  # reported, each by the one fit of every probe
_NAME_BYTES = 512  # a file name's UTF-8 bytes when gathered across processes
_LOG_SECONDS = 30.0
_HASH_CHUNK = 1 << 23  # bytes read at a time when hashing a weight file


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


def weights_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
  """{"bytes": size, "sha256": hex digest} of a weight file: what its features depend on."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_HASH_CHUNK):
      digest.update(chunk)
  return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def _settings(config: ml_collections.ConfigDict, model: nnx.Module, codes: tuple[str, ...],
              weights: dict[str, Any]) -> dict:
  """What the features depend on; stored in each file and compared on a rerun.

  The weights count by content (`weights_fingerprint`), not by the source string: a file
  replaced at the same path makes new features, the same file moved elsewhere keeps them.
  """
  return json.loads(json.dumps({
      "model": config.model, "model_config": config.model_config.to_dict(),
      "weights": weights, "image_size": config.image_size, "classes": codes,
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

  Returns {probe name: {split: report}} for the validation and test splits (on process 0; {} on
  the others); names as `write_probe_reports`.
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
  start = time.time()
  weights = weights_fingerprint(model.pretrained.path)
  logging.info("Weights %s: %d bytes, SHA-256 %s (%.1f s).", model.pretrained.path,
               weights["bytes"], weights["sha256"], time.time() - start)
  codes = None
  for split in SPLITS:
    data = input_pipeline.create_eval_iter(config, builder, split)
    codes = data.mapping.codes
    settings = _settings(config, model, codes, weights)
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
  return write_probe_reports(workdir, codes, config, weights)


def probe_settings(config: ml_collections.ConfigDict) -> probe.ProbeSettings:
  """`config.probe` (configs/default.py) as `bmcc.probe.ProbeSettings`; defaults if absent."""
  block = config.get("probe")
  if block is None:
    return probe.ProbeSettings()
  return probe.ProbeSettings(
      fit_on=tuple(block.fit_on), c=block.get("c"),
      c_sweep=(float(block.c_sweep[0]), float(block.c_sweep[1]), int(block.c_sweep[2])),
      max_iter=int(block.max_iter), knn_k=tuple(int(k) for k in block.knn_k),
      weighted_knn_k=tuple(int(k) for k in block.weighted_knn_k))


def report_name(probe_name: str, split: str) -> str:
  """The `eval_<...>` name of a probe's report: the linear probe's is the split's own."""
  return split if probe_name == "linear" else f"{split}_{probe_name}"


def write_probe_reports(workdir: str, codes: tuple[str, ...], config: ml_collections.ConfigDict,
                        weights: dict[str, Any] | None = None) -> dict:
  """Fits each probe of `config.probe` once; writes eval_<split>[_<probe>].json and friends.

  Returns {probe name: {split: report}}: "linear", "knn<k>", "weighted_knn<k>".
  """
  start = time.time()
  reports = probe.evaluate_probes(workdir, codes, eval_splits=EVAL_SPLITS,
                                  settings=probe_settings(config))
  logging.info("Fitted %d probes in %.1f s.", len(reports), time.time() - start)
  for name, by_split in reports.items():
    for split, report in by_split.items():
      report.update(model=config.model, pretrained=config.pretrained, weights=weights)
      paths = metrics.write_report(report, workdir, report_name(name, split))
      block = report["probe"]
      logging.info("%s probe (fitted on %s, %d images) on %s: accuracy %.4f, balanced accuracy "
                   "%.4f, weighted F1 %.4f (%s).", name, "+".join(block["fit_on"]),
                   block["n_fit"], split, report["accuracy"], report["balanced_accuracy"],
                   report["weighted_f1"], paths["json"])
  linear = reports["linear"]["test"]["probe"]["settings"]
  logging.info("Linear probe: C = %g, %d L-BFGS iterations (%s); on test:\n%s", linear["C"],
               linear["n_iter"], "converged" if linear["converged"] else "NOT converged",
               metrics.format_per_class_table(reports["linear"]["test"]))
  return reports
