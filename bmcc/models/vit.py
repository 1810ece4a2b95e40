"""DINOv2-style Vision Transformers (ViT-S/B/L/G with 14 px patches) in Flax NNX.

The layout follows DINOv2 and timm's `vit_*_patch14_dinov2` so that their weights load one to one
(see `bmcc.models.pretrained`): a 14x14/14 patch-embedding convolution, a CLS token, optional
register tokens, a learned absolute position embedding, pre-norm blocks (LayerNorm eps 1e-6,
multi-head attention with a fused qkv projection, LayerScale, a GELU MLP or a packed SwiGLU
feed-forward for ViT-G, stochastic depth) and a final LayerNorm. `features` is the normalised CLS
token (timm's pre-logits with token pooling, DINOv2's `x_norm_clstoken`); `__call__` puts a linear
head on it.

Position embedding: stored for the patch grid of `image_size` (224 px -> 16 x 16 by default). An
input of another size gets the patch part resampled bicubically exactly as DINOv2 does it (PyTorch
`interpolate(mode="bicubic", antialias=False)` with scale factor (grid + 0.1) / stored grid), so
features at any size match DINOv2's. As in timm, a model without registers keeps a position for
the CLS token inside `pos_embed`; with registers, `pos_embed` covers the patches only (the CLS
position is folded into `cls_token`) and neither CLS nor registers get a position.

Activations are computed in `dtype`; parameters stay float32 and outputs are returned as float32.
Attention goes through `jax.nn.dot_product_attention` (pass `attention_impl="cudnn"` to force the
fused cuDNN kernel on a GPU with bfloat16 compute).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmcc import sharding

PATCH_SIZE = 14
# DINOv2's interpolate_offset: the scale factor of the position-embedding resampling is
# (new grid + 0.1) / old grid, a historical kludge kept for backward compatibility.
_INTERPOLATE_OFFSET = 0.1
_CUBIC_A = -0.75  # PyTorch's bicubic coefficient (non-antialiased path)
_LINEAR_INIT = nnx.initializers.truncated_normal(stddev=0.02)
_POS_INIT = nnx.initializers.truncated_normal(stddev=0.02)
_CLS_INIT = nnx.initializers.normal(stddev=1e-6)

# Widths, depths and heads of the DINOv2 sizes; ViT-G uses the SwiGLU feed-forward.
SIZES: dict[str, dict[str, Any]] = {
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "giant": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """Weights [..., 4] of the taps at floor-1 .. floor+2 for fractional offsets t (Keys, A=-0.75)."""
  a = _CUBIC_A

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] matrix of PyTorch's 1-D bicubic resampling as DINOv2 calls it.

  Source coordinate of output i: (i + 0.5) / s - 0.5 with s = (out_size + 0.1) / in_size
  (align_corners=False, the scale factor rather than the size ratio), taps clamped to the edge.
  """
  scale = (out_size + _INTERPOLATE_OFFSET) / in_size
  source = (np.arange(out_size) + 0.5) / scale - 0.5
  floor = np.floor(source)
  weights = _cubic_weights(source - floor)
  taps = np.clip(floor[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)
  matrix = np.zeros((out_size, in_size))
  np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.reshape(-1)), weights.reshape(-1))
  return matrix


def resample_patch_pos_embed(pos: jax.Array, src_grid: tuple[int, int],
                             dst_grid: tuple[int, int]) -> jax.Array:
  """Resamples patch position embeddings [1, Hs*Ws, D] to [1, Hd*Wd, D] as DINOv2 does.

  Works on numpy and jax arrays (the interpolation matrices are numpy constants). Returns the
  input unchanged when the grids agree, as DINOv2 does.
  """
  if tuple(src_grid) == tuple(dst_grid):
    return pos
  (hs, ws), (hd, wd) = src_grid, dst_grid
  rows = _bicubic_matrix(hs, hd).astype(np.float32)
  cols = _bicubic_matrix(ws, wd).astype(np.float32)
  if isinstance(pos, np.ndarray):
    out = np.einsum("ah,bw,hwd->abd", rows, cols, pos.astype(np.float32).reshape(hs, ws, -1))
  else:
    out = jnp.einsum("ah,bw,hwd->abd", rows, cols, pos.astype(jnp.float32).reshape(hs, ws, -1),
                     precision=jax.lax.Precision.HIGHEST)
  return out.reshape(1, hd * wd, -1)


def _linear(in_features: int, out_features: int, *, dtype: jnp.dtype,
            rngs: nnx.Rngs) -> nnx.Linear:
  """Linear layer with bias, float32 parameters and timm's truncated-normal(0.02) init."""
  return nnx.Linear(in_features, out_features, kernel_init=_LINEAR_INIT, dtype=dtype,
                    param_dtype=jnp.float32, rngs=rngs)


