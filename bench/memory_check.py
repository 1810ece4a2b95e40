"""A compiled step's memory analysis checked against the device's measured peak.

Used by `bench/train_step.py --memory`: `compiled_memory(compiled)` reads XLA's
`memory_analysis()` of the compiled training step (per device, before anything runs);
`device_memory()` reads the allocator's `memory_stats()` of the first device; `report(...)` prints
both, the peak the analysis predicts (the live bytes before the steps + the step's outputs and
temporaries - the donated inputs it reuses) and the ratio measured / predicted.

`compiled_memory` is the stand-in for `bench/memory.py`'s function of the same job (written on
another branch): to check that one instead, point `compiled_memory` at it; the report only needs a
dict with the keys below.
"""

from __future__ import annotations

_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
           "temp_size_in_bytes", "generated_code_size_in_bytes")


def compiled_memory(compiled) -> dict[str, int] | None:
  """{argument, output, alias, temp, generated_code}_bytes of a compiled program (one device),
  or None where the backend gives no analysis."""
  analysis = compiled.memory_analysis()
  if isinstance(analysis, list | tuple):
    analysis = analysis[0] if analysis else None
  if analysis is None:
    return None
  return {field.replace("_size_in_bytes", "_bytes"): int(getattr(analysis, field, 0) or 0)
          for field in _FIELDS}


def device_memory(device=None) -> dict[str, int] | None:
  """The allocator's statistics of `device` (default: the first), or None (the CPU has none)."""
  import jax

  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001  (backends without allocator statistics)
    return None
  return dict(stats) if stats else None


def _gib(value: float | None) -> str:
  return "n/a" if value is None else f"{value / 2**30:.3f} GiB"


def report(compiled_stats: dict[str, int] | None, before: dict[str, int] | None,
           after: dict[str, int] | None) -> None:
  """Prints the analysis, the device's bytes in use before the steps and its peak after them.

  `memory_*=` lines, one per figure, for bench/gpu.sh to pick up.
  """
  if compiled_stats is None:
    print("memory_analysis=n/a (the backend gives none)")
  else:
    print("memory_analysis=" + " ".join(f"{k}={_gib(v)}" for k, v in compiled_stats.items()))
  if before is None or after is None:
    print("memory_measured=n/a (the device keeps no allocator statistics: a CPU)")
    return
  in_use = before.get("bytes_in_use")
  peak_before, peak = before.get("peak_bytes_in_use"), after.get("peak_bytes_in_use")
  print(f"memory_measured=bytes_in_use_before_steps={_gib(in_use)} "
        f"peak_before_steps={_gib(peak_before)} peak_after_steps={_gib(peak)} "
        f"bytes_limit={_gib(after.get('bytes_limit'))}")
  if compiled_stats is None or in_use is None or peak is None:
    return
  # The arguments (state, batch, key) are live before the step; the step adds its outputs and
  # temporaries, less the outputs written into donated inputs (alias).
  step_extra = (compiled_stats["output_bytes"] + compiled_stats["temp_bytes"]
                - compiled_stats["alias_bytes"])
  predicted = in_use + step_extra
  note = "" if peak_before is None or peak > peak_before else (
      " (the peak was reached before the steps: the steps stayed under it)")
  print(f"memory_step_analysis_gib={(compiled_stats['argument_bytes'] + step_extra) / 2**30:.3f} "
        "(arguments + outputs + temporaries - aliased)")
  print(f"memory_step_peak_gib={peak / 2**30:.3f} predicted={predicted / 2**30:.3f} "
        f"ratio={peak / predicted:.3f}{note}")
