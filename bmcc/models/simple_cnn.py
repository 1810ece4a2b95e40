"""A plain CNN in the spirit of the old project: conv + batch-norm + ReLU + max-pool blocks, a dense
head with dropout. Global average pooling before the head keeps it independent of image size."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class ConvBlock(nnx.Module):
  """Two 3x3 conv + batch-norm + ReLU layers, then 2x2 max-pooling."""

  def __init__(self, in_features: int, out_features: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(in_features, out_features, (3, 3), use_bias=False, dtype=dtype,
                          rngs=rngs)
    self.norm1 = nnx.BatchNorm(out_features, momentum=0.9, dtype=dtype, rngs=rngs)
    self.conv2 = nnx.Conv(out_features, out_features, (3, 3), use_bias=False, dtype=dtype,
                          rngs=rngs)
    self.norm2 = nnx.BatchNorm(out_features, momentum=0.9, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.norm1(self.conv1(x)))
    x = nnx.relu(self.norm2(self.conv2(x)))
    return nnx.max_pool(x, (2, 2), strides=(2, 2))


class SimpleCNN(nnx.Module):
  """Conv blocks of widths `features`, global average pooling, dense + dropout, linear head."""

  DEFAULT_FEATURES = (32, 64, 128, 256)

  def __init__(self, *, num_classes: int, rngs: nnx.Rngs,
               features: Sequence[int] = DEFAULT_FEATURES, dense: int = 256,
               dropout: float = 0.3, dtype: str = "float32"):
    compute_dtype = jnp.dtype(dtype)
    widths = [3, *features]
    self.blocks = nnx.List([
        ConvBlock(a, b, dtype=compute_dtype, rngs=rngs)
        for a, b in zip(widths[:-1], widths[1:], strict=True)
    ])
    self.dense = nnx.Linear(widths[-1], dense, dtype=compute_dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)
    self.head = nnx.Linear(dense, num_classes, dtype=compute_dtype, rngs=rngs)
    self.compute_dtype = compute_dtype

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    x = x.astype(self.compute_dtype)
    for block in self.blocks:
      x = block(x)
    x = x.mean(axis=(1, 2))
    x = nnx.relu(self.dense(x))
    x = self.dropout(x, rngs=rngs)
    return self.head(x).astype(jnp.float32)

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
    x = nnx.relu(self.dense(x.mean(axis=(1, 2))))
    return self.head(self.dropout(x, rngs=rngs)).astype(jnp.float32)
