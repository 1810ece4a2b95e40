"""The suite's set-up (tests/conftest.py): a preset XLA_FLAGS keeps the four fake devices."""

import pytest

from tests.conftest import with_test_xla_flags

DEVICES = "--xla_force_host_platform_device_count"
FAST = "--xla_backend_optimization_level"


@pytest.mark.parametrize("preset, expected", [
    ("", f"{DEVICES}=4 {FAST}=0"),
    ("  ", f"{DEVICES}=4 {FAST}=0"),
    ("--xla_dump_to=/tmp/x", f"--xla_dump_to=/tmp/x {DEVICES}=4 {FAST}=0"),
    (f"{DEVICES}=8", f"{DEVICES}=8 {FAST}=0"),  # an explicit device count wins
    (f"{FAST}=2 {DEVICES}=2", f"{FAST}=2 {DEVICES}=2"),
])
def test_preset_xla_flags_are_kept_and_completed(preset, expected):
  assert with_test_xla_flags(preset) == expected
