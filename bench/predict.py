"""Throughput of `--mode=predict`: files on disk -> JSON lines, end to end.

  python bench/predict.py                                   # demo config, a fresh random model
  python bench/predict.py --config configs/default.py --num_images 2048 --tta
  python bench/predict.py --workdir runs/demo               # the checkpoint of a real run

Writes `--num_images` synthetic 250 x 250 JPEGs (all 21 classes in turn) into a temporary folder.
Without `--workdir` it builds the config's model (random weights) and saves it as a checkpoint in
a temporary workdir. It warms up (compilation) on one batch of the files, then times
`bmcc.predict.predict_paths` over the whole folder: checkpoint restore, decoding in the thread
pool, padded batches on the device mesh, JSON lines (to /dev/null). For orientation it also times
decoding alone and the model alone. Each measurement is the fastest of `--repeats`. The last line
is `images_per_second=<float>`.
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
    print(f"device={jax.devices()[0].device_kind} x{jax.device_count()} model={meta['model']} "
          f"image_size={size} batch={batch} tta={FLAGS.tta} threads={threads}")
    print(f"decode_only_images_per_second={decode_rate:.1f}")
    print(f"model_only_images_per_second={model_rate:.1f}")
    print(f"predict_paths_seconds={seconds:.2f} (restore, decode, infer, write {len(paths)})")
    print(f"images_per_second={len(paths) / seconds:.1f}")


if __name__ == "__main__":
  app.run(main)
