"""Fine-tuning optimiser for pretrained backbones: frozen start, layer-wise learning-rate decay.

`create_finetune_optimizer(model, ...)` is AdamW split into parameter groups by depth:

- Layers: a ViT's patch embedding, CLS / register tokens and position embedding are layer 0,
  block i is layer i + 1 and the final norm is layer depth + 1; a ResNet's stem is layer 0 and its
  stage s (0-based) layer s + 1. With L the deepest layer, layer l learns at
  `learning_rate(step) * layer_decay ** (L - l)` (BEiT / timm layer decay): the final norm or last
  stage at the full rate, a ViT's embeddings at `layer_decay ** (depth + 1)` of it.
- The head (`model.head`) has its own `head_learning_rate` and is never frozen.
- For the first `freeze_steps` steps every backbone update is exactly zero (no Adam step, no weight
  decay: parameters stay bit-identical, and the backbone's Adam moments start at unfreezing). The
  backbone's learning rate is its schedule at the global step, so a schedule that should warm up
  after unfreezing has to say so itself.
- Weight decay applies to kernels only: not to biases, norm scales, LayerScale, tokens or the
  position embedding (`decay_mask`, the one rule of every optimizer bmcc builds: plain AdamW in
  `bmcc.steps.create_optimizer` uses it too).

Batch-norm statistics are not parameters: a frozen ResNet backbone still updates its running
statistics when run in train mode. The returned transformation can be wrapped like
`bmcc.steps.create_optimizer`'s (global-norm clipping before, the plateau multiplier after).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bmcc.models.resnet import ResNet
from bmcc.models.vit import VisionTransformer

HEAD = "head"
# Parameters without weight decay besides all 1-D ones (biases, norm scales, LayerScale).
_NO_DECAY = frozenset({"cls_token", "reg_token", "pos_embed"})


def _names(path: tuple[Any, ...]) -> tuple[Any, ...]:
  """Plain keys of a parameter-tree path (dict keys, indices, attributes; no trailing 'value')."""
  names = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
  return names[:-1] if names and names[-1] == "value" else names


def layer_fn(model: nnx.Module) -> tuple[Callable[[tuple[Any, ...]], int | str], int]:
  """(path names -> layer id or HEAD, deepest layer id L) for a ViT or a ResNet."""
  if isinstance(model, VisionTransformer):
    depth = len(model.blocks)

    def vit_layer(names: tuple[Any, ...]) -> int | str:
      if names[0] == "head":
        return HEAD
      if names[0] == "blocks":
        return int(names[1]) + 1
      return depth + 1 if names[0] == "norm" else 0

    return vit_layer, depth + 1
  if isinstance(model, ResNet):
    stage_of = [s for s, n in enumerate(model.stage_sizes) for _ in range(n)]

    def resnet_layer(names: tuple[Any, ...]) -> int | str:
      if names[0] == "head":
        return HEAD
      return stage_of[int(names[1])] + 1 if names[0] == "blocks" else 0

    return resnet_layer, len(model.stage_sizes)
  raise TypeError(f"No layer-wise decay rule for {type(model).__name__} (ViT or ResNet only).")


def layer_scales(model: nnx.Module, layer_decay: float) -> dict[str, float]:
  """Learning-rate multiplier of each backbone group label ('layer_<l>'): decay ** (L - l)."""
  _, deepest = layer_fn(model)
  return {f"layer_{layer}": layer_decay ** (deepest - layer) for layer in range(deepest + 1)}


def param_labels(model: nnx.Module) -> Callable[[Any], Any]:
  """A function params -> same-shaped tree of group labels ('layer_<l>' or 'head')."""
  layer, _ = layer_fn(model)

  def labels(params: Any) -> Any:
    def label(path, _):
      group = layer(_names(path))
      return group if group == HEAD else f"layer_{group}"

    return jax.tree_util.tree_map_with_path(label, params)

  return labels


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: kernels (ndim > 1) other than tokens and pos_embed.

  The weight-decay rule of every optimizer path (training from scratch, `config.pretrained`
  without `finetune.*`, and `create_finetune_optimizer`), as in timm and DINOv2: no decay on
  biases, norm scales and offsets, LayerScale gammas (all 1-D), the position embedding and the
  class and register tokens.
  """
  def decays(path, leaf):
    return leaf.ndim > 1 and not (_NO_DECAY & set(map(str, _names(path))))

  return jax.tree_util.tree_map_with_path(decays, params)


