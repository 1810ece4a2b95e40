"""Tests of bmcc.models: the registry, logits shape/dtype, ResNet parameter counts against
torchvision, ResNet v1.5 / ResNeXt structure, bfloat16 compute with float32 parameters and the
batch-norm train/eval behaviour.

Random initialisation on CPU compiles one RNG kernel per parameter shape (about a second each), so
parameter counting uses `nnx.eval_shape` and the forward-shape tests fill an abstract model with
numpy values; only ResNet-18 is initialised for real, with RBG keys (cheaper to compile).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bmcc import models
from bmcc.models import resnet

NUM_CLASSES = 21
RESNETS = ("resnet18", "resnet34", "resnet50", "resnext50_32x4d")


def _head(features: int, classes: int) -> int:
  """Parameters of a linear head: kernel and bias."""
  return features * classes + classes


# torchvision parameter counts (1000-class head), with the head swapped for a 21-class one.
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512 - _head(512, 1000) + _head(512, NUM_CLASSES),
    "resnet34": 21_797_672 - _head(512, 1000) + _head(512, NUM_CLASSES),
    "resnet50": 25_557_032 - _head(2048, 1000) + _head(2048, NUM_CLASSES),
    "resnext50_32x4d": 25_028_904 - _head(2048, 1000) + _head(2048, NUM_CLASSES),
}


def _images(size: int = 32, batch: int = 2, seed: int = 0, channels: int = 3) -> jax.Array:
  """A random NHWC float32 batch."""
  shape = (batch, size, size, channels)
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _abstract(name: str, **kwargs) -> nnx.Module:
  """The model with ShapeDtypeStructs in place of arrays: nothing allocated or initialised."""
  return nnx.eval_shape(
      lambda: models.create_model(name, num_classes=NUM_CLASSES, rngs=nnx.Rngs(0), **kwargs))


def _materialise(name: str, **kwargs) -> nnx.Module:
  """The real module structure with numpy-drawn weights (fan-in scaled), unit BN scale/variance.

  Avoids the per-shape compilation of JAX's random initialisers, which dominates on CPU.
  """
  graphdef, state = nnx.split(_abstract(name, **kwargs))
  rng = np.random.default_rng(0)

  def fill(path, leaf: jax.ShapeDtypeStruct) -> jax.Array:
    field = path[-2].key
    if len(leaf.shape) >= 2:
      value = rng.normal(size=leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))
    elif field in ("scale", "var"):
      value = np.ones(leaf.shape)
    else:
      value = np.zeros(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def _rngs() -> nnx.Rngs:
  """Keys for a real initialisation; RBG compiles its per-shape sampler faster than threefry."""
  return nnx.Rngs(jax.random.key(0, impl="rbg"))


def _count(model: nnx.Module, kind: type = nnx.Param) -> int:
  """Number of scalars in the model's variables of type `kind` (works on abstract models)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, kind)))


def _snapshot(model: nnx.Module, kind: type) -> list[np.ndarray]:
  """Copies of the model's variables of type `kind`, in a fixed order."""
  return [np.array(leaf) for leaf in jax.tree.leaves(nnx.state(model, kind))]


def test_registry_names():
  assert set(RESNETS) | {"simple_cnn"} <= set(models.available())


def test_unknown_name_lists_available():
  with pytest.raises(ValueError, match="Unknown model 'resnet1000'") as info:
    models.create_model("resnet1000", num_classes=NUM_CLASSES, rngs=nnx.Rngs(0))
  for name in models.available():
    assert name in str(info.value)


@pytest.mark.parametrize("name", models.available())
def test_logits_shape_and_dtype_train_and_eval(name):
  # ViTs run with a single block here; tests/test_vit.py covers their full sizes.
  model = _materialise(name, **({"depth": 1} if name.startswith("vit_") else {}))
  x = _images(28 if name.startswith("vit_") else 32)  # a ViT takes multiples of its 14 px patch
  for mode in ("train", "eval"):
    getattr(model, mode)()
    logits = model(x, rngs=nnx.Rngs(dropout=1))
    assert logits.shape == (2, NUM_CLASSES), mode
    assert logits.dtype == jnp.float32, mode
    assert bool(jnp.all(jnp.isfinite(logits))), mode


