"""`--mode=evaluate`: the best or latest checkpoint of a workdir on a chosen split."""

from __future__ import annotations

import logging
import os

import jax
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bmcc import checkpointing, config_validation, evaluate, metrics, steps
from bmcc.data import loading, pipeline, splits


def restore_model(workdir: str, checkpoint: str = "best") -> tuple[nnx.Module, dict, int]:
  """(model, run metadata, step) from the `best` or `latest` checkpoint in `workdir`.

  With `ema_decay` in the metadata, the model holds the averaged weights. The model is built from
  the metadata saved with the checkpoint (model name, its config, the classes), so it does not
  depend on the config the caller passes. It is built abstractly
  (`nnx.eval_shape`) and its arrays come straight from the checkpoint: running the random
  initialisers only to overwrite them would cost many seconds of compilation on a CPU.
  """
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise config_validation.ConfigError(
        f"No checkpoints in {directory!r}: train first with --mode=train --workdir={workdir}.")
  ckpt = checkpointing.Checkpointer(directory, read_only=True)
  try:
    step = ckpt.best_step() if checkpoint == "best" else None
    if step is None:
      step = ckpt.latest_step()
    if step is None:
      raise config_validation.ConfigError(f"No complete checkpoint in {directory!r}.")
    meta = ckpt.metadata(step)
    config = ml_collections.ConfigDict({
        "model": meta["model"], "model_config": meta["model_config"], "seed": 0})
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: steps.create_model(config, len(meta["classes"]))))
    # Restore replicated on this machine's devices, whatever topology saved it.
    replicated = NamedSharding(steps.create_mesh(jax.local_devices()), P())
    # A run with an exponential moving average kept the averaged weights as `ema`.
    item = "ema" if meta.get("ema_decay") else "model"
    target = {item: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        nnx.to_pure_dict(state))}
    restored = ckpt.manager.restore(
        step, args=checkpointing.ocp.args.Composite(
            state=checkpointing.ocp.args.PyTreeRestore(target, partial_restore=True)))["state"]
  finally:
    ckpt.close()
  nnx.replace_by_pure_dict(state, restored[item])
  return nnx.merge(graphdef, state), meta, step


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str, *, split: str = "test",
                     checkpoint: str = "best", tta: bool = False) -> dict:
  """Evaluates a checkpoint of `workdir` on `split`; writes eval_<split>.json and friends."""
  model, meta, step = restore_model(workdir, checkpoint)
  mapping = pipeline.ClassMapping.create(meta["classes"])
  builder = loading.load_builder(config.data)
  selection = splits.Selection(split, meta.get("fold"), meta.get("num_folds"))
  report = evaluate.evaluate_split(
      model, pipeline.role_source(builder, selection), mapping=mapping,
      image_size=meta["image_size"], batch_size=config.eval_batch_size,
      mesh=steps.create_mesh(), selection=selection, tta=tta)
  report["checkpoint_step"] = step
  paths = metrics.write_report(report, workdir, split)
  logging.info("Evaluated the %s checkpoint (step %d) on %s; report in %s\n%s", checkpoint, step,
               split, paths["json"], metrics.format_per_class_table(report))
  return report
