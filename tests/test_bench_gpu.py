"""The GPU benchmark's helpers: the profile summary (on a GPU-shaped trace) and the memory check.

bench/gpu.sh runs once on a lent GPU, so the parts that read a GPU's output are checked here on
hand-made inputs: an XSpace with a GPU device plane written from its text form, and allocator
statistics as `Device.memory_stats()` returns them.
"""

from __future__ import annotations

import os
import sys

from jax.profiler import ProfileData

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import memory_check  # noqa: E402
import profile_summary  # noqa: E402

MS = 1_000_000_000  # picoseconds per millisecond


def _event(metadata: int, start_ms: float, ms: float, category: str | None = None) -> str:
  stat = f' stats {{ metadata_id: 10 str_value: "{category}" }}' if category else ""
  return (f"events {{ metadata_id: {metadata} offset_ps: {int(start_ms * MS)} "
          f"duration_ps: {int(ms * MS)}{stat} }}")


# Two steps of a program on a GPU, as jax's profiler lays them out: one "XLA Modules" event per
# run, the HLO ops on "XLA Ops" (with their category), the kernels on a "Stream" line.
GPU_TRACE = f"""
planes {{
  id: 1
  name: "/device:GPU:0"
  lines {{ id: 1 name: "XLA Modules" timestamp_ns: 1000
    {_event(1, 0, 6)} {_event(1, 7, 4)} }}
  lines {{ id: 2 name: "XLA Ops" timestamp_ns: 1000
    {_event(2, 0, 3, "convolution")} {_event(3, 3, 1, "loop fusion")}
    {_event(2, 7, 3, "convolution")} {_event(5, 10, 1, "loop fusion")} }}
  lines {{ id: 3 name: "Stream #7(compute)" timestamp_ns: 1000
    {_event(4, 0, 2)} {_event(4, 3, 1.5)} {_event(6, 5, 0.5)} }}
  event_metadata {{ key: 1 value {{ id: 1 name: "jit_pure_step" }} }}
  event_metadata {{ key: 2 value {{ id: 2 name: "convolution.3" }} }}
  event_metadata {{ key: 3 value {{ id: 3 name: "fusion.12" }} }}
  event_metadata {{ key: 5 value {{ id: 5 name: "fusion.7" }} }}
  event_metadata {{ key: 4 value {{ id: 4 name: "sm90_xmma_gemm_bf16" }} }}
  event_metadata {{ key: 6 value {{ id: 6 name: "loop_add_fusion" }} }}
  stat_metadata {{ key: 10 value {{ id: 10 name: "hlo_category" }} }}
}}
planes {{ id: 2 name: "/host:CPU" }}
"""


def test_profile_summary_of_a_gpu_trace(tmp_path):
  folder = tmp_path / "plugins" / "profile" / "2026_01_01"
  folder.mkdir(parents=True)
  (folder / "host.xplane.pb").write_bytes(ProfileData.text_proto_to_serialized_xspace(GPU_TRACE))
  text = profile_summary.summarize(str(tmp_path), steps=2, top=5)
  lines = text.splitlines()
  assert "device plane: /device:GPU:0 (of 1)" in lines
  assert "module jit_pure_step: 2 run(s), mean 5.000 ms, min 4.000 ms" in lines
  assert "XLA ops: 4.000 ms/step busy, 3 distinct ops" in lines
  assert "by HLO category: convolution 3.00 ms (75%), loop fusion 1.00 ms (25%)" in lines
  # By kind, the two fusions add up; per op, each is half a call per step.
  kinds = lines[lines.index("by op kind (instance number dropped):") + 2:][:2]
  assert [line.split() for line in kinds] == [["3.000", "75.0%", "1.0", "convolution"],
                                              ["1.000", "25.0%", "1.0", "fusion"]]
  ops = lines[lines.index("top XLA ops by device time:") + 2:][:3]
  assert ops[0].split() == ["3.000", "75.0%", "1.0", "convolution.3", "[convolution]"]
  assert sorted(line.split()[3] for line in ops[1:]) == ["fusion.12", "fusion.7"]
  assert "GPU kernels (all streams): 2.000 ms/step, 1.5 launches/step" in lines
  kernels = lines[lines.index("top kernels by device time:") + 2:]
  assert [line.split() for line in kernels] == [["1.750", "87.5%", "1.0", "sm90_xmma_gemm_bf16"],
                                                ["0.250", "12.5%", "0.5", "loop_add_fusion"]]


class _Analysis:
  argument_size_in_bytes = 10 * 2**30
  output_size_in_bytes = 9 * 2**30
  alias_size_in_bytes = 8 * 2**30
  temp_size_in_bytes = 4 * 2**30
  generated_code_size_in_bytes = 2**20


class _Compiled:
  def memory_analysis(self):
    return _Analysis()


def test_memory_check_predicts_the_peak_from_the_analysis(capsys):
  stats = memory_check.compiled_memory(_Compiled())
  assert stats == {"argument_bytes": 10 * 2**30, "output_bytes": 9 * 2**30,
                   "alias_bytes": 8 * 2**30, "temp_bytes": 4 * 2**30,
                   "generated_code_bytes": 2**20}
  before = {"bytes_in_use": 12 * 2**30, "peak_bytes_in_use": 13 * 2**30}
  after = {"bytes_in_use": 12 * 2**30, "peak_bytes_in_use": 16.5 * 2**30,
           "bytes_limit": 100 * 2**30}
  memory_check.report(stats, before, after)
  out = capsys.readouterr().out.splitlines()
  # Live before the steps (12) + outputs (9) + temporaries (4) - outputs in donated inputs (8).
  assert "memory_step_analysis_gib=15.000 (arguments + outputs + temporaries - aliased)" in out
  assert "memory_step_peak_gib=16.500 predicted=17.000 ratio=0.971" in out
  measured = "memory_measured=bytes_in_use_before_steps=12.000 GiB peak_before_steps=13.000 GiB"
  assert any(line.startswith(measured) for line in out), out


def test_memory_check_without_allocator_statistics(capsys):
  memory_check.report(None, None, None)
  assert capsys.readouterr().out.splitlines() == [
      "memory_analysis=n/a (the backend gives none)",
      "memory_measured=n/a (the device keeps no allocator statistics: a CPU)"]
