"""Test set-up: four fake CPU devices for the sharded paths, absl flags marked parsed."""

import os

# Must happen before jax initialises its backend. Four fake CPU devices; LLVM's optimisation
# passes skipped, which makes the many small CPU compilations of the suite several times faster.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

# grain's mp_prefetch reads absl flags; under pytest they were never parsed.
flags.FLAGS.mark_as_parsed()
