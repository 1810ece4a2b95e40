"""Throughput of `--mode=predict`: files on disk -> JSON lines, end to end.

  python bench/predict.py                                   # demo config, a fresh random model
  python bench/predict.py --config configs/default.py --num_images 2048 --tta
  python bench/predict.py --workdir runs/demo               # the checkpoint of a real run
  python bench/predict.py --config configs/resnet50.py --num_images 128 --batch_size 32 --repeats 2

Writes `--num_images` synthetic 250 x 250 JPEGs (all 21 classes in turn) into a temporary folder.
Without `--workdir` it builds the config's model (random weights) and saves it as a checkpoint in
a temporary workdir. It warms up (compilation) on one batch of the files, then times
`bmcc.predict.predict_paths` over the whole folder: checkpoint restore, decoding in the thread
pool, padded batches on the device mesh, JSON lines (to /dev/null). For orientation it also times
decoding alone and the model alone. Each measurement is the fastest of `--repeats`. The last line
is `images_per_second=<float>`.

With the export extra installed (onnxruntime, jax2onnx) it also exports the model to ONNX
(`bmcc.export`) and times ONNX Runtime on the CPU the same two ways, in the same run:
`onnx_model_only_images_per_second` (the same batch through the session) and
`onnx_images_per_second` (`bmcc.onnx_predict.predict_paths` over the folder: session load, decoding,
inference, JSON lines). `--noonnx` skips it. bench/predict_torch.py gives PyTorch's figure for
torchvision's ResNet-50 on the same images.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs/ imports `configs.default`

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", os.path.join(REPO, "configs", "demo.py"),
                                "Config whose model and eval_batch_size are used.")
flags.DEFINE_string("workdir", None, "Restore the model from this run instead of building one.")
flags.DEFINE_integer("num_images", 512, "Synthetic JPEGs to predict.")
flags.DEFINE_integer("batch_size", None, "Batch size (default: config.eval_batch_size).")
flags.DEFINE_bool("tta", False, "Average over the 8 rotations/flips of each image.")
flags.DEFINE_integer("threads", None, "Decoding threads (default: the CPU count).")
flags.DEFINE_integer("repeats", 3, "Timed runs of each measurement; the fastest is reported.")
flags.DEFINE_bool("onnx", True, "Also time ONNX Runtime (CPU) on the exported model, when the "
                  "export extra is installed.")


def _write_images(folder: str, n: int) -> list[str]:
  from bmcc import synthetic
  from bmcc.data import classes

  paths = []
  for i in range(n):
    code = classes.CODES[i % len(classes.CODES)]
    path = os.path.join(folder, f"{code}_{i + 1:05d}.jpg")
    with open(path, "wb") as f:
      f.write(synthetic.image_bytes(code, i // len(classes.CODES) + 1))
    paths.append(path)
  return paths


def _save_model(config, workdir: str) -> None:
  """The config's model, freshly initialised, as a checkpoint of `workdir` (real layout)."""
  import grain
  import optax
  from flax import nnx

  from bmcc import checkpointing, steps
  from bmcc.data import pipeline

  mapping = pipeline.ClassMapping.create(config.data.classes)
  model = steps.create_model(config, mapping.num_classes)
  optimizer = nnx.Optimizer(model, optax.sgd(0.0), wrt=nnx.Param)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  # A run with a weight average is read through its `ema` item: save the weights there too.
  ckpt.save(0, model=model, optimizer=optimizer,
            ema_model=model if config.get("ema_decay") else None,
            data_iterator=iter(grain.MapDataset.range(1).to_iter_dataset()),
            metadata=checkpointing.run_metadata(config, mapping.codes))
  ckpt.close()


