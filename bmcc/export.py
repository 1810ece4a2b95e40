"""`--mode=export`: a trained run's model out of JAX, as ONNX and StableHLO beside a model card.

  python main.py --mode=export --workdir runs/demo                   # both formats
  python main.py --mode=export --workdir runs/demo --format=onnx --output_dir /tmp/out

From the run's best checkpoint (the weight average when the run kept one), into
`<workdir>/export/` by default:

- `model.onnx`: uint8 RGB images [N, S, S, 3] (N dynamic, S the run's image size) -> class
  probabilities [N, C] float32; the input normalisation is inside the graph. The metadata entry
  `bmcc` holds a JSON object (`export_metadata`): class codes and names, input size,
  normalisation, bmcc version, checkpoint step, protocol and the run's test metrics. Needs the
  optional extra `pip install 'bmcc[export]'` (onnx, onnxruntime, jax2onnx; see `bmcc.onnx_graph`).
- `model.stablehlo`: `jax.export`'s serialization of the same function (symbolic batch), with
  the same metadata in `model.stablehlo.json`; `jax.export.deserialize(data).call(images)` runs
  it without bmcc.
- `model_card.md`: data, protocol, test metrics, classes, intended use and its limits, and how
  to call the ONNX model with onnxruntime.

The exported function is the one `--mode=predict` runs (`bmcc.steps.eval_step`: normalise,
model in eval mode, softmax), written as a pure function of the images with the weights closed
over as constants.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import bmcc
from bmcc import atomic, checkpointing, steps
from bmcc.config_validation import ConfigError
from bmcc.data import classes

FORMATS = ("onnx", "stablehlo")
ONNX_FILE = "model.onnx"
STABLEHLO_FILE = "model.stablehlo"
CARD_FILE = "model_card.md"
INSTALL_HINT = "pip install 'bmcc[export]'"


def load_model(workdir: str, checkpoint: str = "best") -> tuple[nnx.Module, dict, int]:
  """(model, checkpoint metadata, step) of the run in `workdir`, through
  `checkpointing.restore_run` like every other mode that reads a trained run."""
  run = checkpointing.restore_run(workdir, checkpoint=checkpoint)
  return run.model, run.metadata, run.step


def probability_fn(model: nnx.Module) -> Callable[[jax.Array], jax.Array]:
  """A pure function uint8 images [N, S, S, 3] -> probabilities [N, C] float32, `eval_step`'s
  computation with the model's weights closed over (`nnx.split`, re-merged at each call)."""
  model.eval()
  graphdef, state = nnx.split(model)
  mean = getattr(model, "input_mean", None)
  std = getattr(model, "input_std", None)

  def probabilities(images: jax.Array) -> jax.Array:
    merged = nnx.merge(graphdef, state)
    if mean is not None:
      merged.input_mean, merged.input_std = mean, std
    logits = merged(steps.normalize_input(merged, images))
    return jax.nn.softmax(logits, axis=-1)

  return probabilities


def float32_copy(model: nnx.Module) -> nnx.Module:
  """A copy of `model` (sharing its arrays) that computes in float32: every `dtype` or
  `compute_dtype` attribute of a submodule that is a 16-bit float becomes float32.

  For ONNX: ONNX Runtime's CPU kernels have no bfloat16 convolutions or matrix products, and the
  parameters are float32 anyway, so the graph computes in float32 (a little more precisely than a
  bfloat16 run's own predictions).
  """
  copy = nnx.merge(*nnx.split(model))
  copy.input_mean = getattr(model, "input_mean", None)
  copy.input_std = getattr(model, "input_std", None)
  for _, module in nnx.iter_graph(copy):
    if not isinstance(module, nnx.Module):
      continue
    for name in ("dtype", "compute_dtype"):
      value = getattr(module, name, None)
      if value is not None and jnp.dtype(value) in (jnp.bfloat16, jnp.float16):
        setattr(module, name, jnp.float32)
  return copy


