"""Reduce-on-plateau of the learning rate and early stopping, on a validation metric.

The logic is a pure function of the sequence of validation values (higher is better), so it can be
tested on scripted sequences and its state saved in every checkpoint (a resumed run takes the same
decisions). Only validation metrics drive it; the test split never does.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class PlateauState:
  """What the tracker remembers between evaluations."""

  best: float = -math.inf  # best validation value so far
  best_step: int = 0  # the step it was reached at
  since_best: int = 0  # evaluations since it (early stopping counts these)
  since_reduce: int = 0  # evaluations since the best or the last reduction (plateau counts these)
  lr_scale: float = 1.0  # multiplies the scheduled learning rate
  reductions: int = 0

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: dict) -> PlateauState:
    return cls(**data)


@dataclasses.dataclass(frozen=True)
class Plateau:
  """Keras-style ReduceLROnPlateau and EarlyStopping in one.

  After `patience` evaluations without an improvement of more than `min_delta`, the learning-rate
  scale is multiplied by `factor` (not below `min_scale`) and the count restarts. After
  `stop_patience` evaluations without an improvement, training stops. None disables either.
  """

  patience: int | None = None
  factor: float = 0.5
  stop_patience: int | None = None
  min_delta: float = 0.0
  min_scale: float = 1e-3

  def update(self, state: PlateauState, value: float, step: int) -> tuple[PlateauState, bool]:
    """The state after one evaluation with `value` at `step`, and whether to stop now."""
    if value > state.best + self.min_delta:
      return dataclasses.replace(state, best=value, best_step=step, since_best=0,
                                 since_reduce=0), False
    state = dataclasses.replace(state, since_best=state.since_best + 1,
                                since_reduce=state.since_reduce + 1)
    if self.patience is not None and state.since_reduce >= self.patience:
      scale = max(self.min_scale, state.lr_scale * self.factor)
      if scale < state.lr_scale:
        state = dataclasses.replace(state, lr_scale=scale, since_reduce=0,
                                    reductions=state.reductions + 1)
    stop = self.stop_patience is not None and state.since_best >= self.stop_patience
    return state, stop
