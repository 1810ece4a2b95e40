"""The cost of one stop agreement: a two-number int32 all-gather between 2 CPU processes (gloo).

  python bench/stop_agreement.py [--calls 500]

Starts both processes itself over 127.0.0.1 and prints each one's mean time per all-gather, the
call `bmcc.preemption.StopRequest.should_stop` makes at each agreement (about every 2 s of wall
time in a multi-process run; never in a single-process one).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time


def _worker(port: int, index: int, calls: int) -> None:
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=index)
  from jax.experimental import multihost_utils  # noqa: PLC0415

  row = np.array([0, 1], np.int32)
  for _ in range(20):  # compile and warm up
    multihost_utils.process_allgather(row)
  start = time.perf_counter()
  for _ in range(calls):
    multihost_utils.process_allgather(row)
  per_call = (time.perf_counter() - start) / calls
  print(f"process {index}: {per_call * 1e3:.2f} ms per all-gather ({calls} calls)", flush=True)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--calls", type=int, default=500)
  parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--index", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.index is not None:
    _worker(args.port, args.index, args.calls)
    return 0
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device per process
  procs = [subprocess.Popen([sys.executable, __file__, "--calls", str(args.calls), "--port",
                             str(port), "--index", str(i)], env=env) for i in range(2)]
  return max(p.wait() for p in procs)


if __name__ == "__main__":
  sys.exit(main())
