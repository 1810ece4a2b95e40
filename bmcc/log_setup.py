"""Quiet, useful logs: what `main.py` prints by default, and what `--verbosity=1` adds.

Default (`--verbosity=0`): bmcc's own messages (progress, metrics, reports), clu's metric and
progress lines, and every warning and error, except the few library messages listed in `HARMLESS`,
which look alarming but are expected here. Library INFO messages (orbax writes dozens per
checkpoint; TFDS, grain, JAX's backend probing, matplotlib, ...) and the INFO logs of the
TensorFlow/XLA C++ runtimes are dropped. `--mode=predict` keeps stderr for its `error:` lines and
one summary line, so there bmcc's own INFO messages are dropped as well.

`--verbosity=1` (or more) shows everything, as before this module existed.

Most libraries log through absl (`from absl import logging`), so their records reach the same
handler as bmcc's under the logger name "absl"; the filter tells them apart by the file that made
the record (absl records the real caller), not by logger name.
"""

from __future__ import annotations

import logging
import os
import warnings

import bmcc

# Substrings of library messages that are expected in a bmcc run, dropped at verbosity 0.
HARMLESS = (
    # orbax checkpoint_manager.py (WARNING) at every checkpoint between evaluations: bmcc keeps
    # the best checkpoint by validation metrics, which only the evaluation steps have.
    "Requested `tracked_metric`; did not provide metrics",
    # tensorflow_datasets core/utils/file_utils.py (WARNING): probing the dataset folder before
    # the dataset is prepared (the first run, or --mode=prepare).
    "has no dataset_info.json",
    # jax _src/xla_bridge.py (INFO): probing for TPU and IFRT-proxy plugins that are not there.
    "Unable to initialize backend",
    # orbax checkpoint_manager.py (WARNING): evaluate and predict open checkpoints read-only on
    # purpose.
    "Given directory is read only",
    "CheckpointManagerOptions.read_only=True",
)
# Python `warnings` (not logging) dropped at verbosity 0: a regex matched at the message start.
HARMLESS_WARNINGS = (
    # orbax serialization/jax_array_handlers.py (UserWarning) when a checkpoint is restored
    # without a sharding for some arrays: they are placed as saved, which bmcc then replicates.
    "Sharding info not provided when restoring",
)
# Loggers of libraries that log through the standard `logging` module under their own names.
LIBRARY_LOGGERS = ("jax", "jaxlib", "orbax", "grain", "tensorflow", "tensorflow_datasets", "clu",
                   "matplotlib", "PIL", "absl.flags")

_BMCC_DIR = os.path.dirname(os.path.abspath(bmcc.__file__))
_MAIN = os.path.join(os.path.dirname(_BMCC_DIR), "main.py")
_CLU_SHOWN = (os.path.join("clu", "metric_writers", "logging_writer.py"),
              os.path.join("clu", "platform", "local.py"))


class QuietFilter(logging.Filter):
  """Keeps bmcc's messages, warnings and clu's metric lines; drops library INFO and `HARMLESS`."""

  def __init__(self, own_info: bool = True):
    super().__init__("bmcc-quiet")
    self.own_info = own_info  # False: bmcc's INFO messages are dropped too (--mode=predict)

  def filter(self, record: logging.LogRecord) -> bool:
    try:
      message = record.getMessage()
    except Exception:  # a malformed record is the handler's business, not ours
      return True
    if any(text in message for text in HARMLESS):
      return False
    if record.levelno >= logging.WARNING:
      return True
    path = os.path.abspath(record.pathname or "")
    if path.startswith(_BMCC_DIR + os.sep) or path == _MAIN:
      return self.own_info
    # clu's logging writer: the metric lines ("[100] train/loss=...") and the hyper-parameters,
    # not its "Got images" notes; clu's local work unit: the progress line (steps/s, ETA).
    if path.endswith(_CLU_SHOWN[0]):
      return " Got " not in message
    return path.endswith(_CLU_SHOWN[1]) and "work unit notes" in message


def configure(verbosity: int, *, own_info: bool = True) -> QuietFilter | None:
  """Sets up the logs for a main.py run; call it before TensorFlow or JAX is imported.

  Args:
    verbosity: absl's --verbosity; 1 or more shows everything (nothing is filtered).
    own_info: whether bmcc's own INFO messages are shown at verbosity 0.

  Returns:
    The filter installed on the root logger's handlers, or None at verbosity >= 1.
  """
  if verbosity >= 1:
    return None
  # TensorFlow's and XLA's C++ logs: warnings and errors only (an explicit setting wins).
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  # TensorFlow 2.21 prints "oneDNN custom operations are on ..." twice at import whatever the
  # level above. bmcc does no arithmetic in TensorFlow (TFDS reads and writes records, clu writes
  # TensorBoard summaries; the model is JAX), so its oneDNN kernels are not needed.
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  for name in LIBRARY_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)
  for pattern in HARMLESS_WARNINGS:
    warnings.filterwarnings("ignore", message=pattern)
  quiet = QuietFilter(own_info)
  handlers = list(logging.getLogger().handlers)
  try:
    from absl import logging as absl_logging  # noqa: PLC0415
    handlers.append(absl_logging.get_absl_handler())
  except ImportError:
    pass
  for handler in handlers:
    for old in [f for f in handler.filters if isinstance(f, QuietFilter)]:
      handler.removeFilter(old)
    handler.addFilter(quiet)
  return quiet


def quiet_dataset_preparation() -> None:
  """Drops TFDS's two prints to stdout when it prepares a dataset (verbosity 0 only).

  `DatasetBuilder.download_and_prepare` prints "Downloading and preparing dataset Unknown size
  ..." and "Dataset ... downloaded and prepared to ...": nothing is downloaded (bmcc prepares a
  local folder or zip, and logs that itself with the number of images). Imports TFDS: call it only
  in modes that load the dataset anyway.
  """
  from tensorflow_datasets.core import dataset_builder  # noqa: PLC0415

  for name in ("_log_download_bytes", "_log_download_done"):
    if hasattr(dataset_builder.DatasetBuilder, name):
      setattr(dataset_builder.DatasetBuilder, name, lambda self: None)
