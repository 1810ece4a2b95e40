"""Training-step throughput of a config on the devices present: images/s and fraction of peak.

  python bench/train_step.py --config configs/tiny.py                      # CPU smoke run
  python bench/train_step.py --config configs/resnet50.py --steps 20       # ResNet-50, bf16, 224 px
  python bench/train_step.py --config configs/resnet50.py --input=pipeline --warmup 16 --steps 60
  python bench/train_step.py --config configs/dinobloom_b_finetune.py --steps 20   # ViT-B/14, bf16

`--input=synthetic` (default): one batch of random uint8 images and labels, generated once on the
devices and sharded over the `data` mesh axis, is fed to every step, so only the step is timed. This
mode imports jax, flax, optax, numpy, absl and ml_collections only (no TensorFlow, TFDS, grain or
clu), so it runs on a GPU machine that has nothing else; the last lines check that.

`--input=pipeline`: batches come from the training input pipeline exactly as `bmcc.train` reads
them (`bmcc.data.input_pipeline.create_train_iter`: decoding and the config's augmentation in
`config.data.num_workers` worker processes, class balancing as `config.data.balance_alpha` says,
put on the devices ahead by a thread) over a prepared synthetic dataset of 250 x 250 JPEGs in the
real layout (written and prepared on first use, in `config.data.cache_dir`; the config's own
`data.synthetic` if set, else `--synthetic_scale` of the real class sizes). The ratio of the two
modes' images/s says how far the input pipeline holds the step back. Grain and TFDS are imported
only in this mode; the warm-up should outlast the pipeline's start, and the timed steps the
batches it reads ahead.

Both modes compile one program: `bmcc.steps.train_step` (the step training runs, with the weight
average when the config has `ema_decay`) inside `jax.jit` over the `nnx.split` state, ahead of
time, and time that program, so no NNX Python overhead is counted. The FLOPs per image come from
XLA's cost analysis of the compiled program (per device, divided by the per-device batch); the
unoptimised HLO's count of the step and of the eval-mode forward pass is printed beside it. The
fraction of peak uses a small table of dense peak TFLOP/s per device kind ('n/a' for devices not
in it, the CPU included).

Then `--forward_steps` steps of the eval-mode forward pass alone on the same batch, timed the same
way: `model.features` for the ViTs and ResNets (what `--mode=features` runs per batch), the logits
for the simple CNN; `forward_images_per_second=<float>`. Pretrained configs build the same model
with random weights (nothing is loaded; the weights do not change the speed), with the fine-tuning
optimizer as after unfreezing (the frozen steps skip the backbone's Adam update). The last line is
`images_per_second=<float>` (training; a copy is printed as soon as the timing ends, so a caller's
time-out during the extras below keeps the figure).

Extras (bench/gpu.sh uses them): `--forward_only` times the forward pass alone (no optimizer, no
training step: ViT-G's features); `--memory` prints the compiled step's `memory_analysis()` and
the device's bytes in use before the steps and peak after them (bench/memory_check.py);
`--profile_dir` traces `--profile_steps` more steps with `jax.profiler` and prints the device time
by op (bench/profile_summary.py); `--hlo_out` writes the compiled step's optimised HLO (the op
names of the profile); `--attention_impl=cudnn` runs a ViT's attention through cuDNN's fused
kernel.
"""

from __future__ import annotations

import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs/ imports `configs.default`; bmcc need not be installed

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", os.path.join(REPO, "configs", "tiny.py"),
                                "Config whose model, image size, batch and optimizer are used.")
flags.DEFINE_integer("steps", 20, "Timed training steps.")
flags.DEFINE_integer("warmup", 3, "Untimed steps before timing (after compilation).")
flags.DEFINE_integer("batch_size", None, "Global batch (default: config.batch_size).")
flags.DEFINE_integer("forward_steps", 10,
                     "Timed forward-only (features) steps after the training steps; 0: none.")
flags.DEFINE_enum("input", "synthetic", ["synthetic", "pipeline"],
                  "synthetic: one device-resident random batch; pipeline: the grain training "
                  "pipeline over a prepared synthetic JPEG dataset.")
