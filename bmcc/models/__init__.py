"""Model registry: Flax NNX classifiers by name.

Every model maps a float batch [N, H, W, 3] (normalised) to logits [N, num_classes] and takes
`train` through `model.train()` / `model.eval()` (dropout, batch-norm statistics) and a `rngs`
argument at call time for dropout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

from bmcc.models.resnet import resnet18, resnet34, resnet50, resnext50_32x4d
from bmcc.models.simple_cnn import SimpleCNN
from bmcc.models.vit import (
  PATCH_SIZE,
  vit_base_patch14,
  vit_giant_patch14,
  vit_large_patch14,
  vit_small_patch14,
)

_REGISTRY: dict[str, Callable[..., nnx.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnext50_32x4d": resnext50_32x4d,
    "simple_cnn": SimpleCNN,
    "vit_base_patch14": vit_base_patch14,
    "vit_giant_patch14": vit_giant_patch14,
    "vit_large_patch14": vit_large_patch14,
    "vit_small_patch14": vit_small_patch14,
}


def available() -> list[str]:
  """Names accepted by `create_model`."""
  return sorted(_REGISTRY)


def min_image_size(name: str, model_config: dict[str, Any]) -> int:
  """The smallest square input `name` with `model_config` maps to a non-empty feature map.

  SimpleCNN halves the size once per block (a 16 px input to its five default blocks would
  leave 0 x 0 pixels and a NaN loss); the ResNets pad, so any size leaves at least 1 x 1; a ViT
  needs one 14 px patch.
  """
  if name == "simple_cnn":
    features = model_config.get("features", SimpleCNN.DEFAULT_FEATURES)
    return 2 ** len(features)
  if name.startswith("vit_"):
    return PATCH_SIZE
  return 1


def create_model(name: str, *, num_classes: int, rngs: nnx.Rngs, **kwargs: Any) -> nnx.Module:
  """Builds the model registered as `name`; raises ValueError listing the names otherwise."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model {name!r}. Available models: {', '.join(available())}.")
  return _REGISTRY[name](num_classes=num_classes, rngs=rngs, **kwargs)
