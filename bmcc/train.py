"""The training loop: data, state, resume, periodic evaluation, checkpoints, metrics, final test.

The step itself and the mesh, model, optimizer and schedule it needs live in `bmcc.steps` (free of
TensorFlow and clu, for benchmarks); they are re-exported here.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bmcc import checkpointing, config_validation, evaluate, metrics, steps
from bmcc import plateau as plateau_lib
from bmcc.data import augment, loading, pipeline, sampling, splits
from bmcc.steps import (  # noqa: F401  (re-exported: the public training API lives here too)
  create_learning_rate_fn,
  create_mesh,
  create_model,
  create_optimizer,
  train_step,
)


def _pure_state(model: nnx.Module, optimizer: nnx.Optimizer,
                ema_model: nnx.Module | None = None) -> dict:
  state = {"model": nnx.to_pure_dict(nnx.state(model)),
           "optimizer": nnx.to_pure_dict(nnx.state(optimizer))}
  if ema_model is not None:
    # The averaged weights in the model's own layout: evaluation and prediction read this item
    # instead of `model` when the run has `ema_decay` in its metadata.
    state["ema"] = nnx.to_pure_dict(nnx.state(ema_model))
  return state


def _load_pure_state(model: nnx.Module, optimizer: nnx.Optimizer | None, pure: dict,
                     ema_model: nnx.Module | None = None) -> None:
  targets = [(model, "model"), (optimizer, "optimizer"), (ema_model, "ema")]
  for module, key in targets:
    if module is not None:
      state = nnx.state(module)
      nnx.replace_by_pure_dict(state, pure[key])
      nnx.update(module, state)


def run_metadata(config: ml_collections.ConfigDict, mapping: pipeline.ClassMapping) -> dict:
  """What a checkpoint must be read with: model, its config, the classes and the image size."""
  return {
      "model": config.model,
      "model_config": config.model_config.to_dict(),
      "classes": list(mapping.codes),
      "image_size": config.image_size,
      "fold": config.data.fold,
      "num_folds": config.data.num_folds,
      "ema_decay": config.get("ema_decay") or None,  # 0 and None both mean no average
  }


def _hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = {}

  def visit(prefix, node):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, ml_collections.ConfigDict):
        visit(name + ".", value)
      elif isinstance(value, bool | int | float | str):
        flat[name] = value
      else:
        flat[name] = str(value)

  visit("", config)
  return flat


def _write_eval(writer, step: int, split: str, report: dict, workdir: str) -> None:
  prefix = "val" if split == "validation" else split
  writer.write_scalars(step, {f"{prefix}/{k}": v for k, v in
                              metrics.summary_scalars(report).items()})
  writer.write_images(step, {f"{prefix}/confusion_matrix":
                             metrics.confusion_matrix_image(report)[None]})
  if jax.process_index() == 0:
    metrics.write_report(report, workdir, split)


def _write_samples(writer, step: int, model, source, mapping, config, mesh, selection) -> None:
  """A captioned grid of the first 16 validation images, true -> predicted, in TensorBoard."""
  batch_size = max(jax.device_count(), 16 // jax.device_count() * jax.device_count())
  batch = next(pipeline.eval_batches(
      source, mapping=mapping, image_size=config.image_size,
      batch_size=batch_size // jax.process_count(), process_index=jax.process_index(),
      process_count=jax.process_count(), selection=selection), None)
  if batch is None:
    return
  labels, probs, _ = evaluate.predict_batches(model, [batch], mesh)
  # Process 0's examples come first in the gathered arrays.
  n = int(min(16, batch["mask"].sum()))
  if jax.process_index() == 0 and n:
    grid = metrics.sample_grid(batch["image"][:n], labels[:n], probs[:n].argmax(-1),
                               mapping.codes)
    writer.write_images(step, {"val/samples": grid[None]})


class TrainingInterrupted(Exception):
  """SIGTERM or SIGINT stopped training after a checkpoint at the step reached."""


class _StopRequest:
  """Turns SIGTERM and SIGINT into a request to checkpoint and stop after the current step.

  A second signal of either kind interrupts at once (the last complete checkpoint stays valid).
  """

  def __init__(self):
    self.signal: str | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):
    if self.signal is not None:
      raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}")
    self.signal = signal.Signals(signum).name
    logging.warning("Received %s: saving a checkpoint after this step, then stopping.",
                    self.signal)

  def __enter__(self) -> _StopRequest:
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


def _summarize(pending: list[tuple[int, dict[str, jax.Array]]], checkpoint_dir: str
               ) -> dict[str, float]:
  """Means of the pending step metrics; FloatingPointError naming the first non-finite step."""
  if not pending:
    return {}
  values = jax.device_get([m for _, m in pending])
  for (step, _), m in zip(pending, values, strict=True):
    bad = {k: float(v) for k, v in m.items() if not np.isfinite(v)}
    if bad:
      raise FloatingPointError(
          f"Non-finite training metrics at step {step}: {bad}. Training stopped; the last good "
          f"checkpoint is kept in {checkpoint_dir}. Lower the learning rate or check the data.")
  return {k: float(np.mean([m[k] for m in values])) for k in values[0]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """Trains (resuming from `workdir` if it holds checkpoints), then evaluates on the test split.

  Returns the test report, or None when `config.stop_at_step` stopped the run early.
  """
  from clu import metric_writers, periodic_actions  # imports TensorFlow: keep out of benchmarks

  config_validation.validate(config, workdir)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  mapping = pipeline.ClassMapping.create(config.data.classes)
  builder = loading.load_builder(config.data)
  mesh = create_mesh()
  logging.info("Training on %d device(s) (%s), %d process(es); classes: %s.", mesh.size,
               jax.devices()[0].platform, jax.process_count(), ", ".join(mapping.codes))

  model = create_model(config, mapping.num_classes)
  learning_rate_fn = create_learning_rate_fn(config)
  optimizer = nnx.Optimizer(model, create_optimizer(config, learning_rate_fn), wrt=nnx.Param)
  replicated = NamedSharding(mesh, P())
  state = jax.device_put(nnx.state((model, optimizer)), replicated)
  nnx.update((model, optimizer), state)
  ema = steps.create_ema(config, model)
  # What is evaluated, kept as best and tested: the averaged weights when there are any.
  eval_model = model if ema is None else ema.apply_to(model)
  ema_model = None if ema is None else eval_model

  per_process_batch = config.batch_size // jax.process_count()
  selections = {role: splits.Selection(role, config.data.fold, config.data.num_folds)
                for role in splits.SPLITS}
  train_source = pipeline.role_source(builder, selections["train"])
  index_cache = os.path.join(
      builder.data_dir, f"record_index-{'+'.join(selections['train'].splits())}.npz")
  train_ds = pipeline.train_dataset(
      train_source, mapping=mapping,
      image_size=config.image_size, batch_size=per_process_batch, seed=config.seed,
      augment=augment.AugmentConfig.from_config(config.data) or False,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_workers=config.data.num_workers, selection=selections["train"],
      balance_alpha=config.data.balance_alpha, index_cache=index_cache)
  data_sharding = NamedSharding(mesh, P("data"))
  train_iter = pipeline.prefetch_to_device(iter(train_ds), size=2, sharding=data_sharding)
  class_weights = None
  if config.data.loss_weight_alpha:
    _, run_labels = pipeline.training_labels(
        train_source, mapping=mapping, selection=selections["train"], index_cache=index_cache)
    counts = sampling.class_counts(run_labels, mapping.num_classes)
    frequencies = (sampling.class_probabilities(counts, config.data.balance_alpha)
                   if config.data.balance_alpha else None)
    class_weights = jax.device_put(
        sampling.class_weights(counts, config.data.loss_weight_alpha, frequencies), replicated)
  validation_source = pipeline.role_source(builder, selections["validation"])

  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    keep=config.keep_checkpoints)
  metadata = run_metadata(config, mapping)
  start_step = 0
  tracker = plateau_lib.Plateau(
      patience=config.plateau_patience, factor=config.plateau_factor,
      stop_patience=config.early_stopping_patience, min_delta=config.min_delta)
  plateau_state = plateau_lib.PlateauState()
  latest = ckpt.latest_step()
  if latest is not None:
    config_validation.check_checkpoint_metadata(ckpt.metadata(latest), metadata, workdir)
    restored = ckpt.restore(latest, _pure_state(model, optimizer, ema_model), train_iter)
    _load_pure_state(model, optimizer, restored, ema_model)
    start_step = latest
    if progress := ckpt.progress(latest).get("plateau"):
      plateau_state = plateau_lib.PlateauState.from_json(progress)
    logging.info("Resumed from the checkpoint at step %d in %s.", latest, ckpt.directory)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)
  if start_step == 0:
    writer.write_hparams(_hparams(config))
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=config.num_train_steps, writer=writer)

  dropout_base = jax.random.key(config.seed + 1)
  last_step = config.num_train_steps
  if config.stop_at_step is not None:
    last_step = min(last_step, config.stop_at_step)
  pending: list[tuple[int, dict[str, jax.Array]]] = []  # (step, metrics) not yet logged
  stopped_early = bool(latest is not None and ckpt.progress(latest).get("stopped_early"))
  if stopped_early:
    last_step = start_step
  step = start_step
  try:
    with jax.set_mesh(mesh), _StopRequest() as stop_request:
      for step in range(start_step + 1, last_step + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          batch = next(train_iter)
          pending.append((step, train_step(model, optimizer, batch["image"], batch["label"],
                                           jax.random.fold_in(dropout_base, step), class_weights,
                                           ema, label_smoothing=config.label_smoothing)))
        report_progress(step)

        if step % config.log_every_steps == 0 or step == last_step:
          summary = _summarize(pending, ckpt.directory)
          pending = []
          summary["learning_rate"] = float(learning_rate_fn(step - 1)) * plateau_state.lr_scale
          writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})

        eval_metrics = None
        if step % config.eval_every_steps == 0 or step == config.num_train_steps:
          _summarize(pending, ckpt.directory)  # never evaluate or keep a diverged model
          with report_progress.timed("eval"):
            report = evaluate.evaluate_split(
                eval_model, validation_source, mapping=mapping, image_size=config.image_size,
                batch_size=config.eval_batch_size, mesh=mesh,
                selection=selections["validation"])
          _write_eval(writer, step, "validation", report, workdir)
          _write_samples(writer, step, eval_model, validation_source, mapping, config, mesh,
                         selections["validation"])
          eval_metrics = {f"val_{k}": v for k, v in metrics.summary_scalars(report).items()}
          previous_scale = plateau_state.lr_scale
          plateau_state, early_stop = tracker.update(
              plateau_state, report["balanced_accuracy"], step)
          if plateau_state.lr_scale != previous_scale:
            steps.set_lr_scale(optimizer, plateau_state.lr_scale)
            logging.info("Validation balanced accuracy has not improved for %d evaluations: "
                         "learning rate x%g from step %d.", config.plateau_patience,
                         plateau_state.lr_scale, step + 1)
          if early_stop:
            logging.info("Early stopping at step %d: no improvement for %d evaluations (best "
                         "%.4f at step %d).", step, plateau_state.since_best,
                         plateau_state.best, plateau_state.best_step)
            stopped_early = True
        if (eval_metrics is not None or step % config.checkpoint_every_steps == 0
            or step == last_step or stop_request.signal is not None or stopped_early):
          _summarize(pending, ckpt.directory)  # a non-finite state never replaces a good one
          ckpt.save(step, _pure_state(model, optimizer, ema_model), train_iter, metadata,
                    metrics=eval_metrics, force=True,
                    progress={"plateau": plateau_state.to_json(), "stopped_early": stopped_early})
        if stopped_early:
          break
        writer.flush()
        if stop_request.signal is not None:
          raise TrainingInterrupted(
              f"Stopped by {stop_request.signal} at step {step} of {config.num_train_steps}, "
              f"with a checkpoint in {ckpt.directory}; rerun the same command to resume.")
  finally:
    train_iter.close()
    ckpt.wait_until_finished()
    writer.flush()

  if stopped_early:
    last_step = step
  if last_step < config.num_train_steps and not stopped_early:
    logging.info("Stopped at step %d of %d as configured (stop_at_step); rerun with the same "
                 "--workdir to continue.", last_step, config.num_train_steps)
    writer.close()
    ckpt.close()
    return None

  final_step = last_step
  if config.final_eval_checkpoint == "best" and ckpt.best_step() is not None:
    final_step = ckpt.best_step()
    if final_step != last_step:
      restored = ckpt.restore(final_step, _pure_state(model, optimizer, ema_model))
      _load_pure_state(model, None, restored, ema_model)
  logging.info("Final evaluation on the test split with the %s checkpoint (step %d).",
               config.final_eval_checkpoint, final_step)
  report = evaluate.evaluate_split(
      eval_model, pipeline.role_source(builder, selections["test"]), mapping=mapping,
      image_size=config.image_size, batch_size=config.eval_batch_size, mesh=mesh,
      selection=selections["test"])
  report["checkpoint_step"] = final_step
  _write_eval(writer, last_step, "test", report, workdir)
  logging.info("Test report written to %s:\n%s", os.path.join(workdir, "eval_test.json"),
               metrics.format_per_class_table(report))
  writer.close()
  ckpt.close()
  logging.info("Test summary: %s", json.dumps(metrics.summary_scalars(report)))
  return report