flags.DEFINE_bool("forward_only", False,
                  "Time only the eval-mode forward pass (features); no training step is built.")
flags.DEFINE_bool("memory", False,
                  "Print the compiled step's memory_analysis() beside the device's measured peak "
                  "(bench/memory_check.py).")
flags.DEFINE_string("profile_dir", None,
                    "After timing, trace --profile_steps more steps with jax.profiler into this "
                    "folder and print a summary of the device time (bench/profile_summary.py).")
flags.DEFINE_integer("profile_steps", 3, "Steps traced with --profile_dir.")
flags.DEFINE_string("hlo_out", None, "Write the compiled step's optimised HLO text to this file.")
flags.DEFINE_enum("attention_impl", None, ["xla", "cudnn"],
                  "ViTs: implementation of jax.nn.dot_product_attention (model_config key "
                  "attention_impl; default: the config's, else jax's default).")
flags.DEFINE_float("synthetic_scale", 0.012,
                   "--input=pipeline without config.data.synthetic: images per class of the "
                   "synthetic dataset as a fraction of the real class sizes (at least 40 each).")

# Dense peak TFLOP/s per device by device kind (first match of a lower-case substring wins):
# bfloat16 tensor cores, TF32 tensor cores (what XLA uses for float32 convolutions and matrix
# products on these GPUs by default) and float32 without tensor cores.
PEAK_TFLOPS = (
    ("h100 pcie", {"bfloat16": 756.0, "tf32": 378.0, "float32": 51.0}),
    ("h100", {"bfloat16": 989.0, "tf32": 495.0, "float32": 67.0}),  # SXM
    ("h200", {"bfloat16": 989.0, "tf32": 495.0, "float32": 67.0}),
    ("a100", {"bfloat16": 312.0, "tf32": 156.0, "float32": 19.5}),
)


def peak_tflops(device_kind: str, dtype: str) -> tuple[float | None, str]:
  """(dense peak TFLOP/s of one device for compute `dtype`, what it is), or (None, 'n/a')."""
  kind = device_kind.lower()
  for pattern, peaks in PEAK_TFLOPS:
    if pattern in kind:
      if dtype == "bfloat16":
        return peaks["bfloat16"], "bf16 tensor cores, dense"
      return peaks["tf32"], f"tf32 tensor cores, dense (float32 without them: {peaks['float32']})"
  return None, "n/a"


def _flops(cost) -> float | None:
  """The 'flops' entry of an XLA cost analysis (a dict, or a list of one dict in older jax)."""
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else None
  if not cost:
    return None
  value = cost.get("flops")
  return float(value) if value is not None and value > 0 else None


def _num_classes(config) -> int:
  from bmcc.data import classes

  return len(config.data.classes) if config.data.classes else classes.NUM_CLASSES


