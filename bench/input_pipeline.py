"""Throughput of the training input pipeline (grain), against a tf.data pipeline doing the same.

  python bench/input_pipeline.py --config configs/demo.py --config.image_size=224 \\
      --config.data.cache_dir=/tmp/bmcc-bench --workers=0,1,2 --baseline=tfdata

Prepares the config's dataset (`bmcc.data.loading.load_builder`; the demo config writes its
synthetic set into `data.cache_dir` first), then times `bmcc.data.pipeline.train_dataset` on the
training split with the config's augmentation, image size, batch size, seed, class balancing and
`data.num_workers` (or each count in `--workers`): after `--warmup_batches` (worker start-up), the
time for `--num_batches` batches on the host, as images per second. `--rounds` repeats every
measurement in turn (so that load from other jobs hits all alike) and reports the median.

`--baseline=tfdata` also times a tf.data pipeline over the same training images: the original
JPEG files of the (synthetic) download when they are on disk (`tf.io.read_file`), else the same
bytes from the data source held in memory; `decode_and_crop_jpeg` with a random crop from
`sample_distorted_bounding_box` (same scale and ratio ranges), resize to the image size, random
flip and rot90, brightness/contrast/saturation/hue jitter of the same strength, uint8, batch,
prefetch, AUTOTUNE parallelism (TensorFlow's standard ImageNet-style input). It has no Gaussian
blur. `--compare_decoders` times JPEG decoding alone: bmcc's one decoder (`decode_image`:
OpenCV at reduced DCT scale + bilinear), PIL's draft + antialiased bilinear, and simplejpeg if
installed.

The LAST line is `images_per_second=<float>`: tf.data's with `--baseline=tfdata`, else ours (the
best over `--workers`).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs/ imports `configs.default`

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", os.path.join(REPO, "configs", "demo.py"),
                                "Config whose data, image_size, batch_size and seed are used.")
flags.DEFINE_enum("baseline", "none", ["none", "tfdata"], "Also time this baseline pipeline.")
flags.DEFINE_list("workers", None, "grain worker counts to time (default: data.num_workers).")
flags.DEFINE_integer("batch_size", None, "Per-process batch size (default: config.batch_size).")
flags.DEFINE_integer("num_batches", 100, "Timed batches per measurement.")
flags.DEFINE_integer("warmup_batches", 10, "Batches read before timing (worker start-up).")
flags.DEFINE_integer("rounds", 3, "Repeats of every measurement, in turn; the median is reported.")
flags.DEFINE_integer("read_threads", None, "Threads per process computing batches "
                     "(default: pipeline.READ_THREADS).")
flags.DEFINE_bool("compare_decoders", False, "Also time JPEG decoding alone, per decoder.")


def _time_batches(iterator, batch_size: int) -> float:
  """Images per second over FLAGS.num_batches batches, after FLAGS.warmup_batches."""
  for _ in range(FLAGS.warmup_batches):
    next(iterator)
  start = time.perf_counter()
  for _ in range(FLAGS.num_batches):
    batch = next(iterator)
  elapsed = time.perf_counter() - start
  assert len(batch["label"]) == batch_size
  return FLAGS.num_batches * batch_size / elapsed


def _ours(config, source, records, mapping, batch_size: int, num_workers: int) -> float:
  from bmcc.data import augment, pipeline

  kwargs = {} if FLAGS.read_threads is None else {"read_threads": FLAGS.read_threads}
  ds = pipeline.train_dataset(
      source, mapping=mapping, image_size=config.image_size, batch_size=batch_size,
      seed=config.seed, augment=augment.AugmentConfig.from_config(config.data) or False,
      num_workers=num_workers, records=records, balance_alpha=config.data.balance_alpha,
      **kwargs)
  iterator = iter(ds)
  try:
    return _time_batches(iterator, batch_size)
  finally:
    iterator.close()


def _training_files(config, source) -> tuple[list, list[int]]:
  """(paths or bytes, dataset labels) of the training records, as tf.data reads them."""
  from bmcc import synthetic
  from bmcc.data import loading

  labels, inputs = [], []
  _, manual_dir = loading.dataset_dirs(config.data)
  roots = [os.path.join(manual_dir, folder) for folder in synthetic.LAYOUT_FOLDERS.values()]
  roots = [r for r in roots if os.path.isdir(r)]
  for i in range(len(source)):
    record = source[i]
    labels.append(int(record["label"]))
    name = record["file_name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    path = os.path.join(roots[0], name) if roots else None
    inputs.append(path if path and os.path.exists(path) else bytes(record["image"]))
  if any(isinstance(x, bytes) for x in inputs):
    print("tf.data reads the JPEG bytes from memory (the original files are not on disk).")
    inputs = [x if isinstance(x, bytes) else open(x, "rb").read() for x in inputs]
  else:
    print(f"tf.data reads {len(inputs)} original JPEG files under {roots[0]}.")
  return inputs, labels


def _tfdata(config, inputs, labels, batch_size: int) -> float:
  import tensorflow as tf

  from bmcc.data import augment

  aug = augment.AugmentConfig.from_config(config.data)
  size = config.image_size
  from_files = isinstance(inputs[0], str)
  ds = tf.data.Dataset.from_tensor_slices((inputs, labels))
  ds = ds.shuffle(len(labels), seed=config.seed, reshuffle_each_iteration=True).repeat()

  def load(x, label):
    data = tf.io.read_file(x) if from_files else x
    if aug is None:
      image = tf.io.decode_jpeg(data, channels=3)
      image = tf.image.resize(image, (size, size), antialias=True)
      return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), label
    shape = tf.io.extract_jpeg_shape(data)
    begin, crop, _ = tf.image.sample_distorted_bounding_box(
        shape, tf.zeros([0, 0, 4], tf.float32), area_range=aug.crop_scale,
        aspect_ratio_range=aug.crop_ratio, max_attempts=10, use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
    image = tf.io.decode_and_crop_jpeg(data, window, channels=3)
    image = tf.image.resize(image, (size, size), antialias=True) / 255.0
    if aug.dihedral:
      image = tf.image.random_flip_left_right(image)
      image = tf.image.rot90(image, tf.random.uniform([], 0, 4, tf.int32))
    if aug.color_jitter:
      j = aug.color_jitter
      image = image * tf.random.uniform([], 1 - j, 1 + j)
      image = tf.image.random_contrast(image, 1 - j, 1 + j)
      image = tf.image.random_saturation(image, 1 - j, 1 + j)
    if aug.hue_jitter:
      image = tf.image.random_hue(image, aug.hue_jitter)
    image = tf.clip_by_value(tf.round(image * 255.0), 0, 255)
    return tf.cast(image, tf.uint8), label

  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  iterator = ({"image": x, "label": y} for x, y in ds.as_numpy_iterator())
  return _time_batches(iterator, batch_size)


def _compare_decoders(source) -> None:
  import io
  import math

  import cv2
  import numpy as np
  from PIL import Image

  from bmcc.data.decode import decode_image

  datas = [bytes(source[i]["image"]) for i in range(min(256, len(source)))]

  def resize(image, size):
    if image.shape[:2] == (size, size):
      return image
    shrink_2x = min(image.shape[:2]) >= 2 * size
    return cv2.resize(image, (size, size),
                      interpolation=cv2.INTER_AREA if shrink_2x else cv2.INTER_LINEAR)

  def pil(data, size):
    with Image.open(io.BytesIO(data)) as image:
      image.draft("RGB", (size, size))
      return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR,
                                                    reducing_gap=None))

  decoders = {"bmcc decode_image: OpenCV IMREAD_REDUCED_* + bilinear (train/eval/predict)":
              decode_image,
              "PIL draft + antialiased bilinear (evaluation's before)": pil}
  try:
    import simplejpeg

    def simple(data, size):
      return resize(simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=size,
                                           min_width=size), size)

    decoders["simplejpeg min_height/width + bilinear"] = simple
  except ImportError:
    print("simplejpeg is not installed: not compared.")
  cv2.setNumThreads(1)
  for size in (224, 64):
    for name, decode in decoders.items():
      best = math.inf
      for _ in range(5):
        start = time.perf_counter()
        for data in datas:
          decode(data, size)
        best = min(best, (time.perf_counter() - start) / len(datas))
      print(f"decode to {size:3d} px, {name:40s}: {best * 1e3:6.3f} ms/image "
            f"({1 / best:6.0f} images/s, one thread)")


def main(argv: list[str]) -> None:
  del argv
  from bmcc.data import input_pipeline, loading, pipeline

  config = FLAGS.config
  batch_size = FLAGS.batch_size or config.batch_size
  cores = len(os.sched_getaffinity(0))
  builder = loading.load_builder(config.data)
  source = input_pipeline.data_source(builder, "train")
  mapping = pipeline.ClassMapping.create(config.data.classes)
  records = (pipeline.select_records(source, mapping) if config.data.balance_alpha
             or not mapping.is_identity else None)
  print(f"{len(source)} training records; image_size={config.image_size}, batch={batch_size}, "
        f"augment={config.data.augment}, {cores} cores available "
        f"(load average {os.getloadavg()[0]:.1f} at start).")
  if FLAGS.compare_decoders:
    _compare_decoders(source)

  workers = [int(w) for w in FLAGS.workers] if FLAGS.workers else [config.data.num_workers]
  runs = {f"grain num_workers={w}": (lambda w=w: _ours(config, source, records, mapping,
                                                        batch_size, w)) for w in workers}
  if FLAGS.baseline == "tfdata":
    inputs, labels = _training_files(config, source)
    runs["tf.data AUTOTUNE"] = lambda: _tfdata(config, inputs, labels, batch_size)
  results = {name: [] for name in runs}
  for round_index in range(FLAGS.rounds):
    for name, run in runs.items():
      results[name].append(run())
      print(f"round {round_index + 1}: {name}: {results[name][-1]:.1f} images/s "
            f"(load average {os.getloadavg()[0]:.1f})", flush=True)
  medians = {name: statistics.median(values) for name, values in results.items()}
  for name, value in medians.items():
    print(f"median {name}: {value:.1f} images/s = {value / cores:.1f} per core ({cores} cores); "
          f"rounds: {', '.join(f'{v:.1f}' for v in results[name])}")
  ours = max(v for k, v in medians.items() if k.startswith("grain"))
  if FLAGS.baseline == "tfdata":
    print(f"ours_images_per_second={ours:.1f}")
    print(f"images_per_second={medians['tf.data AUTOTUNE']:.1f}")
  else:
    print(f"images_per_second={ours:.1f}")


if __name__ == "__main__":
  app.run(main)
