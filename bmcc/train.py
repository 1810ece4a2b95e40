"""The training loop: asks the data entry point for batches and the checkpointer for state.

`train_and_evaluate(config, workdir)` trains (resuming from the latest checkpoint in `workdir`,
data iterator included), evaluates on validation every `eval_every` steps (keeping the best
checkpoint by balanced accuracy, driving reduce-on-plateau and early stopping), then evaluates the
best (or latest) checkpoint once on the test split.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections
import numpy as np
from flax import nnx, traverse_util

from bmcc import checkpointing, config_validation, evaluate, metrics, preemption, steps, transfer
from bmcc import plateau as plateau_lib
from bmcc import sharding as sharding_lib
from bmcc.atomic import atomic_write
from bmcc.data import input_pipeline, loading


def create_train_state(config: ml_collections.ConfigDict, mesh, num_classes: int,
                       learning_rate_fn, *, freeze_steps: int = 0, load_pretrained: bool = True
                       ) -> tuple[nnx.Module, nnx.Optimizer, nnx.EMA | None]:
  """The model, its optimizer and the optional weight average, laid out over `mesh` as
  `config.sharding` says (`bmcc.sharding`: replicated, or FSDP).

  With `load_pretrained` (a run from scratch) the model starts from `config.pretrained`, and
  `model.pretrained` says what was loaded (`transfer.load_pretrained`).
  """
  model = steps.create_model(config, num_classes)
  if load_pretrained:
    transfer.load_pretrained(config, model)
  optimizer = steps.create_train_optimizer(config, learning_rate_fn, model, freeze_steps)
  rule = sharding_lib.rule_from_config(config)
  nnx.update((model, optimizer), sharding_lib.place(nnx.state((model, optimizer)), mesh, rule))
  ema = steps.create_ema(config, model)
  if ema is not None:
    nnx.update(ema, sharding_lib.place(nnx.state(ema), mesh, rule))
  return model, optimizer, ema


def _hparams(config: ml_collections.ConfigDict) -> dict:
  flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
  return {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in flat.items()}


def _summarize(pending: list[tuple[int, dict]], checkpoint_dir: str) -> dict[str, float]:
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
  """Trains, resuming from `workdir`, then evaluates on the test split; returns the test report.

  Returns None when `config.stop_at_step` stopped the run before its end.
  """
  from clu import metric_writers  # imports TensorFlow: keep out of benchmarks

  from bmcc import progress as progress_lib

  config_validation.validate(config, workdir)
  workdir = os.path.abspath(workdir)
  builder = loading.load_builder(config.data)  # before the workdir exists: no empty one on error
  os.makedirs(workdir, exist_ok=True)
  mesh = steps.create_mesh()
  data = input_pipeline.create_train_iter(config, builder, mesh)
  mapping = data.mapping
  durations = steps.resolve_durations(config, data.steps_per_epoch)  # ConfigError if unfit
  logging.info("Training on %d device(s) (%s), %d process(es): %d examples of %d classes, %d "
               "steps per epoch, %s; sharding %s, %d micro-batch(es) per step, training %s "
               "parameters.", mesh.size, jax.devices()[0].platform, jax.process_count(),
               data.num_examples, mapping.num_classes, data.steps_per_epoch, durations,
               config.get("sharding") or "data", config.get("accumulate_steps") or 1,
               steps.trainable(config))
  learning_rate_fn = steps.create_learning_rate_fn(config, durations)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    keep=config.keep_checkpoints)
  latest = ckpt.latest_step()
  model, optimizer, ema = create_train_state(config, mesh, mapping.num_classes, learning_rate_fn,
                                             freeze_steps=durations.freeze,
                                             load_pretrained=latest is None)
  # What is evaluated, kept as best and tested: the averaged weights when there are any.
  eval_model = model if ema is None else ema.apply_to(model)
  ema_model = None if ema is None else eval_model
  modules = dict(model=model, optimizer=optimizer, ema_model=ema_model)

  metadata = checkpointing.run_metadata(config, mapping.codes, transfer.loaded(model))
  tracker = plateau_lib.Plateau(
      patience=config.plateau_patience, factor=config.plateau_factor,
      stop_patience=config.early_stopping_patience, min_delta=config.min_delta)
  plateau_state, start_step, progress = plateau_lib.PlateauState(), 0, {}
  if latest is not None:
    saved_metadata = ckpt.metadata(latest)
    checkpointing.check_compatible(saved_metadata, metadata, workdir)
    metadata["pretrained_weights"] = saved_metadata.get("pretrained_weights")  # the run's start
    ckpt.restore(latest, **modules, data_iterator=data.iterator)
    start_step, progress = latest, ckpt.progress(latest)
    if progress.get("plateau"):
      plateau_state = plateau_lib.PlateauState.from_json(progress["plateau"])
    logging.info("Resumed from the checkpoint at step %d in %s.", latest, ckpt.directory)
  if jax.process_index() == 0:
    atomic_write(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))

  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)
  if start_step == 0:
    writer.write_hparams(_hparams(config))
  report_progress = progress_lib.Progress(
      num_train_steps=durations.total, steps_per_epoch=data.steps_per_epoch,
      batch_size=config.batch_size, every_steps=config.log_every_steps, writer=writer)
  dropout_base = jax.random.key(config.seed + 1)
  step_options = dict(accumulate_steps=config.get("accumulate_steps") or 1,
                      rule=sharding_lib.rule_from_config(config), trainable=steps.trainable(config))
  stopped_early = bool(progress.get("stopped_early"))
  last_step = start_step if stopped_early else min(durations.total,
                                                   config.stop_at_step or durations.total)
  pending: list[tuple[int, dict]] = []  # (step, metrics) not yet logged
  step = start_step
  # The mode is part of the compiled program's static structure: set it outside the jitted steps
  # (train here, eval in evaluate) so that each compiles once.
  model.train()
  try:
    with jax.set_mesh(mesh), preemption.StopRequest(ckpt.directory) as stop_request:
      for step in range(start_step + 1, last_step + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          batch = next(data.iterator)
          pending.append((step, steps.train_step(
              model, optimizer, batch["image"], batch["label"],
              jax.random.fold_in(dropout_base, step), data.class_weights, ema,
              label_smoothing=config.label_smoothing, **step_options)))
        report_progress(step)
        if step % config.log_every_steps == 0 or step == last_step:
          summary = _summarize(pending, ckpt.directory)
          pending = []
          summary["learning_rate"] = float(learning_rate_fn(step - 1)) * plateau_state.lr_scale
          writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
          writer.flush()

        eval_metrics = None
        if step % durations.eval_every == 0 or step == durations.total:
          _summarize(pending, ckpt.directory)  # never evaluate or keep a diverged model
          with report_progress.timed("eval"):
            report, samples = evaluate.evaluate_split(
                eval_model, input_pipeline.create_eval_iter(config, builder, "validation"), mesh,
                num_samples=16)
          evaluate.log_report(writer, step, "validation", report, workdir, samples)
          model.train()
          eval_metrics = {f"val_{k}": v for k, v in metrics.summary_scalars(report).items()}
          previous_scale = plateau_state.lr_scale
          plateau_state, stopped_early = tracker.update(
              plateau_state, report["balanced_accuracy"], step)
          if plateau_state.lr_scale != previous_scale:
            steps.set_lr_scale(optimizer, plateau_state.lr_scale)
            logging.info("No improvement of validation balanced accuracy for %d evaluations: "
                         "learning rate x%g from step %d.", config.plateau_patience,
                         plateau_state.lr_scale, step + 1)
          if stopped_early:
            logging.info("Early stopping at step %d (best %.4f at step %d).", step,
                         plateau_state.best, plateau_state.best_step)
        stop = stop_request.should_stop(step)
        if (eval_metrics is not None or step % durations.checkpoint_every == 0
            or step == last_step or stop or stopped_early):
          _summarize(pending, ckpt.directory)  # a non-finite state never replaces a good one
          ckpt.save(step, **modules, data_iterator=data.iterator, metadata=metadata,
                    metrics=eval_metrics,
                    progress={"plateau": plateau_state.to_json(), "stopped_early": stopped_early})
        if stopped_early:
          break
        if stop:
          raise preemption.TrainingInterrupted(
              f"Stopped by {stop_request.signal} at step {step} of {durations.total}, with a "
              f"checkpoint in {ckpt.directory}; rerun the same command to resume.")
  finally:
    data.iterator.close()
    ckpt.wait_until_finished()
    writer.flush()

  if not stopped_early and last_step < durations.total:
    logging.info("Stopped at step %d of %d as configured (stop_at_step); rerun with the same "
                 "--workdir to continue.", last_step, durations.total)
    writer.close()
    ckpt.close()
    return None
  final_step = step if stopped_early else last_step
  if config.final_eval_checkpoint == "best" and ckpt.best_step() not in (None, final_step):
    final_step = ckpt.best_step()
    ckpt.restore(final_step, **modules)
  logging.info("Final evaluation on the test split with the %s checkpoint (step %d).",
               config.final_eval_checkpoint, final_step)
  report, _ = evaluate.evaluate_split(
      eval_model, input_pipeline.create_eval_iter(config, builder, "test"), mesh)
  report["checkpoint_step"] = final_step
  report.update(input_pipeline.protocol_report(config, builder, report["num_examples"]))
  evaluate.log_report(writer, last_step, "test", report, workdir)
  logging.info("Test report written to %s:\n%s", os.path.join(workdir, "eval_test.json"),
               metrics.format_per_class_table(report))
  writer.close()
  ckpt.close()
  logging.info("Test summary: %s", json.dumps(metrics.summary_scalars(report)))
  return report
