"""Pretrained backbones: DinoBloom / DINOv2 ViTs and ImageNet ResNets as bmcc models.

    from bmcc.models import pretrained
    model = pretrained.load_backbone("vit_small_patch14", "DinoBloom-S.pth")
    embeddings = model.features(x)  # x: float32 [N, H, W, 3] normalised with model.input_mean/std

`load_backbone` builds the model (nothing is randomly initialised but the new head) and fills it
from the file; `load_into` fills a model the registry already built (training builds the model
from its config, then loads the backbone). The classifier head is never loaded. Sources are local
files (safetensors, or PyTorch `.pth`/`.bin` read without torch) or `hf-hub:owner/repo[/file]`
ids, downloaded with huggingface_hub; nothing touches the network unless a hub id is named.

Supported checkpoints (layouts in `bmcc.models.weight_layouts`): DinoBloom S/B/L/G training
checkpoints (`teacher` of a DINOv2 training run), their timm safetensors mirrors
(`1aurent/vit_*_patch14_224.dinobloom`), DINOv2 in the original hub layout (with `mask_token`,
optionally `register_tokens`) or timm's `vit_*_patch14[_reg4]_dinov2.lvd142m`, and torchvision /
timm ResNet-50 and ResNeXt-50 32x4d state dicts.

A ViT built by `load_backbone` keeps the file's position grid unless `image_size` is given (then
the grid is resampled once, at load); either way it runs at any multiple of 14 px. Resampling
follows the file's origin (`weight_layouts.vit_position_resampling`): DINOv2's offset rule for
original DINOv2 / DinoBloom files without registers, antialiased bicubic for files with
registers and timm-layout files (`bmcc.models.vit`). `load_backbone` also sets the model's
run-time rule from the file; `load_into` uses the file's rule at load unless the model names one
(`pos_embed_resampling`), and leaves the model's run-time rule to its config, so that a run and
its restored checkpoints resample alike. All these weights expect ImageNet normalisation,
`normalization(arch)`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmcc.models import create_model, weight_files
from bmcc.models import weight_layouts as layouts
from bmcc.models.resnet import ResNet
from bmcc.models.vit import PATCH_SIZE, VisionTransformer, resample_patch_pos_embed

ARCHS = {
    "vit_small_patch14": "vit",
    "vit_base_patch14": "vit",
    "vit_large_patch14": "vit",
    "vit_giant_patch14": "vit",
    "resnet50": "resnet",
    "resnext50_32x4d": "resnet",
}
_MODEL_TYPES = {"vit": VisionTransformer, "resnet": ResNet}
_LISTED = 8  # keys named per category in a mismatch error


@dataclasses.dataclass(frozen=True)
class Normalization:
  """Per-channel input normalisation on the 0..255 pixel scale: x = (pixels - mean) / std.

  The same scale as `bmcc.data.normalization.MEAN_RGB` / `STDDEV_RGB`.
  """

  mean: tuple[float, float, float]
  std: tuple[float, float, float]


# ImageNet statistics (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) times 255; DINOv2, DinoBloom,
# torchvision and timm ResNets were all trained on inputs normalised with them.
IMAGENET = Normalization(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))


@dataclasses.dataclass(frozen=True)
class LoadedWeights:
  """What `load_into` / `load_backbone` loaded, for run metadata (`dataclasses.asdict`).

  Attributes:
    arch: the architecture name.
    source: the source as given (path or hub id); path: the local file read.
    layout: the file's layout as detected, e.g. "DINOv2 training checkpoint (teacher), original
      DINOv2 layout".
    normalization: the input normalisation the weights expect.
    tensors: number of tensors loaded.
    position_grid: (file grid, model grid) of a ViT's position embedding; they differ when it was
      resampled at load. None for ResNets.
    position_resampling: a ViT's resampling rule at load ("dinov2" or "antialias"); None for
      ResNets.
  """

  arch: str
  source: str
  path: str
  layout: str
  normalization: Normalization
  tensors: int
  position_grid: tuple[int, int] | None = None
  position_resampling: str | None = None


class PretrainedWeightsError(ValueError):
  """Weights that do not fit the model: names the missing, unexpected and misshaped keys."""


def normalization(arch: str) -> Normalization:
  """The input normalisation the pretrained weights of `arch` expect (ImageNet for all)."""
  _family(arch)
  return IMAGENET


def _family(arch: str) -> str:
  if arch not in ARCHS:
    raise ValueError(f"No pretrained weights for {arch!r}; supported: {', '.join(ARCHS)}.")
  return ARCHS[arch]


def read_state_dict(source: str | os.PathLike) -> tuple[dict[str, np.ndarray], str, str]:
  """The canonical state dict of `source`, its detected layout and the local path read."""
  path = weight_files.resolve(source)
  try:
    state, layout = layouts.canonical_state_dict(weight_files.read(path))
  except weight_files.WeightFileError as error:
    raise PretrainedWeightsError(str(error)) from error
  except ValueError as error:
    raise PretrainedWeightsError(f"{path}: {error}.") from error
  return state, layout, path


def load_backbone(arch: str, source: str | os.PathLike, *, num_classes: int | None = None,
                  image_size: int | None = None, dtype: str = "float32",
                  rngs: nnx.Rngs | None = None, **model_config: Any) -> nnx.Module:
  """Builds `arch` with the weights of `source`, in eval mode.

  Args:
    arch: one of `ARCHS`.
    source: a weight file or `hf-hub:owner/repo[/file]`.
    num_classes: size of a new, randomly initialised linear head; None leaves an empty head
      (use `model.features`).
    image_size: ViTs only: the input size the position embedding is stored for; None keeps the
      file's grid (224 px for DinoBloom, 518 px for DINOv2). Any input size works either way.
    dtype: compute dtype; parameters stay float32.
    rngs: keys of the new head (default `nnx.Rngs(0)`).
    **model_config: further `create_model` arguments (e.g. `drop_path_rate`; or a non-standard
      width/depth, for small test models). A ViT's `num_registers` defaults to the file's, its
      `pos_embed_resampling` ("auto") to the file's origin.

  Returns:
    The model, with `input_mean` / `input_std` (0..255 scale) and `pretrained` (`LoadedWeights`)
    attributes.
  """
  kind = _family(arch)
  state, layout, path = read_state_dict(source)
  config = dict(model_config, dtype=dtype)
  if kind == "vit" and layouts.family(state) == "vit":
    config.setdefault("num_registers", layouts.vit_registers(state))
    if config.get("pos_embed_resampling", "auto") == "auto":
      config["pos_embed_resampling"] = layouts.vit_position_resampling(state, layout)
    grid = layouts.vit_position_grid(state)
    config["image_size"] = image_size or (grid * PATCH_SIZE if grid else 224)
  model = nnx.eval_shape(lambda: create_model(arch, num_classes=0, rngs=nnx.Rngs(0), **config))
  loaded = _load(model, arch, state, layout, os.fspath(source), path)
  model.head = nnx.Linear(model.num_features, num_classes or 0, dtype=model.compute_dtype,
                          param_dtype=jnp.float32, rngs=rngs or nnx.Rngs(0))
  model.eval()
  model.pretrained = loaded
  return model


def load_into(model: nnx.Module, arch: str, source: str | os.PathLike) -> LoadedWeights:
  """Fills the backbone of a registry-built `model` (all but its head) from `source`, in place.

  A ViT's position embedding is resampled to the model's grid if the file's differs. Also sets
  `model.input_mean` / `model.input_std` (0..255 scale).

  Raises:
    PretrainedWeightsError: the file is unreadable, or its keys or shapes do not fit the model
      (the message lists them and says which architecture the file looks like).
  """
  kind = _family(arch)
  if not isinstance(model, _MODEL_TYPES[kind]):
    raise TypeError(f"{arch} weights load into a {_MODEL_TYPES[kind].__name__}, got "
                    f"{type(model).__name__}.")
  state, layout, path = read_state_dict(source)
  return _load(model, arch, state, layout, os.fspath(source), path)


def _fit_pos_embed(value: np.ndarray, model: VisionTransformer, method: str
                   ) -> np.ndarray | None:
  """The file's position embedding resampled to the model's grid by `method`, None if it cannot
  be."""
  expected = model.pos_embed.shape
  if value.ndim != 3 or value.shape[-1] != expected[-1]:
    return None
  prefix = 1 if model.embed_class else 0
  patches = value.shape[1] - prefix
  side = int(round(patches**0.5))
  if side * side != patches or side == 0:
    return None
  resampled = resample_patch_pos_embed(value[:, prefix:], (side, side), (model.grid, model.grid),
                                       method)
  return np.concatenate([value[:, :prefix], resampled], axis=1)


def _load(model: nnx.Module, arch: str, state: dict[str, np.ndarray], layout: str, source: str,
          path: str) -> LoadedWeights:
  """Checks `state` against `model`'s backbone, then writes it into the model."""
  targets = layouts.expected_keys(model)
  missing = sorted(k for k in targets if k not in state)
  unexpected = sorted(k for k in state if k not in targets and not layouts.ignored(k))
  wrong, values = [], {}
  file_grid = resampling = None
  if isinstance(model, VisionTransformer):
    resampling = (model.pos_embed_resampling if model.pos_embed_resampling != "auto"
                  else layouts.vit_position_resampling(state, layout))
  for key, target in targets.items():
    if key not in state:
      continue
    value = np.asarray(state[key], np.float32)
    if key == "pos_embed" and value.shape != target.file_shape:
      fitted = _fit_pos_embed(value, model, resampling)
      if fitted is not None:
        file_grid = int(round((value.shape[1] - (1 if model.embed_class else 0)) ** 0.5))
        value = fitted
    if value.shape != target.file_shape:
      wrong.append(f"{key}: file {list(value.shape)}, model {list(target.file_shape)}")
      continue
    values[target.path] = target.transform(value)
  if missing or unexpected or wrong:
    raise PretrainedWeightsError(_mismatch(model, arch, path, layout, state, missing, unexpected,
                                           wrong))
  flat = nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
  nnx.update(model, nnx.from_flat_state([
      (p, v.replace(jnp.asarray(values[p], v.dtype))) for p, v in flat if p in values]))
  model.input_mean, model.input_std = IMAGENET.mean, IMAGENET.std
  grid = None
  if isinstance(model, VisionTransformer):
    grid = (file_grid or model.grid, model.grid)
  return LoadedWeights(arch=arch, source=source, path=path, layout=layout,
                       normalization=normalization(arch), tensors=len(values), position_grid=grid,
                       position_resampling=resampling)


def _listing(title: str, keys: list[str]) -> str:
  more = f" ... and {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
  return f"\n  {title} ({len(keys)}): {', '.join(keys[:_LISTED])}{more}"


def _mismatch(model: nnx.Module, arch: str, path: str, layout: str, state: dict[str, np.ndarray],
              missing: list[str], unexpected: list[str], wrong: list[str]) -> str:
  """The error message of a file that does not fit the model."""
  built = layouts.describe({k: t.file_shape for k, t in layouts.expected_keys(model).items()})
  message = (f"Weights in {path} ({layout}) do not fit {arch} as built, "
             f"{built.split(': ')[0]}. The file looks like {layouts.describe(state)}. "
             "Keys in the canonical layout:")
  if missing:
    message += _listing("missing from the file", missing)
  if unexpected:
    message += _listing("unexpected in the file", unexpected)
  if wrong:
    message += _listing("wrong shape", wrong)
  return message