def _layer_norm(features: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm with eps 1e-6 (DINOv2), statistics in float32 with the two-pass variance."""
  return nnx.LayerNorm(features, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32,
                       use_fast_variance=False, rngs=rngs)


def swiglu_hidden(embed_dim: int, mlp_ratio: float) -> int:
  """Hidden width of DINOv2's SwiGLU feed-forward: 2/3 of the MLP width, rounded up to 8."""
  return (int(embed_dim * mlp_ratio * 2 / 3) + 7) // 8 * 8


class LayerScale(nnx.Module):
  """Per-channel residual scale `gamma` (CaiT / DINOv2), initialised to `init_value`."""

  def __init__(self, features: int, init_value: float):
    self.gamma = nnx.Param(jnp.full((features,), init_value, jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.gamma[...].astype(x.dtype)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection (biases on qkv and the output)."""

  def __init__(self, dim: int, num_heads: int, *, implementation: str | None, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"Width {dim} is not divisible by {num_heads} heads.")
    self.num_heads = num_heads
    self.implementation = implementation
    self.qkv = _linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = _linear(dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, tokens, dim = x.shape
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
    out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                       implementation=self.implementation)
    return self.proj(out.reshape(batch, tokens, dim))


class Mlp(nnx.Module):
  """fc1 -> exact (erf) GELU -> fc2."""

  def __init__(self, dim: int, hidden: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = _linear(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class SwiGLU(nnx.Module):
  """Packed SwiGLU: fc1 to 2 x hidden, silu(first half) * second half, fc2 (timm SwiGLUPacked).

  DINOv2 names the two projections `w12` and `w3`; timm `fc1` and `fc2`.
  """

  def __init__(self, dim: int, hidden: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, 2 * hidden, dtype=dtype, rngs=rngs)
    self.fc2 = _linear(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate, value = jnp.split(self.fc1(x), 2, axis=-1)
    return self.fc2(jax.nn.silu(gate) * value)


class Block(nnx.Module):
  """Pre-norm transformer block: x + drop_path(ls1(attn(norm1(x)))), same with the MLP."""

  def __init__(self, dim: int, num_heads: int, *, hidden: int, ffn: str, layer_scale: float,
               drop_path: float, attention_impl: str | None, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.norm1 = _layer_norm(dim, dtype=dtype, rngs=rngs)
    self.attn = Attention(dim, num_heads, implementation=attention_impl, dtype=dtype, rngs=rngs)
    self.ls1 = LayerScale(dim, layer_scale)
    self.norm2 = _layer_norm(dim, dtype=dtype, rngs=rngs)
    ffn_class = {"mlp": Mlp, "swiglu": SwiGLU}[ffn]
    self.mlp = ffn_class(dim, hidden, dtype=dtype, rngs=rngs)
    self.ls2 = LayerScale(dim, layer_scale)
    # Stochastic depth: dropout of whole examples (mask broadcast over tokens and channels).
    self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2))

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))), rngs=rngs)
    return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))), rngs=rngs)


class VisionTransformer(nnx.Module):
  """ViT on NHWC images with 14 px patches; see the module docstring for the layout.

  Attributes:
    patch_embed: the patch-embedding convolution (kernel [14, 14, 3, D]).
    cls_token: [1, 1, D]; reg_token: [1, R, D] when `num_registers` > 0, else None.
    pos_embed: [1, G*G (+1 without registers), D] for the grid G = image_size // 14.
    blocks: `nnx.List` of `Block`s; norm: the final LayerNorm; head: the linear classifier.
    num_features: D, the size of `features`.
  """

  def __init__(self, *, num_classes: int, rngs: nnx.Rngs, embed_dim: int, depth: int,
               num_heads: int, mlp_ratio: float = 4.0, ffn: str = "mlp", num_registers: int = 0,
               image_size: int = 224, layer_scale: float = 1e-5, drop_path_rate: float = 0.0,
               dropout: float = 0.0, attention_impl: str | None = None, in_features: int = 3,
               dtype: str = "float32"):
    """Builds the network.

    Args:
      num_classes: size of the linear head (0 gives an empty head; use `features`).
      rngs: parameter initialisation keys.
      embed_dim, depth, num_heads: width D, number of blocks and attention heads.
      mlp_ratio: MLP width / D (4 in DINOv2); with `ffn="swiglu"` the hidden width is
        `swiglu_hidden(D, mlp_ratio)` per half, as DINOv2's SwiGLUFFNFused.
      ffn: "mlp" (GELU) or "swiglu".
      num_registers: register tokens after the CLS token (DINOv2 with registers uses 4).
      image_size: the square input size the position embedding is stored for.
      layer_scale: initial LayerScale value.
      drop_path_rate: stochastic-depth rate of the last block, rising linearly from 0.
      dropout: dropout rate before the head.
      attention_impl: `implementation` of `jax.nn.dot_product_attention` (None, "xla", "cudnn").
      in_features: input channels.
      dtype: compute dtype of the activations; parameters stay float32.
    """
    if ffn not in ("mlp", "swiglu"):
      raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}.")
    if image_size < PATCH_SIZE:
      raise ValueError(f"image_size {image_size} is smaller than one {PATCH_SIZE} px patch.")
    compute_dtype = jnp.dtype(dtype)
    self.compute_dtype = compute_dtype
    self.patch_size = PATCH_SIZE
    self.grid = image_size // PATCH_SIZE
    self.num_features = embed_dim
    self.num_registers = num_registers
    self.embed_class = num_registers == 0
    self.patch_embed = nnx.Conv(in_features, embed_dim, (PATCH_SIZE, PATCH_SIZE),
                                strides=(PATCH_SIZE, PATCH_SIZE), padding="VALID",
                                dtype=compute_dtype, param_dtype=jnp.float32, rngs=rngs)
    self.cls_token = nnx.Param(_CLS_INIT(rngs.params(), (1, 1, embed_dim), jnp.float32))
    self.reg_token = (nnx.Param(_CLS_INIT(rngs.params(), (1, num_registers, embed_dim),
                                          jnp.float32)) if num_registers else None)
    num_pos = self.grid**2 + (1 if self.embed_class else 0)
    self.pos_embed = nnx.Param(_POS_INIT(rngs.params(), (1, num_pos, embed_dim), jnp.float32))
    hidden = swiglu_hidden(embed_dim, mlp_ratio) if ffn == "swiglu" else int(embed_dim * mlp_ratio)
    rates = np.linspace(0.0, drop_path_rate, depth) if depth else []
    self.blocks = nnx.List([
        Block(embed_dim, num_heads, hidden=hidden, ffn=ffn, layer_scale=layer_scale,
              drop_path=float(rate), attention_impl=attention_impl, dtype=compute_dtype, rngs=rngs)
        for rate in rates
    ])
    self.norm = _layer_norm(embed_dim, dtype=compute_dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)
    self.head = nnx.Linear(embed_dim, num_classes, dtype=compute_dtype, param_dtype=jnp.float32,
                           rngs=rngs)

  def _position_embedding(self, grid: tuple[int, int]) -> jax.Array:
    """Position embedding of the patches for a `grid` of patches, [1, gh*gw, D] float32."""
    pos = self.pos_embed[...]
    if self.embed_class:
      pos = pos[:, 1:]
    return resample_patch_pos_embed(pos, (self.grid, self.grid), grid)

  def tokens(self, x: jax.Array) -> jax.Array:
    """Embedded tokens [N, 1 + R + gh*gw, D] (CLS, registers, patches) before the blocks."""
    x = self.patch_embed(x.astype(self.compute_dtype))
    batch, gh, gw, dim = x.shape
    x = x.reshape(batch, gh * gw, dim) + self._position_embedding((gh, gw)).astype(x.dtype)
    cls = self.cls_token[...]
    if self.embed_class:
      cls = cls + self.pos_embed[:, :1]
    prefix = [jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, dim))]
    if self.reg_token is not None:
      prefix.append(jnp.broadcast_to(self.reg_token[...].astype(x.dtype),
                                     (batch, self.num_registers, dim)))
    return jnp.concatenate([*prefix, x], axis=1)

  def features(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Final-norm CLS token [N, D] (float32) for images [N, H, W, C]; `rngs` feeds drop-path."""
    x = self.tokens(x)
    for block in self.blocks:
      x = block(sharding.constrain_batch(x), rngs=rngs)  # a no-op outside FSDP training
    return self.norm(x)[:, 0].astype(jnp.float32)

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Float32 logits [N, num_classes]; `rngs` feeds drop-path and dropout in train mode."""
    x = self.dropout(self.features(x, rngs=rngs), rngs=rngs)
    return self.head(x.astype(self.compute_dtype)).astype(jnp.float32)


def _factory(size: str):
  """The registry constructor of one DINOv2 size."""

  def create(*, num_classes: int, rngs: nnx.Rngs, **kwargs: Any) -> VisionTransformer:
    return VisionTransformer(num_classes=num_classes, rngs=rngs, **{**SIZES[size], **kwargs})

  create.__name__ = f"vit_{size}_patch14"
  create.__doc__ = (f"ViT-{size[0].upper()}/14 (DINOv2): width {SIZES[size]['embed_dim']}, "
                    f"{SIZES[size]['depth']} blocks, {SIZES[size]['num_heads']} heads.")
  return create


vit_small_patch14 = _factory("small")
vit_base_patch14 = _factory("base")
vit_large_patch14 = _factory("large")
vit_giant_patch14 = _factory("giant")

