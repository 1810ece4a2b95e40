"""bmcc.preemption in-process: the second signal, its message, and when processes agree on a stop.

The end-to-end runs (signals to main.py, one and two processes) are in tests/test_robustness.py.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from bmcc import preemption


@pytest.fixture
def restore_handlers():
  """A stop under way leaves its handler installed (for the clean-up): put pytest's back."""
  saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  yield
  for signum, handler in saved.items():
    signal.signal(signum, handler)


def test_first_signal_asks_second_raises_at_once_saying_whether_a_checkpoint_exists(
    tmp_path, restore_handlers):
  folder = str(tmp_path / "checkpoints")
  with preemption.StopRequest(folder) as stop:
    assert not stop.should_stop(1)
    signal.raise_signal(signal.SIGTERM)  # the first: a request, no exception
    assert stop.signal == "SIGTERM" and stop.should_stop(2)
    with pytest.raises(preemption.TrainingInterrupted) as error:
      signal.raise_signal(signal.SIGINT)  # the second: at once
  assert str(error.value) == ("Second signal SIGINT: stopped at once; no checkpoint was written "
                              "yet: rerun the same command to start the run again.")
  # The message says what is there when it is shown (a save under way may finish meanwhile).
  os.makedirs(os.path.join(folder, "7"))
  os.makedirs(os.path.join(folder, "9.orbax-checkpoint-tmp-1"))  # unfinished: not a checkpoint
  assert str(error.value) == ("Second signal SIGINT: stopped at once; the last complete "
                              "checkpoint (step 7) stays valid. Rerun the same command to resume.")
  # A stop under way keeps the handler through the clean-up: a further signal still raises.
  with pytest.raises(preemption.TrainingInterrupted):
    signal.raise_signal(signal.SIGTERM)


def test_without_a_signal_the_previous_handlers_come_back(restore_handlers):
  before = signal.getsignal(signal.SIGINT)
  with preemption.StopRequest() as stop:
    assert signal.getsignal(signal.SIGINT) != before
    assert not any(stop.should_stop(step) for step in range(1, 5))
  assert signal.getsignal(signal.SIGINT) == before


class _FakeProcesses:
  """Two processes as `should_stop` sees them: a clock, and the other process's all-gather row."""

  def __init__(self, monkeypatch, other_flag: int = 0, other_step_seconds: float = 0.0):
    self.now, self.gathers = 100.0, []
    self.other_flag, self.other_step_seconds = other_flag, other_step_seconds
    monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
    monkeypatch.setattr(preemption.time, "monotonic", lambda: self.now)
    monkeypatch.setattr(preemption.multihost_utils, "process_allgather", self._gather)

  def _gather(self, row):
    self.gathers.append(row.tolist())
    other = row.copy()
    other[0] = self.other_flag
    if self.other_step_seconds:
      other[1] = max(1, int(preemption.SYNC_SECONDS // self.other_step_seconds))
    return np.stack([row, other])


@pytest.mark.parametrize("step_seconds, interval", [(0.0625, 32), (0.5, 4), (1.5, 1), (60.0, 1)])
def test_processes_agree_about_every_sync_seconds_whatever_the_step_time(
    monkeypatch, step_seconds, interval):
  fake = _FakeProcesses(monkeypatch)
  stop, synced = preemption.StopRequest(), []
  for step in range(1, 201):
    fake.now += step_seconds
    count = len(fake.gathers)
    assert not stop.should_stop(step)
    if len(fake.gathers) > count:
      synced.append(step)
  # The first agreement at the first step, the second one step later (to measure the pace), then
  # every floor(SYNC_SECONDS / step time) steps (at least 1): never more than SYNC_SECONDS apart.
  assert synced[:2] == [1, 2]
  assert np.diff(synced[1:]).tolist() == [interval] * (len(synced) - 2)
  assert interval * step_seconds <= max(preemption.SYNC_SECONDS, step_seconds)


def test_a_signal_to_the_other_process_stops_this_one_at_the_next_agreement(monkeypatch):
  fake = _FakeProcesses(monkeypatch, other_step_seconds=1.0)  # the slower one sets the pace
  stop = preemption.StopRequest()
  answers = {}
  for step in range(1, 12):
    fake.now += 0.1
    if step == 6:
      fake.other_flag = 1
    answers[step] = stop.should_stop(step)
    if answers[step]:
      break
  # Agreements at 1, 2, then every 2 steps (the other process's 2 s / 1 s per step): 4, 6.
  assert [s for s, a in answers.items() if a] == [6]
  assert stop.signal == "a signal to another process" and stop.agreements == 4
  assert [row[0] for row in fake.gathers] == [0, 0, 0, 0]  # this process had no signal
