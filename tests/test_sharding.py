"""FSDP (`config.sharding`), gradient accumulation (`config.accumulate_steps`) and a frozen
backbone (`config.finetune.freeze_backbone`) in the compiled training step, on the four fake CPU
devices of conftest.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bmcc import sharding, steps
from configs import demo


def _vit_config(**overrides) -> ml_collections.ConfigDict:
  """A two-block ViT on 28 px inputs, float32, no batch norm, no dropout."""
  config = demo.get_config()
  config.model = "vit_small_patch14"
  config.model_config = ml_collections.ConfigDict(
      {"embed_dim": 64, "depth": 2, "num_heads": 2, "image_size": 28, "dtype": "float32"})
  config.image_size = 28
  config.batch_size = 16
  config.warmup_steps = 0
  config.num_train_steps = 30
  config.learning_rate = 1e-3
  for key, value in overrides.items():
    config[key] = value
  return config


def _state(config, mesh, num_classes: int = 21):
  model = steps.create_model(config, num_classes)
  lr = steps.create_learning_rate_fn(config, steps.resolve_durations(config, 100))
  optimizer = steps.create_train_optimizer(config, lr, model)
  rule = sharding.rule_from_config(config)
  nnx.update((model, optimizer), sharding.place(nnx.state((model, optimizer)), mesh, rule))
  ema = steps.create_ema(config, model)
  if ema is not None:
    nnx.update(ema, sharding.place(nnx.state(ema), mesh, rule))
  return model, optimizer, ema


def _batches(n: int, batch: int, size: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return [(rng.integers(0, 255, (batch, size, size, 3), dtype=np.uint8),
           rng.integers(0, 21, (batch,), dtype=np.int32)) for _ in range(n)]


def _train(config, batches, devices):
  mesh = steps.create_mesh(devices)
  model, optimizer, ema = _state(config, mesh)
  data = NamedSharding(mesh, P("data"))
  options = dict(accumulate_steps=config.accumulate_steps,
                 rule=sharding.rule_from_config(config), trainable=steps.trainable(config))
  outs = []
  with jax.set_mesh(mesh):
    for step, (images, labels) in enumerate(batches, start=1):
      outs.append(steps.train_step(model, optimizer, jax.device_put(images, data),
                                   jax.device_put(labels, data),
                                   jax.random.fold_in(jax.random.key(1), step), None, ema,
                                   label_smoothing=config.label_smoothing, **options))
  _train.grad_norms = [float(o["grad_norm"]) for o in outs]  # Adam hides a gradient's scale
  return [float(o["loss"]) for o in outs], model, optimizer, ema


def test_rule_splits_the_largest_divisible_dimension_of_large_arrays():
  rule = sharding.Rule("fsdp", min_bytes=4 * 2**20)
  assert rule.spec((1024, 3072), 4, 4) == P(None, "data")  # 12 MiB: the larger dimension
  assert rule.spec((3072, 1024), 4, 8) == P("data")
  assert rule.spec((14, 14, 3, 2048), 4, 8) == P(None, None, None, "data")  # 4.6 MiB
  assert rule.spec((1030, 1536), 4, 4) == P(None, "data")  # 1030 is not divisible by 4
  assert rule.spec((2048, 2048), 4, 4) == P(None, "data")  # a tie: the inner one
  assert rule.spec((1023, 1025), 4, 4) == P()  # nothing divisible: replicated
  assert rule.spec((1024, 1023), 4, 4) == P()  # 4 MiB - 4 KiB: under the threshold
  assert rule.spec((1024, 1024), 4, 4) == P(None, "data")  # exactly 4 MiB: split
  assert rule.spec((1024, 3072), 4, 1) == P()  # one device
  assert sharding.Rule("data").spec((1024, 3072), 4, 4) == P()
  with pytest.raises(ValueError, match="Unknown sharding 'model'"):
    sharding.Rule("model")


def test_fsdp_gives_data_parallel_losses_with_every_large_array_split_four_ways():
  """30 steps of a small ViT on 4 devices: the same losses (1e-5) under both layouts, and under
  FSDP every parameter, Adam moment and weight-average array of at least the threshold (lowered
  to 16 KiB so that this small ViT has some) is split 4 ways along one dimension."""
  min_bytes = 16 * 1024
  batches = _batches(30, 16, 28)
  config = _vit_config(sharding="data", ema_decay=0.9)
  data_losses, *_ = _train(config, batches, jax.devices()[:4])
  config = _vit_config(sharding="fsdp", fsdp_min_bytes=min_bytes, ema_decay=0.9)
  fsdp_losses, model, optimizer, ema = _train(config, batches, jax.devices()[:4])
  np.testing.assert_allclose(fsdp_losses, data_losses, rtol=1e-5)
  assert data_losses[0] != data_losses[-1]

  checked = {"model": 0, "optimizer": 0, "ema": 0}
  for name, module in (("model", model), ("optimizer", optimizer), ("ema", ema)):
    for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(module)):
      spec = x.sharding.spec
      if x.size * x.dtype.itemsize >= min_bytes:
        dim = list(spec).index("data")  # raises if not split
        assert x.sharding.shard_shape(x.shape)[dim] * 4 == x.shape[dim], (name, path, spec)
        checked[name] += 1
      else:
        assert all(s is None for s in spec), (name, path, spec)
  # qkv, proj, fc1, fc2 of 2 blocks, each in the model, the 2 Adam moments and the average.
  assert checked["model"] >= 8 and checked["optimizer"] >= 16 and checked["ema"] >= 8, checked


class _Unit(nnx.Module):
  """One FSDP unit: a 32 x 64 kernel (8 KiB, split 4 ways at a 1 KiB threshold)."""

  def __init__(self):
    self.linear = nnx.Linear(32, 64, rngs=nnx.Rngs(0))

  def __call__(self, x, *, rngs=None):
    return jnp.tanh(self.linear(x)) ** 2


def test_fsdp_call_gathers_in_the_unit_and_reduces_its_gradients_after_it():
  """`sharding.fsdp_call` traced in `fsdp_training`: the value and the gradients of a plain call
  (1e-5), and the program has the unit's gather tied to its input (an optimization barrier),
  recomputed in the backward pass (`remat`: a second barrier) and the gradient reduction tied
  to the input's gradient (a third); under the `data` rule the call is a plain one."""
  mesh = steps.create_mesh(jax.devices()[:4])
  graphdef, params = nnx.split(_Unit())
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 32)), jnp.float32)

  def value_and_grad(kind):  # one function per rule: jit and make_jaxpr cache by function
    def loss(params, x):
      with sharding.fsdp_training(sharding.Rule(kind, min_bytes=1024)):
        return sharding.fsdp_call(nnx.merge(graphdef, params), x).sum()
    return jax.value_and_grad(loss, argnums=(0, 1))

  results, programs = {}, {}
  with jax.set_mesh(mesh):
    for kind in ("data", "fsdp"):
      f = value_and_grad(kind)
      results[kind] = jax.jit(f)(params, x)
      programs[kind] = str(jax.make_jaxpr(f)(params, x))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               results["data"], results["fsdp"])
  assert float(jnp.abs(results["fsdp"][1][1]).max()) > 0  # a gradient to compare
  assert programs["fsdp"].count("optimization_barrier") == 3, programs["fsdp"]
  assert "remat" in programs["fsdp"] and "P(None, 'data')" in programs["fsdp"]
  assert "optimization_barrier" not in programs["data"] and "remat" not in programs["data"]


