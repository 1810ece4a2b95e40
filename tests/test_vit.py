"""Tests of bmcc.models.vit: parameter counts against timm's DINOv2 ViTs, token layout with and
without registers, bfloat16 compute, stochastic depth and the DINOv2 position-embedding resampling.

Parameter counts use `nnx.eval_shape` (nothing allocated); the forward tests fill a tiny abstract
model with numpy values, which avoids compiling JAX's random initialisers.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bmcc import models
from bmcc.models import vit

# Parameter counts of timm 1.0.31 `timm.create_model(name, img_size=size, num_classes=0)`
# (`vit_*_patch14_dinov2`; printed by tests/fixtures/make_pretrained_fixtures.py --counts).
TIMM_PARAMS = {
    ("vit_small_patch14", 224): 21_628_800,
    ("vit_small_patch14", 518): 22_056_192,
    ("vit_base_patch14", 224): 85_724_928,
    ("vit_base_patch14", 518): 86_579_712,
    ("vit_large_patch14", 224): 303_227_904,
    ("vit_large_patch14", 518): 304_367_616,
    ("vit_giant_patch14", 224): 1_134_769_664,
    ("vit_giant_patch14", 518): 1_136_479_232,
}
TIMM_SMALL_REG4_224 = 21_629_952  # vit_small_patch14_reg4_dinov2, img_size=224
TINY = dict(embed_dim=32, depth=2, num_heads=2, image_size=56)


def _abstract(name: str, num_classes: int = 0, **kwargs) -> nnx.Module:
  return nnx.eval_shape(
      lambda: models.create_model(name, num_classes=num_classes, rngs=nnx.Rngs(0), **kwargs))


def _count(model: nnx.Module) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _tiny(**kwargs) -> vit.VisionTransformer:
  """A tiny ViT with numpy-drawn weights (unit LayerNorm scales, random everything else)."""
  graphdef, state = nnx.split(_abstract("vit_small_patch14", num_classes=5, **{**TINY, **kwargs}))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    if path[-2].key == "scale":
      return jnp.ones(leaf.shape, leaf.dtype)
    scale = 1 / math.sqrt(leaf.shape[0]) if len(leaf.shape) == 2 else 0.2
    return jnp.asarray(rng.normal(size=leaf.shape) * scale, leaf.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def _images(size=56, batch=2, width=None, seed=1):
  shape = (batch, size, width or size, 3)
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize("name,size", sorted(TIMM_PARAMS))
def test_param_count_matches_timm(name, size):
  assert _count(_abstract(name, image_size=size)) == TIMM_PARAMS[name, size]


def test_param_count_registers_and_head():
  assert _count(_abstract("vit_small_patch14", num_registers=4)) == TIMM_SMALL_REG4_224
  assert _count(_abstract("vit_small_patch14", num_classes=21)) == (
      TIMM_PARAMS["vit_small_patch14", 224] + 384 * 21 + 21)


def test_giant_swiglu_widths():
  block = _abstract("vit_giant_patch14").blocks[0]
  assert type(block.mlp) is vit.SwiGLU
  assert block.mlp.fc1.kernel.shape == (1536, 2 * 4096)
  assert block.mlp.fc2.kernel.shape == (4096, 1536)
  assert vit.swiglu_hidden(32, 4.0) == 88


def test_token_layout():
  plain = _abstract("vit_base_patch14")
  assert plain.pos_embed.shape == (1, 257, 768) and plain.reg_token is None
  assert plain.patch_embed.kernel.shape == (14, 14, 3, 768)
  registers = _abstract("vit_base_patch14", num_registers=4, image_size=518)
  assert registers.pos_embed.shape == (1, 37 * 37, 768)
  assert registers.reg_token.shape == (1, 4, 768)
  model = _tiny(num_registers=3)
  assert model.tokens(_images()).shape == (2, 1 + 3 + 16, 32)


def test_logits_features_shapes_and_dtypes():
  model = _tiny()
  model.eval()
  x = _images()
  features = model.features(x)
  logits = model(x)
  assert features.shape == (2, 32) and features.dtype == jnp.float32
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  # The head is a plain linear map of the features.
  np.testing.assert_allclose(logits, features @ model.head.kernel[...] + model.head.bias[...],
                             rtol=1e-5, atol=1e-5)
  # Non-square inputs: the position embedding is resampled to the 4 x 6 grid.
  assert model.features(_images(width=84)).shape == (2, 32)


def test_bfloat16_compute_float32_params():
  model = _tiny(dtype="bfloat16")
  model.eval()
  assert model.tokens(_images()).dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
  reference = _tiny()
  reference.eval()
  x = _images()
  np.testing.assert_allclose(model.features(x), reference.features(x), atol=0.1)
  assert model(x).dtype == jnp.float32


def test_drop_path_drops_whole_residual_branches():
  # Depth 2, rate 1.0: the last block's rate is 1 (linear rule from 0), the first block's 0.
  model = _tiny(drop_path_rate=1.0)
  x = _images()
  model.eval()
  full = model.features(x)
  model.train()
  dropped = model.features(x, rngs=nnx.Rngs(dropout=0))
  # With block 1's branches dropped, the output is the final norm of block 0's output.
  model.eval()
  expected = model.norm(model.blocks[0](model.tokens(x)))[:, 0]
  np.testing.assert_allclose(dropped, expected, rtol=1e-5, atol=1e-5)
  assert not np.allclose(full, dropped, atol=1e-3)


def test_bicubic_matrix_matches_pytorch():
  # torch.nn.functional.interpolate(scale_factor=4.1 / 3, mode="bicubic") on a 3-pixel axis.
  torch_weights = np.array([[1.07542753, -0.07542753, 0.0],
                            [0.39070845, 0.71706879, -0.10777712],
                            [-0.11109877, 0.80068344, 0.31041539],
                            [0.0, -0.04032469, 1.04032409]])
  np.testing.assert_allclose(vit._bicubic_matrix(3, 4), torch_weights, atol=1e-6)


RESAMPLED = np.load(Path(__file__).parent / "fixtures" / "pretrained" / "resample_references.npz")


@pytest.mark.parametrize("key", sorted(k for k in RESAMPLED.files
                                       if k.startswith(("dinov2_", "antialias_"))))
def test_resampling_rules_match_pytorch(key):
  # PyTorch references (tests/fixtures/make_resample_fixtures.py): 518 -> 224 px (37 -> 16),
  # 224 -> 280 px (16 -> 20) and non-square grids; DINOv2's offset rule (no registers) and
  # timm's / DINOv2-reg's antialiased bicubic. Each rule fails the other's reference.
  rule, old, new = key.split("_")
  src, dst = (int(old), int(old)), tuple(int(n) for n in new.split("x"))
  pos, reference = RESAMPLED[f"pos_{old}"], RESAMPLED[key]
  scale = np.abs(reference).max()
  tolerance = {"dinov2": 1e-5, "antialias": 2e-6}[rule] * scale  # torch's float32 coordinates
  out = vit.resample_patch_pos_embed(pos, src, dst, rule)
  assert out.shape == (1, dst[0] * dst[1], 4)
  np.testing.assert_allclose(out, reference, rtol=0, atol=tolerance)
  other = {"dinov2": "antialias", "antialias": "dinov2"}[rule]
  assert np.abs(vit.resample_patch_pos_embed(pos, src, dst, other) - reference).max() > 0.1 * scale


def test_resampling_rule_of_a_model():
  def rule(**kwargs):
    return _abstract("vit_small_patch14", **TINY, **kwargs).resampling

  assert rule() == "dinov2" and rule(num_registers=4) == "antialias"
  assert rule(pos_embed_resampling="antialias") == "antialias"
  assert rule(num_registers=4, pos_embed_resampling="dinov2") == "dinov2"
  with pytest.raises(ValueError, match="pos_embed_resampling must be one of auto, dinov2"):
    rule(pos_embed_resampling="bilinear")
  with pytest.raises(ValueError, match="Unknown position-embedding resampling 'nearest'"):
    vit.resample_patch_pos_embed(np.zeros((1, 4, 2)), (2, 2), (3, 3), "nearest")


@pytest.mark.parametrize("rule", vit.RESAMPLING)
def test_resample_identity_and_numpy_jax_agree(rule):
  pos = np.random.default_rng(0).normal(size=(1, 16 * 16, 8)).astype(np.float32)
  assert vit.resample_patch_pos_embed(pos, (16, 16), (16, 16), rule) is pos
  a = vit.resample_patch_pos_embed(pos, (16, 16), (18, 12), rule)
  b = vit.resample_patch_pos_embed(jnp.asarray(pos), (16, 16), (18, 12), rule)
  assert a.shape == (1, 18 * 12, 8)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_antialiased_matrix_is_jax_image_resize():
  # Down (37 -> 16) and up (16 -> 20): the weights jax.image.resize applies to the identity.
  for old, new in ((37, 16), (16, 20)):
    expected = jax.image.resize(jnp.eye(old), (new, old), "bicubic", antialias=True)
    np.testing.assert_allclose(vit._antialiased_bicubic_matrix(old, new), expected, atol=1e-6)


def test_sizes_off_the_patch_grid_are_refused():
  # As DINOv2: a 250 px input would silently lose its last 12 px rows and columns.
  model = _tiny()
  with pytest.raises(ValueError, match=r"input size 56x62 px .* 62 px would lose its last 6 px "
                                       r"\(use 56 or 70 px\)"):
    model.tokens(_images(width=62))
  with pytest.raises(ValueError, match=r"image_size\) size 250x250 px .* \(use 238 or 252 px\)"):
    _abstract("vit_small_patch14", image_size=250)
  assert vit.valid_sizes_near(250) == [238, 252] and vit.valid_sizes_near(10) == [14]
  assert vit.valid_sizes_near(224) == [224]


def test_registry_and_min_image_size():
  assert {"vit_small_patch14", "vit_base_patch14", "vit_large_patch14",
          "vit_giant_patch14"} <= set(models.available())
  assert models.min_image_size("vit_base_patch14", {}) == 14
  with pytest.raises(ValueError, match="ffn"):
    _abstract("vit_small_patch14", ffn="relu")


def _attention_pair(monkeypatch):
  """An Attention layer and 257 tokens; jax's cuDNN attention replaced by XLA's with the same
  arguments (padding lengths included), so the padded path runs on a CPU."""
  real = jax.nn.dot_product_attention
  calls = []

  def cudnn_as_xla(*args, implementation=None, **kwargs):
    calls.append((implementation, args[0].shape[1], sorted(kwargs)))
    return real(*args, implementation="xla" if implementation == "cudnn" else implementation,
                **kwargs)

  layer = vit.Attention(32, 2, implementation=None, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, 257, 32))
  expected = layer(x)
  monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn_as_xla)
  return layer, x, expected, calls, real


def test_cudnn_attention_pads_to_64_tokens_and_masks_them(monkeypatch):
  layer, x, expected, calls, _ = _attention_pair(monkeypatch)
  layer.implementation = "cudnn"
  np.testing.assert_allclose(layer(x), expected, rtol=0, atol=1e-6)
  assert calls == [("cudnn", 320, ["key_value_seq_lengths", "query_seq_lengths"])]


def test_gpu_default_tries_cudnn_then_falls_back_to_xla(monkeypatch):
  layer, x, expected, calls, real = _attention_pair(monkeypatch)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  np.testing.assert_allclose(layer(x), expected, rtol=0, atol=1e-6)
  assert calls[0][:2] == ("cudnn", 320)

  def no_cudnn(*args, implementation=None, **kwargs):
    if implementation == "cudnn":
      raise RuntimeError("cuDNN is not detected.")
    calls.append(implementation)
    return real(*args, implementation=implementation, **kwargs)

  calls.clear()
  monkeypatch.setattr(jax.nn, "dot_product_attention", no_cudnn)
  np.testing.assert_allclose(layer(x), expected, rtol=0, atol=1e-6)
  assert calls == ["xla"]
