"""Tests of bmcc.finetune: layer ids and learning-rate multipliers of ViTs and ResNets, a frozen
backbone that stays bit-identical and starts Adam afresh when unfrozen, exact per-layer step sizes,
the separate head rate and the weight-decay mask.

The gradients are synthetic (±1 per element), so one Adam step moves every element by exactly its
group's learning rate (up to Adam's epsilon): the per-layer step sizes can be checked exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bmcc import finetune, models

LR, HEAD_LR, DECAY = 0.01, 0.05, 0.5


def _model(name: str, **kwargs) -> nnx.Module:
  """A small registry model with numpy-drawn weights (no JAX initialiser compilation)."""
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: models.create_model(name, num_classes=3, rngs=nnx.Rngs(0), **kwargs)))
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda leaf: jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype), state)
  return nnx.merge(graphdef, state)


def _vit() -> nnx.Module:
  return _model("vit_small_patch14", embed_dim=8, depth=2, num_heads=2, image_size=28)


def _resnet() -> nnx.Module:
  return _model("resnet50", width=4, stage_sizes=(2, 1, 1, 1))


def _flat(model: nnx.Module) -> dict[tuple, np.ndarray]:
  """Parameters by path, copied."""
  return {path: np.array(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _signs(model: nnx.Module, seed: int, scale: float = 1.0):
  """Synthetic gradients: ±scale per element, in the structure nnx.grad returns."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(scale * rng.choice([-1.0, 1.0], size=p.shape),
                                            p.dtype), nnx.state(model, nnx.Param))


def _labels(model: nnx.Module) -> dict[str, str]:
  labels = finetune.param_labels(model)(nnx.state(model, nnx.Param))
  return {".".join(map(str, finetune._names(path))): label
          for path, label in jax.tree_util.tree_leaves_with_path(labels)}


def test_vit_layers_and_scales():
  model = _vit()
  labels = _labels(model)
  assert labels["patch_embed.kernel"] == labels["cls_token"] == labels["pos_embed"] == "layer_0"
  assert labels["blocks.0.attn.qkv.kernel"] == "layer_1"
  assert labels["blocks.1.ls2.gamma"] == "layer_2"
  assert labels["norm.scale"] == "layer_3"
  assert labels["head.kernel"] == labels["head.bias"] == "head"
  assert finetune.layer_scales(model, DECAY) == {
      "layer_0": 0.125, "layer_1": 0.25, "layer_2": 0.5, "layer_3": 1.0}


def test_resnet_layers_are_stem_and_stages():
  model = _resnet()
  labels = _labels(model)
  assert labels["stem.conv.kernel"] == labels["stem.norm.scale"] == "layer_0"
  assert labels["blocks.0.conv1.kernel"] == labels["blocks.1.norm3.bias"] == "layer_1"
  assert labels["blocks.2.shortcut.conv.kernel"] == "layer_2"
  assert labels["blocks.4.conv3.kernel"] == "layer_4"
  assert labels["head.kernel"] == "head"
  assert finetune.layer_scales(model, 0.8) == {
      f"layer_{i}": 0.8 ** (4 - i) for i in range(5)}


@pytest.mark.parametrize("make", [_vit, _resnet])
def test_frozen_backbone_then_exact_layer_steps(make):
  model = make()
  freeze = 3
  schedule = lambda step: LR * (1.0 + step)  # noqa: E731 - rate at the global step
  tx = finetune.create_finetune_optimizer(model, learning_rate=schedule,
                                          head_learning_rate=HEAD_LR, layer_decay=DECAY,
                                          freeze_steps=freeze, weight_decay=0.0)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  update = nnx.jit(lambda model, optimizer, grads: optimizer.update(model, grads))
  start = _flat(model)
  labels = finetune.param_labels(model)(nnx.state(model, nnx.Param))
  label_of = {tuple(finetune._names(p)): label
              for p, label in jax.tree_util.tree_leaves_with_path(labels)}
  for step in range(freeze):
    # Large, opposite gradients while frozen: they must leave no trace in Adam's moments.
    update(model, optimizer, _signs(model, seed=1, scale=-100.0 * (step + 1)))
    now = _flat(model)
    for path, value in now.items():
      if label_of[path] == "head":
        assert not np.array_equal(value, start[path]), path
      else:
        assert np.array_equal(value, start[path]), path  # bit-identical
  before = _flat(model)
  grads = _signs(model, seed=2)
  update(model, optimizer, grads)
  after = _flat(model)
  scales = finetune.layer_scales(model, DECAY)
  signs = {tuple(finetune._names(p)): np.asarray(g)
           for p, g in jax.tree_util.tree_leaves_with_path(grads)}
  for path, value in after.items():
    label = label_of[path]
    if label == "head":
      continue
    # First Adam step after unfreezing: exactly -rate * sign(g), rate = schedule(3) * scale
    # (to float32 rounding of the parameters, about 1e-7).
    np.testing.assert_allclose(value - before[path],
                               -schedule(freeze) * scales[label] * signs[path], atol=1e-6,
                               err_msg=str(path))


