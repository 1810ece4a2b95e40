"""`--mode=explain`: attribution maps of a checkpoint's predictions, as pictures and arrays.

  python main.py --mode=explain --config configs/demo.py --workdir workdirs/demo cell.jpg cells/
  python main.py --mode=explain --config configs/demo.py --workdir workdirs/demo \\
      --method=integrated_gradients:baseline=blurred,smoothgrad --target=BLA cells/
  python main.py --mode=explain --config configs/demo.py --workdir workdirs/demo \\
      --split=test --num_examples=24

Model, classes, input size and (with `--split`) the protocol and fold come from the checkpoint
(`bmcc.checkpointing.restore_run`, as for evaluate and predict), and files are found, decoded and
reported exactly as by `--mode=predict` (`bmcc.predict`: folders walked in sorted order, any PIL
mode and size, one `error: <path>: <reason>` line on stderr per unusable file, exit status 1 if
any failed). Into `--output_dir` (default `<workdir>/explain/<date-time>/`) go, per image,
`<nnnn>_<name>.png` (the cell and one captioned overlay per method) and
`<nnnn>_<name>.<method>.npy` (the raw map, float32 at the model's input size), plus
`contact_sheet.png` (the first `contact_sheet_rows` images) and `index.jsonl`; stdout gets the
same JSON line per image. With `--split`, examples of a prepared split are chosen (the commonest
confusions of the confusion matrix first, then round-robin over the true classes) and the panels
and the contact sheet also go to TensorBoard (events in the output folder, under the workdir).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import TextIO

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image, ImageFile

from bmcc import checkpointing, config_validation, predict, steps
from bmcc.data import classes
from bmcc.data.decode import read_image
from bmcc.explain import methods as methods_lib
from bmcc.explain import render
from bmcc.parallel import ordered_map

_CODE_IN_NAME = re.compile(r"^([A-Z]{3})_")  # the dataset's file names: BLA_00001.jpg


@dataclasses.dataclass
class Example:
  """One image to explain: the model's input, a picture of it, and what is known about it."""

  name: str  # file-name stem of the outputs
  path: str  # the input file, or '<split>[<index>]'
  image: np.ndarray  # uint8 [S, S, 3] at the model's size
  display: np.ndarray  # uint8, any square size, for the pictures
  true_code: str | None = None
  note: str | None = None  # why it was chosen (split mode) or a geometry warning


