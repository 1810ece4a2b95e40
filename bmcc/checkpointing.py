"""Everything about a run's stored state: orbax checkpoints, run metadata, restoring a model.

A checkpoint holds four items: `state` (the model, the optimizer and, with `ema_decay`, the
averaged weights `ema`, as pure pytrees), `data` (the grain iterator, so a resumed run reads the
exact next batch), `metadata` (what the weights must be read with: `run_metadata`) and `progress`
(small JSON run state such as the plateau tracker). Retention: the latest `keep` checkpoints and
the single best by validation balanced accuracy. Writes are asynchronous and atomic (orbax writes a
temporary folder and renames it), so a run killed mid-write resumes from the last complete one.
This is the only module that imports orbax.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bmcc import steps
from bmcc.config_validation import ConfigError
from bmcc.data import classes as classes_lib
from bmcc.data.normalization import MEAN_RGB, STDDEV_RGB

BEST_METRIC = "val_balanced_accuracy"
# Metadata keys a resumed run must agree on with the run that wrote the checkpoint.
_RESUME_KEYS = ("model", "model_config", "classes", "image_size", "protocol", "fold",
                "num_folds", "ema_decay", "data_workers", "input_mean", "input_std", "trainable")
# Values of metadata keys that checkpoints written before the key existed implicitly had.
_OLD_DEFAULTS = {"input_mean": list(MEAN_RGB), "input_std": list(STDDEV_RGB)}


def _best_metric(metrics: dict[str, float]) -> float:
  return metrics[BEST_METRIC]


def run_metadata(config: ml_collections.ConfigDict, codes: tuple[str, ...],
                 pretrained_weights: dict | None = None) -> dict:
  """What a checkpoint must be read with: model, its config, the classes, the image size and the
  input normalisation (mean/std on the 0..255 scale); and where the weights came from: the
  `pretrained` source of the config and what was loaded from it (`pretrained_weights`, a
  `bmcc.models.pretrained.LoadedWeights` as a dict)."""
  mean, std = steps.input_normalization(config)
  return {
      "model": config.model,
      "model_config": config.model_config.to_dict(),
      "classes": list(codes),
      "image_size": config.image_size,
      "protocol": config.data.split,
      "fold": config.data.fold,
      "num_folds": config.data.num_folds,
      "ema_decay": config.get("ema_decay") or None,  # 0 and None both mean no average
      # The data iterator's saved state has one part per grain worker process.
      "data_workers": config.data.num_workers,
      "input_mean": list(mean),
      "input_std": list(std),
      # What has optimizer state: 'all', or 'head' with `finetune.freeze_backbone`.
      "trainable": steps.trainable(config),
      "pretrained": config.get("pretrained"),
      "pretrained_weights": pretrained_weights,
  }


def check_compatible(saved: dict, current: dict, workdir: str) -> None:
  """Raises ConfigError if the checkpoint in `workdir` was made by an incompatible config."""
  current = json.loads(json.dumps(current))  # tuples -> lists, as the saved JSON has them
  for key in _RESUME_KEYS:
    default = _OLD_DEFAULTS.get(key)
    if key not in saved and default is None:
      continue  # a key this checkpoint predates and that has no implicit value
    if saved.get(key, default) != current.get(key, default):
      raise ConfigError(
          f"The checkpoint in {workdir!r} was made with {key}={saved.get(key, default)!r}, but the "
          f"config says {current.get(key, default)!r}. Use another --workdir, or the config that "
          "made it.")


def _modules(model, optimizer, ema_model) -> dict[str, nnx.Module]:
  found = {"model": model, "optimizer": optimizer, "ema": ema_model}
  return {key: module for key, module in found.items() if module is not None}


def _pure(modules: dict[str, nnx.Module]) -> dict:
  return {key: nnx.to_pure_dict(nnx.state(module)) for key, module in modules.items()}


class Checkpointer:
  """The checkpoints of one run: `ocp.CheckpointManager` over the four items above."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 1, asynchronous: bool = True,
               read_only: bool = False):
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=max(1, keep)),
        ocp.checkpoint_managers.BestN(get_metric_fn=_best_metric, reverse=False, n=1,
                                      keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        # Still needed beside BestN in orbax 0.12: without best_fn the manager neither writes the
        # metrics of a checkpoint nor ranks by them (best_step() would return the latest step).
        best_fn=_best_metric,
        best_mode="max",
        enable_async_checkpointing=asynchronous,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        create=not read_only,
    )
    self.directory = os.path.abspath(os.fspath(directory))
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, *, model: nnx.Module, optimizer: nnx.Optimizer,
           ema_model: nnx.Module | None, data_iterator: Any, metadata: dict,
           metrics: dict[str, float] | None = None, progress: dict | None = None) -> bool:
    """Starts an asynchronous save of the run's state, iterator, metadata and progress."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(_pure(_modules(model, optimizer, ema_model))),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        metadata=ocp.args.JsonSave(metadata),
        progress=ocp.args.JsonSave(progress or {}),
    )
    return self.manager.save(step, args=args, metrics=metrics, force=True)

  def restore(self, step: int, *, model: nnx.Module, optimizer: nnx.Optimizer,
              ema_model: nnx.Module | None = None, data_iterator: Any | None = None) -> None:
    """Restores the modules in place (shaped and sharded as they are), and the iterator if given."""
    modules = _modules(model, optimizer, ema_model)
    items = {"state": ocp.args.StandardRestore(_pure(modules))}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
    for key, module in modules.items():
      state = nnx.state(module)
      nnx.replace_by_pure_dict(state, restored[key])
      nnx.update(module, state)

  def restore_partial(self, step: int, target: dict) -> dict:
    """The items of the saved state named by `target` (a pytree of ShapeDtypeStructs), placed
    with the target's shardings (not the saved ones: the device count may differ)."""
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))["state"]

  def progress(self, step: int) -> dict:
    """The `progress` saved at `step` ({} for a checkpoint without one)."""
    if not os.path.isdir(os.path.join(self.directory, str(step), "progress")):
      return {}
    restored = self.manager.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))
    return restored["progress"]

  def metadata(self, step: int) -> dict:
    restored = self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    return restored["metadata"]

  def wait_until_finished(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _open_read_only(workdir: str) -> Checkpointer:
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise ConfigError(
        f"No checkpoints in {directory!r}: train first with --mode=train --workdir={workdir}.")
  return Checkpointer(directory, read_only=True)


def _choose_step(ckpt: Checkpointer, checkpoint: str) -> int:
  if checkpoint not in ("best", "latest"):
    raise ConfigError(f"checkpoint={checkpoint!r}: use best or latest.")
  step = ckpt.best_step() if checkpoint == "best" else None
  if step is None:
    step = ckpt.latest_step()
  if step is None:
    raise ConfigError(f"No complete checkpoint in {ckpt.directory!r}.")
  return step


def restore_model(workdir: str, checkpoint: str = "best", mesh: jax.sharding.Mesh | None = None
                  ) -> tuple[nnx.Module, dict, int]:
  """(model, run metadata, step) from the `best` or `latest` checkpoint in `workdir`.

  The model is built from the metadata saved with the checkpoint (model name, its config, the
  classes), abstractly (`nnx.eval_shape`: no initialisers run), with its arrays read straight from
  the checkpoint, replicated over `mesh` (default: this process's devices; with several processes
  pass the global mesh, and every process must call this). With `ema_decay` in the metadata it
  holds the averaged weights. Its `input_mean` / `input_std` are the metadata's (the stain
  statistics for checkpoints written before they were recorded).
  """
  ckpt = _open_read_only(workdir)
  try:
    step = _choose_step(ckpt, checkpoint)
    meta = ckpt.metadata(step)
    config = ml_collections.ConfigDict({
        "model": meta["model"], "model_config": meta["model_config"], "seed": 0})
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: steps.create_model(config, len(meta["classes"]))))
    mesh = steps.create_mesh(jax.local_devices()) if mesh is None else mesh
    replicated = NamedSharding(mesh, P())
    item = "ema" if meta.get("ema_decay") else "model"
    target = {item: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        nnx.to_pure_dict(state))}
    restored = ckpt.restore_partial(step, target)
  finally:
    ckpt.close()
  nnx.replace_by_pure_dict(state, restored[item])
  model = nnx.merge(graphdef, state)
  model.input_mean = tuple(float(x) for x in meta.get("input_mean", MEAN_RGB))
  model.input_std = tuple(float(x) for x in meta.get("input_std", STDDEV_RGB))
  return model, meta, step


