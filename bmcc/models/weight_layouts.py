"""Key layouts of published ViT and ResNet checkpoints, and how they map onto bmcc's models.

Every supported checkpoint is first rewritten into one canonical layout per family, then matched
key by key against the model:

- ViT: timm's `VisionTransformer` names (`cls_token`, `reg_token`, `pos_embed`,
  `patch_embed.proj.*`, `blocks.<i>.{norm1,attn.qkv,attn.proj,ls1,norm2,mlp.fc1,mlp.fc2,ls2}.*`,
  `norm.*`). `canonical_state_dict` converts the original DINOv2 layout into it, as timm's
  `_convert_dinov2` does: `mask_token` dropped, SwiGLU `w12`/`w3` renamed `fc1`/`fc2`, block-chunk
  keys `blocks.<chunk>.<i>.` flattened, and `register_tokens` renamed `reg_token` with the CLS
  position folded into `cls_token` (a model with registers has no CLS position). A DINOv2 training
  checkpoint (DinoBloom's `.pth`) is unwrapped first: its `teacher`, without `dino_head.*` and
  `ibot_head.*`, `backbone.` stripped.
- ResNet: torchvision's names (`conv1`, `bn1`, `layer<s>.<j>.{conv,bn}<k>`,
  `layer<s>.<j>.downsample.{0,1}`, `fc`), which timm's ResNets share.

`expected_keys(model)` lists, for each canonical key, the model variable it fills, the shape the
file must have and the transform into the model's layout (linear kernels transposed, convolution
kernels OIHW -> HWIO, batch-norm weight/bias/running_mean/running_var -> scale/bias/mean/var).
`describe` says which architecture a canonical state dict looks like, for error messages.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from bmcc.models.resnet import ResNet
from bmcc.models.vit import VisionTransformer

# Keys a checkpoint may hold that the backbone does not use: classifier heads (a new head is
# trained), batch-norm step counters.
_IGNORED = re.compile(r"^(head\.|fc\.)|num_batches_tracked$")
_VIT_SIZES = {(384, 12): "vit_small_patch14", (768, 12): "vit_base_patch14",
              (1024, 24): "vit_large_patch14", (1536, 40): "vit_giant_patch14"}
_RESNETS = {("bottleneck", (3, 4, 6, 3), 1): "resnet50",
            ("bottleneck", (3, 4, 6, 3), 32): "resnext50_32x4d",
            ("basic", (2, 2, 2, 2), 1): "resnet18", ("basic", (3, 4, 6, 3), 1): "resnet34",
            ("bottleneck", (3, 4, 23, 3), 1): "resnet101"}
# Variables a checkpoint fills: parameters and batch-norm statistics.
_LOADED = nnx.Any(nnx.Param, nnx.BatchStat)
_BN_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


@dataclasses.dataclass(frozen=True)
class Target:
  """Where a canonical checkpoint key goes: the model variable, the file shape, the transform."""

  path: tuple[Any, ...]
  file_shape: tuple[int, ...]
  transform: Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
  return x


def _linear_kernel(x: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> flax kernel [in, out]."""
  return x.T


