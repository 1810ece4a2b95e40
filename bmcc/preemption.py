"""SIGTERM / SIGINT during training: checkpoint, then stop; all processes at the same step.

The first signal asks for a checkpoint and a stop after the current step. With several processes,
each may see its own signal (or only one of them does), so they agree before acting: at every
`sync_every`-th step they all-gather their flags and stop together at the first step where any
was set, otherwise one process would wait in the checkpoint barrier while another waits in the next
step's gradient all-reduce. A second signal interrupts at once (the last complete checkpoint
stays valid); both end the run with `TrainingInterrupted` (exit status 3 from main.py).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


class TrainingInterrupted(Exception):
  """SIGTERM or SIGINT stopped training; rerun the same command to resume."""


class StopRequest:
  """A context manager that turns SIGTERM and SIGINT into a stop request (see the module)."""

  def __init__(self, sync_every: int = 1):
    self.signal: str | None = None
    self._sync_every = max(1, sync_every)
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.signal is not None:
      raise TrainingInterrupted(f"Second signal {name}: stopped at once; the last complete "
                                "checkpoint stays valid. Rerun the same command to resume.")
    self.signal = name
    logging.warning("Received %s: saving a checkpoint, then stopping.", name)

  def should_stop(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step`: the same answer on every process."""
    if jax.process_count() == 1:
      return self.signal is not None
    if step % self._sync_every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.signal is not None))
    if np.any(flags) and self.signal is None:
      self.signal = "a signal to another process"
    return bool(np.any(flags))

  def __enter__(self) -> StopRequest:
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      # Once a stop is under way, a further signal during the clean-up still means "stop at once"
      # (TrainingInterrupted), not a KeyboardInterrupt traceback.
      signal.signal(signum, self._handle if self.signal is not None else handler)
