"""Where each array of the training state lives on the mesh: replicated, or sharded (FSDP).

One mesh (`bmcc.steps.create_mesh`: one axis `data` over all devices of all processes) serves both
layouts of `config.sharding`:

- `"data"`: every parameter, optimizer moment and weight-average array is replicated; only the
  batch is split over `data` (XLA all-reduces the gradients).
- `"fsdp"`: big_vision's rule (`big_vision/sharding.py`, `fsdp`), written afresh here: an array of
  at least `config.fsdp_min_bytes` (default 4 MiB) is split along its largest dimension that the
  device count divides (the next largest if not, and so on); smaller arrays, and arrays with no
  divisible dimension, stay replicated. The batch is still split over the same `data` axis. The
  rule looks at shapes only, so a parameter, its gradient, its two Adam moments and its weight
  average always share one layout. XLA gathers each weight where a matrix product needs it and
  reduces its gradient to the shards. A model marks its FSDP units (a ViT: each block) with
  `fsdp_call`, which gathers a unit's weights right before it, gathers them again in the
  backward pass instead of keeping them, and reduces the unit's gradients right after its
  backward pass (left alone, XLA's CPU compiler keeps every block's gathered weights and
  full-size gradients alive at once: about one float32 copy of the model per device).

Kept free of TensorFlow, TFDS, grain and clu (benchmarks import it on a bare GPU machine).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"
SHARDINGS = ("data", "fsdp")
DEFAULT_MIN_BYTES = 4 * 2**20


@dataclasses.dataclass(frozen=True)
class Rule:
  """The layout of the training state: `kind` 'data' (replicated) or 'fsdp' (sharded arrays of
  at least `min_bytes` bytes). Hashable, so it can be a static argument of a jitted step."""

  kind: str = "data"
  min_bytes: int = DEFAULT_MIN_BYTES

  def __post_init__(self):
    if self.kind not in SHARDINGS:
      raise ValueError(f"Unknown sharding {self.kind!r}: use one of {', '.join(SHARDINGS)}.")

  def spec(self, shape: tuple[int, ...], itemsize: int, num_devices: int) -> P:
    """The PartitionSpec of an array of `shape` with `itemsize`-byte elements over `num_devices`."""
    if self.kind == "data" or num_devices == 1:
      return P()
    if math.prod(shape) * itemsize < self.min_bytes:
      return P()
    # Largest dimension first; among equal sizes the later (inner) one, as big_vision's stable
    # argsort of the reversed order gives.
    for dim in sorted(range(len(shape)), key=lambda d: (shape[d], d), reverse=True):
      if shape[dim] % num_devices == 0:
        return P(*([None] * dim + [AXIS]))
    return P()


REPLICATED = Rule("data")


def rule_from_config(config: Any) -> Rule:
  """The `Rule` of a config: `config.sharding` (default 'data') and `config.fsdp_min_bytes`."""
  min_bytes = config.get("fsdp_min_bytes")
  return Rule(kind=config.get("sharding") or "data",
              min_bytes=DEFAULT_MIN_BYTES if min_bytes is None else int(min_bytes))


def _spec_of(rule: Rule, leaf: Any, num_devices: int) -> P:
  shape = tuple(getattr(leaf, "shape", ()))
  dtype = getattr(leaf, "dtype", None)
  itemsize = np.dtype(dtype).itemsize if dtype is not None and shape else 1
  return rule.spec(shape, itemsize, num_devices)


def shardings(tree: Any, mesh: Mesh, rule: Rule) -> Any:
  """A NamedSharding for every array (or ShapeDtypeStruct) leaf of `tree` under `rule`."""
  return jax.tree.map(lambda x: NamedSharding(mesh, _spec_of(rule, x, mesh.size)), tree)


def place(tree: Any, mesh: Mesh, rule: Rule) -> Any:
  """`tree`'s arrays put on `mesh` as `rule` says (device_put; works with several processes when
  every process holds the same full values)."""
  return jax.device_put(tree, shardings(tree, mesh, rule))


def constrain(tree: Any, rule: Rule) -> Any:
  """Inside a jitted function run under `jax.set_mesh`: `tree`'s arrays constrained to `rule`'s
  layout over the current mesh's `data` axis (a no-op for 'data' or without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if rule.kind == "data" or mesh.empty or AXIS not in mesh.axis_names:
    return tree
  size = mesh.shape[AXIS]
  return jax.tree.map(
      lambda x: jax.lax.with_sharding_constraint(x, _spec_of(rule, x, size)), tree)


def describe(tree: Any) -> dict[str, int]:
  """{'sharded': n, 'replicated': m}: how many arrays of a placed `tree` are split, for logs."""
  counts = {"sharded": 0, "replicated": 0}
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    split = isinstance(sharding, NamedSharding) and any(s is not None for s in sharding.spec)
    counts["sharded" if split else "replicated"] += 1
  return counts


