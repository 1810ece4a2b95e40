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
  reduce-scatters its gradient.

Kept free of TensorFlow, TFDS, grain and clu (benchmarks import it on a bare GPU machine).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
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


_BATCH_SHARDED = contextvars.ContextVar("bmcc_batch_sharded_activations", default=False)


@contextlib.contextmanager
def batch_sharded_activations() -> Iterator[None]:
  """While tracing inside this context, `constrain_batch` pins activations to the batch split.

  Under FSDP the training step traces the model inside it. Without the pin XLA's partitioner may
  instead gather the activations of the whole global batch onto every device and keep the
  weights split (tensor-parallel style), which makes each device's activation memory grow with
  the global batch instead of its own share.
  """
  token = _BATCH_SHARDED.set(True)
  try:
    yield
  finally:
    _BATCH_SHARDED.reset(token)


def constrain_batch(x: jax.Array) -> jax.Array:
  """`x` [N, ...] constrained to be split over the mesh's `data` axis along N, when traced in
  `batch_sharded_activations` under a mesh whose `data` axis divides N; else `x` unchanged."""
  if not _BATCH_SHARDED.get():
    return x
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or AXIS not in mesh.axis_names or x.ndim == 0 or x.shape[0] % mesh.shape[AXIS]:
    return x
  return jax.lax.with_sharding_constraint(x, P(AXIS))
