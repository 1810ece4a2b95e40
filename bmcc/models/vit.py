"""DINOv2-style Vision Transformers (ViT-S/B/L/G with 14 px patches) in Flax NNX.

The layout follows DINOv2 and timm's `vit_*_patch14_dinov2` so that their weights load one to one
(see `bmcc.models.pretrained`): a 14x14/14 patch-embedding convolution, a CLS token, optional
register tokens, a learned absolute position embedding, pre-norm blocks (LayerNorm eps 1e-6,
multi-head attention with a fused qkv projection, LayerScale, a GELU MLP or a packed SwiGLU
feed-forward for ViT-G, stochastic depth) and a final LayerNorm. `features` pools the normalised
tokens as `pooling` says: "cls" (the default) is the CLS token (timm's pre-logits with token
pooling, DINOv2's `x_norm_clstoken`, what DinoBloom's probes use); "cls_mean_patch" is the CLS
token followed by the mean of the patch tokens (registers excluded), 2 D values, DINOv2's linear
evaluation input with one block. `patch_tokens` gives the normalised patch tokens themselves.
`__call__` puts a linear head on `features`; `attention_maps` returns every block's attention
probabilities (for attention rollout, `bmcc.explain.methods`).

Position embedding: stored for the patch grid of `image_size` (224 px -> 16 x 16 by default). An
input of another size gets the patch part resampled bicubically by one of two rules
(`pos_embed_resampling`), so that features at any size match those of the weights' origin:

- "dinov2": the original DINOv2 hub models without registers (and DinoBloom): PyTorch
  `interpolate(mode="bicubic", antialias=False)` with scale factor (grid + 0.1) / stored grid.
- "antialias": DINOv2's `*_reg` hub models and timm (`resample_abs_pos_embed`): PyTorch's
  antialiased bicubic to the new size, no offset (`jax.image.resize(..., "bicubic",
  antialias=True)` computes the same weights).

"auto" (the default) is "antialias" with registers and "dinov2" without; `bmcc.models.pretrained`
picks the rule from the weight file's layout. As in timm, a model without registers keeps a
position for the CLS token inside `pos_embed`; with registers, `pos_embed` covers the patches only
(the CLS position is folded into `cls_token`) and neither CLS nor registers get a position.
Inputs whose sides are not multiples of the 14 px patch are refused, as DINOv2 refuses them.

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
RESAMPLING = ("dinov2", "antialias")  # position-embedding resampling rules (module docstring)
_LINEAR_INIT = nnx.initializers.truncated_normal(stddev=0.02)
_POS_INIT = nnx.initializers.truncated_normal(stddev=0.02)
_CLS_INIT = nnx.initializers.normal(stddev=1e-6)
# What `features` returns: the CLS token, or the CLS token and the mean patch token side by side.
POOLINGS = ("cls", "cls_mean_patch")

# Widths, depths and heads of the DINOv2 sizes; ViT-G uses the SwiGLU feed-forward.
SIZES: dict[str, dict[str, Any]] = {
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "giant": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}


def valid_sizes_near(size: int) -> list[int]:
  """The multiples of the patch size nearest `size` (below and above; one if `size` is one)."""
  below = size // PATCH_SIZE * PATCH_SIZE
  if below == size:
    return [size]
  return [n for n in (below, below + PATCH_SIZE) if n >= PATCH_SIZE]


def check_image_size(height: int, width: int, what: str = "input") -> None:
  """Raises ValueError unless `height` and `width` are multiples of the patch size.

  DINOv2 refuses such inputs too: the patch embedding would silently drop the last rows and
  columns (their gradient exactly 0).
  """
  for side in sorted({height, width}):
    if side % PATCH_SIZE:
      raise ValueError(
          f"The {what} size {height}x{width} px is not a multiple of the {PATCH_SIZE} px patch: "
          f"{side} px would lose its last {side % PATCH_SIZE} px (use "
          f"{' or '.join(map(str, valid_sizes_near(side)))} px).")


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


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel at |x| (support 2)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, np.zeros_like(x)))


def _antialiased_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] matrix of PyTorch's 1-D antialiased bicubic resampling to `out_size`.

  Keys' kernel with A=-0.5, widened by the downsampling factor in/out when it is above 1, taps
  beyond the edges dropped and the weights renormalised: PyTorch's `interpolate(size=...,
  mode="bicubic", antialias=True)`, which `jax.image.resize(..., "bicubic", antialias=True)`
  also computes. In float32 with PyTorch's own operations (its CPU `_upsample_bicubic2d_aa`), so
  that the rounding of the source coordinates agrees too (to ~1e-7 instead of ~2e-6).
  """
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  support = f32(2) * max(scale, f32(1))
  invscale = f32(1) / scale if scale >= 1 else f32(1)
  center = scale * (np.arange(out_size, dtype=f32) + f32(0.5))
  first = np.maximum((center - support + f32(0.5)).astype(np.int64), 0)
  stop = np.minimum((center + support + f32(0.5)).astype(np.int64), in_size)
  taps = np.arange(in_size)
  inside = (taps >= first[:, None]) & (taps < stop[:, None])
  weights = _keys_cubic((taps.astype(f32) - center[:, None] + f32(0.5)) * invscale, f32(-0.5))
  weights = np.where(inside, weights, f32(0))
  return (weights / weights.sum(axis=1, keepdims=True, dtype=f32)).astype(f32)


