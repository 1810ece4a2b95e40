"""Throughput of the explanation methods: images per second per method, the model on the device.

  python bench/explain.py                                   # demo config (48 px), random weights
  python bench/explain.py --workdir workdirs/demo --num_images 100
  python bench/explain.py --methods=ig:steps=32:chunk=32,gradcam --batch_size 64

Renders `--num_images` synthetic cells at the model's input size, builds the config's model with
random weights (or restores `--workdir`'s checkpoint), and times `bmcc.explain.methods.
explain_batch` (one jitted program per batch and method, batches sharded over the local devices)
over all the images, after one warm-up batch (compilation, reported separately). Decoding and
writing pictures are not included (`--mode=explain` adds them). Each measurement is the fastest
of `--repeats`. One line per method: `<method> images_per_second=<float>`.
"""

from __future__ import annotations

import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs/ imports `configs.default`

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", os.path.join(REPO, "configs", "demo.py"),
                                "Config whose model and image size are used.")
flags.DEFINE_string("workdir", None, "Restore the model from this run instead of building one.")
flags.DEFINE_integer("num_images", 100, "Synthetic cells to explain.")
flags.DEFINE_integer("batch_size", 32, "Images per batch over all devices.")
flags.DEFINE_string("methods", "integrated_gradients,smoothgrad,gradcam,occlusion",
                    "Comma-separated method specs (bmcc.explain.methods).")
flags.DEFINE_integer("repeats", 2, "Timed runs of each measurement; the fastest is reported.")


def main(argv: list[str]) -> None:
  del argv
  import jax
  import numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from bmcc import checkpointing, steps, synthetic
  from bmcc.data import classes
  from bmcc.explain import methods

  config = FLAGS.config
  if FLAGS.workdir:
    model, meta, _ = checkpointing.restore_model(FLAGS.workdir)
    size, num_classes, name = meta["image_size"], len(meta["classes"]), meta["model"]
  else:
    size, num_classes, name = config.image_size, classes.NUM_CLASSES, config.model
    model = steps.create_model(config, num_classes)
  mesh = steps.create_mesh(jax.local_devices())
  nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(mesh, P())))
  batch = -(-min(FLAGS.batch_size, FLAGS.num_images) // mesh.size) * mesh.size
  num_batches = -(-FLAGS.num_images // batch)
  images = np.zeros((num_batches * batch, size, size, 3), np.uint8)
  for i in range(FLAGS.num_images):
    images[i] = synthetic.render_image(classes.CODES[i % 21], i // 21 + 1, image_size=size)
  sharding = NamedSharding(mesh, P("data"))
  batches = [jax.device_put(images[i:i + batch], sharding) for i in range(0, len(images), batch)]
  targets = jax.device_put(np.full(batch, -1, np.int32), sharding)
  print(f"device={jax.devices()[0].device_kind} x{len(jax.local_devices())} model={name} "
        f"image_size={size} batch={batch} images={FLAGS.num_images} ({num_batches} batches)",
        flush=True)
  with jax.set_mesh(mesh):
    for method in methods.parse_methods(FLAGS.methods):
      start = time.time()
      jax.block_until_ready(methods.explain_batch(model, batches[0], targets, method=method))
      compile_seconds = time.time() - start
      times = []
      for _ in range(FLAGS.repeats):
        start = time.time()
        out = [methods.explain_batch(model, b, targets, method=method) for b in batches]
        jax.block_until_ready(out)
        times.append(time.time() - start)
      print(f"{method.describe()} first_batch_seconds={compile_seconds:.1f} "
            f"images_per_second={FLAGS.num_images / min(times):.1f}", flush=True)


if __name__ == "__main__":
  app.run(main)
