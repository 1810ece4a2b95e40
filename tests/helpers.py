"""Shared test helpers: run main.py in a subprocess, read a run's final parameters."""

import glob
import os
import subprocess
import sys

from bmcc import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every config module in configs/, by name.
CONFIG_NAMES = sorted(os.path.splitext(os.path.basename(p))[0]
                      for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                      if not p.endswith("__init__.py"))


# Skips LLVM's optimisation passes: CPU compilations take a fraction of the time; the programs
# compute the same maths (runs compared in one test all use the same flags).
FAST_COMPILE = "--xla_backend_optimization_level=0"


def cli_env(devices: int = 1, fast_compile: bool = True) -> dict[str, str]:
  """The environment for a main.py subprocess with `devices` CPU devices."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  flags = [FAST_COMPILE] if fast_compile else []
  if devices > 1:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  env["PYTHONUNBUFFERED"] = "1"
  return env


def main_command(config: str, workdir: str, *overrides: str) -> list[str]:
  return [sys.executable, os.path.join(REPO, "main.py"), "--config",
          os.path.join(REPO, "configs", config), "--workdir", workdir, *overrides]


def run_main(config: str, workdir: str, *overrides: str, devices: int = 1, timeout: int = 600,
             fast_compile: bool = True) -> subprocess.CompletedProcess:
  return subprocess.run(main_command(config, workdir, *overrides), cwd=REPO,
                        env=cli_env(devices, fast_compile), capture_output=True, text=True,
                        timeout=timeout)


def final_state(workdir: str, config) -> tuple[int, dict]:
  """(step, numpy pytree of the state) of the latest checkpoint in `workdir`: model, optimizer
  and, for a config with `ema_decay`, the averaged weights (`ema`)."""
  return checkpointing.read_state(workdir, config, 21)