def _resampling_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
  if method == "dinov2":
    return _bicubic_matrix(in_size, out_size).astype(np.float32)
  if method == "antialias":
    return _antialiased_bicubic_matrix(in_size, out_size)
  raise ValueError(f"Unknown position-embedding resampling {method!r}: use one of "
                   f"{', '.join(RESAMPLING)}.")


def resample_patch_pos_embed(pos: jax.Array, src_grid: tuple[int, int],
                             dst_grid: tuple[int, int], method: str = "dinov2") -> jax.Array:
  """Resamples patch position embeddings [1, Hs*Ws, D] to [1, Hd*Wd, D].

  `method`: "dinov2" (offset 0.1, no antialias: DINOv2 without registers) or "antialias"
  (antialiased bicubic to the size: DINOv2 with registers, timm). Works on numpy and jax arrays
  (the interpolation matrices are numpy constants). Returns the input unchanged when the grids
  agree, as DINOv2 and timm do.
  """
  if tuple(src_grid) == tuple(dst_grid):
    return pos
  (hs, ws), (hd, wd) = src_grid, dst_grid
  rows = _resampling_matrix(hs, hd, method)
  cols = _resampling_matrix(ws, wd, method)
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


_CUDNN_TOKEN_MULTIPLE = 64  # cuDNN flash attention in training: sequence lengths in multiples of 64


