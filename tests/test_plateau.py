"""Reduce-on-plateau and early stopping on scripted validation sequences."""

import pytest

from bmcc.plateau import Plateau, PlateauState


def _run(tracker, values):
  state, scales, stops = PlateauState(), [], []
  for step, value in enumerate(values, start=1):
    state, stop = tracker.update(state, value, step)
    scales.append(state.lr_scale)
    stops.append(stop)
  return state, scales, stops


def test_reduces_after_patience_and_restarts_the_count():
  tracker = Plateau(patience=2, factor=0.5)
  state, scales, stops = _run(tracker, [0.5, 0.6, 0.6, 0.55, 0.59, 0.58, 0.7, 0.69, 0.69])
  assert scales == [1, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125]
  assert not any(stops)
  assert state.best == 0.7 and state.best_step == 7 and state.reductions == 3


def test_min_delta_and_min_scale():
  tracker = Plateau(patience=1, factor=0.1, min_delta=0.05, min_scale=0.01)
  _, scales, _ = _run(tracker, [0.5, 0.54, 0.53, 0.52, 0.60])
  # 0.54 is not an improvement of more than 0.05.
  assert scales == pytest.approx([1, 0.1, 0.01, 0.01, 0.01])


def test_early_stopping_counts_from_the_best_not_from_reductions():
  tracker = Plateau(patience=1, factor=0.5, stop_patience=3)
  _, scales, stops = _run(tracker, [0.5, 0.4, 0.45, 0.49, 0.3])
  assert stops == [False, False, False, True, True]
  assert scales == [1, 0.5, 0.25, 0.125, 0.0625]


def test_disabled_by_default_and_state_round_trips():
  tracker = Plateau()
  state, scales, stops = _run(tracker, [0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
  assert set(scales) == {1.0} and not any(stops)
  assert PlateauState.from_json(state.to_json()) == state
