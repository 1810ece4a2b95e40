"""Test set-up: four fake CPU devices for the sharded paths, absl flags marked parsed."""

import os


def with_test_xla_flags(flags: str) -> str:
  """`flags` (an XLA_FLAGS value, possibly empty) plus the suite's: four fake CPU devices unless
  it already sets a device count, and LLVM's optimisation passes skipped unless it sets a level
  (which makes the many small CPU compilations of the suite several times faster)."""
  extra = []
  if "--xla_force_host_platform_device_count" not in flags:
    extra.append("--xla_force_host_platform_device_count=4")
  if "--xla_backend_optimization_level" not in flags:
    extra.append("--xla_backend_optimization_level=0")
  return " ".join([flags.strip(), *extra]).strip()


# Must happen before jax initialises its backend.
os.environ["XLA_FLAGS"] = with_test_xla_flags(os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

# grain's mp_prefetch reads absl flags; under pytest they were never parsed.
flags.FLAGS.mark_as_parsed()
