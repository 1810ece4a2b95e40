"""Per-device memory of the compiled training step: data-parallel vs FSDP, frozen backbone, and
the largest per-device batch that fits a card. Compiles only; never runs a step or allocates
the model (abstract shapes throughout), so ViT-G fits on a laptop.

  python bench/memory.py                      # the README table's cases, one JSON line each
  python bench/memory.py --models=vit_small_patch14 --devices=1,4 --shardings=fsdp
  python bench/memory.py --frozen_rows        # ViT-S and ViT-G, backbone frozen vs trained

Each case is `bmcc.steps.train_step` (the step training runs: AdamW after global-norm clipping,
`config.accumulate_steps` micro-batches, the `bmcc.sharding` layout) at 224 px with bfloat16
compute and float32 parameters, compiled ahead of time for a mesh of N devices (fake CPU devices
unless real accelerators are present: `--xla_force_host_platform_device_count` is set before jax
starts). `compiled.memory_analysis()` gives per device the bytes of the arguments (state and
batch), of the outputs, of the outputs that alias donated arguments, and of the temporaries; the
peak is arguments + outputs - aliased + temporaries (`bytes_per_device`); `flops` is XLA's count
for one device's program. One JSON line per case:

  {"model": "vit_giant_patch14", "sharding": "fsdp", "devices": 8, "batch_per_device": 1,
   "bytes_per_device": ..., "argument_bytes": ..., "output_bytes": ..., "alias_bytes": ...,
   "temp_bytes": ..., "gib_per_device": ..., ...}

Largest batch per card: memory is affine in the batch (state + batch x activations), so each
model/sharding/devices case is compiled at two per-device batches (1 and `--probe_batch`) and
the line `{"kind": "fit", ..., "max_batch_per_device": {"24": b, "40": ..., "80": ..., "141": ...}}`
gives the largest b with state + b x per-image <= capacity x (1 - `--headroom`) (the headroom
leaves room for the runtime and fragmentation). These are the compiler's figures for this
backend: a GPU's (`bench/gpu.sh` compares them with measured peaks) differ by its kernels'
workspaces. Importable with only jax, flax, optax, numpy and ml_collections:
`memory_analysis(...)` returns one case's figures as a dict.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)  # configs/ and bmcc need not be installed

MODELS = ("vit_small_patch14", "vit_base_patch14", "vit_large_patch14", "vit_giant_patch14",
          "resnet50")
CARDS_GIB = (24, 40, 80, 141)


def _ensure_devices(count: int) -> None:
  """Asks for `count` fake CPU devices if jax has not started yet (no effect on GPUs), and skips
  LLVM's optimisation passes on the CPU (the machine code is never run; buffer assignment, hence
  the memory figures, comes before it)."""
  if "jax" in sys.modules:
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if "--xla_force_host_platform_device_count" not in flags:
    flags += f" --xla_force_host_platform_device_count={count}"
  if "--xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0"
  os.environ["XLA_FLAGS"] = flags.strip()


def make_config(model: str, *, image_size: int = 224, dtype: str = "bfloat16",
                sharding: str = "data", accumulate_steps: int = 1, frozen: bool = False,
                ema: bool = False, fsdp_min_bytes: int | None = None):
  """The training config of a case: configs/default.py with the model, bf16 compute, AdamW."""
  import ml_collections

  from configs import default

  config = default.get_config()
  config.model = model
  config.image_size = image_size
  config.model_config = ml_collections.ConfigDict({"dtype": dtype})
  if model.startswith("vit_"):
    config.model_config.image_size = image_size
  config.optimizer = "adamw"
  config.ema_decay = 0.999 if ema else None
  config.sharding = sharding
  config.fsdp_min_bytes = fsdp_min_bytes
  config.accumulate_steps = accumulate_steps
  config.finetune.freeze_backbone = frozen
  config.num_train_steps, config.warmup_steps = 1000, 10
  return config


def memory_analysis(model: str, *, sharding: str = "data", devices: int = 1,
                    batch_per_device: int = 1, image_size: int = 224, dtype: str = "bfloat16",
                    accumulate_steps: int = 1, frozen: bool = False, ema: bool = False,
                    num_classes: int = 21, config=None) -> dict:
  """Compiles the training step of one case on the first `devices` devices; returns its figures.

  `config` (optional) replaces the case's config (`make_config`); its `batch_size` is ignored:
  the global batch is `batch_per_device` x `devices`. Nothing is allocated on the devices.
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from bmcc import sharding as sharding_lib
  from bmcc import steps

  if config is None:
    config = make_config(model, image_size=image_size, dtype=dtype, sharding=sharding,
                         accumulate_steps=accumulate_steps, frozen=frozen, ema=ema)
  available = jax.devices()
  if devices > len(available):
    raise ValueError(f"{devices} devices asked for, {len(available)} present.")
  mesh = steps.create_mesh(available[:devices])
  rule = sharding_lib.rule_from_config(config)
  schedule = steps.create_learning_rate_fn(config, steps.Durations(1000, 10, 1000, 1000))

  def build():
    net = steps.create_model(config, num_classes)
    return net, steps.create_train_optimizer(config, schedule, net), steps.create_ema(config, net)

  start = time.time()
  with jax.set_mesh(mesh):
    abstract = nnx.eval_shape(build)
  graphdef, state = nnx.split(abstract)
  state_shardings = sharding_lib.shardings(state, mesh, rule)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       state, state_shardings)
  batch = batch_per_device * devices
  data = NamedSharding(mesh, P("data"))
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8, sharding=data)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data)
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))
  which = steps.trainable(config)
  k = int(config.get("accumulate_steps") or 1)

  def pure_step(state, images, labels, key):
    net, optimizer, average = nnx.merge(graphdef, state)
    metrics = steps.train_step(net, optimizer, images, labels, key, None, average,
                               accumulate_steps=k, rule=rule, trainable=which)
    return nnx.state((net, optimizer, average)), metrics

  with jax.set_mesh(mesh):
    compiled = jax.jit(pure_step, donate_argnums=0, out_shardings=(state_shardings, None)).lower(
        state, images, labels, key).compile()
  analysis = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if cost else {}) if isinstance(cost, list | tuple) else (cost or {})
  seconds = time.time() - start
  argument = int(analysis.argument_size_in_bytes)
  output = int(analysis.output_size_in_bytes)
  alias = int(analysis.alias_size_in_bytes)
  temp = int(analysis.temp_size_in_bytes)
  total = argument + output - alias + temp
  params = nnx.state(abstract[0], nnx.Param)
  trained = nnx.state(abstract[0], steps.trainable_filter(which))
  return {
      "model": config.model, "sharding": rule.kind,
      "devices": devices, "batch_per_device": batch_per_device, "image_size": image_size,
      "dtype": config.model_config.get("dtype", "float32"), "accumulate_steps": k,
      "trainable": which, "ema": bool(config.get("ema_decay")),
      "parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
      "trained_parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(trained)),
      "bytes_per_device": total, "gib_per_device": round(total / 2**30, 3),
      "argument_bytes": argument, "output_bytes": output, "alias_bytes": alias,
      "temp_bytes": temp, "flops": float(cost.get("flops", 0.0)),
      "platform": available[0].platform,
      "compile_seconds": round(seconds, 1),
  }