def _conv_kernel(x: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [O, I, H, W] -> flax kernel [H, W, I, O]."""
  return x.transpose(2, 3, 1, 0)


def family(state: Mapping[str, Any]) -> str | None:
  """'vit' or 'resnet' for a canonical state dict, None if it looks like neither."""
  if "cls_token" in state or "patch_embed.proj.weight" in state:
    return "vit"
  if "conv1.weight" in state and any(k.startswith("layer1.") for k in state):
    return "resnet"
  return None


def canonical_state_dict(obj: Any) -> tuple[dict[str, np.ndarray], str]:
  """A loaded checkpoint rewritten into the canonical layout, and the name of its source layout.

  Raises ValueError when `obj` is not a mapping of names to arrays (after unwrapping).
  """
  layouts = []
  if isinstance(obj, Mapping) and isinstance(obj.get("teacher"), Mapping):
    layouts.append("DINOv2 training checkpoint (teacher)")
    obj = {k.removeprefix("backbone."): v for k, v in obj["teacher"].items()
           if not k.startswith(("dino_head.", "ibot_head."))}
  for wrapper in ("state_dict", "model"):
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      layouts.append(f"'{wrapper}' entry")
      obj = obj[wrapper]
  if not isinstance(obj, Mapping) or not obj:
    raise ValueError(f"expected a state dict (names -> tensors), got {type(obj).__name__}")
  bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise ValueError(f"expected a state dict (names -> tensors); entries {bad[:5]} are not "
                     "tensors")
  state = dict(obj)
  if "embeddings.cls_token" in state or "embeddings.patch_embeddings.projection.weight" in state:
    raise ValueError("Hugging Face transformers layout (Dinov2Model); use the original DINOv2 or "
                     "a timm checkpoint")
  if family(state) == "vit" and ("mask_token" in state or "register_tokens" in state
                                 or any(".mlp.w12." in k for k in state)):
    layouts.append("original DINOv2 layout")
    state = _from_dinov2(state)
  elif family(state) == "vit":
    layouts.append("timm ViT layout")
  elif family(state) == "resnet":
    layouts.append("torchvision/timm ResNet layout")
  else:
    layouts.append("unknown layout")
  return state, ", ".join(layouts)


def _from_dinov2(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Original DINOv2 keys -> timm keys (see the module docstring)."""
  out = {}
  for key, value in state.items():
    if key == "mask_token":
      continue
    key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)  # block chunks
    key = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", key)
    key = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", key)
    out[key] = value
  if "register_tokens" in out:
    pos = out.pop("pos_embed")
    out["reg_token"] = out.pop("register_tokens")
    out["cls_token"] = out["cls_token"] + pos[:, :1]
    out["pos_embed"] = pos[:, 1:]
  return out


def ignored(key: str) -> bool:
  """Whether a canonical key is deliberately not loaded (heads, batch-norm counters)."""
  return bool(_IGNORED.search(key))


def expected_keys(model: nnx.Module) -> dict[str, Target]:
  """Canonical checkpoint key -> `Target` for every backbone variable of `model` (not the head)."""
  if isinstance(model, VisionTransformer):
    translate = _vit_key
  elif isinstance(model, ResNet):
    stage_of = [(s, j) for s, n in enumerate(model.stage_sizes) for j in range(n)]
    translate = lambda path: _resnet_key(path, stage_of)  # noqa: E731
  else:
    raise TypeError(f"No pretrained-weight layout for {type(model).__name__}.")
  targets = {}
  for path, variable in nnx.to_flat_state(nnx.state(model, _LOADED)):
    if path[0] == "head":
      continue
    key = translate(path)
    shape = tuple(variable.shape)
    if path[-1] == "kernel" and len(shape) == 2:
      targets[key] = Target(path, shape[::-1], _linear_kernel)
    elif path[-1] == "kernel" and len(shape) == 4:
      targets[key] = Target(path, (shape[3], shape[2], shape[0], shape[1]), _conv_kernel)
    else:
      targets[key] = Target(path, shape, _identity)
  return targets


def _leaf(name: str) -> str:
  return {"kernel": "weight", "scale": "weight"}.get(name, name)


def _vit_key(path: tuple[Any, ...]) -> str:
  """Model variable path -> timm key, e.g. ('blocks', 0, 'attn', 'qkv', 'kernel')."""
  if len(path) == 1:  # cls_token, reg_token, pos_embed
    return str(path[0])
  modules = ["patch_embed.proj" if p == "patch_embed" else str(p) for p in path[:-1]]
  return ".".join([*modules, _leaf(path[-1])])