def _test_report(workdir: str) -> dict | None:
  path = os.path.join(workdir, "eval_test.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _synthetic_data(workdir: str) -> bool:
  """Whether the run's config.json says it trained on bmcc's synthetic dataset (the demo)."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      return bool(json.load(f).get("data", {}).get("synthetic"))
  except (OSError, ValueError):
    return False


def export_metadata(meta: dict, step: int, workdir: str, checkpoint: str = "best") -> dict:
  """What travels with the exported model (JSON-serialisable)."""
  report = _test_report(workdir)
  metrics = None
  if report is not None:
    metrics = {k: report[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1",
                                      "num_examples") if k in report}
    metrics["split"] = "test"
    metrics["protocol"] = report.get("protocol", meta.get("protocol"))
  codes = list(meta["classes"])
  return {
      "format": "bmcc-export-1",
      "bmcc_version": bmcc.__version__,
      "model": meta["model"],
      "model_config": meta.get("model_config"),
      "classes": codes,
      "class_names": [classes.NAMES.get(c, c) for c in codes],
      "image_size": int(meta["image_size"]),
      "input": "uint8 RGB [N, S, S, 3], N any, S = image_size; resize like bmcc (bilinear)",
      "output": "float32 class probabilities [N, C] in the order of `classes`",
      "normalization": {"mean": list(meta.get("input_mean", [])),
                        "std": list(meta.get("input_std", [])),
                        "formula": "(x - mean) / std on the 0..255 scale, inside the graph"},
      "checkpoint": checkpoint,
      "step": int(step),
      "weights": "weight average (EMA)" if meta.get("ema_decay") else "model",
      "data": "synthetic (bmcc.synthetic)" if _synthetic_data(workdir) else "bone marrow",
      "protocol": meta.get("protocol"),
      "fold": meta.get("fold"),
      "num_folds": meta.get("num_folds"),
      "pretrained": meta.get("pretrained"),
      "test_metrics": metrics,
      "exported": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  }


def input_spec(image_size: int, batch: int | str = "N") -> jax.ShapeDtypeStruct:
  """The uint8 image batch; a string `batch` is a symbolic (dynamic) dimension."""
  if isinstance(batch, str):
    (batch,) = jax.export.symbolic_shape(batch)
  return jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8)


def export_stablehlo(fn: Callable[[jax.Array], jax.Array], image_size: int, path: str,
                     metadata: dict) -> None:
  """Writes `jax.export`'s serialization of `fn` (dynamic batch) to `path`, metadata beside it."""
  exported = jax.export.export(jax.jit(fn))(input_spec(image_size))
  atomic.atomic_write(path, bytes(exported.serialize()))
  atomic.atomic_write(path + ".json", json.dumps(metadata, indent=2) + "\n")


def load_stablehlo(path: str) -> jax.export.Exported:
  """The exported function of a `model.stablehlo` file; `.call(images)` runs it."""
  with open(path, "rb") as f:
    return jax.export.deserialize(bytearray(f.read()))


def export_onnx(fn: Callable[[jax.Array], jax.Array], image_size: int, path: str,
                metadata: dict) -> None:
  """Writes `fn` as an ONNX graph (dynamic batch) with `metadata` under the key `bmcc`.

  Raises ConfigError (one line) when the export extra is missing or an operation has no ONNX
  conversion.
  """
  from bmcc import onnx_graph  # needs the export extra

  model = onnx_graph.convert(fn, input_spec(image_size, 1), name="bmcc")
  onnx_graph.set_metadata(model, {"bmcc": json.dumps(metadata)})
  atomic.atomic_write(path, model.SerializeToString())


def _fmt(value: Any) -> str:
  return f"{value:.3f}" if isinstance(value, float) else str(value)


def model_card(metadata: dict) -> str:
  """The model card (Markdown) of an exported model."""
  m = metadata
  metrics = m["test_metrics"]
  if metrics:
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in metrics.items()
                     if k not in ("split", "protocol"))
    metrics_text = (f"On the run's held-out **test split** (protocol: {metrics['protocol']}), "
                    f"from `eval_test.json`:\n\n| metric | value |\n|---|---|\n{rows}")
  else:
    metrics_text = ("No test report (`eval_test.json`) was found in the workdir: this model has "
                    "not been evaluated on a held-out test split.")
  class_rows = "\n".join(f"| {i} | {c} | {n} |" for i, (c, n) in
                         enumerate(zip(m["classes"], m["class_names"], strict=True)))
  mean, std = m["normalization"]["mean"], m["normalization"]["std"]
  size = m["image_size"]
  fold = "" if m["fold"] is None else f" (fold {m['fold']} of {m['num_folds']})"
  if m["data"].startswith("synthetic"):
    data = ("bmcc's **synthetic** demo dataset (drawn cells in the real on-disk layout): this "
            "model has never seen a real cell and is for trying the tools only.")
  else:
    data = ("single-cell bone-marrow smear images in the layout of Matek et al. (Blood 2021; "
            "250 x 250 px crops, May-Grünwald-Giemsa stain).")
  return f"""# Model card: bmcc {m['model']} ({len(m['classes'])} bone-marrow cell classes)

Exported by bmcc {m['bmcc_version']} on {m['exported']} from the {m['checkpoint']} checkpoint
(step {m['step']}, {m['weights']} weights) of a run on protocol `{m['protocol']}`.

## Data and protocol

Trained on {data} Split: bmcc's `{m['protocol']}` protocol{fold}. The split is by **image**, not
by patient: images of one patient can be in training and test.

## Test metrics

{metrics_text}

## Classes

| index | code | name |
|---|---|---|
{class_rows}

## Input and output

- Input `images`: uint8 RGB, shape [N, {size}, {size}, 3], any N. Resize each cell image to
  {size} x {size} px (bmcc decodes with PIL and resizes bilinearly; `python main.py --mode=predict
  --model=model.onnx ...` does it for you).
- Normalisation is inside the graph: (x - mean) / std with mean {mean} and std {std} (0..255).
- Output: float32 probabilities [N, {len(m['classes'])}] in the class order above.

## Intended use and limits

Research use only: not a medical device, not validated for diagnosis. The test metrics come from
an image-level split of one data set; there has been no patient-level or multi-centre validation,
and images from other scanners, stains or magnifications may be classified worse without warning.
The rare classes have few examples: read their per-class recall in the run's report before
trusting them.

## Calling the model in Python

```python
import json
import numpy as np
import onnxruntime as ort
from PIL import Image

session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
meta = json.loads(session.get_modelmeta().custom_metadata_map["bmcc"])
image = Image.open("cell.jpg").convert("RGB").resize(({size}, {size}), Image.BILINEAR)
probs = session.run(None, {{"images": np.asarray(image, np.uint8)[None]}})[0][0]
print(meta["classes"][int(probs.argmax())], float(probs.max()))
```

`model.stablehlo` holds the same function for JAX: `jax.export.deserialize(open("model.stablehlo",
"rb").read()).call(images)`.
"""