class Explainer:
  """A restored model on the local mesh, the methods, and the output folder."""

  def __init__(self, workdir: str, *, checkpoint: str,
               methods: Sequence[methods_lib.Method] | None, target: str | None,
               out_dir: str | None, batch_size: int, stderr: TextIO, display_size: int = 192,
               contact_sheet_rows: int = 48, config: ml_collections.ConfigDict | None = None):
    if checkpoint not in ("best", "latest"):
      raise config_validation.ConfigError(f"checkpoint={checkpoint!r}: use best or latest.")
    if batch_size < 1:
      raise config_validation.ConfigError(f"batch_size={batch_size} must be at least 1.")
    run = checkpointing.restore_run(workdir, config, checkpoint=checkpoint)
    self.model, self.meta, self.step = run.model, run.metadata, run.step
    self.config = run.config  # the given config with the run's protocol, fold, classes, size
    self.codes = list(self.meta["classes"])
    self.image_size = int(self.meta["image_size"])
    if target is not None and target not in self.codes:
      raise config_validation.ConfigError(
          f"--target={target!r} is not a class of this model: {', '.join(self.codes)}.")
    self.target = -1 if target is None else self.codes.index(target)
    if methods is None:
      methods = _parse_methods(methods_lib.default_methods(self.model))
    for method in methods:
      if method.name == "occlusion":
        try:
          methods_lib.occlusion_geometry(method, self.image_size)
        except ValueError as e:
          raise config_validation.ConfigError(f"--method: {e}") from None
    self.methods = []
    for method in methods:
      reason = methods_lib.unsupported_reason(self.model, method)
      if reason:
        print(f"warning: {method.name} skipped: {reason}", file=stderr, flush=True)
      else:
        self.methods.append(method)
    if not self.methods:
      raise config_validation.ConfigError(
          f"None of the methods applies to {self.meta['model']}.")
    self.mesh = steps.create_mesh(jax.local_devices())
    self.batch_size = -(-batch_size // self.mesh.size) * self.mesh.size
    nnx.update(self.model, jax.device_put(nnx.state(self.model), NamedSharding(self.mesh, P())))
    if out_dir is None:
      out_dir = os.path.join(workdir, "explain", time.strftime("%Y%m%d-%H%M%S"))
      base, n = out_dir, 1
      while os.path.exists(out_dir):
        out_dir, n = f"{base}-{n}", n + 1
    self.out_dir = out_dir
    os.makedirs(out_dir, exist_ok=True)
    self.display_size = display_size
    self.contact_sheet_rows = contact_sheet_rows
    self.thumbnails: list[Image.Image] = []
    self.panels: list[np.ndarray] = []  # full-size panels, kept for TensorBoard (split mode)
    self.keep_panels = False
    self.num_explained = 0

  def explain(self, batch: list[Example]) -> list[jax.Array]:
    """Dispatches one batch (at most `batch_size` examples) to every method; returns results."""
    images = np.zeros((self.batch_size, self.image_size, self.image_size, 3), np.uint8)
    images[:len(batch)] = np.stack([e.image for e in batch])
    sharding = NamedSharding(self.mesh, P("data"))
    images = jax.device_put(images, sharding)
    targets = jax.device_put(np.full(self.batch_size, self.target, np.int32), sharding)
    with jax.set_mesh(self.mesh):
      return [methods_lib.explain_batch(self.model, images, targets, method=m)
              for m in self.methods]

  def write(self, batch: list[Example], results: list, stdout: TextIO, index: TextIO) -> None:
    """The pictures, maps and JSON lines of one explained batch."""
    results = jax.device_get(results)
    probs, targets = results[0][1], results[0][2]
    for row, example in enumerate(batch):
      predicted = int(np.argmax(probs[row]))
      target = int(targets[row])
      maps = {m.name: np.asarray(r[0][row]) for m, r in zip(self.methods, results, strict=True)}
      files = {}
      for name, attribution in maps.items():
        files[name] = os.path.join(self.out_dir, f"{example.name}.{name}.npy")
        np.save(files[name], attribution)
      args = dict(true_code=example.true_code, predicted=self.codes[predicted],
                  probability=float(probs[row, predicted]), target=self.codes[target])
      titled = [(m.title, maps[m.name]) for m in self.methods]
      picture = render.panel(example.display, titled, **args, tile=self.display_size)
      png = os.path.join(self.out_dir, f"{example.name}.png")
      picture.save(png)
      if self.keep_panels:
        self.panels.append(np.asarray(picture))
      if len(self.thumbnails) < self.contact_sheet_rows:
        self.thumbnails.append(render.panel(example.display, titled, **args, tile=112))
      record = {
          "path": example.path, "code": self.codes[predicted],
          "name": classes.NAMES[self.codes[predicted]],
          "probability": round(float(probs[row, predicted]), 6),
          "target": self.codes[target],
          "target_probability": round(float(probs[row, target]), 6),
          "true": example.true_code, "picture": png, "maps": files}
      if example.note:
        record["note"] = example.note
      line = json.dumps(record)
      stdout.write(line + "\n")
      index.write(line + "\n")
      self.num_explained += 1
    stdout.flush()

  def run(self, examples: Iterable[Example | predict._Item], stdout: TextIO,
          stderr: TextIO) -> int:
    """Explains the examples in batches (unreadable files reported); returns the failures."""
    failures = 0
    batch: list[Example] = []
    with open(os.path.join(self.out_dir, "index.jsonl"), "w") as index:
      for example in examples:
        if isinstance(example, predict._Item):  # a file that could not be read
          failures += 1
          print(f"error: {example.path}: {example.error}", file=stderr, flush=True)
          continue
        batch.append(example)
        if len(batch) == self.batch_size:
          self.write(batch, self.explain(batch), stdout, index)
          batch = []
      if batch:
        self.write(batch, self.explain(batch), stdout, index)
    return failures

  def contact_sheet(self, title: str) -> Image.Image | None:
    if not self.thumbnails:
      return None
    sheet = render.contact_sheet(
        self.thumbnails, title, omitted=self.num_explained - len(self.thumbnails))
    sheet.save(os.path.join(self.out_dir, "contact_sheet.png"))
    return sheet

  def title(self, what: str) -> str:
    return (f"{what}: {self.meta['model']} at {self.image_size} px, step {self.step}; "
            f"{'; '.join(m.describe() for m in self.methods)}")


def _safe_stem(path: str) -> str:
  stem = os.path.splitext(os.path.basename(path))[0]
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:80] or "image"


