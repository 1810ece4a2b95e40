"""Attribution maps in pure jax: integrated gradients, SmoothGrad, Grad-CAM, occlusion.

Written in jax, not with PAIR's `saliency` package (0.2.1, last release March 2024), because that
package drives the model from a numpy loop one image at a time (one callback per chunk of IG
steps, per SmoothGrad sample, per occlusion window at stride 1), so it cannot make one jitted,
sharded program of a batch; each method here is a few lines of `jax.grad` and `vmap`.

Every method maps a batch of images (float pixel values 0..255, [B, H, W, 3]) and the class to
explain for each ([B] int) to one map per image [B, H, W] (float32), inside the jitted
`explain_batch`, which also returns the probabilities and the explained classes (the predicted
ones where the target is -1). Batches are sharded over the mesh's `data` axis like
`steps.eval_step`; the steps (IG), samples (SmoothGrad) and windows (occlusion) of all images run
`chunk` at a time through `vmap`, in a `lax.scan`, so memory grows with `chunk x batch`, not with
the number of steps. Gradients are of the target's logit (IG, SmoothGrad, Grad-CAM); occlusion
measures the target's probability.

Maps, per method:
  integrated_gradients  signed, per pixel (summed over RGB); the map sums to
                        logit(x) - logit(baseline) up to the quadrature error (completeness).
  smoothgrad            >= 0: |mean gradient over noisy copies|, summed over RGB (noise scaled
                        to each image's range).
  gradcam               >= 0: ReLU of the gradient-weighted last conv feature map, upsampled.
  occlusion             signed: the mean drop of the target probability when a patch covering
                        the pixel is replaced by the fill (positive: the patch supported it).
  attention_rollout     >= 0, class-agnostic: the CLS token's rolled-out attention to each patch,
                        for models with `attention_maps(x) -> [B, layers, heads, T, T]` (the ViT:
                        tokens CLS, `num_registers` registers, then the patches row by row).

Reference images (IG's "mean" baseline, occlusion's "mean" fill) are the model's own input mean
(`model.input_mean`: what its normalisation maps to 0), e.g. ImageNet's for pretrained weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from bmcc import steps
from bmcc.data.normalization import MEAN_RGB

CNN_METHODS = "integrated_gradients,gradcam,occlusion"  # the default for convolutional networks
VIT_METHODS = "integrated_gradients,attention_rollout,occlusion"  # ... and for transformers

ALIASES = {"ig": "integrated_gradients", "grad_cam": "gradcam", "smooth_grad": "smoothgrad",
           "rollout": "attention_rollout"}
# Each method's settings and their defaults; `--method=name:key=value:key=value` overrides them.
DEFAULTS: dict[str, dict[str, int | float | str]] = {
    # baseline: mean (the model's input mean colour, which it sees as 0; the default: of
    # the three it alone passed both the randomisation and the nucleus check of
    # tests/test_explain.py), black (pixels 0) or blurred (Gaussian, sigma = blur x image side);
    # steps of the midpoint rule along the path.
    "integrated_gradients": {"steps": 32, "baseline": "mean", "blur": 0.08, "chunk": 8},
    # noise: standard deviation as a fraction of each image's range (max - min pixel value), as
    # Smilkov et al. 2017 define the noise level (and PAIR's saliency computes it).
    "smoothgrad": {"samples": 16, "noise": 0.15, "seed": 0, "chunk": 8},
    "gradcam": {},
    # patch and stride in pixels of the model's input; 0: shorter side // 8 (at least 2) and
    # patch // 2. stride <= patch, so that every pixel is covered.
    "occlusion": {"patch": 0, "stride": 0, "fill": "mean", "blur": 0.08, "chunk": 16},
    "attention_rollout": {},
}
BASELINES = ("black", "mean", "blurred")
TITLES = {"integrated_gradients": "integrated gradients", "smoothgrad": "SmoothGrad",
          "gradcam": "Grad-CAM", "occlusion": "occlusion", "attention_rollout": "attention rollout"}


@dataclasses.dataclass(frozen=True)
class Method:
  """A method and its settings (hashable: a static argument of the jitted `explain_batch`)."""

  name: str
  options: tuple[tuple[str, int | float | str], ...] = ()

  def get(self, key: str):
    return dict(self.options)[key]

  @property
  def title(self) -> str:
    return TITLES[self.name]

  def describe(self) -> str:
    return ":".join([self.name, *(f"{k}={v}" for k, v in self.options)])


def parse_method(spec: str) -> Method:
  """'integrated_gradients:steps=64:baseline=blurred' -> Method; ValueError saying what is wrong."""
  name, *settings = [part.strip() for part in spec.strip().split(":")]
  name = ALIASES.get(name.lower(), name.lower())
  if name not in DEFAULTS:
    raise ValueError(f"Unknown explanation method {name!r}; use one of "
                     f"{', '.join(DEFAULTS)} (or {', '.join(ALIASES)}).")
  options = dict(DEFAULTS[name])
  for setting in settings:
    key, sep, value = setting.partition("=")
    if not sep or key not in options:
      raise ValueError(f"{name}: bad setting {setting!r}; settings are key=value with key in "
                       f"{sorted(options) or 'none'}.")
    default = options[key]
    try:
      options[key] = type(default)(value)
    except ValueError:
      raise ValueError(f"{name}: {key}={value!r} is not a {type(default).__name__}.") from None
  for key in ("baseline", "fill"):
    if key in options and options[key] not in BASELINES:
      raise ValueError(f"{name}: {key}={options[key]!r}; use one of {', '.join(BASELINES)}.")
  for key in ("steps", "samples", "chunk"):
    if key in options and options[key] < 1:
      raise ValueError(f"{name}: {key} must be at least 1.")
  if name == "occlusion" and (options["patch"] < 0 or options["stride"] < 0):
    raise ValueError("occlusion: patch and stride must be positive (0: automatic).")
  if name == "occlusion" and options["patch"] and options["stride"] > options["patch"]:
    raise ValueError(f"occlusion: stride={options['stride']} > patch={options['patch']} would "
                     "leave pixels that no window covers; use stride <= patch.")
  return Method(name, tuple(sorted(options.items())))


def parse_methods(specs: str | list[str]) -> list[Method]:
  """A comma-separated list (or a list) of method specs -> Methods, each named once."""
  if isinstance(specs, str):
    specs = [s for s in specs.split(",") if s.strip()]
  methods = [parse_method(s) for s in specs]
  if not methods:
    raise ValueError("No explanation method given.")
  names = [m.name for m in methods]
  if len(set(names)) != len(names):
    raise ValueError(f"A method is named twice: {names}.")
  return methods


def unsupported_reason(model: nnx.Module, method: Method) -> str | None:
  """Why `model` cannot be explained with `method`, or None if it can."""
  if method.name == "gradcam" and not hasattr(model, "feature_map"):
    return (f"Grad-CAM needs the last convolutional feature map; {type(model).__name__} has no "
            "feature_map/logits_from_feature_map methods.")
  if method.name == "attention_rollout" and not hasattr(model, "attention_maps"):
    return (f"attention rollout needs a transformer with attention_maps(x); "
            f"{type(model).__name__} has none (a CNN: use gradcam).")
  return None


def default_methods(model: nnx.Module) -> str:
  """The methods `--mode=explain` uses when none is given: attention rollout in place of
  Grad-CAM for a transformer (a model with `attention_maps`)."""
  return VIT_METHODS if hasattr(model, "attention_maps") else CNN_METHODS


# ------------------------------------------------------------------------------------------------
# Pieces.


def gaussian_blur(images: jax.Array, sigma: float) -> jax.Array:
  """Separable Gaussian blur of [B, H, W, C] images (sigma in pixels, edges reflected)."""
  if sigma <= 0:
    return images
  radius = max(1, math.ceil(3 * sigma))
  x = np.arange(-radius, radius + 1, dtype=np.float32)
  kernel = np.exp(-0.5 * (x / sigma) ** 2)
  kernel = jnp.asarray(kernel / kernel.sum())
  pad = ((0, 0), (radius, radius), (radius, radius), (0, 0))
  padded = jnp.pad(images, pad, mode="reflect" if radius < min(images.shape[1:3]) else "edge")
  channels = images.shape[-1]
  column = jnp.tile(kernel[:, None, None, None], (1, 1, 1, channels))  # HWIO, one group each
  dims = ("NHWC", "HWIO", "NHWC")
  for k in (column, column.transpose(1, 0, 2, 3)):
    padded = jax.lax.conv_general_dilated(padded, k, (1, 1), "VALID", dimension_numbers=dims,
                                          feature_group_count=channels)
  return padded


def baseline_images(images: jax.Array, kind: str, blur: float,
                    mean: tuple[float, ...] = MEAN_RGB) -> jax.Array:
  """The reference images of IG (and occlusion's fill): black, the colour `mean` (pass the
  model's `input_mean`, which its normalisation maps to 0), or blurred."""
  if kind == "black":
    return jnp.zeros_like(images)
  if kind == "mean":
    return jnp.broadcast_to(jnp.asarray(mean, images.dtype), images.shape)
  if kind == "blurred":
    return gaussian_blur(images, blur * max(images.shape[1:3]))
  raise ValueError(f"Unknown baseline {kind!r}.")


def _input_mean(model: nnx.Module) -> tuple[float, ...]:
  return tuple(getattr(model, "input_mean", MEAN_RGB))


def _logits_fn(model: nnx.Module) -> Callable[[jax.Array], jax.Array]:
  return lambda x: model(steps.normalize_input(model, x))


def _target_gradient(logits_fn, x: jax.Array, targets: jax.Array) -> jax.Array:
  """d logit[target] / d x for each image of the batch (images are independent in eval mode)."""
  def total(x):
    return jnp.take_along_axis(logits_fn(x), targets[:, None], axis=1).sum()
  return jax.grad(total)(x)


def _chunked_sum(fn: Callable[[jax.Array], jax.Array], values: np.ndarray, weights: np.ndarray,
                 chunk: int, like: jax.Array) -> jax.Array:
  """sum_i weights[i] * fn(values[i]), `chunk` values at a time through vmap, in a scan."""
  n = len(values)
  chunk = min(chunk, n)
  padded = -(-n // chunk) * chunk
  values = np.pad(values, [(0, padded - n)] + [(0, 0)] * (values.ndim - 1), mode="edge")
  weights = np.pad(weights, (0, padded - n))  # padding counts 0
  values = values.reshape(padded // chunk, chunk, *values.shape[1:])
  weights = weights.reshape(padded // chunk, chunk).astype(np.float32)

  def body(total, xs):
    v, w = xs
    out = jax.vmap(fn)(v)
    return total + jnp.tensordot(w, out, axes=1), None

  total, _ = jax.lax.scan(body, jnp.zeros_like(like), (jnp.asarray(values), jnp.asarray(weights)))
  return total


# ------------------------------------------------------------------------------------------------
# Methods: (model, images [B, H, W, 3] float 0..255, targets [B], method) -> maps [B, H, W].


def integrated_gradients(model, images, targets, method: Method, rows=None) -> jax.Array:
  """Sundararajan et al. 2017, midpoint rule over `steps` points of the straight path."""
  logits_fn = _logits_fn(model)
  baseline = baseline_images(images, method.get("baseline"), method.get("blur"),
                             _input_mean(model))
  steps = method.get("steps")
  alphas = (np.arange(steps, dtype=np.float32) + 0.5) / steps

  def gradient_at(alpha):
    return _target_gradient(logits_fn, baseline + alpha * (images - baseline), targets)

  mean_gradient = _chunked_sum(gradient_at, alphas, np.full(steps, 1.0 / steps),
                               method.get("chunk"), images)
  return ((images - baseline) * mean_gradient).sum(-1)


def smoothgrad(model, images, targets, method: Method, rows: jax.Array) -> jax.Array:
  """Smilkov et al. 2017: the gradient averaged over copies with Gaussian noise.

  The noise's standard deviation is `noise` times the image's own range (max - min over its
  pixels and channels), the paper's "noise level"; it is not a fraction of 0..255: on cells whose
  range is 130..235 that was up to twice the noise, and the map spread off the nucleus. The noise
  of each image depends on the seed, the sample and its row in the batch (`rows`, the global row
  numbers), not on how the batch is split over devices.
  """
  logits_fn = _logits_fn(model)
  samples = method.get("samples")
  spread = images.max(axis=(1, 2, 3)) - images.min(axis=(1, 2, 3))
  sigma = method.get("noise") * spread[:, None, None, None]
  key = jax.random.key(method.get("seed"))

  def gradient_with_noise(index):
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(key, index), rows)
    noise = sigma * jax.vmap(lambda k: jax.random.normal(k, images.shape[1:], images.dtype))(keys)
    return _target_gradient(logits_fn, images + noise, targets)

  mean_gradient = _chunked_sum(gradient_with_noise, np.arange(samples, dtype=np.int32),
                               np.full(samples, 1.0 / samples), method.get("chunk"), images)
  return jnp.abs(mean_gradient).sum(-1)


def gradcam(model, images, targets, method: Method, rows=None) -> jax.Array:
  """Selvaraju et al. 2017 on `model.feature_map` (the last conv stage), bilinearly upsampled."""
  del method, rows
  features = model.feature_map(steps.normalize_input(model, images)).astype(jnp.float32)

  def total(features):
    logits = model.logits_from_feature_map(features)
    return jnp.take_along_axis(logits, targets[:, None], axis=1).sum()

  weights = jax.grad(total)(features).mean(axis=(1, 2))  # [B, C]
  cam = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", features, weights))
  return jax.image.resize(cam, (cam.shape[0], *images.shape[1:3]), "bilinear")


def occlusion_positions(size: int, patch: int, stride: int) -> np.ndarray:
  """Top-left offsets of the windows along one side, the last one flush with the edge."""
  starts = list(range(0, size - patch + 1, stride))
  if starts[-1] != size - patch:
    starts.append(size - patch)
  return np.asarray(starts, np.int32)


def occlusion_geometry(method: Method, size: int) -> tuple[int, int]:
  """(patch, stride) in pixels for images whose shorter side is `size` (0 in the settings:
  automatic); the patch is at most `size`. ValueError if stride > patch (uncovered pixels)."""
  patch = method.get("patch") or max(2, size // 8)
  patch = min(patch, size)
  stride = method.get("stride") or max(1, patch // 2)
  if stride > patch:
    raise ValueError(f"occlusion: stride={stride} > patch={patch} (at {size} px) would leave "
                     "pixels that no window covers; use stride <= patch.")
  return patch, stride


def occlusion(model, images, targets, method: Method, rows=None) -> jax.Array:
  """Zeiler & Fergus 2014: the drop of the target probability when each window is filled in."""
  logits_fn = _logits_fn(model)
  h, w = images.shape[1:3]
  patch, stride = occlusion_geometry(method, min(h, w))
  fill = baseline_images(images, method.get("fill"), method.get("blur"), _input_mean(model))
  ys, xs = occlusion_positions(h, patch, stride), occlusion_positions(w, patch, stride)
  corners = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
  rows = (np.arange(h)[None] >= corners[:, :1]) & (np.arange(h)[None] < corners[:, :1] + patch)
  cols = (np.arange(w)[None] >= corners[:, 1:]) & (np.arange(w)[None] < corners[:, 1:] + patch)

  def target_probability(x):
    probs = jax.nn.softmax(logits_fn(x), axis=-1)
    return jnp.take_along_axis(probs, targets[:, None], axis=1)[:, 0]

  def occluded(window):
    r, c = window
    inside = (r[:, None] & c[None, :])[None, :, :, None]
    return target_probability(jnp.where(inside, fill, images))

  drops = jax.lax.map(occluded, (jnp.asarray(rows), jnp.asarray(cols)),
                      batch_size=method.get("chunk"))  # [windows, B]
  drops = target_probability(images)[None] - drops
  rows, cols = rows.astype(np.float32), cols.astype(np.float32)
  counts = np.einsum("ph,pw->hw", rows, cols)
  if counts.min() == 0:  # cannot happen with stride <= patch; a NaN map must never be written
    raise ValueError(f"occlusion: windows of {patch} px every {stride} px leave pixels uncovered.")
  return jnp.einsum("pb,ph,pw->bhw", drops, rows, cols) / counts


def rollout(attentions: jax.Array) -> jax.Array:
  """Abnar & Zuidema 2020: [B, layers, heads, T, T] attention (token 0 = CLS) -> [B, T - 1].

  Heads are averaged, the residual added as the identity, rows renormalised, and the layers
  multiplied from the first; the CLS row over the other tokens is returned.
  """
  a = attentions.mean(axis=2)
  a = a + jnp.eye(a.shape[-1], dtype=a.dtype)
  a = a / a.sum(axis=-1, keepdims=True)
  total = a[:, 0]
  for layer in range(1, a.shape[1]):
    total = a[:, layer] @ total
  return total[:, 0, 1:]


def attention_rollout(model, images, targets, method: Method, rows=None) -> jax.Array:
  """Attention rollout over the patch tokens (after CLS and the model's `num_registers`
  registers), on the patch grid (`patch_size`; a square grid without it), upsampled bilinearly
  to the input (class-agnostic)."""
  del targets, method, rows
  cls_row = rollout(model.attention_maps(steps.normalize_input(model, images)))
  patches = cls_row[:, getattr(model, "num_registers", 0):]
  h, w = images.shape[1:3]
  patch_size = getattr(model, "patch_size", None)
  if patch_size:
    grid = (h // patch_size, w // patch_size)
  else:
    grid = (math.isqrt(patches.shape[-1]),) * 2
  if grid[0] * grid[1] != patches.shape[-1]:
    raise ValueError(f"{patches.shape[-1]} patch tokens do not make a {grid[0]}x{grid[1]} grid.")
  grid_map = patches.reshape(-1, *grid).astype(jnp.float32)
  return jax.image.resize(grid_map, (grid_map.shape[0], h, w), "bilinear")


METHODS: dict[str, Callable[..., jax.Array]] = {
    "integrated_gradients": integrated_gradients,
    "smoothgrad": smoothgrad,
    "gradcam": gradcam,
    "occlusion": occlusion,
    "attention_rollout": attention_rollout,
}


@functools.partial(nnx.jit, static_argnames=("method",))
def explain_batch(model: nnx.Module, images: jax.Array, targets: jax.Array, *, method: Method
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(maps [B, H, W], probabilities [B, C], explained classes [B]) of uint8 images [B, H, W, 3].

  `targets` [B] are class indices, -1 for the predicted class. One compiled program per method,
  batch shape and settings. Under a mesh with a `data` axis (`jax.set_mesh`) whose size divides
  the batch, each device explains its rows of the batch (`shard_map`: the model replicated, no
  communication); shard `images` and `targets` over it like `steps.eval_step`.
  """
  model.eval()
  graphdef, state = nnx.split(model)
  rows = jnp.arange(images.shape[0], dtype=jnp.int32)

  def local(state, images, targets, rows):
    model = nnx.merge(graphdef, state)
    x = images.astype(jnp.float32)
    probs = jax.nn.softmax(_logits_fn(model)(x), axis=-1)
    targets = jnp.where(targets < 0, jnp.argmax(probs, axis=-1), targets).astype(jnp.int32)
    maps = METHODS[method.name](model, x, targets, method, rows)
    return maps.astype(jnp.float32), probs, targets

  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and "data" in mesh.axis_names and images.shape[0] % mesh.shape["data"] == 0:
    # check_vma=False: without it the gradient of the ViT's exact GELU (erfc) fails to trace
    # ("Primitive polynomial requires varying manual axes to match", jax 0.12); nothing here
    # communicates between devices, so the check has nothing to guard.
    local = jax.shard_map(local, in_specs=(P(), P("data"), P("data"), P("data")),
                          out_specs=P("data"), check_vma=False)
  return local(state, images, targets, rows)