def test_four_micro_batches_of_16_make_the_update_of_one_batch_of_64():
  batches = _batches(2, 64, 28, seed=3)
  ref_losses, ref_model, _, _ = _train(_vit_config(batch_size=64), batches, jax.devices()[:4])
  ref_norms = _train.grad_norms
  losses, model, _, _ = _train(_vit_config(batch_size=64, accumulate_steps=4), batches,
                               jax.devices()[:4])
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  np.testing.assert_allclose(_train.grad_norms, ref_norms, rtol=1e-5)
  ref = nnx.to_pure_dict(nnx.state(ref_model, nnx.Param))
  new = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new, ref)


def test_accumulation_with_batch_norm_updates_statistics_once_per_micro_batch():
  """Documented behaviour (as PyTorch gradient accumulation): micro-batch j (examples j, j+k,
  ...) is normalised with its own statistics, the running statistics take one momentum step per
  micro-batch, and the update uses the mean of the micro-batches' gradients. Checked against
  that computed by hand, eagerly, one micro-batch after the other."""
  config = demo.get_config()  # the simple CNN: batch norm in every block
  config.model_config.features = (4, 8)
  config.model_config.dense = 8
  config.model_config.dropout = 0.0
  config.image_size = 16
  config.batch_size, config.accumulate_steps, config.warmup_steps = 16, 2, 0
  config.label_smoothing = 0.0
  [(images, labels)] = _batches(1, 16, 16, seed=5)
  _, model, _, _ = _train(config, [(images, labels)], jax.devices()[:4])
  [grad_norm] = _train.grad_norms

  # By hand: the same initial state, two eager micro-batches, one update.
  mesh = steps.create_mesh(jax.devices()[:1])
  ref, optimizer, _ = _state(config, mesh)
  ref.train()
  grads = []
  for j in range(2):
    def loss_fn(m, j=j):
      logits = m(steps.normalize_input(m, images[j::2]))
      return optax_ce(logits, labels[j::2])
    grads.append(nnx.grad(loss_fn)(ref))  # updates ref's batch statistics, as training does
  mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  np.testing.assert_allclose(grad_norm, float(optax.tree.norm(mean)), rtol=1e-5)
  optimizer.update(ref, mean)
  expected = nnx.to_pure_dict(nnx.state(ref))
  got = nnx.to_pure_dict(nnx.state(model))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, expected)
  # And it is not what one batch of 16 gives: its statistics are the whole batch's.
  config.accumulate_steps = 1
  _, whole, _, _ = _train(config, [(images, labels)], jax.devices()[:4])
  stats = nnx.to_pure_dict(nnx.state(whole, nnx.BatchStat))
  assert not all(np.allclose(a, b, rtol=1e-5) for a, b in zip(
      jax.tree.leaves(stats), jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))),
      strict=True))