class FrozenThenState(NamedTuple):
  """Global step count and the wrapped transformation's state."""

  count: jax.Array
  inner: optax.OptState


def _frozen_then(inner: optax.GradientTransformation, learning_rate: Callable[[jax.Array], Any],
                 freeze_steps: int) -> optax.GradientTransformation:
  """Zero updates (inner state untouched) for `freeze_steps` steps, then
  -learning_rate(step) * inner's updates; `step` counts from the first call."""

  def init(params):
    return FrozenThenState(count=jnp.zeros([], jnp.int32), inner=inner.init(params))

  def update(updates, state, params=None):
    def frozen(_):
      return jax.tree.map(jnp.zeros_like, updates), state.inner

    def active(_):
      new, inner_state = inner.update(updates, state.inner, params)
      rate = jnp.asarray(learning_rate(state.count), jnp.float32)
      return jax.tree.map(lambda u: (-rate * u).astype(u.dtype), new), inner_state

    new, inner_state = jax.lax.cond(state.count < freeze_steps, frozen, active, None)
    return new, FrozenThenState(count=optax.safe_increment(state.count), inner=inner_state)

  return optax.GradientTransformation(init, update)


def _schedule(rate: float | optax.Schedule, scale: float = 1.0) -> Callable[[jax.Array], Any]:
  if callable(rate):
    return lambda step: rate(step) * scale
  return lambda step: rate * scale


def create_finetune_optimizer(model: nnx.Module, *, learning_rate: float | optax.Schedule,
                              head_learning_rate: float | optax.Schedule | None = None,
                              layer_decay: float = 1.0, freeze_steps: int = 0,
                              weight_decay: float = 0.05, b1: float = 0.9, b2: float = 0.999,
                              eps: float = 1e-8) -> optax.GradientTransformation:
  """AdamW with a frozen start, layer-wise learning-rate decay and a separate head rate.

  Args:
    model: the ViT or ResNet to fine-tune (its structure defines the groups).
    learning_rate: the backbone's rate (float or schedule of the global step) at the deepest
      layer.
    head_learning_rate: the head's rate (float or schedule); default `learning_rate`.
    layer_decay: per-layer multiplier d; layer l learns at d ** (L - l) times `learning_rate`.
    freeze_steps: steps during which the backbone does not move at all.
    weight_decay: decoupled weight decay (times each group's rate), kernels only (`decay_mask`).
    b1, b2, eps: Adam's moment decays and epsilon.

  Returns:
    An optax transformation for `nnx.Optimizer(model, tx, wrt=nnx.Param)`.
  """
  if freeze_steps < 0 or not 0.0 < layer_decay <= 1.0:
    raise ValueError(f"Need freeze_steps >= 0 and 0 < layer_decay <= 1, got {freeze_steps} and "
                     f"{layer_decay}.")
  adamw = optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                      optax.add_decayed_weights(weight_decay, mask=decay_mask))
  transforms = {
      label: _frozen_then(adamw, _schedule(learning_rate, scale), freeze_steps)
      for label, scale in layer_scales(model, layer_decay).items()
  }
  head_rate = learning_rate if head_learning_rate is None else head_learning_rate
  transforms[HEAD] = _frozen_then(adamw, _schedule(head_rate), 0)
  return optax.multi_transform(transforms, param_labels(model))
