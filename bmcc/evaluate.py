"""Evaluation: run a model over every example of a split and build the report.

Batches are padded to a fixed size with a mask (`bmcc.data.pipeline.eval_batches`), so every
example counts exactly once and no example is dropped; the padding never enters the metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bmcc import metrics
from bmcc.data import pipeline, splits


@nnx.jit
def eval_step(model: nnx.Module, images: jax.Array) -> jax.Array:
  """Softmax probabilities [N, C] of a batch of uint8 images."""
  model.eval()
  logits = model(pipeline.normalize_images(images, jnp.float32))
  return jax.nn.softmax(logits, axis=-1)


@nnx.jit
def dihedral_average(model: nnx.Module, images: jax.Array) -> jax.Array:
  """Softmax probabilities [N, C] of square uint8 images, averaged over their 8 symmetries.

  The 8 views are the rotations by 0, 90, 180 and 270 degrees, each with and without a
  left-right flip (the dihedral group of the square, which the training augmentation samples).
  The probabilities, not the logits, are averaged. Works on sharded batches like `eval_step`.
  """
  model.eval()
  x = pipeline.normalize_images(images, jnp.float32)
  total = jnp.zeros((), jnp.float32)
  for k in range(4):
    rotated = jnp.rot90(x, k, axes=(1, 2))
    for view in (rotated, rotated[:, :, ::-1]):
      total = total + jax.nn.softmax(model(view), axis=-1)
  return total / 8.0


def predict_batches(model: nnx.Module, batches: Iterable[dict], mesh: Mesh, *, tta: bool = False
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(labels, probabilities, mask) over all batches, gathered from every process.

  With `tta`, the probabilities are averaged over the 8 rotations/flips of each image.
  """
  step_fn = dihedral_average if tta else eval_step
  sharding = NamedSharding(mesh, P("data"))
  labels, probs, masks = [], [], []
  with jax.set_mesh(mesh):
    for batch in batches:
      images = jax.make_array_from_process_local_data(sharding, batch["image"])
      out = step_fn(model, images)
      probs.append(np.asarray(multihost_utils.process_allgather(out, tiled=True)))
      labels.append(np.asarray(multihost_utils.process_allgather(
          jax.make_array_from_process_local_data(sharding, batch["label"]), tiled=True)))
      masks.append(np.asarray(multihost_utils.process_allgather(
          jax.make_array_from_process_local_data(sharding, batch["mask"]), tiled=True)))
  if not probs:
    raise ValueError("The split is empty: there is nothing to evaluate.")
  return np.concatenate(labels), np.concatenate(probs), np.concatenate(masks).astype(bool)


def evaluate_split(model: nnx.Module, source, *, mapping: pipeline.ClassMapping,
                   image_size: int, batch_size: int, mesh: Mesh,
                   selection: splits.Selection | None = None, tta: bool = False) -> dict:
  """The classification report (bmcc.metrics) of `model` on one split's data source."""
  start = time.time()
  per_process = batch_size // jax.process_count()
  batches = pipeline.eval_batches(
      source, mapping=mapping, image_size=image_size, batch_size=per_process,
      process_index=jax.process_index(), process_count=jax.process_count(), selection=selection)
  labels, probs, mask = predict_batches(model, batches, mesh, tta=tta)
  report = metrics.classification_report(labels, probs, mapping.codes, mask=mask,
                                         class_names=mapping.names)
  report["test_time_augmentation"] = tta
  logging.info("Evaluated %d examples in %.1f s: accuracy %.4f, balanced accuracy %.4f, "
               "macro F1 %.4f.", report["num_examples"], time.time() - start,
               report["accuracy"], report["balanced_accuracy"], report["macro_f1"])
  return report
