"""ResNet-18/34/50 and ResNeXt-50 (32x4d) in Flax NNX, following torchvision / the flax examples.

The architecture is ResNet v1.5: a 7x7/2 stem convolution + batch-norm + ReLU + 3x3/2 max-pool,
four stages of residual blocks (basic blocks for ResNet-18/34, bottleneck blocks for ResNet-50 and
ResNeXt-50) whose first block in stages 2-4 downsamples with a stride on its 3x3 convolution, a
projection shortcut (1x1 conv + batch-norm) wherever the shape changes, global average pooling and
a linear head. Paddings match torchvision, so parameter counts and feature-map sizes agree with it.

Inputs are NHWC. Activations are computed in `dtype` (e.g. 'bfloat16'); parameters and batch-norm
statistics stay float32 and the logits are returned as float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# Kaiming-normal (fan-out, untruncated) initialisation of the convolutions, as in torchvision.
_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
_PAD1 = ((1, 1), (1, 1))


def _conv(in_features: int, out_features: int, kernel: int, *, strides: int = 1,
          groups: int = 1, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Conv:
  """Bias-free convolution with torchvision's padding (kernel // 2 on every side)."""
  pad = kernel // 2
  return nnx.Conv(in_features, out_features, (kernel, kernel), strides=(strides, strides),
                  padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=False,
                  kernel_init=_CONV_INIT, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def _norm(features: int, *, dtype: jnp.dtype, rngs: nnx.Rngs, zero_scale: bool = False
          ) -> nnx.BatchNorm:
  """Batch-norm with float32 parameters/statistics; scale initialised to zero if `zero_scale`."""
  scale_init = nnx.initializers.zeros_init() if zero_scale else nnx.initializers.ones_init()
  return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, scale_init=scale_init, dtype=dtype,
                       param_dtype=jnp.float32, rngs=rngs)