@pytest.mark.parametrize("name", RESNETS)
def test_param_count_matches_torchvision(name):
  model = _abstract(name)
  assert _count(model) == TORCHVISION_PARAMS[name]
  # Running statistics are not parameters: mean and variance per batch-norm channel.
  assert _count(model, nnx.BatchStat) > 0
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(model)))


@pytest.mark.parametrize("name,stage_sizes,block_type",
                         [("resnet18", (2, 2, 2, 2), resnet.BasicBlock),
                          ("resnet34", (3, 4, 6, 3), resnet.BasicBlock),
                          ("resnet50", (3, 4, 6, 3), resnet.Bottleneck),
                          ("resnext50_32x4d", (3, 4, 6, 3), resnet.Bottleneck)])
def test_resnet_structure(name, stage_sizes, block_type):
  model = _abstract(name)
  assert model.stem.conv.kernel.shape == (7, 7, 3, 64)
  assert model.stem.conv.strides == (2, 2)
  assert len(model.blocks) == sum(stage_sizes)
  assert all(type(block) is block_type for block in model.blocks)
  firsts = {int(i) for i in np.cumsum((0, *stage_sizes[:-1]))}
  for i, block in enumerate(model.blocks):
    strided = i in firsts and i > 0
    # v1.5: the stride sits on the 3x3 convolution (conv1 in basic, conv2 in bottleneck blocks).
    conv3x3 = block.conv1 if block_type is resnet.BasicBlock else block.conv2
    assert conv3x3.kernel_size == (3, 3)
    assert conv3x3.strides == ((2, 2) if strided else (1, 1)), i
    if block_type is resnet.Bottleneck:
      assert block.conv1.strides == (1, 1) and block.conv3.strides == (1, 1)
    # Projection shortcut exactly where the shape changes.
    changes = strided or (i == 0 and block_type is resnet.Bottleneck)
    assert (block.shortcut is not None) == changes, i
    if changes:
      assert block.shortcut.conv.kernel_size == (1, 1)
      assert block.shortcut.conv.strides == ((2, 2) if strided else (1, 1))
  expansion = block_type.expansion
  assert model.head.kernel.shape == (512 * expansion, NUM_CLASSES)


