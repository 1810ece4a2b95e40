"""SIGTERM / SIGINT during training: checkpoint, then stop; all processes at the same step.

The first signal asks for a checkpoint and a stop after the current step. With one process that
is a flag read after every step (no host synchronisation). With several, each may see its own
signal (or only one of them does), so they agree before acting: they all-gather their flags
(one small all-gather) at agreed steps, spaced so that about `SYNC_SECONDS` of wall time passes
between two agreements whatever the step time (each agreement also fixes the next one from the
slowest process's measured step time), and stop together at the first agreement where any flag
was set. A stop thus starts within `SYNC_SECONDS` plus one step of the signal, far inside the
~30 s that SLURM, Kubernetes and cloud preemption leave before SIGKILL, however long the steps.

A second signal stops at once (`TrainingInterrupted`, exit status 3 from main.py); the message
says whether a complete checkpoint exists to resume from. With several processes the one that
got it publishes that in the distributed runtime's key-value store and exits at once; a watcher
thread in every other process sees it within a second and exits too, so none is left waiting
in a collective for a process that is gone. Process 0 hosts the runtime's coordination service
and goes last (its peers abort, SIGABRT, when it is gone first); a process whose collective
fails because a peer left that way exits the same way instead of through jax's shutdown, which
would abort once the peer's heartbeats time out.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any, NoReturn

import jax
import numpy as np
from jax.experimental import multihost_utils

# Multi-process runs: wall time between two agreements on a pending stop (at least one step).
SYNC_SECONDS = 2.0
_MAX_SYNC_STEPS = 10_000
_ABORT_KEY = "bmcc/second_signal"  # set in the distributed key-value store by a second signal
_WATCH_SECONDS = 0.25  # how often the other processes look for it
_EXITING_KEY = "bmcc/exiting/"  # + process index: set by each process just before it exits
_LAST_WAIT_SECONDS = 10.0  # at most this long process 0 waits for the others to exit first


class TrainingInterrupted(Exception):
  """SIGTERM or SIGINT stopped training; rerun the same command to resume.

  With `checkpoint_dir`, the message ends with `resume_hint(checkpoint_dir)` as it is when the
  message is shown (a save under way when the signal came may have finished by then).
  """

  def __init__(self, message: str, checkpoint_dir: str | None = None):
    super().__init__(message)
    self.checkpoint_dir = checkpoint_dir

  def __str__(self) -> str:
    message = super().__str__()
    return message if self.checkpoint_dir is None else (
        f"{message}; {resume_hint(self.checkpoint_dir)}")


def checkpoint_steps(checkpoint_dir: str | None) -> list[int]:
  """The steps of the complete checkpoints in `checkpoint_dir` (orbax renames a step's folder
  to its number only once it is written)."""
  if not checkpoint_dir or not os.path.isdir(checkpoint_dir):
    return []
  return sorted(int(name) for name in os.listdir(checkpoint_dir) if name.isdigit())


def resume_hint(checkpoint_dir: str | None) -> str:
  """What a rerun does: resume from the last complete checkpoint, or start again if none."""
  steps = checkpoint_steps(checkpoint_dir)
  if steps:
    return (f"the last complete checkpoint (step {steps[-1]}) stays valid. Rerun the same "
            "command to resume.")
  return "no checkpoint was written yet: rerun the same command to start the run again."


def _exit_now(message: str) -> NoReturn:
  """Prints `interrupted: <message>` and ends the process at once (status 3), without the clean-up
  that would wait for the other processes."""
  print(f"interrupted: {message}", file=sys.stderr, flush=True)
  logging.shutdown()
  os._exit(3)


def _exit_after_second_signal(message: str) -> NoReturn:
  """Multi-process `_exit_now`: the others first, process 0 (the coordination service) last."""
  client, index = _client(), jax.process_index()
  try:
    client.key_value_set(f"{_EXITING_KEY}{index}", "1")
    if index == 0:
      deadline = time.monotonic() + _LAST_WAIT_SECONDS
      for other in range(1, jax.process_count()):
        left_ms = int(max(deadline - time.monotonic(), 0.001) * 1000)
        client.blocking_key_value_get(f"{_EXITING_KEY}{other}", left_ms)
      time.sleep(2 * _WATCH_SECONDS)  # between their last word and their exit
  except Exception:  # noqa: BLE001  (a peer that never says so, or the runtime is gone)
    pass
  _exit_now(message)


def _second_signal_elsewhere() -> str | None:
  """The index of the process that got a second signal, if one did (multi-process)."""
  try:
    return _client().key_value_try_get(_ABORT_KEY)
  except Exception:  # noqa: BLE001  (not set: NOT_FOUND)
    return None


def _client():
  """The distributed runtime's client (jax has no public handle on its key-value store)."""
  from jax._src import distributed  # noqa: PLC0415

  return distributed.global_state.client


