"""What happens when: SIGTERM, kill -9 at random moments, a diverging loss, a bad config."""

import json
import os
import random
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from configs import tiny
from tests import helpers


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """A prepared tiny synthetic dataset shared by the tests here."""
  path = str(tmp_path_factory.mktemp("bmcc-cache"))
  config = tiny.get_config()
  config.data.cache_dir = path
  from bmcc.data import loading  # noqa: PLC0415
  loading.load_builder(config.data)
  return path


def _wait_for(path_fn, timeout: float, proc: subprocess.Popen) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if path_fn():
      return
    if proc.poll() is not None:
      raise AssertionError(f"process ended early: {proc.returncode}")
    time.sleep(0.1)
  raise AssertionError("timed out")


def _checkpoint_steps(workdir: str) -> list[int]:
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def _start(workdir: str, overrides: list[str], **popen) -> subprocess.Popen:
  return subprocess.Popen(helpers.main_command("tiny.py", workdir, *overrides), cwd=helpers.REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _events_size(workdir: str) -> int:
  """Bytes of TensorBoard events written so far (process 0 writes them)."""
  return sum(os.path.getsize(os.path.join(workdir, n)) for n in os.listdir(workdir)
             if n.startswith("events"))


def _training_started(workdir: str) -> bool:
  """The first scalars are written once training runs."""
  return os.path.isdir(workdir) and any(n.startswith("events") for n in os.listdir(workdir))


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_sigterm_saves_a_checkpoint_at_the_step_reached_and_resumes(tmp_path, cache_dir,
                                                                     num_workers):
  """SIGTERM to the whole process group, as SLURM and Ctrl-C send it: grain's worker processes
  get it too, and the run still checkpoints and exits 3."""
  workdir = str(tmp_path / "w")
  overrides = [f"--config.data.cache_dir={cache_dir}", "--config.num_train_steps=100000",
               "--config.checkpoint_every_steps=1000", "--config.eval_every_steps=1000",
               "--config.log_every_steps=1", f"--config.data.num_workers={num_workers}"]
  proc = _start(workdir, overrides, env=helpers.cli_env(), start_new_session=True)
  try:
    _wait_for(lambda: _training_started(workdir), 240, proc)
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 3, stderr[-2000:]
  assert "Stopped by SIGTERM at step" in stderr
  reached = int(stderr.split("Stopped by SIGTERM at step ")[1].split()[0])
  assert reached > 0 and reached % 1000 != 0
  assert _checkpoint_steps(workdir) == [reached]  # saved exactly where it stopped

  result = helpers.run_main("tiny.py", workdir, overrides[0], overrides[-1],
                            f"--config.num_train_steps={reached + 2}", "--config.warmup_steps=1")
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"Resumed from the checkpoint at step {reached}" in result.stderr
  assert os.path.exists(os.path.join(workdir, "eval_test.json"))
  if num_workers:  # the iterator state is per worker: another count is refused, clearly
    result = helpers.run_main("tiny.py", workdir, overrides[0], "--config.data.num_workers=0",
                              f"--config.num_train_steps={reached + 4}")
    assert result.returncode == 2 and "data_workers=2" in result.stderr, result.stderr[-2000:]


def _two_signals_at_once(proc: subprocess.Popen) -> None:
  """SIGINT and SIGTERM delivered together (the process stopped meanwhile): Python runs the
  SIGINT handler, then at once the SIGTERM one, before the loop can act on the first. So the
  second-signal path is taken, deterministically, before any stop checkpoint."""
  proc.send_signal(signal.SIGSTOP)
  try:
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
  finally:
    proc.send_signal(signal.SIGCONT)


def _second_signal(stderr: str) -> str:
  """The signal handled second: the other one of SIGINT and SIGTERM than the one the first
  handler logged ('Received SIGINT: ...')."""
  first = [name for name in ("SIGINT", "SIGTERM") if f"Received {name}: saving" in stderr]
  assert len(first) == 1, stderr[-2000:]
  return "SIGTERM" if first == ["SIGINT"] else "SIGINT"


@pytest.mark.slow
def test_a_second_signal_stops_at_once_with_status_3(tmp_path, cache_dir):
  workdir = str(tmp_path / "w")
  overrides = [f"--config.data.cache_dir={cache_dir}", "--config.num_train_steps=100000",
               "--config.checkpoint_every_steps=100000", "--config.eval_every_steps=100000"]
  proc = _start(workdir, overrides, env=helpers.cli_env())
  try:
    _wait_for(lambda: _training_started(workdir), 240, proc)
    time.sleep(3)  # in the training loop
    _two_signals_at_once(proc)
    _, stderr = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 3, stderr[-2000:]
  # The second signal stopped the run before the stop checkpoint (without that path the first
  # signal's stop would save one and say 'Stopped by SIGINT at step ...'); no checkpoint existed,
  # and the message says so instead of promising one. One line, never a KeyboardInterrupt.
  lines = [line for line in stderr.splitlines() if line.startswith("interrupted: ")]
  second = _second_signal(stderr)
  assert lines == [f"interrupted: Second signal {second}: stopped at once; no checkpoint was "
                   "written yet: rerun the same command to start the run again."], stderr[-2000:]
  assert "KeyboardInterrupt" not in stderr and "Stopped by" not in stderr
  assert _checkpoint_steps(workdir) == []


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_equals_uninterrupted(tmp_path, cache_dir):
  """SIGKILL at random moments (async checkpoint writes included); the finished run matches."""
  overrides = [f"--config.data.cache_dir={cache_dir}", "--config.num_train_steps=40",
               "--config.checkpoint_every_steps=1", "--config.eval_every_steps=20"]
  reference = str(tmp_path / "reference")
  result = helpers.run_main("tiny.py", reference, *overrides)
  assert result.returncode == 0, result.stderr[-2000:]

  workdir = str(tmp_path / "killed")
  rng = random.Random(1234)
  kills = 0
  for _ in range(3):
    proc = subprocess.Popen(helpers.main_command("tiny.py", workdir, *overrides),
                            cwd=helpers.REPO, env=helpers.cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
      before = _checkpoint_steps(workdir)
      # Wait until this run has written a checkpoint of its own, then kill it a random moment
      # later (checkpoints are written every step, so most kills land during a write).
      _wait_for(lambda b=before: _checkpoint_steps(workdir) not in ([], b), 240, proc)
      time.sleep(rng.uniform(0.0, 1.5))
      if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        kills += 1
      proc.wait(timeout=60)
    except AssertionError:
      if proc.poll() != 0:  # ended early: only fine if it finished the run
        raise
    finally:
      proc.kill()
  assert kills >= 2
  result = helpers.run_main("tiny.py", workdir, *overrides)
  assert result.returncode == 0, result.stderr[-2000:]

  config = tiny.get_config()
  step_ref, state_ref = helpers.final_state(reference, config)
  step, state = helpers.final_state(workdir, config)
  assert step == step_ref == 40
  jax.tree.map(np.testing.assert_array_equal, state_ref, state)
  with open(os.path.join(reference, "eval_test.json")) as f1, \
       open(os.path.join(workdir, "eval_test.json")) as f2:
    assert json.load(f1) == json.load(f2)


def test_diverging_run_exits_4_naming_the_step_and_keeps_only_finite_checkpoints(
    tmp_path, cache_dir):
  """A learning rate of 1e30 without gradient clipping: real divergence, through main.py.

  Warm-up gives step 1 a learning rate of 0 and step 2 one of 2.5e29: the updated weights' norm
  is not finite. With a checkpoint after every step, every step before the first non-finite one is
  saved and none from it on, and what is kept is finite. The
  run's stderr is also the bound on a short training run's log (tests/test_log_setup.py).
  """
  workdir = str(tmp_path / "nan")
  overrides = [f"--config.data.cache_dir={cache_dir}", "--config.learning_rate=1e30",
               "--config.grad_clip_norm=0", "--config.checkpoint_every_steps=1"]
  result = helpers.run_main("tiny.py", workdir, *overrides)
  assert result.returncode == 4, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-3000:]
  assert "error: Non-finite training metrics at step " in errors[0]
  assert "the last good checkpoint is kept" in errors[0]
  bad_step = int(errors[0].split(" at step ")[1].split(":")[0])
  assert bad_step > 1
  assert _checkpoint_steps(workdir) == [bad_step - 1]  # saved up to the step before, not after
  config = tiny.get_config()
  config.grad_clip_norm = 0.0  # the optimizer state has no clipping entry then
  step, state = helpers.final_state(workdir, config)
  assert step == bad_step - 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))
  # Step 1 has a learning rate of 0; step 2's update (2.5e29) makes the weights' norm overflow, so
  # step 2 is refused at once: the weights a checkpoint holds never blew up.
  assert bad_step == 2
  assert max(float(np.abs(x).max()) for x in jax.tree.leaves(state["model"])) < 100
  # Quiet logs: the start line, the hyper-parameters, a metric line or two and the error, not
  # orbax's dozens of lines per checkpoint.
  assert len(result.stderr.splitlines()) <= 12, result.stderr[-3000:]
  assert "orbax" not in result.stderr and "tracked_metric" not in result.stderr