class Shortcut(nnx.Module):
  """Projection shortcut: strided 1x1 convolution + batch-norm."""

  def __init__(self, in_features: int, out_features: int, *, strides: int, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.conv = _conv(in_features, out_features, 1, strides=strides, dtype=dtype, rngs=rngs)
    self.norm = _norm(out_features, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(self.conv(x))


class BasicBlock(nnx.Module):
  """Two 3x3 conv + batch-norm layers with an identity or projection shortcut (ResNet-18/34)."""

  expansion = 1

  def __init__(self, in_features: int, planes: int, *, strides: int = 1, groups: int = 1,
               group_width: int = 64, zero_init_residual: bool = True, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    if groups != 1 or group_width != 64:
      raise ValueError("BasicBlock supports only groups=1 and group_width=64.")
    out_features = planes * self.expansion
    self.conv1 = _conv(in_features, planes, 3, strides=strides, dtype=dtype, rngs=rngs)
    self.norm1 = _norm(planes, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(planes, out_features, 3, dtype=dtype, rngs=rngs)
    self.norm2 = _norm(out_features, dtype=dtype, rngs=rngs, zero_scale=zero_init_residual)
    self.shortcut = (Shortcut(in_features, out_features, strides=strides, dtype=dtype, rngs=rngs)
                     if strides != 1 or in_features != out_features else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    residual = x if self.shortcut is None else self.shortcut(x)
    y = nnx.relu(self.norm1(self.conv1(x)))
    y = self.norm2(self.conv2(y))
    return nnx.relu(y + residual)


class Bottleneck(nnx.Module):
  """1x1 reduce, (grouped) 3x3 carrying the stride, 1x1 expand (x4); ResNet-50 / ResNeXt-50.

  The inner width is `planes * group_width // 64 * groups` as in torchvision: `planes` for
  ResNet-50 (groups=1, group_width=64), `2 * planes` for ResNeXt-50 32x4d (groups=32,
  group_width=4).
  """

  expansion = 4

  def __init__(self, in_features: int, planes: int, *, strides: int = 1, groups: int = 1,
               group_width: int = 64, zero_init_residual: bool = True, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    inner = planes * group_width // 64 * groups
    out_features = planes * self.expansion
    self.conv1 = _conv(in_features, inner, 1, dtype=dtype, rngs=rngs)
    self.norm1 = _norm(inner, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(inner, inner, 3, strides=strides, groups=groups, dtype=dtype, rngs=rngs)
    self.norm2 = _norm(inner, dtype=dtype, rngs=rngs)
    self.conv3 = _conv(inner, out_features, 1, dtype=dtype, rngs=rngs)
    self.norm3 = _norm(out_features, dtype=dtype, rngs=rngs, zero_scale=zero_init_residual)
    self.shortcut = (Shortcut(in_features, out_features, strides=strides, dtype=dtype, rngs=rngs)
                     if strides != 1 or in_features != out_features else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    residual = x if self.shortcut is None else self.shortcut(x)
    y = nnx.relu(self.norm1(self.conv1(x)))
    y = nnx.relu(self.norm2(self.conv2(y)))
    y = self.norm3(self.conv3(y))
    return nnx.relu(y + residual)


class Stem(nnx.Module):
  """7x7/2 convolution + batch-norm + ReLU + 3x3/2 max-pool: 4x spatial downsampling."""

  def __init__(self, in_features: int, out_features: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.conv = _conv(in_features, out_features, 7, strides=2, dtype=dtype, rngs=rngs)
    self.norm = _norm(out_features, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.norm(self.conv(x)))
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=_PAD1)


class ResNet(nnx.Module):
  """Generic ResNet / ResNeXt classifier on NHWC images.

  Attributes:
    stem: the `Stem` (callable on its own, e.g. to inspect activations).
    blocks: `nnx.List` of all residual blocks, stage by stage (`stage_sizes` blocks per stage).
    head: the linear classifier on the globally average-pooled features.
  """

  def __init__(self, *, num_classes: int, rngs: nnx.Rngs, block: type[BasicBlock | Bottleneck],
               stage_sizes: Sequence[int], groups: int = 1, group_width: int = 64,
               width: int = 64, in_features: int = 3, dropout: float = 0.0,
               zero_init_residual: bool = True, dtype: str = "float32"):
    """Builds the network.

    Args:
      num_classes: size of the head.
      rngs: parameter initialisation keys.
      block: `BasicBlock` or `Bottleneck`.
      stage_sizes: number of blocks in each stage; stage i has `width * 2**i` planes.
      groups: groups of the 3x3 convolution in bottleneck blocks (ResNeXt cardinality).
      group_width: width per group at `width` planes 64 (ResNeXt "d"; 64 for plain ResNet).
      width: channels of the stem and planes of the first stage (64 in the standard nets).
      in_features: input channels.
      dropout: dropout rate before the head.
      zero_init_residual: initialise the last batch-norm scale of each block to zero, so every
        residual block starts as the identity.
      dtype: compute dtype of the activations; parameters stay float32.
    """
    compute_dtype = jnp.dtype(dtype)
    self.compute_dtype = compute_dtype
    self.stage_sizes = tuple(stage_sizes)
    self.stem = Stem(in_features, width, dtype=compute_dtype, rngs=rngs)
    blocks = []
    features = width
    for stage, num_blocks in enumerate(stage_sizes):
      planes = width * 2**stage
      for index in range(num_blocks):
        strides = 2 if stage > 0 and index == 0 else 1
        blocks.append(block(features, planes, strides=strides, groups=groups,
                            group_width=group_width, zero_init_residual=zero_init_residual,
                            dtype=compute_dtype, rngs=rngs))
        features = planes * block.expansion
    self.blocks = nnx.List(blocks)
    self.num_features = features
    self.dropout = nnx.Dropout(dropout)
    self.head = nnx.Linear(features, num_classes, dtype=compute_dtype, param_dtype=jnp.float32,
                           rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """Globally average-pooled features [N, num_features] (in the compute dtype)."""
    x = self.stem(x.astype(self.compute_dtype))
    for block in self.blocks:
      x = block(x)
    return x.mean(axis=(1, 2))

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Float32 logits [N, num_classes] for images [N, H, W, C]; `rngs` feeds dropout."""
    x = self.dropout(self.features(x), rngs=rngs)
    return self.head(x).astype(jnp.float32)

  # For Grad-CAM (bmcc.explain): the forward pass split after the last stage; together they
  # equal __call__.
  def feature_map(self, x: jax.Array) -> jax.Array:
    """The last stage's output [N, h, w, num_features] (before global average pooling)."""
    x = self.stem(x.astype(self.compute_dtype))
    for block in self.blocks:
      x = block(x)
    return x

  def logits_from_feature_map(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Float32 logits from `feature_map`'s output: pooling, dropout and head."""
    x = self.dropout(x.mean(axis=(1, 2)), rngs=rngs)
    return self.head(x).astype(jnp.float32)


def _build(num_classes: int, rngs: nnx.Rngs, defaults: dict[str, Any], kwargs: dict[str, Any]
           ) -> ResNet:
  """A ResNet from a named architecture's `defaults`, overridden by `kwargs` (e.g. tiny test
  variants with fewer blocks per stage)."""
  return ResNet(num_classes=num_classes, rngs=rngs, **{**defaults, **kwargs})


def resnet18(*, num_classes: int, rngs: nnx.Rngs, **kwargs: Any) -> ResNet:
  """ResNet-18: basic blocks [2, 2, 2, 2]."""
  return _build(num_classes, rngs, dict(block=BasicBlock, stage_sizes=(2, 2, 2, 2)), kwargs)


def resnet34(*, num_classes: int, rngs: nnx.Rngs, **kwargs: Any) -> ResNet:
  """ResNet-34: basic blocks [3, 4, 6, 3]."""
  return _build(num_classes, rngs, dict(block=BasicBlock, stage_sizes=(3, 4, 6, 3)), kwargs)


def resnet50(*, num_classes: int, rngs: nnx.Rngs, **kwargs: Any) -> ResNet:
  """ResNet-50 (v1.5): bottleneck blocks [3, 4, 6, 3]."""
  return _build(num_classes, rngs, dict(block=Bottleneck, stage_sizes=(3, 4, 6, 3)), kwargs)


def resnext50_32x4d(*, num_classes: int, rngs: nnx.Rngs, **kwargs: Any) -> ResNet:
  """ResNeXt-50 32x4d: bottlenecks [3, 4, 6, 3] with 32-group 3x3 convs, 4 channels per group."""
  return _build(num_classes, rngs,
                dict(block=Bottleneck, stage_sizes=(3, 4, 6, 3), groups=32, group_width=4), kwargs)
