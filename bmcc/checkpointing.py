"""orbax checkpoints of a run: model and optimizer state, the data iterator, and run metadata.

Retention: the latest `keep` checkpoints and the single best by validation balanced accuracy
(checkpoints saved without metrics are kept only while among the latest). Writes are asynchronous
and atomic (orbax writes into a temporary folder and renames it when complete), so a run killed
mid-write resumes from the last complete checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp

BEST_METRIC = "val_balanced_accuracy"


def _best_metric(metrics: dict[str, float]) -> float:
  return metrics[BEST_METRIC]


class Checkpointer:
  """A thin wrapper around `ocp.CheckpointManager` for the three items of a run."""

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

  def save(self, step: int, state: dict, data_iterator: Any, metadata: dict,
           metrics: dict[str, float] | None = None, force: bool = False,
           progress: dict | None = None) -> bool:
    """Starts an asynchronous save of `state` (a pure pytree), the iterator and the metadata.

    `progress` is small JSON run state that is not in the arrays (e.g. the plateau tracker).
    """
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        metadata=ocp.args.JsonSave(metadata),
        progress=ocp.args.JsonSave(progress or {}),
    )
    return self.manager.save(step, args=args, metrics=metrics, force=force)

  def restore(self, step: int, state_target: dict, data_iterator: Any | None = None) -> dict:
    """Restores `state` (shaped and sharded like `state_target`) and, if given, the iterator."""
    items = {"state": ocp.args.StandardRestore(state_target)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

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