def _load_example(numbered: tuple[int, str], size: int, display_size: int, codes: list[str]
                  ) -> Example | predict._Item:
  """predict's decoding of one file (an `_Item` with its error if it fails) -> an Example."""
  number, path = numbered
  item = predict._load(path, size)
  if item.error is not None:
    return item
  try:
    display, _ = read_image(path, display_size)
  except Exception as e:  # e.g. the file changed in between
    return predict._Item(path, error=predict.error_reason(e))
  match = _CODE_IN_NAME.match(os.path.basename(path))
  return Example(name=f"{number:04d}_{_safe_stem(path)}", path=path, image=item.image,
                 display=display,
                 true_code=match[1] if match and match[1] in codes else None,
                 note=predict.geometry_warning(*item.size))


def _parse_methods(methods: str | Sequence[str]) -> list[methods_lib.Method]:
  try:
    return methods_lib.parse_methods(methods)
  except ValueError as e:
    raise config_validation.ConfigError(f"--method: {e}") from None


def explain_paths(workdir: str, paths: Sequence[str | os.PathLike], *,
                  methods: str | Sequence[str] | None = None,
                  target: str | None = None,
                  out_dir: str | None = None, checkpoint: str = "best", batch_size: int = 32,
                  display_size: int = 192, contact_sheet_rows: int = 48,
                  stdout: TextIO | None = None, stderr: TextIO | None = None,
                  num_threads: int | None = None) -> int:
  """Explains the prediction of every image named by `paths`; returns the exit status.

  Args:
    workdir: the training run's folder (its `checkpoints/` are read).
    paths: image files and folders (see `bmcc.predict.collect_images`).
    methods: comma-separated method specs, `name[:key=value...]` (`bmcc.explain.methods`);
      None: `methods.default_methods(model)`.
    target: a class code to explain instead of each image's predicted class.
    out_dir: where the pictures and maps go (default `<workdir>/explain/<date-time>`).
    checkpoint: 'best' or 'latest'.
    batch_size: images per compiled batch over all local devices (rounded up to a multiple of
      their count; every batch is padded to it). IG holds `chunk` x this many images' gradients.
    display_size: side in pixels of each picture in a panel (the file is decoded again at it).
    contact_sheet_rows: at most this many images on the contact sheet.
    stdout, stderr: where the JSON lines and the error lines go (default: sys.stdout/stderr).
    num_threads: decoding threads (default: the CPU count).

  Returns:
    0 if every file was explained, 1 if any failed or no image was found.

  Raises:
    ConfigError: no checkpoint, an unknown method, setting or target, a bad argument.
  """
  stdout = sys.stdout if stdout is None else stdout
  stderr = sys.stderr if stderr is None else stderr
  parsed = None if methods is None else _parse_methods(methods)
  files, failures = predict.find_images(paths, stderr)
  if not files:
    return 1
  explainer = Explainer(workdir, checkpoint=checkpoint, methods=parsed, target=target,
                        out_dir=out_dir, batch_size=min(batch_size, len(files)), stderr=stderr,
                        display_size=display_size, contact_sheet_rows=contact_sheet_rows)
  logging.info("Explaining %d file(s) with the %s checkpoint (step %d) of %s into %s: %s.",
               len(files), checkpoint, explainer.step, workdir, explainer.out_dir,
               ", ".join(m.describe() for m in explainer.methods))
  start = time.time()
  threads = num_threads or os.cpu_count() or 1
  truncated_setting = ImageFile.LOAD_TRUNCATED_IMAGES
  try:  # the same global PIL/warnings state as predict_paths, for the same reasons
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      load = functools.partial(_load_example, size=explainer.image_size,
                               display_size=display_size, codes=explainer.codes)
      examples = ordered_map(load, enumerate(files, start=1), num_threads=threads,
                             window=2 * explainer.batch_size + threads,
                             thread_name_prefix="bmcc-decode")
      failures += explainer.run(examples, stdout, stderr)
  finally:
    ImageFile.LOAD_TRUNCATED_IMAGES = truncated_setting
  explainer.contact_sheet(explainer.title(f"{explainer.num_explained} image(s)"))
  seconds = time.time() - start
  logging.info("Explained %d image(s), %d failed, in %.1f s; outputs in %s.",
               explainer.num_explained, failures, seconds, explainer.out_dir)
  return 1 if failures else 0


# ------------------------------------------------------------------------------------------------
# Examples of a split.