def test_resnext_grouped_widths():
  model = _abstract("resnext50_32x4d")
  firsts = (0, 3, 7, 13)
  for first, inner in zip(firsts, (128, 256, 512, 1024), strict=True):
    conv = model.blocks[first].conv2
    assert conv.feature_group_count == 32
    assert conv.kernel.shape == (3, 3, inner // 32, inner)
    assert model.blocks[first].conv3.kernel.shape[-1] == inner * 2
  assert all(block.conv2.feature_group_count == 1 for block in _abstract("resnet50").blocks)


def test_width_option_scales_channels():
  model = _abstract("resnet50", width=32)
  assert model.stem.conv.kernel.shape == (7, 7, 3, 32)
  assert model.head.kernel.shape == (32 * 8 * 4, NUM_CLASSES)


def test_zero_init_residual():
  model = models.create_model("resnet18", num_classes=NUM_CLASSES, rngs=_rngs())
  for block in model.blocks:
    assert not np.any(np.asarray(block.norm2.scale[...]))
    assert np.all(np.asarray(block.norm1.scale[...]) == 1)
  model = models.create_model("resnet18", num_classes=NUM_CLASSES, rngs=_rngs(),
                              zero_init_residual=False)
  assert all(np.all(np.asarray(block.norm2.scale[...]) == 1) for block in model.blocks)


def test_bfloat16_activations_float32_params():
  model = models.create_model("resnet18", num_classes=NUM_CLASSES, rngs=_rngs(),
                              dtype="bfloat16")
  x = _images()
  stem = model.stem(x.astype(jnp.bfloat16))
  assert stem.dtype == jnp.bfloat16
  assert stem.shape == (2, 8, 8, 64)
  assert model.blocks[0](stem).dtype == jnp.bfloat16
  assert model.features(x).dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert all(leaf.dtype == jnp.float32
             for leaf in jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
  for mode in ("train", "eval"):
    getattr(model, mode)()
    logits = model(x)
    assert logits.dtype == jnp.float32 and logits.shape == (2, NUM_CLASSES), mode
    assert bool(jnp.all(jnp.isfinite(logits))), mode


def test_bfloat16_grouped_bottleneck():
  block = resnet.Bottleneck(64, 32, strides=2, groups=32, group_width=4, dtype=jnp.bfloat16,
                            rngs=_rngs())
  y = block(_images(size=8, channels=64).astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16 and y.shape == (2, 4, 4, 128)
  assert block.conv2.kernel.dtype == jnp.float32


def test_batchnorm_running_stats_train_vs_eval():
  model = models.create_model("resnet18", num_classes=NUM_CLASSES, rngs=_rngs())
  x = _images(seed=1)
  stats, params = _snapshot(model, nnx.BatchStat), _snapshot(model, nnx.Param)

  model.train()
  model(x)
  after_train = _snapshot(model, nnx.BatchStat)
  changed = [not np.array_equal(a, b) for a, b in zip(stats, after_train, strict=True)]
  assert all(changed)  # every batch-norm's mean and variance moved
  assert all(np.array_equal(a, b)
             for a, b in zip(params, _snapshot(model, nnx.Param), strict=True))

  model.eval()
  first = model(x)
  after_eval = _snapshot(model, nnx.BatchStat)
  assert all(np.array_equal(a, b) for a, b in zip(after_train, after_eval, strict=True))
  # Eval mode uses running statistics: each example's logits do not depend on the batch.
  np.testing.assert_allclose(model(x[:1]), first[:1], rtol=1e-4, atol=1e-4)


def test_simple_cnn_linear_head_and_pytorch_init():
  """`dense=0`: pooled features straight into the head (the PyTorch baseline's head); `init`
  sets the kernels' scale: flax's LeCun normal (std 1/sqrt(fan_in)) or PyTorch's default uniform
  in +- 1/sqrt(fan_in) (std 1/sqrt(3 fan_in)); an unknown name is refused."""
  linear = models.create_model("simple_cnn", num_classes=5, rngs=nnx.Rngs(0), features=(8, 64),
                               dense=0, dropout=0.0, init="pytorch")
  assert linear.dense is None and linear.head.kernel.shape == (64, 5)
  x = _images(16)
  pooled = linear.feature_map(x).mean(axis=(1, 2))
  np.testing.assert_allclose(linear(x), pooled @ linear.head.kernel[...] + linear.head.bias[...],
                             rtol=1e-5, atol=1e-6)
  lecun = models.create_model("simple_cnn", num_classes=5, rngs=nnx.Rngs(0), features=(8, 64),
                              dense=0, dropout=0.0)
  fan_in = 3 * 3 * 8
  for model, std in ((linear, 1 / math.sqrt(3 * fan_in)), (lecun, 1 / math.sqrt(fan_in))):
    kernel = np.asarray(model.blocks[1].conv1.kernel[...])
    assert abs(kernel.std() / std - 1) < 0.05, (kernel.std(), std)
  bound = 1 / math.sqrt(fan_in)
  assert np.abs(np.asarray(linear.blocks[1].conv1.kernel[...])).max() <= bound
  with_dense = models.create_model("simple_cnn", num_classes=5, rngs=nnx.Rngs(0), features=(8,),
                                   dense=4)
  assert with_dense.dense.kernel.shape == (8, 4) and with_dense.head.kernel.shape == (4, 5)
  with pytest.raises(ValueError, match="init='he'"):
    models.create_model("simple_cnn", num_classes=5, rngs=nnx.Rngs(0), init="he")
