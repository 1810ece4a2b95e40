"""The configuration a training run saved in its workdir, for the modes that read a finished run.

`--mode=train` writes `<workdir>/config.json` (`ConfigDict.to_json_best_effort`); evaluate and
predict (and any later mode that reads a run, such as explain) use it when no `--config` is given:

  python main.py --workdir runs/demo --mode=evaluate --split=validation
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from bmcc.config_validation import ConfigError

CONFIG_FILE = "config.json"


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples the config files use (crop_scale, features, classes, ...)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The locked ConfigDict saved by the training run in `workdir`.

  Raises:
    ConfigError: `workdir` is not a folder, or holds no readable config.json; the message says to
      pass --config instead.
  """
  if not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir!r} is not a folder: give the folder of a training run "
                      "(--mode=train writes it).")
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise ConfigError(f"No --config given and {path!r} does not exist (--mode=train writes it): "
                      "pass --config configs/<name>.py.")
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"Cannot read {path!r} ({e}): pass --config configs/<name>.py.") from None
  if not isinstance(data, dict):
    raise ConfigError(f"{path!r} does not hold a JSON object: pass --config configs/<name>.py.")
  config = ml_collections.ConfigDict(_tuples(data))
  config.lock()
  return config
