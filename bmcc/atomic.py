"""Atomic file writes: readers (and a run killed mid-write) see the old file or the new, never half.

The one helper every report, manifest, cache and config file of a run is written through.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO


def _umask() -> int:
  """The process's umask, read without changing it where Linux allows (other threads create files
  meanwhile: orbax's background checkpoint writes)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  umask = os.umask(0o077)  # elsewhere it can only be read by setting it: briefly the strictest
  os.umask(umask)
  return umask


def atomic_write(path: str | os.PathLike, content: bytes | str | Callable[[BinaryIO], None]
                 ) -> None:
  """Writes `content` (bytes, UTF-8 text, or a function writing to a binary file) to `path`.

  Through a temporary file in the same folder, fsync'ed and renamed over `path`. The file gets the
  permissions a plain `open(path, "w")` would give (0666 less the umask; mkstemp alone gives 0600).
  """
  path = os.fspath(path)
  folder, name = os.path.split(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      if callable(content):
        content(f)
      else:
        f.write(content.encode("utf-8") if isinstance(content, str) else content)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
