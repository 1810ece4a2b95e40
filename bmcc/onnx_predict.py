"""`--mode=predict --model=FILE.onnx`: an exported model + image files or folders -> JSON lines.

  python main.py --mode=predict --model=runs/demo/export/model.onnx cell.jpg more_cells/

The same file and folder handling, JSON lines, error lines, CSV and exit status as
`bmcc.predict.predict_paths` (whose helpers it reuses), with the graph written by `--mode=export`
run through ONNX Runtime on the CPU: no workdir, no checkpoint and no JAX. The classes and the
input size come from the model's metadata; the graph takes uint8 RGB images [N, S, S, 3] (decoded
and resized to S like training, `bmcc.data.decode`) and returns the class probabilities, with the
input normalisation inside it.

Needs the optional extra: `pip install 'bmcc[export]'` (onnxruntime).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import TextIO

import numpy as np

from bmcc import predict

INSTALL_HINT = "pip install 'bmcc[export]'"


class OnnxPredictError(Exception):
  """A model file or argument that cannot be used (one line; main.py exits with status 2)."""


def load_session(model_path: str, num_threads: int | None = None):
  """(onnxruntime.InferenceSession, metadata dict) of a model written by `--mode=export`.

  Raises OnnxPredictError when onnxruntime is missing, the file cannot be loaded, or it lacks
  bmcc's metadata (a model exported elsewhere).
  """
  try:
    import onnxruntime as ort
  except ImportError:
    raise OnnxPredictError(
        f"--model={model_path}: running an ONNX model needs onnxruntime: {INSTALL_HINT}") from None
  if not os.path.isfile(model_path):
    raise OnnxPredictError(f"--model={model_path}: no such file.")
  options = ort.SessionOptions()
  if num_threads:
    options.intra_op_num_threads = num_threads
  options.log_severity_level = 3  # errors only: stderr is for the error lines
  try:
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
  except Exception as e:  # onnxruntime raises its own exception types
    raise OnnxPredictError(f"--model={model_path}: ONNX Runtime cannot load it: "
                           f"{' '.join(str(e).split())[:300]}") from None
  raw = session.get_modelmeta().custom_metadata_map
  if "bmcc" not in raw:
    raise OnnxPredictError(f"--model={model_path}: no bmcc metadata in the model; export it with "
                           "python main.py --mode=export --workdir <run>.")
  return session, json.loads(raw["bmcc"])


def dihedral_views(images: np.ndarray) -> list[np.ndarray]:
  """The 8 rotations/flips of square images [N, S, S, C], in `bmcc.steps.dihedral_average`'s
  order (rotation by k * 90 degrees, then the same with a left-right flip)."""
  views = []
  for k in range(4):
    rotated = np.rot90(images, k, axes=(1, 2))
    views += [rotated, rotated[:, :, ::-1]]
  return [np.ascontiguousarray(v) for v in views]


def predict_paths(model_path: str, paths: Sequence[str | os.PathLike], *, batch_size: int = 64,
                  top_k: int = 3, tta: bool = False, output_csv: str | None = None,
                  stdout: TextIO | None = None, stderr: TextIO | None = None,
                  num_threads: int | None = None) -> int:
  """Predicts every image named by `paths` with the ONNX model; returns the exit status.

  Arguments and output as `bmcc.predict.predict_paths`, with `model_path` (a `.onnx` file from
  `--mode=export`) instead of a workdir and checkpoint. `tta` averages the probabilities over the
  8 rotations and flips of each image, as `--tta` does with JAX.

  Returns:
    0 if every file was predicted, 1 if any failed or no image was found.

  Raises:
    OnnxPredictError: onnxruntime missing, an unusable model file, a bad argument or an
      unwritable `output_csv`.
  """
  stdout = sys.stdout if stdout is None else stdout
  stderr = sys.stderr if stderr is None else stderr
  if top_k < 1:
    raise OnnxPredictError(f"top_k={top_k} must be at least 1.")
  if batch_size < 1:
    raise OnnxPredictError(f"batch_size={batch_size} must be at least 1.")
  session, meta = load_session(model_path)
  files, failures = predict.find_images(paths, stderr)
  if not files:
    return 1
  image_size = int(meta["image_size"])
  codes = list(meta["classes"])
  input_name = session.get_inputs()[0].name
  batch = min(batch_size, len(files))

  def predict_fn(images: np.ndarray) -> np.ndarray:
    if not tta:
      return session.run(None, {input_name: images})[0]
    return sum(session.run(None, {input_name: v})[0] for v in dihedral_views(images)) / 8.0

  try:
    csv_file = None if output_csv is None else open(output_csv, "w", newline="")
  except OSError as e:
    raise OnnxPredictError(f"Cannot write --output_csv {output_csv!r}: {e.strerror or e}."
                           ) from None
  logging.info("Predicting %d file(s) with %s (%s at %d px, step %s) on ONNX Runtime (CPU), "
               "batches of %d%s.", len(files), model_path, meta.get("model"), image_size,
               meta.get("step"), batch, ", with TTA" if tta else "")
  start = time.time()
  writer = predict._Writer(codes, min(top_k, len(codes)), stdout, csv_file)
  failures += predict.decode_and_predict(files, predict_fn=predict_fn, image_size=image_size,
                                         batch_size=batch, writer=writer, stderr=stderr,
                                         num_threads=num_threads, csv_file=csv_file)
  seconds = time.time() - start
  logging.info("Predicted %d image(s), %d failed, in %.1f s (%.1f images/s).",
               writer.num_predicted, failures, seconds, writer.num_predicted / max(seconds, 1e-9))
  return 1 if failures else 0
