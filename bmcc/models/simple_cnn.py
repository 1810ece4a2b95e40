"""A plain CNN in the spirit of the old project: conv + batch-norm + ReLU + max-pool blocks, an
optional dense layer with dropout, a linear head. Global average pooling before the head keeps it
independent of image size."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Kernel initialisers by name: flax's default (LeCun normal, variance 1 / fan_in) or PyTorch's
# default for Conv2d and Linear (uniform in +- 1 / sqrt(fan_in), variance 1 / (3 fan_in)). Behind
# batch norm the scale sets how fast Adam moves the weights relative to their size.
INITS = {
    "lecun": nnx.initializers.lecun_normal(),
    "pytorch": nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
}


class ConvBlock(nnx.Module):
  """Two 3x3 conv + batch-norm + ReLU layers, then 2x2 max-pooling."""

  def __init__(self, in_features: int, out_features: int, *, dtype: jnp.dtype, rngs: nnx.Rngs,
               kernel_init=INITS["lecun"]):
    self.conv1 = nnx.Conv(in_features, out_features, (3, 3), use_bias=False, dtype=dtype,
                          kernel_init=kernel_init, rngs=rngs)
    self.norm1 = nnx.BatchNorm(out_features, momentum=0.9, dtype=dtype, rngs=rngs)
    self.conv2 = nnx.Conv(out_features, out_features, (3, 3), use_bias=False, dtype=dtype,
                          kernel_init=kernel_init, rngs=rngs)
    self.norm2 = nnx.BatchNorm(out_features, momentum=0.9, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.norm1(self.conv1(x)))
    x = nnx.relu(self.norm2(self.conv2(x)))
    return nnx.max_pool(x, (2, 2), strides=(2, 2))


class SimpleCNN(nnx.Module):
  """Conv blocks of widths `features`, global average pooling, dense + ReLU (`dense` > 0; 0: none),
  dropout, linear head. `init`: the kernels' initialiser, 'lecun' or 'pytorch' (`INITS`)."""

  DEFAULT_FEATURES = (32, 64, 128, 256)

  def __init__(self, *, num_classes: int, rngs: nnx.Rngs,
               features: Sequence[int] = DEFAULT_FEATURES, dense: int = 256,
               dropout: float = 0.3, dtype: str = "float32", init: str = "lecun"):
    if init not in INITS:
      raise ValueError(f"init={init!r}: use one of {', '.join(INITS)}.")
    compute_dtype = jnp.dtype(dtype)
    kernel_init = INITS[init]
    widths = [3, *features]
    self.blocks = nnx.List([
        ConvBlock(a, b, dtype=compute_dtype, rngs=rngs, kernel_init=kernel_init)
        for a, b in zip(widths[:-1], widths[1:], strict=True)
    ])
    self.dense = (nnx.Linear(widths[-1], dense, dtype=compute_dtype, kernel_init=kernel_init,
                             rngs=rngs) if dense else None)
    self.dropout = nnx.Dropout(dropout)
    self.head = nnx.Linear(dense or widths[-1], num_classes, dtype=compute_dtype,
                           kernel_init=kernel_init, rngs=rngs)
    self.compute_dtype = compute_dtype

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    return self.logits_from_feature_map(self.feature_map(x), rngs=rngs)

  # For Grad-CAM (bmcc.explain): the forward pass split at the last conv block; together they
  # equal __call__.
  def feature_map(self, x: jax.Array) -> jax.Array:
    """The last conv block's output [N, h, w, features[-1]] (before global average pooling)."""
    x = x.astype(self.compute_dtype)
    for block in self.blocks:
      x = block(x)
    return x

  def logits_from_feature_map(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Float32 logits from `feature_map`'s output: pooling, dense, dropout and head."""
    x = x.mean(axis=(1, 2))
    if self.dense is not None:
      x = nnx.relu(self.dense(x))
    return self.head(self.dropout(x, rngs=rngs)).astype(jnp.float32)