# What a run's data selection and input are, as config keys, and the metadata key holding each
# (with the value of checkpoints written before the key was recorded).
RUN_SELECTION = (("data.split", "protocol", "stratified"), ("data.fold", "fold", None),
                 ("data.num_folds", "num_folds", None), ("data.classes", "classes", None),
                 ("image_size", "image_size", None))


@dataclasses.dataclass
class RestoredRun:
  """A checkpoint's model with what it was trained on (`restore_run`)."""

  model: nnx.Module  # built from the metadata, weights restored, `input_mean`/`input_std` set
  metadata: dict  # `run_metadata` as saved with the checkpoint
  step: int
  # The `config` given to `restore_run` with the run's protocol, fold, num_folds, classes and
  # image size (`RUN_SELECTION`); None when no config was given.
  config: ml_collections.ConfigDict | None
  overridden: dict[str, tuple[Any, Any]]  # config key -> (the config's value, the run's)


def _config_value(config: ml_collections.ConfigDict, key: str) -> Any:
  value = config
  for part in key.split("."):
    value = value.get(part) if value is not None else None
  if key == "data.classes":  # None: every class, in the dataset's order
    value = classes_lib.CODES if value is None else value
  return json.loads(json.dumps(value))  # tuples -> lists, as the metadata has them


