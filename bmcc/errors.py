"""The error for a configuration that cannot run, below every module that raises it.

`bmcc.config_validation` (which checks configs) and `bmcc.steps` (which resolves durations) both
raise it; it lives here so that neither imports the other for it. `from bmcc.config_validation
import ConfigError` still works (re-exported).
"""

from __future__ import annotations


class ConfigError(ValueError):
  """A configuration that cannot run, with what to change in its message."""