def max_batch(at_one: dict, at_probe: dict, capacity_gib: float, headroom: float) -> int:
  """Largest per-device batch b with memory(1) + (b - 1) x slope <= capacity x (1 - headroom),
  the slope from the two compiled cases (0 if even batch 1 does not fit)."""
  b1, b2 = at_one["batch_per_device"], at_probe["batch_per_device"]
  m1, m2 = at_one["bytes_per_device"], at_probe["bytes_per_device"]
  slope = max(1.0, (m2 - m1) / (b2 - b1))
  budget = capacity_gib * 2**30 * (1.0 - headroom)
  if m1 > budget:
    return 0
  return int(b1 + (budget - m1) // slope)


def _int_list(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--shardings", default="data,fsdp")
  parser.add_argument("--devices", default="1,4,8")
  parser.add_argument("--batches", default="1",
                      help="per-device batches to print (besides the fit's two)")
  parser.add_argument("--probe_batch", type=int, default=8,
                      help="second per-device batch of the fit (memory is affine in the batch)")
  parser.add_argument("--headroom", type=float, default=0.1,
                      help="fraction of each card left free in the fit")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--accumulate_steps", type=int, default=1)
  parser.add_argument("--ema", action="store_true", help="keep the weight average too")
  parser.add_argument("--no_fit", action="store_true", help="skip the largest-batch lines")
  parser.add_argument("--frozen_rows", action="store_true",
                      help="instead: ViT-S and ViT-G on 1 device, backbone frozen vs trained")
  args = parser.parse_args(argv)
  devices_list = _int_list(args.devices)
  _ensure_devices(max(devices_list))
  start = time.time()

  def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)

  if args.frozen_rows:
    for model in ("vit_small_patch14", "vit_giant_patch14"):
      for frozen in (False, True):
        emit(memory_analysis(model, devices=1, batch_per_device=32, frozen=frozen,
                             image_size=args.image_size))
    print(f"# total {time.time() - start:.0f} s", file=sys.stderr)
    return
  common = dict(image_size=args.image_size, accumulate_steps=args.accumulate_steps, ema=args.ema)
  for model in args.models.split(","):
    for devices in devices_list:
      for sharding in args.shardings.split(","):
        if sharding == "fsdp" and devices == 1:
          continue  # one device: nothing to shard, the same program as 'data'
        batches = sorted(set(_int_list(args.batches)) | (set() if args.no_fit
                                                         else {1, args.probe_batch}))
        results = {}
        for b in batches:
          results[b] = memory_analysis(model, sharding=sharding, devices=devices,
                                       batch_per_device=b * args.accumulate_steps, **common)
          emit(results[b])
        if not args.no_fit:
          one, probe = results[1], results[args.probe_batch]
          emit({"kind": "fit", "model": model, "sharding": sharding, "devices": devices,
                "image_size": args.image_size, "accumulate_steps": args.accumulate_steps,
                "ema": args.ema, "headroom": args.headroom,
                "gib_per_image": round((probe["bytes_per_device"] - one["bytes_per_device"])
                                       / (args.probe_batch - 1) / 2**30, 4),
                "max_batch_per_device": {str(c): max_batch(one, probe, c, args.headroom)
                                         for c in CARDS_GIB}})
  print(f"# total {time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
  main()