_FSDP_RULE: contextvars.ContextVar[Rule | None] = contextvars.ContextVar("bmcc_fsdp_rule",
                                                                    default=None)


@contextlib.contextmanager
def fsdp_training(rule: Rule) -> Iterator[None]:
  """While tracing inside this context, the model follows FSDP's discipline (`rule`).

  The training step traces the model inside it when `rule.kind` is 'fsdp'. Two things then
  happen, both no-ops elsewhere:

  - `constrain_batch` pins activations to the batch split. Without the pin XLA's partitioner
    may instead gather the activations of the whole global batch onto every device and keep the
    weights split (tensor-parallel style), which makes each device's activation memory grow
    with the global batch instead of its own share.
  - `fsdp_call` gathers one block's weights just before the block runs (again in the backward
    pass instead of keeping them) and reduces the block's gradients to their shards right
    after its backward pass.
  """
  token = _FSDP_RULE.set(rule)
  try:
    yield
  finally:
    _FSDP_RULE.reset(token)


def _training_mesh_size() -> int | None:
  """The `data` axis size when tracing an FSDP training step under a mesh, else None."""
  rule = _FSDP_RULE.get()
  if rule is None or rule.kind != "fsdp":
    return None
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or AXIS not in mesh.axis_names:
    return None
  return mesh.shape[AXIS]


def constrain_batch(x: jax.Array) -> jax.Array:
  """`x` [N, ...] constrained to be split over the mesh's `data` axis along N, when traced in
  `fsdp_training` under a mesh whose `data` axis divides N; else `x` unchanged."""
  size = _training_mesh_size()
  if size is None or x.ndim == 0 or x.shape[0] % size:
    return x
  return jax.lax.with_sharding_constraint(x, P(AXIS))


def _specs(rule: Rule, tree: Any, size: int) -> Any:
  return jax.tree.map(lambda x: _spec_of(rule, x, size), tree)


def _constrain_to(tree: Any, specs: Any) -> Any:
  return jax.tree.map(jax.lax.with_sharding_constraint, tree, specs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _gather(rule: Rule, size: int, params: Any, x: jax.Array) -> tuple[Any, jax.Array]:
  """(`params` replicated, `x`): the block's weights gathered once its input `x` exists.

  The optimization barrier ties the gather to `x`, so XLA cannot hoist every block's gather to
  the start of the step (which keeps all gathered weights alive at once). Backward: the full
  gradients are reduced to `rule`'s shards, and the barrier ties the reduction to the input's
  gradient, so each block's gradients are reduced (and their full-size copies freed) before the
  backward pass moves on to the previous block instead of waiting for one all-reduce combined
  over the whole model at the end.
  """
  specs = _specs(rule, params, size)
  x, params = jax.lax.optimization_barrier((x, params))
  params = _constrain_to(params, specs)
  return _constrain_to(params, jax.tree.map(lambda _: P(), params)), x


def _gather_fwd(rule: Rule, size: int, params: Any, x: jax.Array):
  return _gather(rule, size, params, x), None


def _gather_bwd(rule: Rule, size: int, _: None, cotangents: tuple[Any, jax.Array]):
  grads, dx = cotangents
  specs = _specs(rule, grads, size)
  grads, dx = jax.lax.optimization_barrier((_constrain_to(grads, specs), dx))
  return _constrain_to(grads, specs), dx


_gather.defvjp(_gather_fwd, _gather_bwd)


def fsdp_call(module: Any, x: jax.Array, *, rngs: Any = None) -> jax.Array:
  """`module(x, rngs=rngs)`; when traced in `fsdp_training` under a mesh, as one FSDP unit.

  A transformer block is the unit: its weights that `rule` splits are gathered right before it
  runs and not kept for the backward pass (`nnx.remat` with `dots_saveable`: the activations
  that matrix products give are saved as without it; the gather and the cheap elementwise work
  after it run again in the backward pass), and its gradients are reduced to their shards as
  soon as its backward pass has made them (`_gather`). Without this XLA keeps every gathered
  weight from the forward to the backward pass and reduces the gradients late, so that about
  one full-size float32 copy of the model stays alive besides the shards. The values computed
  are the same as a plain call's. `module` must not update its own state in the call (a ViT
  block does not; `rngs` may be updated, by dropout).
  """
  size = _training_mesh_size()
  if size is None:
    return module(x, rngs=rngs)
  rule = _FSDP_RULE.get()
  params = nnx.state(module, nnx.Param)
  if all(s == P() for s in jax.tree.leaves(_specs(rule, params, size),
                                           is_leaf=lambda s: isinstance(s, P))):
    return module(x, rngs=rngs)  # nothing split: nothing to gather

  def apply(module, x, rngs):
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    params, x = _gather(rule, size, params, x)
    return nnx.merge(graphdef, params, rest)(x, rngs=rngs)

  return nnx.remat(apply, policy=jax.checkpoint_policies.dots_saveable)(module, x, rngs)