def restore_run(workdir: str, config: ml_collections.ConfigDict | None = None, *,
                checkpoint: str = "best", mesh: jax.sharding.Mesh | None = None) -> RestoredRun:
  """The one way a mode reads a trained run: its model and data selection from the checkpoint.

  Evaluate, predict, explain and export all call this, so that none can disagree with the run it
  restores. The model is `restore_model(workdir, checkpoint, mesh)`'s (architecture, classes,
  weights and input normalisation from the checkpoint's metadata). If `config` is given (for
  its data and batch settings), the returned `config` is a copy of it whose data selection and
  input (`RUN_SELECTION`: protocol `data.split`, `data.fold`, `data.num_folds`, `data.classes`,
  `image_size`) are the run's; every key on which the given config disagreed is named in one
  warning line of the log ("the run's values are used") and listed in `overridden`.

  Raises:
    ConfigError: no checkpoint in `workdir`, or `checkpoint` is not 'best' or 'latest'.
  """
  model, meta, step = restore_model(workdir, checkpoint, mesh)
  overridden: dict[str, tuple[Any, Any]] = {}
  run_config = None
  if config is not None:
    run_config = ml_collections.ConfigDict(config.to_dict())
    for key, meta_key, old_default in RUN_SELECTION:
      run_value = meta.get(meta_key, old_default)
      if meta_key == "classes":
        run_value = list(run_value)
      if _config_value(config, key) != run_value:
        overridden[key] = (_config_value(config, key), run_value)
      *parents, name = key.split(".")
      target = run_config
      for part in parents:
        target = target[part]
      target[name] = tuple(run_value) if meta_key == "classes" else run_value
    if overridden:
      logging.warning(
          "The config disagrees with the run in %s on %s; the run's values are used.", workdir,
          ", ".join(f"{key} ({given!r} -> the run's {run!r})"
                    for key, (given, run) in overridden.items()))
  return RestoredRun(model=model, metadata=meta, step=step, config=run_config,
                     overridden=overridden)


def read_state(workdir: str, config: ml_collections.ConfigDict, num_classes: int
               ) -> tuple[int, dict]:
  """(step, numpy pytree) of the latest checkpoint's state: model, optimizer and `ema` if any.

  For inspection and tests: compare runs array by array.
  """
  ckpt = _open_read_only(workdir)
  try:
    step = _choose_step(ckpt, "latest")
    model = steps.create_model(config, num_classes)
    # The schedule's values do not shape the optimizer state: any durations will do.
    schedule = steps.create_learning_rate_fn(config, steps.Durations(1, 0, 1, 1))
    optimizer = steps.create_train_optimizer(config, schedule, model)
    target = _pure({"model": model, "optimizer": optimizer})
    if config.get("ema_decay"):
      target["ema"] = target["model"]
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
  finally:
    ckpt.close()
  return step, jax.tree.map(np.asarray, restored)