def _time_onnx(workdir: str, tmp: str, folder: str, paths: list[str], decoded, batch_size: int
               ) -> list[str]:
  """ONNX Runtime's model-only and end-to-end rates (output lines), or why there are none."""
  try:
    import onnxruntime as ort

    from bmcc import export, onnx_predict
  except ImportError as e:
    return [f"onnx: skipped ({e}; pip install 'bmcc[export]')"]
  import numpy as np

  start = time.time()
  path = export.export_workdir(workdir, formats=("onnx",), output_dir=os.path.join(tmp, "export"))[
      "onnx"]
  print(f"exported ONNX in {time.time() - start:.1f} s", flush=True)
  session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  images = np.stack([item.image for item in decoded])
  session.run(None, {"images": images})
  runs = max(1, len(paths) // len(images))
  model_seconds = []
  for _ in range(FLAGS.repeats):
    start = time.time()
    for _ in range(runs):
      session.run(None, {"images": images})
    model_seconds.append(time.time() - start)
  kwargs = {"batch_size": batch_size, "tta": FLAGS.tta, "num_threads": FLAGS.threads}
  times = []
  with open(os.devnull, "w") as null:
    for _ in range(FLAGS.repeats):
      start = time.time()
      assert onnx_predict.predict_paths(path, [folder], stdout=null, **kwargs) == 0
      times.append(time.time() - start)
  return [f"onnx_runtime={ort.__version__} intra_op_threads=default",
          f"onnx_model_only_images_per_second={runs * len(images) / min(model_seconds):.1f}",
          f"onnx_predict_paths_seconds={min(times):.2f} (load, decode, infer, write {len(paths)})",
          f"onnx_images_per_second={len(paths) / min(times):.1f}"]


def main(argv: list[str]) -> None:
  del argv
  import jax
  import numpy as np

  from bmcc import checkpointing, predict, steps
  from bmcc.parallel import ordered_map

  config = FLAGS.config
  batch_size = FLAGS.batch_size or config.eval_batch_size
  threads = FLAGS.threads or os.cpu_count() or 1
  with tempfile.TemporaryDirectory(prefix="bmcc-bench-predict-") as tmp:
    folder = os.path.join(tmp, "images")
    os.makedirs(folder)
    start = time.time()
    paths = _write_images(folder, FLAGS.num_images)
    print(f"wrote {len(paths)} JPEGs in {time.time() - start:.1f} s", flush=True)
    workdir = FLAGS.workdir
    if workdir is None:
      workdir = os.path.join(tmp, "workdir")
      start = time.time()
      _save_model(config, workdir)
      print(f"built and saved {config.model} in {time.time() - start:.1f} s", flush=True)

    model, meta, _ = checkpointing.restore_model(workdir)
    size = meta["image_size"]
    decode_seconds = []
    for _ in range(FLAGS.repeats):
      start = time.time()
      decoded = list(ordered_map(functools.partial(predict._load, size=size), paths,
                                 num_threads=threads, window=2 * batch_size))
      decode_seconds.append(time.time() - start)
    assert all(item.error is None for item in decoded)
    decode_rate = len(paths) / min(decode_seconds)

    mesh = steps.create_mesh(jax.local_devices())
    batch = -(-min(batch_size, len(paths)) // mesh.size) * mesh.size
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    images = jax.device_put(np.stack([item.image for item in decoded[:batch]]), sharding)
    step = steps.dihedral_average if FLAGS.tta else steps.eval_step
    with jax.set_mesh(mesh):
      step(model, images).block_until_ready()
      runs = max(1, len(paths) // batch)
      model_seconds = []
      for _ in range(FLAGS.repeats):
        start = time.time()
        for _ in range(runs):
          out = step(model, images)
        out.block_until_ready()
        model_seconds.append(time.time() - start)
    model_rate = runs * batch / min(model_seconds)

    kwargs = {"batch_size": batch_size, "tta": FLAGS.tta, "num_threads": FLAGS.threads}
    with open(os.devnull, "w") as null:
      status = predict.predict_paths(workdir, paths[:batch_size], stdout=null, **kwargs)
      assert status == 0, "warm-up failed"
      times = []
      for _ in range(FLAGS.repeats):
        start = time.time()
        status = predict.predict_paths(workdir, [folder], stdout=null, **kwargs)
        times.append(time.time() - start)
        assert status == 0
    seconds = min(times)
    onnx_lines = _time_onnx(workdir, tmp, folder, paths, decoded[:batch], batch_size) if (
        FLAGS.onnx) else []
    print(f"device={jax.devices()[0].device_kind} x{jax.device_count()} model={meta['model']} "
          f"image_size={size} batch={batch} tta={FLAGS.tta} threads={threads}")
    print(f"decode_only_images_per_second={decode_rate:.1f}")
    print(f"model_only_images_per_second={model_rate:.1f}")
    for line in onnx_lines:
      print(line)
    print(f"predict_paths_seconds={seconds:.2f} (restore, decode, infer, write {len(paths)})")
    print(f"images_per_second={len(paths) / seconds:.1f}")


if __name__ == "__main__":
  app.run(main)
