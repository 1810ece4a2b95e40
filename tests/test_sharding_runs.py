"""FSDP end to end on the tiny synthetic run: exact resume, checkpoints read on another device
count, and two processes (multi-host on one machine) training, stopping and resuming."""

import json
import os
import subprocess

import jax
import numpy as np
import pytest

from bmcc import train
from configs import tiny
from tests import helpers
from tests.test_robustness import _free_port, _process_env

# Small enough that the tiny CNN's 3x3 kernels (8 -> 16 channels: 4.6 KB) and head are split.
FSDP = ["--config.sharding=fsdp", "--config.fsdp_min_bytes=1024"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("bmcc-cache"))


def _fsdp_config(cache_dir: str):
  config = tiny.get_config()
  config.data.cache_dir = cache_dir
  config.sharding, config.fsdp_min_bytes = "fsdp", 1024
  config.ema_decay = 0.9  # the weight average is sharded, resumed and tested too
  return config


def _report(workdir: str, name: str) -> dict:
  with open(os.path.join(workdir, f"eval_{name}.json")) as f:
    return json.load(f)


@pytest.mark.slow
def test_fsdp_resumes_exactly_and_its_checkpoint_evaluates_on_one_device(tmp_path, cache_dir):
  """On the 4 fake devices: stopped at step 12 and resumed equals uninterrupted (bit for bit);
  then --mode=evaluate on ONE device restores the 4-way sharded checkpoint and writes the same
  test report as the run's own."""
  assert jax.device_count() == 4
  config = _fsdp_config(cache_dir)
  full = str(tmp_path / "full")
  report_full = train.train_and_evaluate(config, full)
  parts = str(tmp_path / "parts")
  config.stop_at_step = 12
  assert train.train_and_evaluate(config, parts) is None
  config.stop_at_step = None
  assert train.train_and_evaluate(config, parts) == report_full
  step_full, state_full = helpers.final_state(full, config)
  step_parts, state_parts = helpers.final_state(parts, config)
  assert step_full == step_parts == 24 and set(state_full) == {"model", "optimizer", "ema"}
  jax.tree.map(np.testing.assert_array_equal, state_full, state_parts)

  result = subprocess.run(
      helpers.main_command("tiny.py", full, f"--config.data.cache_dir={cache_dir}", *FSDP,
                           "--config.ema_decay=0.9", "--mode=evaluate", "--checkpoint=best"),
      cwd=helpers.REPO, env=helpers.cli_env(devices=1), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert _report(full, "test_best") == _report(full, "test") == report_full


@pytest.mark.slow
def test_two_processes_train_fsdp_stop_and_resume(tmp_path, cache_dir):
  """2 CPU processes (gloo) with one device each: FSDP over both, stopped at step 4 with a
  checkpoint, resumed to step 8 by the same command; the checkpoint then evaluates on one
  device (one process) to the processes' own test report."""
  workdir = str(tmp_path / "w")
  overrides = [f"--config.data.cache_dir={cache_dir}", *FSDP, "--config.num_train_steps=8",
               "--config.warmup_steps=2", "--config.checkpoint_every_steps=4",
               "--config.eval_every_steps=8"]

  def run_pair(*extra: str) -> list[str]:
    port, procs = _free_port(), []
    for index in range(2):
      procs.append(subprocess.Popen(
          helpers.main_command("tiny.py", workdir, *overrides, *extra), cwd=helpers.REPO,
          env=_process_env(port, index), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
          text=True))
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errs]
    return errs

  errs = run_pair("--config.stop_at_step=4")
  assert "Training on 2 device(s) (cpu), 2 process(es)" in errs[0]
  assert "sharding fsdp" in errs[0] and "Stopped at step 4 of 8" in errs[1]
  assert not os.path.exists(os.path.join(workdir, "eval_test.json"))
  errs = run_pair()
  assert all("Resumed from the checkpoint at step 4" in e for e in errs)
  summaries = [e.split("Test summary: ")[1].splitlines()[0] for e in errs]
  assert summaries[0] == summaries[1]
  report = _report(workdir, "test")
  assert report["checkpoint_step"] == 8

  result = subprocess.run(
      helpers.main_command("tiny.py", workdir, *overrides, "--mode=evaluate",
                           "--checkpoint=latest"),
      cwd=helpers.REPO, env=helpers.cli_env(devices=1), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  evaluated = _report(workdir, "test_latest")
  assert evaluated["confusion_matrix"] == report["confusion_matrix"]
  assert evaluated["balanced_accuracy"] == report["balanced_accuracy"]
