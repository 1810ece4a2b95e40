"""Text summary of a `jax.profiler` trace: where the device time of a few steps goes.

  python bench/profile_summary.py /tmp/trace_dir --steps 3      # the newest .xplane.pb under it

Reads the trace's `.xplane.pb` with `jax.profiler.ProfileData` (jaxlib's own reader: no
TensorBoard or tensorboard-plugin-profile needed) and prints, per step: the device time of each
execution of the compiled programs ("XLA Modules"), the busy time of the XLA ops and the top ops by
time ("XLA Ops": fusions, convolutions, custom calls, each with its HLO category when the trace
records one), and the top GPU kernels by time (the "Stream" lines). On a CPU (no device plane) it
groups the host's events that carry an `hlo_op`. Op names (`fusion.123`, ...) are those of the
compiled program's optimised HLO (`bench/train_step.py --hlo_out`).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import warnings


def find_xplane(trace_dir: str) -> str:
  """The newest `*.xplane.pb` under `trace_dir` (jax writes plugins/profile/<date>/<host>...)."""
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no .xplane.pb under {trace_dir}")
  return max(paths, key=os.path.getmtime)


def _profile_data(path: str):
  try:
    from jax.profiler import ProfileData
  except ImportError:  # older jax: the reader lives in jaxlib only
    from jaxlib._profile_data import ProfileData  # type: ignore[no-redef]
  return ProfileData.from_file(path)


def _stats(event) -> dict:
  try:
    with warnings.catch_warnings():  # "builtin type event_stats has no __module__ attribute"
      warnings.simplefilter("ignore", DeprecationWarning)
      return dict(event.stats)
  except Exception:  # noqa: BLE001  (a stat the reader cannot convert)
    return {}


def _table(totals: dict, counts: dict, extra: dict, steps: int, busy_ns: float, top: int,
           title: str, width: int = 90) -> list[str]:
  lines = [title, f"  {'ms/step':>9} {'share':>6} {'calls/step':>10}  name"]
  for name, ns in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
    share = ns / busy_ns if busy_ns else 0.0
    label = name if len(name) <= width else name[:width - 3] + "..."
    suffix = f"  [{extra[name]}]" if extra.get(name) else ""
    lines.append(f"  {ns / 1e6 / steps:9.3f} {share:6.1%} {counts[name] / steps:10.1f}  "
                 f"{label}{suffix}")
  return lines


def _kind(name: str) -> str:
  """An op's kind: its HLO name without the instance number (`fusion.12` -> `fusion`)."""
  return re.sub(r"(\.\d+)+$", "", name)


def _by_kind(totals: dict, counts: dict, steps: int, busy_ns: float, top: int) -> list[str]:
  kinds, kind_counts = collections.Counter(), collections.Counter()
  for name, ns in totals.items():
    kinds[_kind(name)] += ns
    kind_counts[_kind(name)] += counts[name]
  return _table(kinds, kind_counts, {}, steps, busy_ns, top,
                "by op kind (instance number dropped):")


def summarize(trace_dir: str, steps: int = 1, top: int = 25) -> str:
  """The summary text of the newest trace under `trace_dir`, `steps` steps traced."""
  path = find_xplane(trace_dir)
  data = _profile_data(path)
  steps = max(steps, 1)
  out = [f"trace: {path} ({os.path.getsize(path) / 2**20:.1f} MiB); per-step figures divide by "
         f"{steps} traced step(s)"]
  planes = list(data.planes)
  devices = [p for p in planes if p.name.startswith("/device:") and "CUSTOM" not in p.name]
  if devices:
    plane = devices[0]
    out.append(f"device plane: {plane.name} (of {len(devices)})")
    lines = {line.name: list(line.events) for line in plane.lines}
    modules = collections.defaultdict(list)
    for event in lines.get("XLA Modules", []):
      modules[event.name].append(event.duration_ns)
    for name, durations in sorted(modules.items(), key=lambda kv: -sum(kv[1])):
      mean = sum(durations) / len(durations)
      out.append(f"module {name}: {len(durations)} run(s), mean {mean / 1e6:.3f} ms, "
                 f"min {min(durations) / 1e6:.3f} ms")
    op_events = lines.get("XLA Ops", [])
    if op_events:
      totals, counts, categories = collections.Counter(), collections.Counter(), {}
      by_category = collections.Counter()
      for event in op_events:
        totals[event.name] += event.duration_ns
        counts[event.name] += 1
        category = _stats(event).get("hlo_category")
        if category:
          categories[event.name] = category
          by_category[category] += event.duration_ns
      busy = sum(totals.values())
      out.append(f"XLA ops: {busy / 1e6 / steps:.3f} ms/step busy, {len(totals)} distinct ops")
      if by_category:
        out.append("by HLO category: " + ", ".join(
            f"{c} {ns / 1e6 / steps:.2f} ms ({ns / busy:.0%})"
            for c, ns in by_category.most_common()))
      out += _by_kind(totals, counts, steps, busy, 15)
      out += _table(totals, counts, categories, steps, busy, top, "top XLA ops by device time:")
    kernels, kernel_counts = collections.Counter(), collections.Counter()
    for name, events in lines.items():
      if name.startswith("Stream"):
        for event in events:
          kernels[event.name] += event.duration_ns
          kernel_counts[event.name] += 1
    if kernels:
      busy = sum(kernels.values())
      out.append(f"GPU kernels (all streams): {busy / 1e6 / steps:.3f} ms/step, "
                 f"{sum(kernel_counts.values()) / steps:.1f} launches/step")
      out += _table(kernels, kernel_counts, {}, steps, busy, top, "top kernels by device time:",
                    width=110)
    if not op_events and not kernels:
      out.append("lines on the device plane: " + ", ".join(
          f"{name} ({len(events)})" for name, events in lines.items()))
  else:
    totals, counts = collections.Counter(), collections.Counter()
    for plane in planes:
      for line in plane.lines:
        for event in line.events:
          op = _stats(event).get("hlo_op")
          if op:
            totals[op] += event.duration_ns
            counts[op] += 1
    busy = sum(totals.values())
    out.append(f"no device plane (CPU run): host events with an hlo_op, {busy / 1e6 / steps:.3f} "
               f"ms/step over all threads")
    out += _by_kind(totals, counts, steps, busy, 15)
    out += _table(totals, counts, {}, steps, busy, top, "top ops by time:")
  return "\n".join(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("trace_dir")
  parser.add_argument("--steps", type=int, default=1, help="steps traced (for per-step figures)")
  parser.add_argument("--top", type=int, default=25, help="rows per table")
  args = parser.parse_args()
  print(summarize(args.trace_dir, args.steps, args.top))


if __name__ == "__main__":
  main()