class StopRequest:
  """A context manager that turns SIGTERM and SIGINT into a stop request (see the module).

  `checkpoint_dir` is where the run's checkpoints are, for the second signal's message.
  """

  def __init__(self, checkpoint_dir: str | None = None, sync_seconds: float = SYNC_SECONDS):
    self.signal: str | None = None
    self.agreements = 0  # all-gathers done (multi-process)
    self._checkpoint_dir = checkpoint_dir
    self._sync_seconds = sync_seconds
    self._next_sync: int | None = None  # the step of the next agreement; None: the first step
    self._last_sync: tuple[int, float] | None = None
    self._previous: dict[int, Any] = {}
    self._done = threading.Event()

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.signal is not None:
      error = TrainingInterrupted(f"Second signal {name}: stopped at once",
                                  self._checkpoint_dir)
      if jax.process_count() > 1:
        try:  # tell the other processes, then go: they may be waiting in a collective for us
          _client().key_value_set(_ABORT_KEY, str(jax.process_index()))
        except Exception:  # noqa: BLE001  (another process set it first, or the runtime is gone)
          pass
        _exit_after_second_signal(str(error))
      raise error
    self.signal = name
    logging.warning("Received %s: saving a checkpoint, then stopping.", name)

  def _watch(self) -> None:
    """Multi-process: exits this process once another one got a second signal."""
    while not self._done.wait(_WATCH_SECONDS):
      self._exit_if_second_signal_elsewhere()

  def _exit_if_second_signal_elsewhere(self) -> None:
    index = _second_signal_elsewhere()
    if index is not None:
      _exit_after_second_signal(str(TrainingInterrupted(
          f"A second signal to process {index}: stopped at once", self._checkpoint_dir)))

  def should_stop(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step`: the same answer on every process.

    Called after every step. Multi-process: an all-gather at the agreed steps only.
    """
    if jax.process_count() == 1:
      return self.signal is not None
    if self._next_sync is not None and step < self._next_sync:
      return False
    now = time.monotonic()
    proposal = 1
    if self._last_sync is not None:  # steps that fit in sync_seconds, at this process's pace
      last_step, last_time = self._last_sync
      per_step = max(now - last_time, 1e-6) / max(step - last_step, 1)
      proposal = int(np.clip(self._sync_seconds // per_step, 1, _MAX_SYNC_STEPS))
    gathered = np.asarray(multihost_utils.process_allgather(
        np.array([self.signal is not None, proposal], np.int32))).reshape(-1, 2)
    self.agreements += 1
    self._last_sync = (step, time.monotonic())
    self._next_sync = step + int(gathered[:, 1].min())  # the slowest process's pace
    stop = bool(gathered[:, 0].any())
    if stop and self.signal is None:
      self.signal = "a signal to another process"
    return stop

  def __enter__(self) -> StopRequest:
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    if jax.process_count() > 1 and _client() is not None:
      threading.Thread(target=self._watch, name="bmcc-second-signal", daemon=True).start()
    return self

  def __exit__(self, *exc) -> None:
    if exc[0] is not None and jax.process_count() > 1 and _client() is not None:
      # E.g. a collective that failed because a peer left on a second signal before the watcher
      # saw it: leave as the watcher would.
      self._exit_if_second_signal_elsewhere()
    for signum, handler in self._previous.items():
      # Once a stop is under way, a further signal during the clean-up still means "stop at once"
      # (TrainingInterrupted), not a KeyboardInterrupt traceback.
      signal.signal(signum, self._handle if self.signal is not None else handler)
    if self.signal is None:  # a stop under way keeps watching until the process exits
      self._done.set()