def _cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """cuDNN's fused (flash) attention at any token count.

  In training cuDNN takes only sequence lengths that are multiples of 64 (257 tokens at 224 px do
  not qualify): the tokens are padded to the next multiple and the padded ones masked out, which
  gives exactly the unpadded attention (`tests/test_vit.py` checks it with XLA's implementation).
  """
  tokens = q.shape[1]
  pad = -tokens % _CUDNN_TOKEN_MULTIPLE
  if not pad:
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  q, k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (q, k, v))
  lengths = jnp.full((q.shape[0],), tokens, jnp.int32)
  return jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths,
                                      key_value_seq_lengths=lengths,
                                      implementation="cudnn")[:, :tokens]


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
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.implementation == "cudnn":
      out = _cudnn_attention(q, k, v)
    elif self.implementation is None and jax.default_backend() == "gpu":
      # jax's own default picks XLA's unfused attention at 257 tokens (1,656-1,711 images/s for
      # ViT-B/14 training on an H200, against 2,367 through cuDNN padded): try cuDNN first.
      try:
        out = _cudnn_attention(q, k, v)
      except (NotImplementedError, RuntimeError, ValueError):  # no cuDNN, or an unsupported GPU
        out = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    else:
      out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
    return self.proj(out.reshape(batch, tokens, dim))

  def weights(self, x: jax.Array) -> jax.Array:
    """The attention probabilities [B, heads, T, T] (float32; rows sum to 1) that `__call__`
    applies to the values: softmax(q k^T / sqrt(head width)) over the keys."""
    batch, tokens, dim = x.shape
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
    q, k = qkv[:, :, 0].astype(jnp.float32), qkv[:, :, 1].astype(jnp.float32)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dim // self.num_heads)
    return jax.nn.softmax(scores, axis=-1)


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
    num_features: the size of `features`: D, or 2 D with `pooling="cls_mean_patch"`.
  """

  def __init__(self, *, num_classes: int, rngs: nnx.Rngs, embed_dim: int, depth: int,
               num_heads: int, mlp_ratio: float = 4.0, ffn: str = "mlp", num_registers: int = 0,
               image_size: int = 224, layer_scale: float = 1e-5, drop_path_rate: float = 0.0,
               dropout: float = 0.0, attention_impl: str | None = None, in_features: int = 3,
               dtype: str = "float32", pooling: str = "cls",
               pos_embed_resampling: str = "auto"):
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
      pooling: what `features` (and so the head) sees, one of `POOLINGS`: "cls", or
        "cls_mean_patch" (CLS token and mean patch token concatenated, 2 x embed_dim).
      pos_embed_resampling: how the position embedding is resampled for inputs of another size:
        "dinov2", "antialias" or "auto" (see the module docstring).
    """
    if ffn not in ("mlp", "swiglu"):
      raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}.")
    if pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}.")
    if pos_embed_resampling not in ("auto", *RESAMPLING):
      raise ValueError(f"pos_embed_resampling must be one of auto, {', '.join(RESAMPLING)}; got "
                       f"{pos_embed_resampling!r}.")
    if image_size < PATCH_SIZE:
      raise ValueError(f"image_size {image_size} is smaller than one {PATCH_SIZE} px patch.")
    check_image_size(image_size, image_size, "position-embedding (image_size)")
    compute_dtype = jnp.dtype(dtype)
    self.compute_dtype = compute_dtype
    self.patch_size = PATCH_SIZE
    self.grid = image_size // PATCH_SIZE
    self.pooling = pooling
    self.num_features = embed_dim * (2 if pooling == "cls_mean_patch" else 1)
    self.num_registers = num_registers
    self.embed_class = num_registers == 0
    self.pos_embed_resampling = pos_embed_resampling
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
    self.head = nnx.Linear(self.num_features, num_classes, dtype=compute_dtype,
                           param_dtype=jnp.float32, rngs=rngs)

  @property
  def resampling(self) -> str:
    """The position-embedding resampling rule in use: "dinov2" or "antialias"."""
    if self.pos_embed_resampling != "auto":
      return self.pos_embed_resampling
    return "dinov2" if self.embed_class else "antialias"

  def _position_embedding(self, grid: tuple[int, int]) -> jax.Array:
    """Position embedding of the patches for a `grid` of patches, [1, gh*gw, D] float32."""
    pos = self.pos_embed[...]
    if self.embed_class:
      pos = pos[:, 1:]
    return resample_patch_pos_embed(pos, (self.grid, self.grid), grid, self.resampling)

  def tokens(self, x: jax.Array) -> jax.Array:
    """Embedded tokens [N, 1 + R + gh*gw, D] (CLS, registers, patches) before the blocks.

    Raises ValueError when the image height or width is not a multiple of the patch size.
    """
    check_image_size(x.shape[1], x.shape[2])
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

  def encode(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Final-norm tokens [N, 1 + R + gh*gw, D] (CLS, registers, patches) in the compute dtype."""
    x = self.tokens(x)
    for block in self.blocks:
      # Both no-ops outside FSDP training (`bmcc.sharding.fsdp_training`).
      x = sharding.fsdp_call(block, sharding.constrain_batch(x), rngs=rngs)
    return self.norm(x)

  def patch_tokens(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Final-norm patch tokens [N, gh*gw, D] (float32, row-major grid; no CLS, no registers)."""
    return self.encode(x, rngs=rngs)[:, 1 + self.num_registers:].astype(jnp.float32)

  def features(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Pooled final-norm tokens [N, num_features] (float32) for images [N, H, W, C].

    `pooling="cls"`: the CLS token; "cls_mean_patch": the CLS token, then the mean of the patch
    tokens (DINOv2's linear evaluation). `rngs` feeds drop-path.
    """
    x = self.encode(x, rngs=rngs)
    cls = x[:, 0].astype(jnp.float32)
    if self.pooling == "cls":
      return cls
    patches = x[:, 1 + self.num_registers:].astype(jnp.float32)
    return jnp.concatenate([cls, patches.mean(axis=1)], axis=-1)

  def attention_maps(self, x: jax.Array) -> jax.Array:
    """Every block's attention [N, depth, heads, T, T] (float32) for images [N, H, W, C], in
    inference mode (no drop-path), tokens in `tokens`' order: CLS, the `num_registers`
    registers, then the patches row by row (`bmcc.explain.methods.attention_rollout`)."""
    x = self.tokens(x)
    maps = []
    for block in self.blocks:
      maps.append(block.attn.weights(block.norm1(x)))
      x = block(x)
    return jnp.stack(maps, axis=1)

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