def optax_ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_frozen_backbone_has_no_gradient_and_no_optimizer_state():
  """`finetune.freeze_backbone`: the backbone stays bit-identical, only the head has Adam
  moments, and the compiled step does far less work (no backward pass through the backbone)."""
  import sys

  from tests.helpers import REPO
  sys.path.insert(0, f"{REPO}/bench")
  import memory  # noqa: PLC0415

  config = _vit_config()
  config.finetune.freeze_backbone = True
  batches = _batches(2, 16, 28)
  model0 = steps.create_model(config, 21)
  before = nnx.to_pure_dict(nnx.state(model0, nnx.Param))
  losses, model, optimizer, _ = _train(config, batches, jax.devices()[:4])
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for key in before:
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[key]),
                                                   jax.tree.leaves(after[key]), strict=True))
    assert same == (key != "head"), key
  head_leaves = len(jax.tree.leaves(before["head"]))
  moments = [x for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(optimizer))
             if x.ndim > 0]
  assert len(moments) == 2 * head_leaves  # mu and nu of the head's kernel and bias, nothing else

  full = memory.memory_analysis("vit_small_patch14", devices=1, batch_per_device=4,
                                image_size=28, dtype="float32",
                                config=_memory_config(config, frozen=False))
  frozen = memory.memory_analysis("vit_small_patch14", devices=1, batch_per_device=4,
                                  image_size=28, dtype="float32",
                                  config=_memory_config(config, frozen=True))
  assert frozen["trained_parameters"] == 64 * 21 + 21
  assert frozen["flops"] < 0.5 * full["flops"], (frozen["flops"], full["flops"])
  assert frozen["argument_bytes"] < 0.5 * full["argument_bytes"]


def _memory_config(config, *, frozen: bool):
  config = ml_collections.ConfigDict(config.to_dict())
  config.finetune.freeze_backbone = frozen
  return config


def test_a_run_does_not_resume_with_another_set_of_trained_parameters():
  """The optimizer state differs (a frozen backbone has none): refused with a clear error; the
  sharding may change between runs."""
  from bmcc import checkpointing
  from bmcc.config_validation import ConfigError

  config = _vit_config()
  saved = checkpointing.run_metadata(config, ("BLA", "EBO"))
  config.sharding = "fsdp"
  checkpointing.check_compatible(saved, checkpointing.run_metadata(config, ("BLA", "EBO")), "w")
  config.finetune.freeze_backbone = True
  with pytest.raises(ConfigError, match="made with trainable='all', but the config says 'head'"):
    checkpointing.check_compatible(saved, checkpointing.run_metadata(config, ("BLA", "EBO")), "w")