def _resnet_key(path: tuple[Any, ...], stage_of: list[tuple[int, int]]) -> str:
  """Model variable path -> torchvision key, e.g. ('blocks', 3, 'shortcut', 'norm', 'mean')."""
  leaf = _BN_LEAVES[path[-1]] if "norm" in str(path[-2]) else _leaf(path[-1])
  if path[0] == "stem":
    module = "conv1" if path[1] == "conv" else "bn1"
    return f"{module}.{leaf}"
  stage, index = stage_of[path[1]]
  if path[2] == "shortcut":
    module = {"conv": "downsample.0", "norm": "downsample.1"}[path[3]]
  else:
    module = str(path[2]).replace("norm", "bn")
  return f"layer{stage + 1}.{index}.{module}.{leaf}"


def _shape(state: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
  """Shape of `state[key]` (an array or a shape tuple), None if absent."""
  if key not in state:
    return None
  return tuple(getattr(state[key], "shape", state[key]))


def describe(state: Mapping[str, Any]) -> str:
  """Which architecture a canonical state dict (arrays or shape tuples) looks like."""
  kind = family(state)
  if kind == "vit":
    return _describe_vit(state)
  if kind == "resnet":
    return _describe_resnet(state)
  return f"not a ViT or ResNet checkpoint (first keys: {', '.join(list(state)[:6])})"


def vit_position_grid(state: Mapping[str, Any]) -> int | None:
  """Side of the square patch grid of a canonical ViT state dict's position embedding."""
  pos = _shape(state, "pos_embed")
  if pos is None or len(pos) != 3:
    return None
  patches = pos[1] - (0 if "reg_token" in state else 1)
  side = int(round(patches**0.5))
  return side if side * side == patches else None


def vit_position_resampling(state: Mapping[str, Any], layout: str) -> str:
  """How the weights' origin resamples a canonical ViT state dict's position embedding.

  "dinov2" (offset 0.1, no antialias) for original DINOv2 / DinoBloom files without registers;
  "antialias" (antialiased bicubic, no offset) for files with registers (DINOv2's `*_reg` hub
  models) and for timm-layout files (timm's `resample_abs_pos_embed`). See `bmcc.models.vit`.
  """
  if vit_registers(state) or "timm ViT layout" in layout:
    return "antialias"
  return "dinov2"


def vit_registers(state: Mapping[str, Any]) -> int:
  """Number of register tokens in a canonical ViT state dict."""
  reg = _shape(state, "reg_token")
  return reg[1] if reg else 0


def _describe_vit(state: Mapping[str, Any]) -> str:
  width = (_shape(state, "cls_token") or _shape(state, "patch_embed.proj.bias") or (0,))[-1]
  blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
  depth = max(blocks) + 1 if blocks else 0
  fc1, fc2 = _shape(state, "blocks.0.mlp.fc1.weight"), _shape(state, "blocks.0.mlp.fc2.weight")
  ffn = "SwiGLU" if fc1 and fc2 and fc1[0] == 2 * fc2[1] else "GELU MLP"
  patch = _shape(state, "patch_embed.proj.weight")
  grid = vit_position_grid(state)
  registers = vit_registers(state)
  parts = [f"width {width}", f"{depth} blocks", ffn,
           f"{registers} registers" if registers else "no registers"]
  if patch:
    parts.append(f"{patch[-1]} px patches")
  if grid and patch:
    parts.append(f"{grid}x{grid} position grid ({grid * patch[-1]} px)")
  name = _VIT_SIZES.get((width, depth), "a non-standard size")
  return f"a ViT ({', '.join(parts)}): {name}"


def _describe_resnet(state: Mapping[str, Any]) -> str:
  stages = []
  for stage in range(1, 5):
    blocks = {int(m.group(1)) for k in state
              if (m := re.match(rf"layer{stage}\.(\d+)\.conv1\.weight$", k))}
    stages.append(len(blocks))
  block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
  conv2 = _shape(state, "layer1.0.conv2.weight")
  groups = conv2[0] // conv2[1] if conv2 and block == "bottleneck" else 1
  stem = _shape(state, "conv1.weight")
  name = _RESNETS.get((block, tuple(stages), groups), "a non-standard ResNet")
  return (f"a ResNet ({block} blocks {tuple(stages)}, 3x3 convolution groups {groups}, "
          f"stem width {stem[0] if stem else '?'}): {name}")
