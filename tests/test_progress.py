"""Training progress in the log: images/s, time per epoch and time left, with exact values."""

import logging

from bmcc import progress


def test_format_duration():
  assert [progress.format_duration(s) for s in (0, 44.6, 60, 200, 3599.4, 3600, 7530, -3)] == [
      "0s", "45s", "1m 00s", "3m 20s", "59m 59s", "1h 00m", "2h 06m", "0s"]


def test_progress_line_values():
  # 4 steps/s of batch 32 = 128 images/s; 50 steps per epoch = 12.5 s; 800 steps left = 200 s.
  line = progress.progress_line(200, 1000, 50, 32, 4.0, 65.0, 7.8)
  assert line == ("Progress: step 200/1000 (20.0%), epoch 4.00 of 20.00: 128.0 images/s, "
                  "12.5 s per epoch, 3m 20s left (1m 05s elapsed; 12.0% of it evaluating)")
  assert progress.progress_line(3, 3, 2, 8, 0.5, 10.0, 0.0) == (
      "Progress: step 3/3 (100.0%), epoch 1.50 of 1.50: 4.0 images/s, 4.0 s per epoch, "
      "0s left (10s elapsed)")


class _Writer:
  def __init__(self):
    self.scalars = []

  def write_scalars(self, step, values):
    self.scalars.append((step, values))


def test_reports_every_log_step_from_the_point_estimate(caplog):
  """The first call starts the clock (compilation never counts); then every `every_steps`."""
  caplog.set_level(logging.INFO)
  writer = _Writer()
  report = progress.Progress(num_train_steps=30, steps_per_epoch=10, batch_size=16,
                             every_steps=10, writer=writer)
  # Step 1 ends at t=100 after a long compilation, which starts nothing; then 2 steps/s.
  fired = [step for step in range(1, 31) if report(step, t=100.0 + 0.5 * (step - 1))]
  assert fired == [10, 20, 30]
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Progress: ")]
  assert len(lines) == 3
  # 9 steps in 4.5 s at step 10, then 10 steps in 5 s: 2 steps/s = 32 images/s.
  assert lines[0].startswith("Progress: step 10/30 (33.3%), epoch 1.00 of 3.00: 32.0 images/s, "
                             "5.0 s per epoch, 10s left (")
  assert lines[2].startswith("Progress: step 30/30 (100.0%), epoch 3.00 of 3.00: 32.0 images/s, "
                             "5.0 s per epoch, 0s left (")
  assert [s for s, _ in writer.scalars] == [10, 20, 30]
  assert writer.scalars[1][1]["images_per_sec"] == 32.0
  assert writer.scalars[1][1]["steps_per_sec"] == 2.0
