"""Training progress a person can read in the log: images/s, time per epoch, time left.

`Progress` is clu's `ReportProgress` (the same point estimate of steps per second over the steps
since its last report, the same `timed("eval")` bookkeeping, the same `steps_per_sec` and `uptime`
scalars for TensorBoard) that also knows the batch size and the steps per epoch, and writes one
log line per report instead of clu's work-unit note, e.g.

  Progress: step 200/1000 (20.0%), epoch 2.00 of 10.00: 410.3 images/s, 24.9 s per epoch,
  3m 20s left (1m 05s elapsed; 12.0% of it evaluating)

It reports every `log_every_steps` steps (with the training metrics) and at the last step. The
first call only starts the clock, so compilation never counts.
"""

from __future__ import annotations

import logging
import time

from clu import periodic_actions


def format_duration(seconds: float) -> str:
  """Seconds -> '45s', '3m 20s', '2h 05m' (rounded to the second, then to the minute past 1 h)."""
  seconds = max(0, round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m {seconds % 60:02d}s"
  minutes = round(seconds / 60)
  return f"{minutes // 60}h {minutes % 60:02d}m"


def progress_line(step: int, total_steps: int, steps_per_epoch: int, batch_size: int,
                  steps_per_sec: float, elapsed: float, eval_seconds: float) -> str:
  """The log line of one report (see the module docstring); times in seconds."""
  images_per_sec = steps_per_sec * batch_size
  line = (f"Progress: step {step}/{total_steps} ({100 * step / total_steps:.1f}%), epoch "
          f"{step / steps_per_epoch:.2f} of {total_steps / steps_per_epoch:.2f}: "
          f"{images_per_sec:.1f} images/s, {steps_per_epoch / steps_per_sec:.1f} s per epoch, "
          f"{format_duration((total_steps - step) / steps_per_sec)} left "
          f"({format_duration(elapsed)} elapsed")
  if eval_seconds > 0 and elapsed > 0:
    line += f"; {100 * eval_seconds / elapsed:.1f}% of it evaluating"
  return line + ")"


class Progress(periodic_actions.ReportProgress):
  """clu's ReportProgress with images/s, time per epoch and time left in a log line."""

  def __init__(self, *, num_train_steps: int, steps_per_epoch: int, batch_size: int,
               every_steps: int, writer=None):
    super().__init__(num_train_steps=num_train_steps, writer=writer, every_steps=every_steps,
                     every_secs=None)
    self._steps_per_epoch = steps_per_epoch
    self._batch_size = batch_size

  def _apply(self, step: int, t: float) -> None:
    steps_per_sec = (step - self._previous_step) / max(t - self._previous_time, 1e-9)
    elapsed = time.monotonic() - self._t0
    logging.info(progress_line(step, self._num_train_steps, self._steps_per_epoch,
                               self._batch_size, steps_per_sec, elapsed,
                               self._time_per_part.get("eval", 0.0)))
    if self._writer is not None:
      self._writer.write_scalars(step, {"steps_per_sec": steps_per_sec,
                                        "images_per_sec": steps_per_sec * self._batch_size,
                                        "uptime": elapsed})
