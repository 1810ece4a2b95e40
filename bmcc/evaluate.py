"""Evaluation: a model over every example of a split -> the report; `--mode=evaluate`.

Batches are padded to a fixed size with a mask (`bmcc.data.pipeline.eval_batches`), so every
example counts exactly once and the padding never enters the metrics. Only the probabilities go
through the devices; labels and masks stay on the host.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bmcc import checkpointing, metrics, steps
from bmcc.data import input_pipeline, loading


@dataclasses.dataclass(frozen=True)
class Samples:
  """The first images of an evaluation (this process's), for a picture in TensorBoard."""

  images: np.ndarray  # uint8 [n, H, W, 3]
  labels: np.ndarray  # int [n]
  predictions: np.ndarray  # int [n]


def gather_host_batches(local: list[np.ndarray]) -> np.ndarray:
  """Host arrays of each batch of this process -> the global batches' rows in device order."""
  stacked = np.stack(local)  # [batches, per-process batch, ...]
  if jax.process_count() == 1:
    return stacked.reshape(-1, *stacked.shape[2:])
  every = np.asarray(multihost_utils.process_allgather(stacked))  # [processes, batches, ...]
  return np.swapaxes(every, 0, 1).reshape(-1, *stacked.shape[2:])


def predict_batches(model: nnx.Module, batches: Iterable[dict], mesh: Mesh, *, tta: bool = False,
                    num_samples: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Samples | None]:
  """(labels, probabilities, mask, samples) over all batches, gathered from every process.

  With `tta`, the probabilities are averaged over the 8 rotations/flips of each image.
  `num_samples` > 0 keeps the first that many images of this process with their predictions.
  """
  step_fn = steps.dihedral_average if tta else steps.eval_step
  sharding = NamedSharding(mesh, P("data"))
  model.eval()  # outside the jitted step: the mode is part of its static structure
  labels, probs, masks = [], [], []
  samples = None
  with jax.set_mesh(mesh):
    for batch in batches:
      images = jax.make_array_from_process_local_data(sharding, batch["image"])
      probs.append(np.asarray(multihost_utils.process_allgather(
          step_fn(model, images), tiled=True)))
      labels.append(batch["label"])
      masks.append(batch["mask"])
      if num_samples and samples is None:
        n = min(num_samples, int(batch["mask"].sum()))
        local = probs[-1][jax.process_index() * len(batch["label"]):][:n]
        samples = Samples(batch["image"][:n], batch["label"][:n], local.argmax(-1))
  if not probs:
    raise ValueError("The split is empty: there is nothing to evaluate.")
  return (gather_host_batches(labels), np.concatenate(probs),
          gather_host_batches(masks).astype(bool), samples)


def evaluate_split(model: nnx.Module, data: input_pipeline.EvalData, mesh: Mesh, *,
                   tta: bool = False, num_samples: int = 0) -> tuple[dict, Samples | None]:
  """(the classification report of `model` on `data`, the first `num_samples` samples)."""
  start = time.time()
  labels, probs, mask, samples = predict_batches(model, data.batches, mesh, tta=tta,
                                                 num_samples=num_samples)
  report = metrics.classification_report(labels, probs, data.mapping.codes, mask=mask,
                                         class_names=data.mapping.names)
  report["test_time_augmentation"] = tta
  logging.info("Evaluated %d examples in %.1f s: accuracy %.4f, balanced accuracy %.4f, "
               "macro F1 %.4f.", report["num_examples"], time.time() - start,
               report["accuracy"], report["balanced_accuracy"], report["macro_f1"])
  return report, samples


def log_report(writer, step: int, split: str, report: dict, workdir: str,
               samples: Samples | None = None) -> None:
  """The report's scalars and pictures to TensorBoard, and its files to `workdir` (process 0)."""
  prefix = "val" if split == "validation" else split
  writer.write_scalars(step, {f"{prefix}/{k}": v for k, v in
                              metrics.summary_scalars(report).items()})
  writer.write_images(step, {f"{prefix}/confusion_matrix":
                             metrics.confusion_matrix_image(report)[None]})
  if samples is not None and jax.process_index() == 0 and len(samples.labels):
    grid = metrics.sample_grid(samples.images, samples.labels, samples.predictions,
                               report["confusion_matrix"]["class_order"])
    writer.write_images(step, {f"{prefix}/samples": grid[None]})
  if jax.process_index() == 0:
    metrics.write_report(report, workdir, split)


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str, *, split: str = "test",
                     checkpoint: str = "best", tta: bool = False) -> dict:
  """Evaluates a checkpoint of `workdir` on `split`, selected as the run selected it
  (`checkpointing.restore_run`: the run's protocol, fold, classes and image size).

  Writes `eval_<split>_<checkpoint>[_tta].json` (and its table and picture) beside the run's own
  reports, never over them.
  """
  mesh = steps.create_mesh()  # all processes' devices; every process restores its replica
  run = checkpointing.restore_run(workdir, config, checkpoint=checkpoint, mesh=mesh)
  model, step, config = run.model, run.step, run.config  # the run's protocol, classes, size
  builder = loading.load_builder(config.data)
  data = input_pipeline.create_eval_iter(config, builder, split)
  report, _ = evaluate_split(model, data, mesh, tta=tta)
  report["checkpoint_step"] = step
  if split == "test":
    report.update(input_pipeline.protocol_report(config, builder, report["num_examples"]))
  name = f"{split}_{checkpoint}" + ("_tta" if tta else "")
  if jax.process_index() > 0:
    return report
  paths = metrics.write_report(report, workdir, name)
  logging.info("Evaluated the %s checkpoint (step %d) on %s; report in %s\n%s", checkpoint, step,
               split, paths["json"], metrics.format_per_class_table(report))
  return report