def _synthetic_batches(mesh, batch: int, size: int, num_classes: int, seed: int):
  """An endless iterator over one random uint8 batch made on the devices, sharded on `data`."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  sharding = NamedSharding(mesh, P("data"))
  key_images, key_labels = jax.random.split(jax.random.key(seed))
  images = jax.jit(lambda k: jax.random.bits(k, (batch, size, size, 3), jnp.uint8),
                   out_shardings=sharding)(key_images)
  labels = jax.jit(lambda k: jax.random.randint(k, (batch,), 0, num_classes, jnp.int32),
                   out_shardings=sharding)(key_labels)
  while True:
    yield images, labels


def _pipeline_batches(config, mesh):
  """Batches of the training pipeline over a prepared synthetic dataset, on the devices.

  Exactly what training reads (`bmcc.data.input_pipeline.create_train_iter`: grain, decoding and
  augmentation, a thread putting batches on the devices ahead). Imports TFDS and grain (here only).
  Returns (iterator of (images, labels), cleanup function).
  """
  import ml_collections

  from bmcc.data import input_pipeline, loading

  if config.data.synthetic is None:
    config.data.synthetic = ml_collections.ConfigDict(
        {"scale": FLAGS.synthetic_scale, "minimum": 40, "seed": 0})
  start = time.time()
  builder = loading.load_builder(config.data)
  print(f"dataset: {builder.data_dir} train={builder.info.splits['train'].num_examples} "
        f"images (ready in {time.time() - start:.1f} s)", flush=True)
  data = input_pipeline.create_train_iter(config, builder, mesh)

  def batches():
    for item in data.iterator:
      yield item["image"], item["label"]

  return batches(), data.iterator.close


def _profile(compiled, state, metrics, batches, keys, first: int):
  """Runs --profile_steps more steps under jax.profiler into --profile_dir; (state, metrics).

  A tracer that fails (no CUPTI, say) is reported, not raised: the row keeps its numbers.
  """
  import jax

  start = time.time()
  try:
    jax.profiler.start_trace(FLAGS.profile_dir)
  except Exception as e:  # noqa: BLE001
    print(f"profile_seconds=n/a (start_trace failed: {type(e).__name__}: {e})", flush=True)
    FLAGS.profile_dir = None
    return state, metrics
  try:
    for step in range(first, first + FLAGS.profile_steps):
      state, metrics = compiled(state, *next(batches), keys[step])
    jax.block_until_ready((state, metrics))
  finally:
    try:
      jax.profiler.stop_trace()
    except Exception as e:  # noqa: BLE001
      print(f"stop_trace failed: {type(e).__name__}: {e}", flush=True)
      FLAGS.profile_dir = None
  print(f"profile_seconds={time.time() - start:.2f} ({FLAGS.profile_steps} steps traced "
        f"into {FLAGS.profile_dir})", flush=True)
  return state, metrics


def main(argv: list[str]) -> None:
  del argv
  import jax
  import numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from bmcc import steps

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import memory_check
  import profile_summary

  config = FLAGS.config
  if FLAGS.batch_size is not None:
    config.batch_size = FLAGS.batch_size
  if FLAGS.attention_impl is not None:
    if not config.model.startswith("vit_"):
      raise app.UsageError(f"--attention_impl is for ViTs, not {config.model}.")
    with config.model_config.unlocked():  # config_flags locks the config
      config.model_config.attention_impl = FLAGS.attention_impl
  if FLAGS.forward_only and (FLAGS.input != "synthetic" or FLAGS.forward_steps < 1):
    raise app.UsageError("--forward_only needs --input=synthetic and --forward_steps >= 1.")
  batch, size = config.batch_size, config.image_size
  dtype = config.model_config.get("dtype", "float32")
  devices = jax.devices()
  if batch % len(devices):
    raise app.UsageError(f"The batch {batch} is not a multiple of the {len(devices)} devices.")
  per_device_batch = batch // len(devices)
  kind = devices[0].device_kind
  num_classes = _num_classes(config)
  print(f"device={kind} x{len(devices)} ({devices[0].platform}) processes={jax.process_count()}")
  print(f"model={config.model} image_size={size} global_batch={batch} "
        f"per_device_batch={per_device_batch} dtype={dtype} input={FLAGS.input} "
        f"ema_decay={config.get('ema_decay')} "
        f"attention_impl={config.model_config.get('attention_impl')} "
        f"forward_only={FLAGS.forward_only}", flush=True)

  mesh = steps.create_mesh()
  replicated = NamedSharding(mesh, P())
  start = time.time()
  model = steps.create_model(config, num_classes)
  model_graph, model_state = nnx.split(model)
  if not FLAGS.forward_only:
    # A fine-tuning config's optimizer as after unfreezing (freeze_steps 0).
    optimizer = nnx.Optimizer(
        model, steps.create_optimizer(config, steps.create_learning_rate_fn(
            config, steps.resolve_durations(config, steps_per_epoch=500)), model), wrt=nnx.Param)
    ema = steps.create_ema(config, model)  # the weight average, if the config keeps one
    graphdef, state = nnx.split((model, optimizer, ema))
    state = jax.device_put(state, replicated)
  num_params = sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(f"parameters={num_params:,} (built in {time.time() - start:.1f} s)", flush=True)

  label_smoothing = config.label_smoothing

  def pure_step(state, images, labels, dropout_key):
    model, optimizer, ema = nnx.merge(graphdef, state)
    metrics = steps.train_step(model, optimizer, images, labels, dropout_key, None, ema,
                               label_smoothing=label_smoothing)
    return nnx.state((model, optimizer, ema)), metrics

  def forward(model_state, images):
    model = nnx.merge(model_graph, model_state)
    model.eval()
    return model(steps.normalize_input(model, images))

  def features(model_state, images):
    model = nnx.merge(model_graph, model_state)
    model.eval()
    embed = getattr(model, "features", model)
    return embed(steps.normalize_input(model, images)).astype(np.float32)

  cleanup = None
  flops_compiled = flops_hlo = None
  memory_before = memory_after = compiled_stats = None
  with jax.set_mesh(mesh):
    example = next(_synthetic_batches(mesh, batch, size, num_classes, config.seed))
    keys = jax.device_put(
        jax.random.split(jax.random.key(config.seed + 1),
                         FLAGS.warmup + FLAGS.steps + FLAGS.profile_steps), replicated)
    if not FLAGS.forward_only:
      start = time.time()
      lowered = jax.jit(pure_step, donate_argnums=0).lower(state, *example, keys[0])
      compiled = lowered.compile()
      print(f"compile_seconds={time.time() - start:.1f}", flush=True)
      flops_compiled = _flops(compiled.cost_analysis())
      flops_hlo = _flops(lowered.cost_analysis())
      if FLAGS.hlo_out:
        with open(FLAGS.hlo_out, "w") as f:
          f.write(compiled.as_text())
        print(f"hlo_out={FLAGS.hlo_out}")
      if FLAGS.memory:
        compiled_stats = memory_check.compiled_memory(compiled)
    flops_forward = _flops(jax.jit(forward).lower(model_state, example[0]).cost_analysis())

    if FLAGS.input == "synthetic":
      batches = _synthetic_batches(mesh, batch, size, num_classes, config.seed)
    else:
      batches, cleanup = _pipeline_batches(config, mesh)
    try:
      # The forward pass first (on the model's initial state: `state` is donated below).
      forward_seconds = None
      if FLAGS.forward_steps > 0:
        start = time.time()
        features_fn = jax.jit(features).lower(
            jax.device_put(model_state, replicated), example[0]).compile()
        print(f"forward_compile_seconds={time.time() - start:.1f}", flush=True)
        forward_state = jax.device_put(model_state, replicated)
        jax.block_until_ready(features_fn(forward_state, example[0]))
        start = time.time()
        for _ in range(FLAGS.forward_steps):
          out = features_fn(forward_state, example[0])
        jax.block_until_ready(out)
        forward_seconds = time.time() - start
        del forward_state, out
      if FLAGS.forward_only:
        seconds = forward_seconds
        metrics = None
      else:
        memory_before = memory_check.device_memory() if FLAGS.memory else None
        start = time.time()
        for step in range(FLAGS.warmup):
          state, metrics = compiled(state, *next(batches), keys[step])
        jax.block_until_ready((state, metrics))
        print(f"warmup_seconds={time.time() - start:.2f} ({FLAGS.warmup} steps)", flush=True)
        start = time.time()
        for step in range(FLAGS.warmup, FLAGS.warmup + FLAGS.steps):
          state, metrics = compiled(state, *next(batches), keys[step])
        jax.block_until_ready((state, metrics))
        seconds = time.time() - start
        # Early copies of the key lines (repeated last): a profile that overruns the caller's
        # time-out must not cost the row its figure.
        print(f"step_seconds={seconds / FLAGS.steps:.4f} (timed; details below)")
        print(f"images_per_second={FLAGS.steps * batch / seconds:.1f} (timed; details below)",
              flush=True)
        memory_after = memory_check.device_memory() if FLAGS.memory else None
        if FLAGS.profile_dir:
          state, metrics = _profile(compiled, state, metrics, batches, keys,
                                    FLAGS.warmup + FLAGS.steps)
    finally:
      if cleanup is not None:
        cleanup()

  if FLAGS.memory and not FLAGS.forward_only:
    memory_check.report(compiled_stats, memory_before, memory_after)
  if FLAGS.profile_dir and not FLAGS.forward_only:
    try:
      print(profile_summary.summarize(FLAGS.profile_dir, FLAGS.profile_steps))
    except Exception as e:  # noqa: BLE001  (the summary must not cost the row its numbers)
      print(f"profile summary failed: {type(e).__name__}: {e}")
  if FLAGS.forward_only:
    print(f"forward_flops_per_image_hlo={flops_forward / batch:.4g}" if flops_forward else
          "forward_flops_per_image_hlo=n/a")
    forward_ips = FLAGS.forward_steps * batch / forward_seconds
    print(f"forward_step_seconds={forward_seconds / FLAGS.forward_steps:.4f}")
    if flops_forward:
      tflops = forward_ips * flops_forward / batch / len(devices) / 1e12
      print(f"forward_tflops_per_device={tflops:.2f} (unoptimised HLO count)")
    print(f"forward_images_per_second={forward_ips:.1f} (eval-mode features, "
          f"{FLAGS.forward_steps} timed steps after 1 untimed)")
    print(f"tensorflow_imported={sys.modules.get('tensorflow') is not None}")
    print(f"images_per_second={forward_ips:.1f}")
    return

  loss = float(metrics["loss"])
  images_per_second = FLAGS.steps * batch / seconds
  print(f"step_seconds={seconds / FLAGS.steps:.4f} (mean of {FLAGS.steps} timed steps after "
        f"{FLAGS.warmup} warm-up; last loss {loss:.3f})")

  def per_image(flops, divisor):
    return f"{flops / divisor:.4g}" if flops else "n/a"

  # The compiled program is one device's part: divide by the per-device batch. The unoptimised
  # HLO is the whole (global) program.
  print(f"train_flops_per_image={per_image(flops_compiled, per_device_batch)} "
        "(XLA cost analysis of the compiled step, one device)")
  print(f"train_flops_per_image_hlo={per_image(flops_hlo, batch)} (unoptimised HLO of the step)")
  print(f"forward_flops_per_image_hlo={per_image(flops_forward, batch)} "
        "(unoptimised HLO of the eval-mode forward pass)")
  flops_per_image = flops_compiled / per_device_batch if flops_compiled else None
  if flops_per_image is None and flops_hlo:
    flops_per_image = flops_hlo / batch
  peak, peak_label = peak_tflops(kind, dtype)
  if flops_per_image:
    achieved = images_per_second * flops_per_image / len(devices) / 1e12
    print(f"achieved_tflops_per_device={achieved:.2f}")
  else:
    achieved = None
    print("achieved_tflops_per_device=n/a")
  if peak is not None and achieved is not None:
    print(f"peak_tflops_per_device={peak:g} ({peak_label})")
    print(f"fraction_of_peak={achieved / peak:.3f}")
  else:
    print(f"peak_tflops_per_device=n/a (no peak known for {kind!r})")
    print("fraction_of_peak=n/a")
  if forward_seconds is not None:
    print(f"forward_images_per_second={FLAGS.forward_steps * batch / forward_seconds:.1f} "
          f"(eval-mode features, {FLAGS.forward_steps} timed steps after 1 untimed)")
  else:
    print("forward_images_per_second=n/a")
  tensorflow_imported = sys.modules.get("tensorflow") is not None
  print(f"tensorflow_imported={tensorflow_imported}")
  if FLAGS.input == "synthetic" and tensorflow_imported:
    raise SystemExit("TensorFlow was imported by the synthetic-input benchmark; it must not be.")
  print(f"images_per_second={images_per_second:.1f}")


if __name__ == "__main__":
  app.run(main)