def choose_examples(labels: np.ndarray, predictions: np.ndarray, num: int, codes: Sequence[str]
                    ) -> list[tuple[int, str]]:
  """(index, why) of up to `num` examples: the commonest confusions, then every class in turn.

  A third of `num` (at least one) goes to the most frequent (true, predicted) pairs off the
  diagonal of the confusion matrix, one example each; the rest is taken round-robin over the
  true classes in class order, in the order of the split.
  """
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  chosen: list[tuple[int, str]] = []
  used: set[int] = set()
  wrong = labels != predictions
  pairs, counts = np.unique(np.stack([labels[wrong], predictions[wrong]], 1), axis=0,
                            return_counts=True) if wrong.any() else (np.zeros((0, 2)), [])
  order = sorted(range(len(counts)), key=lambda i: (-counts[i], *pairs[i]))
  for i in order[:max(1, num // 3) if num > 1 else 0]:
    t, p = (int(v) for v in pairs[i])
    index = int(np.flatnonzero((labels == t) & (predictions == p))[0])
    chosen.append((index, f"confusion {codes[t]} -> {codes[p]} ({counts[i]} in the split)"))
    used.add(index)
  queues = [[int(i) for i in np.flatnonzero(labels == c) if int(i) not in used]
            for c in range(len(codes))]
  while len(chosen) < num and any(queues):
    for c, queue in enumerate(queues):
      if queue and len(chosen) < num:
        chosen.append((queue.pop(0), f"class {codes[c]}"))
  return chosen


def explain_split(config: ml_collections.ConfigDict, workdir: str, *, split: str = "test",
                  num_examples: int = 24, methods: str | Sequence[str] | None = None,
                  target: str | None = None, out_dir: str | None = None,
                  checkpoint: str = "best", batch_size: int = 32,
                  stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
  """Explains `num_examples` examples of a prepared split (see `choose_examples`); returns 0.

  The whole split is predicted first (its confusion matrix decides the examples), then the
  chosen examples are read again and explained. Outputs as `explain_paths`, plus the panels and
  the contact sheet in TensorBoard (`explain/<split>/...`, at the checkpoint's step).
  """
  from clu import metric_writers  # noqa: PLC0415 (imports TensorFlow)

  from bmcc import evaluate  # noqa: PLC0415
  from bmcc.data import input_pipeline, loading  # noqa: PLC0415

  stdout = sys.stdout if stdout is None else stdout
  stderr = sys.stderr if stderr is None else stderr
  if num_examples < 1:
    raise config_validation.ConfigError(f"--num_examples={num_examples} must be at least 1.")
  explainer = Explainer(workdir, checkpoint=checkpoint,
                        methods=None if methods is None else _parse_methods(methods),
                        target=target, out_dir=out_dir, batch_size=batch_size, stderr=stderr,
                        config=config)
  explainer.keep_panels = True
  config = explainer.config  # the run's protocol, fold, classes and image size
  builder = loading.load_builder(config.data)

  def batches():
    return input_pipeline.create_eval_iter(config, builder, split).batches

  labels, probs, mask, _ = evaluate.predict_batches(explainer.model, batches(), explainer.mesh)
  real = np.flatnonzero(mask)
  chosen = choose_examples(labels[real], probs[real].argmax(-1), num_examples, explainer.codes)
  wanted = {int(real[i]): (rank, why) for rank, (i, why) in enumerate(chosen, start=1)}
  examples: dict[int, Example] = {}
  position = 0
  for batch in batches():
    for row in range(len(batch["label"])):
      if position + row in wanted:
        index = position + row
        code = explainer.codes[int(batch["label"][row])]
        image = batch["image"][row]
        display = np.asarray(Image.fromarray(image).resize(
            (explainer.display_size,) * 2, Image.Resampling.BILINEAR))
        rank, why = wanted[index]
        examples[index] = Example(name=f"{rank:04d}_{split}_{index}_{code}",
                                  path=f"{split}[{index}]", image=image, display=display,
                                  true_code=code, note=why)
    position += len(batch["label"])
  ordered = [examples[int(real[i])] for i, _ in chosen]
  explainer.run(ordered, stdout, stderr)
  sheet = explainer.contact_sheet(explainer.title(f"{split}: {len(ordered)} example(s)"))
  writer = metric_writers.create_default_writer(explainer.out_dir, asynchronous=False)
  images = {f"explain/{split}/contact_sheet": np.asarray(sheet)[None]}
  if explainer.panels:
    images[f"explain/{split}/panels"] = np.stack(explainer.panels)
  writer.write_images(explainer.step, images)
  writer.close()
  logging.info("Explained %d example(s) of %s; outputs and TensorBoard events in %s.",
               len(ordered), split, explainer.out_dir)
  return 0
