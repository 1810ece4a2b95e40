"""`bmcc.log_setup`: bmcc's messages, warnings and metric lines stay; library chatter goes.

The stderr of whole runs is bounded in tests/test_robustness.py (a diverging training run) and
tests/test_predict.py (prediction: only the error lines and one summary line).
"""

from __future__ import annotations

import logging
import os

import pytest
from absl import logging as absl_logging

import bmcc
from bmcc import log_setup

BMCC = os.path.dirname(os.path.abspath(bmcc.__file__))
SITE = "/venv/lib/python3.12/site-packages"


def _record(path: str, message: str, level: int = logging.INFO) -> logging.LogRecord:
  return logging.LogRecord("absl", level, path, 1, message, None, None)


CASES = [
    # (file that logs, message, level, shown by default, shown in --mode=predict)
    (f"{BMCC}/train.py", "Training on 1 device(s)", logging.INFO, True, False),
    (f"{BMCC}/data/loading.py", "Writing the synthetic dataset", logging.INFO, True, False),
    (f"{BMCC}/train.py", "Received SIGTERM", logging.WARNING, True, True),
    (f"{os.path.dirname(BMCC)}/main.py", "Process 0 of 2", logging.INFO, True, False),
    (f"{SITE}/clu/metric_writers/logging_writer.py", "[25] train/loss=2.99", logging.INFO, True,
     True),
    (f"{SITE}/clu/metric_writers/logging_writer.py", "[30] Got images: {...}.", logging.INFO,
     False, False),
    (f"{SITE}/clu/platform/local.py", "Setting work unit notes: 4.0 steps/s, ETA: 0m",
     logging.INFO, True, True),
    (f"{SITE}/orbax/checkpoint/_src/checkpointers/async_checkpointer.py",
     "[process=0][thread=save_finalize] Waiting for background save", logging.INFO, False, False),
    (f"{SITE}/orbax/checkpoint/checkpoint_manager.py",
     "Requested `tracked_metric`; did not provide metrics.", logging.WARNING, False, False),
    (f"{SITE}/orbax/checkpoint/checkpoint_manager.py",
     "Given directory is read only=/w/checkpoints", logging.WARNING, False, False),
    (f"{SITE}/orbax/checkpoint/checkpoint_manager.py", "Some other orbax warning",
     logging.WARNING, True, True),
    (f"{SITE}/tensorflow_datasets/core/utils/file_utils.py",
     "Variant folder /c/tfds/bone_marrow/1.0.0 has no dataset_info.json", logging.WARNING, False,
     False),
    (f"{SITE}/jax/_src/xla_bridge.py", "Unable to initialize backend 'tpu': ...", logging.INFO,
     False, False),
    (f"{SITE}/matplotlib/font_manager.py", "generated new fontManager", logging.INFO, False,
     False),
    (f"{SITE}/grain/_src/python/data_loader.py", "a grain error", logging.ERROR, True, True),
]


@pytest.mark.parametrize("path, message, level, shown, shown_in_predict", CASES,
                         ids=[c[1][:30] for c in CASES])
def test_quiet_filter(path, message, level, shown, shown_in_predict):
  record = _record(path, message, level)
  assert log_setup.QuietFilter().filter(record) is shown
  assert log_setup.QuietFilter(own_info=False).filter(record) is shown_in_predict


def test_configure_installs_the_filter_and_verbosity_1_leaves_everything(monkeypatch):
  monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
  monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
  assert log_setup.configure(1) is None
  levels = {name: logging.getLogger(name).level for name in log_setup.LIBRARY_LOGGERS}
  assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ
  handler = logging.StreamHandler()
  logging.getLogger().addHandler(handler)
  try:
    log_setup.configure(0)
    installed = log_setup.configure(0, own_info=False)  # replaces the first: one per handler
    assert [f for f in handler.filters if isinstance(f, log_setup.QuietFilter)] == [installed]
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"
    assert logging.getLogger("jax").getEffectiveLevel() == logging.WARNING
  finally:
    logging.getLogger().removeHandler(handler)
    # configure() also filtered every other root handler (pytest's caplog handler among them,
    # a session-wide object) and absl's: take the filters off, or later tests lose bmcc's INFO.
    for other in [*logging.getLogger().handlers, absl_logging.get_absl_handler()]:
      for f in [f for f in other.filters if isinstance(f, log_setup.QuietFilter)]:
        other.removeFilter(f)
    for name in log_setup.LIBRARY_LOGGERS:
      logging.getLogger(name).setLevel(levels[name])