def export_workdir(workdir: str, *, formats: tuple[str, ...] = FORMATS,
                   output_dir: str | None = None, checkpoint: str = "best") -> dict[str, str]:
  """Exports the run in `workdir` in `formats` into `output_dir` (default `<workdir>/export`).

  Returns {format or 'card': path written}. Raises ConfigError for an unknown format, a missing
  checkpoint or export extra, or an operation the ONNX conversion does not support.
  """
  unknown = [f for f in formats if f not in FORMATS]
  if unknown or not formats:
    raise ConfigError(f"--format={','.join(formats)}: use onnx, stablehlo or both.")
  if "onnx" in formats:
    from bmcc import onnx_graph  # fail before restoring anything when the extra is missing

    onnx_graph.check_available()
  output_dir = output_dir or os.path.join(workdir, "export")
  model, meta, step = load_model(workdir, checkpoint)
  metadata = export_metadata(meta, step, workdir, checkpoint)
  os.makedirs(output_dir, exist_ok=True)
  written = {}
  if "onnx" in formats:
    written["onnx"] = os.path.join(output_dir, ONNX_FILE)
    export_onnx(probability_fn(float32_copy(model)), metadata["image_size"], written["onnx"],
                {**metadata, "compute_dtype": "float32"})
  if "stablehlo" in formats:
    written["stablehlo"] = os.path.join(output_dir, STABLEHLO_FILE)
    export_stablehlo(probability_fn(model), metadata["image_size"], written["stablehlo"],
                     {**metadata, "compute_dtype": str((meta.get("model_config") or {}).get(
                         "dtype", "float32"))})
  written["card"] = os.path.join(output_dir, CARD_FILE)
  atomic.atomic_write(written["card"], model_card(metadata))
  for what, path in written.items():
    logging.info("Exported %s: %s", what, path)
  return written


def reference_probabilities(fn: Callable[[jax.Array], jax.Array], images: np.ndarray
                            ) -> np.ndarray:
  """`fn` on `images` under jit, as numpy: what the exported files must reproduce."""
  return np.asarray(jax.jit(fn)(images))
