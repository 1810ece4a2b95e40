"""`--mode=predict`: a checkpoint + image files or folders -> one JSON line per image.

  python main.py --mode=predict --config configs/demo.py --workdir runs/demo cell.jpg more_cells/

The model, its classes and its input size come from the metadata saved with the checkpoint (the
`--config` only supplies `eval_batch_size`). For every image, in the order given (folders walked
recursively in sorted order), stdout gets one JSON object:

  {"path": "cell.jpg", "code": "BLA", "name": "Blast", "probability": 0.93,
   "top_k": [{"code": "BLA", "name": "Blast", "probability": 0.93}, ...]}

plus a `"warning"` when the image is far from the training geometry (250 x 250 px cells: a side
outside 125..500 px, or not square within 10%); it is still predicted. A file that cannot be used
(missing, unreadable, not an image, truncated, a decompression bomb) gets one line
`error: <path>: <reason>` on stderr and the other files are still predicted; the exit status is 1
if any file failed or no image was found, else 0.

Decoding is training's (`bmcc.data.decode`: libjpeg DCT scaling, any PIL mode to RGB, a bilinear
resize to the model's size). Images are decoded by a thread pool (PIL releases the GIL)
while the device runs the previous batch; batches are padded to one fixed size, so there is one
compilation per run. With `tta=True` the probabilities are averaged over the 8 rotations and flips
of each image (`dihedral_average`), the symmetries the training augmentation samples from.

Prediction runs in one process, over the mesh of its local devices. JAX and the checkpoint code are
imported inside `predict_paths` only: the file handling here also serves `bmcc.onnx_predict`,
which runs without JAX.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from bmcc.data import classes
from bmcc.data.decode import read_image
from bmcc.parallel import ordered_map

# File name endings picked up when walking a folder (case-insensitive). Files named explicitly are
# always tried, whatever their name.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
# The geometry of the training images (Matek et al.: 250 x 250 px single-cell crops) and how far an
# image may stray from it before its prediction carries a warning.
NATIVE_SIZE = 250
MIN_SCALE, MAX_SCALE = 0.5, 2.0
MAX_ASPECT = 1.1


# ------------------------------------------------------------------------------------------------
# Finding and reading images.


def collect_images(paths: Sequence[str | os.PathLike]) -> list[str]:
  """The image files named by `paths`, in order.

  A file is taken as given, whatever its name. A folder is walked recursively in sorted order
  (files of a folder before its subfolders), picking files whose names end in one of
  `IMAGE_EXTENSIONS` (any case); hidden files and folders (names starting with '.', such as macOS
  `._x.jpg` resource forks) are skipped. A path that does not exist is kept as it is, so that
  reading it fails and reports it in its place.
  """
  found = []
  for path in paths:
    path = os.fspath(path)
    if not os.path.isdir(path):
      found.append(path)
      continue
    for root, dirs, files in os.walk(path):
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      found.extend(os.path.join(root, name) for name in sorted(files)
                   if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS))
  return found


def find_images(paths: Sequence[str | os.PathLike], stderr: TextIO) -> tuple[list[str], int]:
  """(`collect_images(paths)`, failures): an error line on `stderr` for each folder without
  images, and one more if nothing at all was found (the caller then exits 1)."""
  files, failures = [], 0
  for path in paths:
    found = collect_images([path])
    if not found:
      failures += 1
      print(f"error: {os.fspath(path)}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this "
            "folder", file=stderr, flush=True)
    files.extend(found)
  if not files:
    print("error: no image files found in the given paths" if paths else
          "error: no image files or folders given", file=stderr, flush=True)
  return files, failures


def geometry_warning(width: int, height: int) -> str | None:
  """Why an image of this size is far from the training images, or None if it is not."""
  low, high = NATIVE_SIZE * MIN_SCALE, NATIVE_SIZE * MAX_SCALE
  problems = []
  if not (low <= width <= high and low <= height <= high):
    problems.append(f"a side outside {low:g}..{high:g} px")
  if max(width, height) > MAX_ASPECT * min(width, height):
    problems.append(f"not square within {MAX_ASPECT - 1:.0%}")
  if not problems:
    return None
  return (f"image is {width}x{height} px ({' and '.join(problems)}); the model was trained on "
          f"{NATIVE_SIZE}x{NATIVE_SIZE} px single-cell crops, so this prediction may be unreliable")


def _one_line(text: str) -> str:
  return " ".join(text.split())


def error_reason(error: BaseException) -> str:
  """A one-line reason for a file that could not be read."""
  if isinstance(error, Image.DecompressionBombError | Image.DecompressionBombWarning):
    return _one_line(f"refused as a possible decompression bomb: {error}")
  if isinstance(error, UnidentifiedImageError):
    return "not an image (PIL cannot identify the file format)"
  if isinstance(error, OSError) and error.strerror:
    return _one_line(error.strerror)  # No such file or directory, Permission denied, ...
  return _one_line(f"cannot decode: {error or type(error).__name__} ({type(error).__name__})")


@dataclasses.dataclass
class _Item:
  """One input file after decoding: either `image` and `size` or `error`."""

  path: str
  image: np.ndarray | None = None
  size: tuple[int, int] | None = None
  error: str | None = None


def _load(path: str, size: int) -> _Item:
  try:
    if os.path.getsize(path) == 0:  # worded as the dataset preparation reports it
      return _Item(path, error="empty file (0 bytes)")
    image, original = read_image(path, size)
  except Exception as e:  # One bad file must never stop the others.
    return _Item(path, error=error_reason(e))
  return _Item(path, image=image, size=original)


class _Writer:
  """Writes the results of the items, in order, to stdout, stderr and the optional CSV."""

  CSV_FIELDS = ("path", "code", "name", "probability", "top_k_codes", "top_k_probabilities",
                "warning", "error")

  def __init__(self, codes: Sequence[str], top_k: int, stdout: TextIO, csv_file: TextIO | None):
    self.codes = list(codes)
    self.names = [classes.NAMES[c] for c in self.codes]
    self.top_k = top_k
    self.stdout = stdout
    self.csv = None
    if csv_file is not None:
      self.csv = csv.DictWriter(csv_file, self.CSV_FIELDS, lineterminator="\n")
      self.csv.writeheader()
    self.num_predicted = 0

  def error(self, item: _Item) -> None:
    if self.csv is not None:
      self.csv.writerow({"path": item.path, "error": item.error})

  def prediction(self, item: _Item, probs: np.ndarray) -> None:
    order = np.argsort(-probs, kind="stable")[:self.top_k]
    top = [{"code": self.codes[i], "name": self.names[i], "probability": round(float(probs[i]), 6)}
           for i in order]
    record = {"path": item.path, **top[0], "top_k": top}
    warning = geometry_warning(*item.size)
    if warning:
      record["warning"] = warning
    self.stdout.write(json.dumps(record) + "\n")
    self.num_predicted += 1
    if self.csv is not None:
      self.csv.writerow({
          "path": item.path, "code": top[0]["code"], "name": top[0]["name"],
          "probability": top[0]["probability"],
          "top_k_codes": " ".join(t["code"] for t in top),
          "top_k_probabilities": " ".join(f"{t['probability']:.6f}" for t in top),
          "warning": warning or "",
      })


def _run_batches(items: Iterator[_Item], *, predict_fn: Callable[[np.ndarray], Any],
                 batch_size: int, image_size: int, writer: _Writer, stderr: TextIO) -> int:
  """Feeds the decoded items through the model; returns the number of failed files.

  Errors are reported as soon as they are met; predictions are written in input order (errors
  keep their place in the CSV). Batch i+1 is dispatched before batch i's results are fetched, so
  the device works while the host decodes and writes.
  """
  failures = 0
  entries: list[_Item] = []
  images: list[np.ndarray] = []
  in_flight: tuple[list[_Item], Any] | None = None

  def dispatch() -> Any:
    if not images:
      return None
    batch = np.zeros((batch_size, image_size, image_size, 3), np.uint8)
    batch[:len(images)] = np.stack(images)
    return predict_fn(batch)

  def finish(done: tuple[list[_Item], Any]) -> None:
    done_entries, probs = done
    probs = None if probs is None else np.asarray(probs)
    row = 0
    for entry in done_entries:
      if entry.error is None:
        writer.prediction(entry, probs[row])
        row += 1
      else:
        writer.error(entry)
    writer.stdout.flush()

  for item in items:
    entries.append(item)
    if item.error is not None:
      failures += 1
      print(f"error: {item.path}: {item.error}", file=stderr, flush=True)
      continue
    images.append(item.image)
    if len(images) == batch_size:
      current = (entries, dispatch())
      if in_flight is not None:
        finish(in_flight)
      in_flight, entries, images = current, [], []
  current = (entries, dispatch())
  if in_flight is not None:
    finish(in_flight)
  finish(current)
  return failures


def predict_paths(workdir: str, paths: Sequence[str | os.PathLike], *, checkpoint: str = "best",
                  batch_size: int = 64, top_k: int = 3, tta: bool = False,
                  output_csv: str | None = None, stdout: TextIO | None = None,
                  stderr: TextIO | None = None, num_threads: int | None = None) -> int:
  """Predicts every image named by `paths` with a checkpoint of `workdir`; returns the exit status.

  Args:
    workdir: the training run's folder (its `checkpoints/` are read).
    paths: image files and folders (see `collect_images`).
    checkpoint: 'best' (by validation balanced accuracy) or 'latest'.
    batch_size: images per batch over all local devices (rounded up to a multiple of their count;
      never more than the number of files, rounded up likewise). Every batch is padded to it.
    top_k: how many classes `top_k` lists, most probable first (at most the number of classes).
    tta: average the probabilities over the 8 rotations and flips of each image.
    output_csv: also write one CSV row per file here (errors included, in their own column).
    stdout, stderr: where the JSON lines and the error lines go (default: sys.stdout/stderr).
    num_threads: decoding threads (default: the CPU count).

  Returns:
    0 if every file was predicted, 1 if any failed or no image was found.

  Raises:
    ConfigError: no checkpoint in `workdir`, a bad argument, or an unwritable `output_csv`.
  """
  import jax
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from bmcc import checkpointing, config_validation, steps

  stdout = sys.stdout if stdout is None else stdout
  stderr = sys.stderr if stderr is None else stderr
  if checkpoint not in ("best", "latest"):
    raise config_validation.ConfigError(f"checkpoint={checkpoint!r}: use best or latest.")
  if top_k < 1:
    raise config_validation.ConfigError(f"top_k={top_k} must be at least 1.")
  if batch_size < 1:
    raise config_validation.ConfigError(f"batch_size={batch_size} must be at least 1.")

  files, failures = find_images(paths, stderr)
  if not files:
    return 1

  run = checkpointing.restore_run(workdir, checkpoint=checkpoint)
  model, meta, step = run.model, run.metadata, run.step
  model.eval()  # before the jitted step: the mode is part of its static structure
  image_size = int(meta["image_size"])
  codes = list(meta["classes"])
  mesh = steps.create_mesh(jax.local_devices())
  batch = min(batch_size, len(files))
  batch = -(-batch // mesh.size) * mesh.size
  nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(mesh, P())))
  data_sharding = NamedSharding(mesh, P("data"))
  step_fn = steps.dihedral_average if tta else steps.eval_step

  def predict_fn(images: np.ndarray) -> jax.Array:
    return step_fn(model, jax.device_put(images, data_sharding))

  try:
    csv_file = None if output_csv is None else open(output_csv, "w", newline="")
  except OSError as e:
    raise config_validation.ConfigError(
        f"Cannot write --output_csv {output_csv!r}: {e.strerror or e}.") from None
  logging.info("Predicting %d file(s) with the %s checkpoint (step %d) of %s: %s at %d px, "
               "batches of %d on %d device(s)%s.", len(files), checkpoint, step, workdir,
               meta["model"], image_size, batch, mesh.size, ", with TTA" if tta else "")
  start = time.time()
  writer = _Writer(codes, min(top_k, len(codes)), stdout, csv_file)
  failures += decode_and_predict(files, predict_fn=predict_fn, image_size=image_size,
                                 batch_size=batch, writer=writer, stderr=stderr,
                                 num_threads=num_threads, csv_file=csv_file,
                                 context=jax.set_mesh(mesh))
  seconds = time.time() - start
  logging.info("Predicted %d image(s), %d failed, in %.1f s (%.1f images/s).",
               writer.num_predicted, failures, seconds, writer.num_predicted / max(seconds, 1e-9))
  return 1 if failures else 0


def decode_and_predict(files: list[str], *, predict_fn, image_size: int, batch_size: int,
                       writer: _Writer, stderr, num_threads: int | None, csv_file=None,
                       context: contextlib.AbstractContextManager | None = None) -> int:
  """Decodes `files` in threads and predicts them in batches; the number of files that failed.

  Shared by the JAX predict and ONNX Runtime's (`bmcc.onnx_predict`). Global PIL/warnings state
  is set for the duration of the run (the decoding threads see it): truncated files must fail
  (some libraries switch this on), and PIL's decompression-bomb *warning* (between 1x and 2x the
  pixel limit) counts as a failure like its error. `csv_file` is closed at the end.
  """
  threads = num_threads or os.cpu_count() or 1
  truncated_setting = ImageFile.LOAD_TRUNCATED_IMAGES
  try:
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with warnings.catch_warnings(), context or contextlib.nullcontext():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      items = ordered_map(functools.partial(_load, size=image_size), files, num_threads=threads,
                          window=2 * batch_size + threads, thread_name_prefix="bmcc-decode")
      return _run_batches(items, predict_fn=predict_fn, batch_size=batch_size,
                          image_size=image_size, writer=writer, stderr=stderr)
  finally:
    ImageFile.LOAD_TRUNCATED_IMAGES = truncated_setting
    if csv_file is not None:
      csv_file.close()