def test_head_rate_and_weight_decay_mask():
  model = _vit()
  wd = 0.1
  tx = finetune.create_finetune_optimizer(model, learning_rate=LR, head_learning_rate=HEAD_LR,
                                          layer_decay=DECAY, weight_decay=wd)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = _flat(model)
  zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
  optimizer.update(model, zeros)  # zero gradients: only weight decay moves parameters
  after = _flat(model)
  scales = {**finetune.layer_scales(model, DECAY), "head": HEAD_LR / LR}
  decayed = set()
  for path, value in after.items():
    label = _labels(model)[".".join(map(str, path))]
    if np.array_equal(value, before[path]):
      continue
    decayed.add(".".join(map(str, path)))
    np.testing.assert_allclose(value, before[path] * (1 - LR * scales[label] * wd), rtol=1e-6,
                               err_msg=str(path))
  assert decayed == {
      "patch_embed.kernel", "head.kernel",
      *(f"blocks.{i}.{m}.kernel" for i in range(2)
        for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))}


# The parameters no optimizer path may decay (timm / DINOv2 rule), named one by one.
_VIT_BLOCK_NOT_DECAYED = ("norm1.scale", "norm1.bias", "attn.qkv.bias", "attn.proj.bias",
                          "ls1.gamma", "norm2.scale", "norm2.bias", "mlp.fc1.bias", "mlp.fc2.bias",
                          "ls2.gamma")
VIT_NOT_DECAYED = {"cls_token", "reg_token", "pos_embed", "patch_embed.bias", "norm.scale",
                   "norm.bias", "head.bias",
                   *(f"blocks.{i}.{name}" for i in range(2) for name in _VIT_BLOCK_NOT_DECAYED)}
VIT_DECAYED = {"patch_embed.kernel", "head.kernel",
               *(f"blocks.{i}.{m}.kernel" for i in range(2)
                 for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))}
# A ResNet-18 with one block per stage (blocks 1-3 have a projection shortcut).
RESNET_NOT_DECAYED = {"stem.norm.scale", "stem.norm.bias", "head.bias",
                      *(f"blocks.{i}.{n}.{leaf}" for i in range(4) for n in ("norm1", "norm2")
                        for leaf in ("scale", "bias")),
                      *(f"blocks.{i}.shortcut.norm.{leaf}" for i in (1, 2, 3)
                        for leaf in ("scale", "bias"))}
RESNET_DECAYED = {"stem.conv.kernel", "head.kernel",
                  *(f"blocks.{i}.conv{k}.kernel" for i in range(4) for k in (1, 2)),
                  *(f"blocks.{i}.shortcut.conv.kernel" for i in (1, 2, 3))}


@pytest.mark.parametrize("family", ["vit", "resnet"])
@pytest.mark.parametrize("path", ["scratch", "pretrained", "finetune"])
def test_one_weight_decay_rule_for_every_optimizer_path(family, path):
  # AdamW from scratch, `config.pretrained` without finetune.* keys, and the fine-tuning
  # optimizer: one step on zero gradients moves only decayed parameters, each by exactly
  # lr x its group's scale x weight_decay of itself.
  from bmcc import steps
  from configs import default

  if family == "vit":
    model = _model("vit_small_patch14", embed_dim=8, depth=2, num_heads=2, image_size=28,
                   num_registers=2)
    decayed, not_decayed = VIT_DECAYED, VIT_NOT_DECAYED
  else:
    model = _model("resnet18", width=4, stage_sizes=(1, 1, 1, 1))
    decayed, not_decayed = RESNET_DECAYED, RESNET_NOT_DECAYED
  config = default.get_config()
  config.model = {"vit": "vit_small_patch14", "resnet": "resnet18"}[family]
  config.weight_decay, config.optimizer = 0.1, "adamw"
  if path != "scratch":
    config.pretrained = "weights.safetensors"
  if path == "finetune":
    config.finetune.layer_decay = DECAY
  assert steps.uses_finetune_optimizer(config) == (path == "finetune")
  optimizer = nnx.Optimizer(model, steps.create_optimizer(config, lambda step: LR, model),
                            wrt=nnx.Param)
  before = _flat(model)
  # One compiled step (eager optax would compile each of its small ops separately).
  nnx.jit(lambda model, optimizer, grads: optimizer.update(model, grads))(
      model, optimizer, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
  after = _flat(model)
  names = {".".join(map(str, p)): p for p in before}
  assert set(names) == decayed | not_decayed and not decayed & not_decayed
  scales = {**finetune.layer_scales(model, DECAY), "head": 1.0}
  labels = _labels(model)
  for name in not_decayed:
    np.testing.assert_array_equal(after[names[name]], before[names[name]], err_msg=name)
  for name in decayed:
    scale = scales[labels[name]] if path == "finetune" else 1.0
    assert not np.array_equal(after[names[name]], before[names[name]]), name
    np.testing.assert_allclose(after[names[name]],
                               before[names[name]] * (1 - LR * scale * config.weight_decay),
                               rtol=1e-6, err_msg=name)


def test_decay_mask_names():
  params = {"cls_token": jnp.zeros((1, 1, 4)), "pos_embed": jnp.zeros((1, 5, 4)),
            "blocks": {"0": {"qkv": {"kernel": jnp.zeros((4, 12)), "bias": jnp.zeros(12)}}}}
  assert finetune.decay_mask(params) == {
      "cls_token": False, "pos_embed": False,
      "blocks": {"0": {"qkv": {"kernel": True, "bias": False}}}}


def test_invalid_arguments():
  with pytest.raises(ValueError, match="layer_decay"):
    finetune.create_finetune_optimizer(_resnet(), learning_rate=LR, layer_decay=0.0)
  with pytest.raises(TypeError, match="SimpleCNN"):
    finetune.create_finetune_optimizer(
        _model("simple_cnn", features=(4,)), learning_rate=LR)