def test_bad_config_fails_before_any_data_or_compile_work(tmp_path):
  start = time.time()
  result = helpers.run_main("tiny.py", str(tmp_path / "w"), "--config.batch_size=10",
                            f"--config.data.cache_dir={tmp_path / 'never'}", devices=4)
  assert result.returncode == 2
  assert "batch_size=10 must be a positive multiple of the device count (4)" in result.stderr
  assert not os.path.exists(tmp_path / "never")  # no data work was done
  assert time.time() - start < 120


@pytest.mark.slow
def test_two_processes_over_localhost_train_together(tmp_path, cache_dir):
  """Multi-host on one machine: 2 CPU processes (gloo collectives) over 127.0.0.1."""
  port = _free_port()
  workdir = str(tmp_path / "w")
  procs = []
  for index in range(2):
    env = _process_env(port, index)
    procs.append(subprocess.Popen(
        helpers.main_command("tiny.py", workdir, f"--config.data.cache_dir={cache_dir}",
                             "--config.num_train_steps=8", "--config.warmup_steps=2"),
        cwd=helpers.REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
  errs = [p.communicate(timeout=600)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errs]
  assert "Process 0 of 2; 1 local and 2 global devices" in errs[0]
  assert "Training on 2 device(s) (cpu), 2 process(es)" in errs[1]
  # Only process 0 writes metrics and reports; both computed the same test summary.
  assert len([n for n in os.listdir(workdir) if n.startswith("events.out")]) == 1
  summaries = [e.split("Test summary: ")[1].splitlines()[0] for e in errs]
  assert summaries[0] == summaries[1]
  with open(os.path.join(workdir, "eval_test.json")) as f:
    report = json.load(f)
  assert report["num_examples"] > 0

  # --mode=evaluate with both processes: restored on the global mesh, the same test report.
  eval_port, procs = _free_port(), []
  for index in range(2):
    procs.append(subprocess.Popen(
        [*helpers.main_command("tiny.py", workdir, f"--config.data.cache_dir={cache_dir}",
                               "--mode=evaluate", "--checkpoint=latest")],
        cwd=helpers.REPO, env=_process_env(eval_port, index), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True))
  errs = [p.communicate(timeout=600)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errs]
  with open(os.path.join(workdir, "eval_test_latest.json")) as f:
    evaluated = json.load(f)
  assert evaluated["confusion_matrix"] == report["confusion_matrix"]


def _process_env(port: int, index: int) -> dict[str, str]:
  return dict(helpers.cli_env(), BMCC_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
              BMCC_NUM_PROCESSES="2", BMCC_PROCESS_ID=str(index), BMCC_CPU_COLLECTIVES="gloo")


def _free_port() -> int:
  import socket  # noqa: PLC0415
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_once_and_a_second_signal_hangs_none(
    tmp_path, cache_dir):
  """Only process 1 is signalled, with log steps 1,000 apart: the processes agree within
  preemption.SYNC_SECONDS, not at the next log step, both checkpoint at the same step and exit 3.
  Resumed, two signals at once to process 1: it exits at once and process 0, which waits for it
  in a collective, follows within seconds instead of hanging."""
  workdir, port = str(tmp_path / "w"), _free_port()
  overrides = [f"--config.data.cache_dir={cache_dir}", "--config.num_train_steps=100000",
               "--config.checkpoint_every_steps=100000", "--config.eval_every_steps=100000",
               "--config.log_every_steps=1000"]
  procs = [_start(workdir, overrides, env=_process_env(port, index)) for index in range(2)]
  try:
    _wait_for(lambda: _training_started(workdir), 300, procs[0])
    time.sleep(3)
    signalled = time.time()
    procs[1].send_signal(signal.SIGTERM)
    errs = [p.communicate(timeout=180)[1] for p in procs]
    stopped_after = time.time() - signalled
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [3, 3], [e[-2000:] for e in errs]
  steps = [int(e.split("Stopped by ")[1].split(" at step ")[1].split()[0]) for e in errs]
  assert steps[0] == steps[1] and steps[0] % 1000 != 0, steps  # not at a log step
  assert "Stopped by SIGTERM" in errs[1] and "a signal to another process" in errs[0]
  assert _checkpoint_steps(workdir) == [steps[0]]
  assert stopped_after < 60, stopped_after  # agreement, checkpoint and exit

  # Resumed with a metric line per step (logging no longer paces the agreement): once process 0
  # writes scalars, both are in the loop.
  port, before = _free_port(), _events_size(workdir)
  overrides[-1] = "--config.log_every_steps=1"
  procs = [_start(workdir, overrides, env=_process_env(port, index)) for index in range(2)]
  try:
    _wait_for(lambda: _events_size(workdir) > before, 300, procs[0])
    time.sleep(1)
    _two_signals_at_once(procs[1])
    signalled = time.time()
    errs = [p.communicate(timeout=120)[1] for p in procs]
    exited_after = time.time() - signalled
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [3, 3], [e[-2000:] for e in errs]
  hint = (f"stopped at once; the last complete checkpoint (step {steps[0]}) stays valid. Rerun "
          "the same command to resume.")
  assert f"interrupted: Second signal {_second_signal(errs[1])}: {hint}" in errs[1], errs[1][-2000:]
  assert f"interrupted: A second signal to process 1: {hint}" in errs[0], errs[0][-2000:]
  assert exited_after < 30, exited_after
  assert _checkpoint_steps(workdir) == [steps[0]]
