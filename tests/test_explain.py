"""Explanations: IG completeness, the model-randomisation sanity check, attribution on the nucleus,
the occlusion deletion check, Grad-CAM's split of the models, `--mode=explain` end to end.

The "trained demo model" of these tests: training the demo config takes minutes here, so the
module trains once (fixture `trained`, ~15 s) a SimpleCNN of the demo's family, smaller: blocks
(8, 16), dense 32, on 32 px synthetic cells of 8 classes (40 images each, decoded as the demo
decodes its 250 px JPEGs), 150 steps of batch 32 with random rotations/flips; it must reach 0.9
test accuracy (measured 0.99 on 96 held-out images). Its checkpoint is saved in the real layout
and read back with `restore_model`, as `--mode=explain` does. The bounds below were measured on
it (numbers in each test); `python -m tests.test_explain WORKDIR` prints the same measurements
for any run, e.g. the real demo (configs/demo.py), whose numbers are in the README.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from bmcc import checkpointing, steps, synthetic
from bmcc.data import decode
from bmcc.data.normalization import MEAN_RGB, STDDEV_RGB, normalize_images
from bmcc.explain import driver, methods, render
from bmcc.models.pretrained import IMAGENET
from configs import tiny

CLASSES = ("BLA", "EBO", "EOS", "LYT", "MON", "NGS", "PLM", "PMO")
SIZE = 32
TRAIN_PER_CLASS = 40
TRAIN_STEPS = 150
BATCH = 32
EXPLAINED = 16  # images explained by the property tests: 2 per class, never trained on


def _config():
  config = tiny.get_config()
  config.image_size = SIZE
  config.model_config.features = (8, 16)
  config.model_config.dense = 32
  config.model_config.dropout = 0.0
  config.data.classes = CLASSES
  config.learning_rate = 3e-3
  config.num_train_steps = TRAIN_STEPS
  config.warmup_steps = 10
  return config


def cell(code: str, index: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 image, bool nucleus mask) at `size` px: the 250 px JPEG decoded as for training; the
  mask is the share of each pixel's 250 px block that is nucleus, at least a half."""
  image, mask = synthetic.render_with_nucleus_mask(code, index)
  small = decode.decode_image(synthetic.encode_jpeg(image), size)
  cover = Image.fromarray(mask.astype(np.float32), "F").resize((size, size), Image.Resampling.BOX)
  return small, np.asarray(cover) >= 0.5


def _train(workdir: str) -> float:
  """Trains the test model, saves it as a checkpoint of `workdir`; returns its test accuracy."""
  config = _config()
  images = np.stack([cell(c, i)[0] for c in CLASSES for i in range(1, TRAIN_PER_CLASS + 1)])
  labels = np.repeat(np.arange(len(CLASSES), dtype=np.int32), TRAIN_PER_CLASS)
  mesh = steps.create_mesh()
  model = steps.create_model(config, len(CLASSES))
  schedule = steps.create_learning_rate_fn(
      config, steps.Durations(TRAIN_STEPS, config.warmup_steps, TRAIN_STEPS, TRAIN_STEPS))
  optimizer = nnx.Optimizer(model, steps.create_optimizer(config, schedule), wrt=nnx.Param)
  nnx.update((model, optimizer),
             jax.device_put(nnx.state((model, optimizer)), NamedSharding(mesh, P())))
  rng = np.random.default_rng(0)
  data = NamedSharding(mesh, P("data"))
  with jax.set_mesh(mesh):
    for step in range(TRAIN_STEPS):
      chosen = rng.choice(len(images), BATCH, replace=False)
      batch = np.rot90(images[chosen], rng.integers(4), axes=(1, 2))
      batch = np.ascontiguousarray(batch[:, :, ::-1] if rng.integers(2) else batch)
      steps.train_step(model, optimizer, jax.device_put(batch, data),
                       jax.device_put(labels[chosen], data), jax.random.key(step))
    test = [(c, i) for c in CLASSES for i in range(500, 512)]
    probs = steps.eval_step(model, jax.device_put(np.stack([cell(*t)[0] for t in test]), data))
  accuracy = float((np.asarray(probs).argmax(-1) == np.repeat(np.arange(len(CLASSES)), 12)).mean())
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  ckpt.save(TRAIN_STEPS, model=model, optimizer=optimizer, ema_model=None,
            data_iterator=iter(grain.MapDataset.range(1).to_iter_dataset()),
            metadata=checkpointing.run_metadata(config, CLASSES))
  ckpt.close()
  return accuracy


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("explain") / "workdir")
  accuracy = _train(workdir)
  assert accuracy >= 0.9, accuracy  # measured 0.99
  return workdir


# ------------------------------------------------------------------------------------------------
# The measurements (also run by `python tests/test_explain.py WORKDIR`).


def explain(model, images: np.ndarray, spec: str, targets: np.ndarray | None = None):
  """(maps, probabilities, explained classes) as numpy, over the local devices."""
  mesh = steps.create_mesh(jax.local_devices())
  data = NamedSharding(mesh, P("data"))
  targets = np.full(len(images), -1, np.int32) if targets is None else targets.astype(np.int32)
  nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(mesh, P())))
  with jax.set_mesh(mesh):
    out = methods.explain_batch(model, jax.device_put(images, data), jax.device_put(targets, data),
                                method=methods.parse_method(spec))
  return tuple(np.asarray(x) for x in out)


def examples(codes, size: int, per_class: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """Held-out cells (file numbers 900+) and their nucleus masks."""
  pairs = [cell(c, 900 + i, size) for c in codes for i in range(per_class)]
  return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def target_logits(model, images: np.ndarray, targets: np.ndarray) -> np.ndarray:
  model.eval()
  logits = np.asarray(model(normalize_images(jnp.asarray(images, jnp.float32))))
  return logits[np.arange(len(targets)), targets]


def completeness_errors(model, images: np.ndarray, baseline: str, num_steps: int):
  """(|sum of IG - (logit(x) - logit(baseline))| / |logit(x) - logit(baseline)|, the deltas)."""
  maps, _, targets = explain(model, images, f"ig:baseline={baseline}:steps={num_steps}")
  base = np.asarray(methods.baseline_images(jnp.asarray(images, jnp.float32), baseline, 0.08))
  delta = target_logits(model, images, targets) - target_logits(model, base, targets)
  return np.abs(maps.sum(axis=(1, 2)) - delta) / np.abs(delta), delta


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman's rank correlation of two maps (ties broken by position: maps are continuous)."""
  ra = np.argsort(np.argsort(a.ravel(), kind="stable"), kind="stable").astype(np.float64)
  rb = np.argsort(np.argsort(b.ravel(), kind="stable"), kind="stable").astype(np.float64)
  return float(np.corrcoef(ra, rb)[0, 1])


def randomised_correlation(model, random_model, images: np.ndarray, spec: str,
                           absolute: bool) -> float:
  """Mean Spearman correlation of the maps of the trained and the re-initialised model (both
  explaining the trained model's prediction), of the maps or of their absolute values."""
  maps, _, targets = explain(model, images, spec)
  other, _, _ = explain(random_model, images, spec, targets)
  if absolute:
    maps, other = np.abs(maps), np.abs(other)
  return float(np.mean([spearman(a, b) for a, b in zip(maps, other, strict=True)]))


def nucleus_ratios(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """Per image: mean |attribution| on the nucleus over the mean off it."""
  magnitude = np.abs(maps)
  inside = np.array([m[k].mean() for m, k in zip(magnitude, masks, strict=True)])
  outside = np.array([m[~k].mean() for m, k in zip(magnitude, masks, strict=True)])
  return inside / np.maximum(outside, 1e-12)


def deletion_drops(model, images: np.ndarray, maps: np.ndarray, targets: np.ndarray, *,
                   patch: int, k: int, random_draws: int = 8, seed: int = 0):
  """Mean drop of the target probability when the k patches (of a patch x patch grid) with the
  highest mean attribution are filled with the mean colour, and when k random patches are."""
  n, size = len(images), images.shape[1]
  cells = size // patch
  scores = maps[:, :cells * patch, :cells * patch].reshape(n, cells, patch, cells, patch)
  scores = scores.mean(axis=(2, 4)).reshape(n, -1)
  fill = np.asarray(methods.baseline_images(jnp.asarray(images, jnp.float32), "mean", 0.0))

  def occluded(choice):  # choice: [n, k] patch numbers
    out = images.astype(np.float32).copy()
    for i, chosen in enumerate(choice):
      for c in chosen:
        y, x = divmod(int(c), cells)
        ys, xs = slice(y * patch, (y + 1) * patch), slice(x * patch, (x + 1) * patch)
        out[i, ys, xs] = fill[i, ys, xs]
    return np.rint(out).astype(np.uint8)

  def target_probability(batch):
    _, probs, _ = explain(model, batch, "gradcam" if hasattr(model, "feature_map") else "ig",
                          targets)
    return probs[np.arange(n), targets]

  before = target_probability(images)
  top = before - target_probability(occluded(np.argsort(-scores, axis=1)[:, :k]))
  rng = np.random.default_rng(seed)
  random = np.mean([before - target_probability(occluded(
      np.stack([rng.choice(cells * cells, k, replace=False) for _ in range(n)])))
      for _ in range(random_draws)], axis=0)
  return top, random


# ------------------------------------------------------------------------------------------------
# The properties, on the trained test model.


@pytest.fixture(scope="module")
def setup(trained):
  """The restored model, a re-initialised copy, 8 held-out cells (one per class), a map cache."""
  model, meta, _ = checkpointing.restore_model(trained, "latest")
  config = _config()
  config.seed = 1
  images, masks = examples(CLASSES, SIZE, per_class=1)
  cache = {}

  def maps(spec: str, which: str = "trained"):
    """(maps, probs, targets) of `spec`; the random model explains the trained one's classes."""
    if (spec, which) not in cache:
      if which == "trained":
        cache[spec, which] = explain(model, images, spec)
      else:
        cache[spec, which] = explain(random_model, images, spec, maps(spec)[2])
    return cache[spec, which]

  random_model = steps.create_model(config, len(CLASSES))
  return {"model": model, "meta": meta, "images": images, "masks": masks, "maps": maps,
          "random": random_model}


def test_trained_model_predicts_the_explained_cells(setup):
  _, probs, targets = setup["maps"]("gradcam")
  assert (targets == np.arange(len(CLASSES))).mean() >= 7 / 8, targets  # measured 8 of 8
  assert np.allclose(probs.sum(-1), 1, atol=1e-5)


def test_integrated_gradients_completeness_within_one_percent(setup):
  """Sum of IG = logit(x) - logit(baseline), for the default baseline (the mean colour).

  Midpoint rule, 128 steps, on 4 of the 8 cells (time): measured max relative error 0.37% over
  all 8 (black baseline 0.80%); at the default 32 steps 1.3% (black 2.1%), and on the real demo
  model more (README): the ReLU and max-pool kinks along the path. Raise `steps` when the sum
  matters.
  """
  model, images = setup["model"], setup["images"]
  # The 4 cells (time) whose predicted logit is furthest from the baseline's: a real difference.
  model.eval()
  targets = np.asarray(model(normalize_images(jnp.asarray(images, jnp.float32)))).argmax(-1)
  base = np.asarray(methods.baseline_images(jnp.asarray(images, jnp.float32), "mean", 0.08))
  far = np.abs(target_logits(model, images, targets) - target_logits(model, base, targets))
  images = images[np.sort(np.argsort(far)[-4:])]
  errors, delta = completeness_errors(model, images, "mean", 128)
  assert np.abs(delta).min() > 0.5, delta  # a real difference to attribute
  assert errors.max() < 0.01, (errors, delta)


class PathModel(nnx.Module):
  """logits = h + h^2 / 2 with h = z . w per class (z the normalised input, w fixed and random):
  along IG's straight path h is linear in alpha, so each logit is quadratic in alpha and its
  derivative linear, which the midpoint rule integrates exactly and left or right Riemann sums
  do not. A logit is 0 where z is 0, i.e. at the model's `input_mean`."""

  def __init__(self, height: int, width: int, num_classes: int, mean, std, seed: int = 0):
    w = np.random.default_rng(seed).normal(size=(height, width, 3, num_classes))
    self.w = nnx.Param(jnp.asarray(w / np.sqrt(height * width * 3), jnp.float32))
    self.input_mean, self.input_std = tuple(mean), tuple(std)

  def __call__(self, z):
    h = jnp.einsum("bhwc,hwck->bk", z, self.w[...], precision=jax.lax.Precision.HIGHEST)
    return h + 0.5 * h * h

  def reference_logits(self, images: np.ndarray) -> np.ndarray:
    """The logits in float64 numpy, from uint8 images."""
    z = (images.astype(np.float64) - np.asarray(self.input_mean)) / np.asarray(self.input_std)
    h = np.einsum("bhwc,hwck->bk", z, np.asarray(self.w[...], np.float64))
    return h + 0.5 * h * h


def _random_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def test_integrated_gradients_midpoint_rule_is_exact_on_a_quadratic_path():
  """The sum of IG equals logit(x) - logit(black) to float32 precision at any number of steps
  (a right-Riemann rule is off by 6% to 76% at 2 steps here)."""
  model = PathModel(8, 8, 3, MEAN_RGB, STDDEV_RGB)
  images, targets = _random_images(4, 8, 8), np.array([0, 1, 2, 0])
  rows = np.arange(4)
  delta = (model.reference_logits(images) - model.reference_logits(np.zeros_like(images)))[
      rows, targets]
  assert np.abs(delta).min() > 0.5, delta
  for num_steps in (1, 2, 5):
    maps, _, _ = explain(model, images, f"ig:baseline=black:steps={num_steps}", targets)
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), delta, rtol=2e-5, atol=1e-5)


def test_mean_baseline_and_occlusion_fill_are_the_models_input_mean():
  """For an ImageNet-normalised model the "mean" reference is ImageNet's mean colour (input 0,
  where every logit of PathModel is 0), not the stain mean (input (1.31, 1.12, 1.68))."""
  model = PathModel(8, 8, 3, IMAGENET.mean, IMAGENET.std)
  images, targets = _random_images(4, 8, 8, seed=1), np.array([2, 1, 0, 2])
  logits = model.reference_logits(images)
  maps, _, _ = explain(model, images, "ig:steps=2", targets)  # baseline=mean, the default
  np.testing.assert_allclose(maps.sum(axis=(1, 2)), logits[np.arange(4), targets], rtol=2e-5,
                             atol=1e-5)
  # One window over the whole image: the drop from p(x) to p(fill) = softmax(0) = 1/3.
  maps, probs, _ = explain(model, images, "occlusion:patch=8:stride=8", targets)
  expected = probs[np.arange(4), targets] - 1 / 3
  np.testing.assert_allclose(maps, np.broadcast_to(expected[:, None, None], maps.shape),
                             atol=1e-6)


def test_occlusion_on_a_non_square_input_matches_a_brute_force_computation():
  """6 x 20 px, patch 8 (clamped to the shorter side: 6) and stride 5: windows at rows [0, 6) and
  columns 0, 5, 10 and 14 (the last flush with the edge). Each pixel's value is the mean drop of
  the target probability over the windows covering it; no NaN. (A patch longer than the shorter
  side raised IndexError; a stride longer than the patch left pixels NaN.)"""
  model = PathModel(6, 20, 3, MEAN_RGB, STDDEV_RGB, seed=2)
  images, targets = _random_images(4, 6, 20, seed=2), np.array([0, 1, 2, 1])
  maps, _, _ = explain(model, images, "occlusion:patch=8:stride=5", targets)

  def probability(batch):
    logits = model.reference_logits(batch)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True))[np.arange(4), targets]

  total, count = np.zeros((4, 6, 20)), np.zeros((6, 20))
  for left in (0, 5, 10, 14):
    occluded = images.astype(np.float64).copy()
    occluded[:, :, left:left + 6] = MEAN_RGB
    total[:, :, left:left + 6] += (probability(images) - probability(occluded))[:, None, None]
    count[:, left:left + 6] += 1
  np.testing.assert_allclose(maps, total / count, atol=2e-6)
  maps, _, _ = explain(model, images, "occlusion", targets)  # automatic: patch 2, stride 1
  assert maps.shape == (4, 6, 20) and np.isfinite(maps).all()


def test_occlusion_settings_that_leave_pixels_uncovered_are_refused(trained, tmp_path):
  from bmcc.config_validation import ConfigError  # noqa: PLC0415

  with pytest.raises(ValueError, match="stride=8 > patch=4"):
    methods.parse_method("occlusion:patch=4:stride=8")
  automatic = methods.parse_method("occlusion:stride=9")  # patch 32 // 8 = 4 at 32 px
  with pytest.raises(ValueError, match=r"stride=9 > patch=4 \(at 32 px\)"):
    methods.occlusion_geometry(automatic, 32)
  image = tmp_path / "cell.png"
  image.write_bytes(synthetic.image_bytes("BLA", 950))
  with pytest.raises(ConfigError, match="--method: occlusion: stride=9 > patch=4"):
    _explain_paths(trained, [image], methods="occlusion:stride=9")


# Spearman rank correlation of the maps of the trained and of the re-initialised model (same
# architecture, seed 1), of their absolute values (the stricter form, Adebayo et al. 2018), mean
# over the 8 cells, measured: IG (mean baseline) 0.153, Grad-CAM 0.086, occlusion 0.169,
# SmoothGrad (32 samples) 0.095, IG with a black baseline 0.054; on the real demo model at most
# 0.24 (README).
# IG with the blurred baseline: 0.703, it fails (its maps are mostly the image's edges, x - blur(x),
# whatever the weights), so it is not a default and not tested here.
RANDOMISATION_BOUND = 0.35


SMOOTHGRAD = "smoothgrad:samples=32:chunk=32"  # 16 samples leave more Monte Carlo noise


@pytest.mark.parametrize("spec", ["ig", "gradcam", "occlusion", SMOOTHGRAD])
def test_maps_change_when_the_weights_are_reinitialised(setup, spec):
  trained, _, _ = setup["maps"](spec)
  random, _, _ = setup["maps"](spec, "random")
  correlations = [spearman(np.abs(a), np.abs(b)) for a, b in zip(trained, random, strict=True)]
  assert np.mean(correlations) < RANDOMISATION_BOUND, correlations
  assert all(m.std() > 0 for m in trained)  # not a degenerate pass: the maps are not constant


def test_spearman_exact_values():
  """Ranks, not values (a Pearson correlation gives 0.79 on the first pair); the ranks of the
  values, not the argsort (which gives 0.8 on the third pair)."""
  assert spearman(np.array([1.0, 2, 3, 100]), np.array([1.0, 2, 3, 4])) == pytest.approx(1.0)
  assert spearman(np.array([1.0, 2, 3, 4]), np.array([4.0, 3, 2, 1])) == pytest.approx(-1.0)
  # 1 - 6 sum(d^2) / (n (n^2 - 1)) with rank differences d:
  assert spearman(np.array([1.0, 2, 3, 4]), np.array([1.0, 2, 4, 3])) == pytest.approx(0.8)
  assert spearman(np.array([0.3, 0.1, 0.2, 0.4]), np.array([30.0, 10, 40, 20])) == pytest.approx(
      0.2)  # ranks (2, 0, 1, 3) and (2, 0, 3, 1): sum(d^2) = 8
  assert spearman(np.array([[0.3, 0.1], [0.2, 0.4]]), np.array([[30.0, 10], [40, 20]])) == (
      pytest.approx(0.2))  # maps are flattened


# The nucleus check: mean |attribution| on the drawn nucleus over the mean off it, per cell, and
# its mean against the re-initialised model's (a dark blob is salient to any CNN). Measured (8
# cells; trained mean, min; re-initialised mean): IG 10.6, 3.6; 4.6. Grad-CAM 4.8, 2.4; 1.9.
# Occlusion 6.3, 1.4; 2.8. SmoothGrad (32 samples) 1.83, 1.11; 1.32. SmoothGrad is a sensitivity
# map (|d logit / d pixel|, no (x - baseline) factor as in IG): it is high wherever the logit is
# sensitive, e.g. the eosinophil's granular cytoplasm (its lowest cell: 1.11), so its margin over
# the re-initialised model is smaller and it has its own bound; with the noise a fraction of
# 0..255 instead of the image's range, as until December 2026, its lowest cell was 0.86. IG with
# a black baseline fails (0.92: it attributes to the light background, far from black).
NUCLEUS_MARGIN = {"ig": 1.5, "gradcam": 1.5, "occlusion": 1.5, SMOOTHGRAD: 1.25}


@pytest.mark.parametrize("spec", ["ig", "gradcam", "occlusion", SMOOTHGRAD])
def test_attribution_is_higher_on_the_nucleus(setup, spec):
  ratios = nucleus_ratios(setup["maps"](spec)[0], setup["masks"])
  random = nucleus_ratios(setup["maps"](spec, "random")[0], setup["masks"])
  assert (ratios > 1).all(), ratios
  assert np.mean(ratios) > NUCLEUS_MARGIN[spec] * np.mean(random), (ratios, random)


def test_occluding_the_most_attributed_patches_lowers_the_probability_most(setup):
  """Deletion check: fill the 4 most-attributed 4 x 4 patches (of 64) with the mean colour, or 4
  random ones (8 draws). Measured mean drop of the target probability: 0.339 against 0.043."""
  maps, _, targets = setup["maps"]("occlusion")
  top, random = deletion_drops(setup["model"], setup["images"], maps, targets, patch=4, k=4)
  assert top.mean() > 2 * random.mean() + 0.05, (top, random)
  assert (top > random).mean() >= 0.75, (top, random)


# ------------------------------------------------------------------------------------------------
# Pieces.


def test_nucleus_mask_comes_with_the_unchanged_image():
  for code in ("BLA", "NGS", "OTH", "ART"):
    image, mask = synthetic.render_with_nucleus_mask(code, 3, seed=1, image_size=120)
    np.testing.assert_array_equal(image, synthetic.render_image(code, 3, seed=1, image_size=120))
    assert mask.shape == (120, 120) and mask.dtype == bool
    if code == "ART":
      assert not mask.any()  # debris: no nucleus
    else:  # the nucleus is a darker blob in the middle of the image
      assert 0.005 < mask.mean() < 0.2
      assert image[mask].mean() < image[~mask].mean() - 40
      ys, xs = np.nonzero(mask)
      assert 20 < ys.mean() < 100 and 20 < xs.mean() < 100


def test_stained_mask_is_the_dark_violet_region_nearest_the_centre():
  """The real-cell proxy of the nucleus (`stained_masks`): two dark-violet blobs on a pink
  background with a pale-blue cytoplasm; the mask is exactly the blob nearest the centre (the
  corner blob, a neighbour, is off; so is the blue, not dark, cytoplasm and a blob one grey level
  too green)."""
  image = np.full((2, 16, 16, 3), (220, 170, 180), np.uint8)  # pink plasma and red cells
  image[:, 3:13, 3:13] = (170, 160, 210)  # pale-blue cytoplasm: blue - green 50, green 160
  image[:, 6:10, 5:11] = (90, 40, 130)  # nucleus: blue - green 90, green 40
  image[:, 0:2, 14:16] = (60, 30, 120)  # a neighbour's nucleus in the corner
  image[1, 6:10, 5:11] = (90, 91, 141)  # green just above the threshold: not stained
  masks = stained_masks(image)
  expected = np.zeros((16, 16), bool)
  expected[6:10, 5:11] = True
  np.testing.assert_array_equal(masks[0], expected)
  corner = np.zeros((16, 16), bool)
  corner[0:2, 14:16] = True
  np.testing.assert_array_equal(masks[1], corner)  # the only stained region left
  assert not stained_masks(np.full((1, 8, 8, 3), 200, np.uint8)).any()  # nothing stained


def test_method_specs():
  ig = methods.parse_method("IG:steps=64:baseline=blurred")
  assert ig.name == "integrated_gradients" and ig.get("steps") == 64
  assert ig.get("baseline") == "blurred" and ig.get("chunk") == 8
  assert ig == methods.parse_method("integrated_gradients:baseline=blurred:steps=64")  # hashable
  assert [m.name for m in methods.parse_methods("gradcam, occlusion:patch=4,smoothgrad")] == [
      "gradcam", "occlusion", "smoothgrad"]
  for bad, message in [("lime", "Unknown explanation method"), ("ig:steps", "bad setting"),
                       ("ig:colour=1", "bad setting"), ("ig:steps=many", "not a int"),
                       ("ig:baseline=white", "baseline='white'"), ("ig:steps=0", "at least 1"),
                       ("gradcam,gradcam", "named twice"), ("", "No explanation method")]:
    with pytest.raises(ValueError, match=message):
      methods.parse_methods(bad)


def test_occlusion_windows_cover_every_pixel():
  np.testing.assert_array_equal(methods.occlusion_positions(32, 4, 2), np.arange(0, 29, 2))
  np.testing.assert_array_equal(methods.occlusion_positions(10, 4, 4), [0, 4, 6])
  assert methods.occlusion_geometry(methods.parse_method("occlusion"), 250) == (31, 15)
  assert methods.occlusion_geometry(methods.parse_method("occlusion:patch=5:stride=3"), 32) == (
      5, 3)


def test_feature_map_and_head_make_up_the_forward_pass(setup):
  from bmcc.models import resnet  # noqa: PLC0415

  cnn = setup["model"]
  net = resnet.ResNet(num_classes=5, rngs=nnx.Rngs(0), block=resnet.BasicBlock,
                      stage_sizes=(1, 1), width=4)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  for model in (cnn, net):
    model.eval()
    np.testing.assert_allclose(model.logits_from_feature_map(model.feature_map(x)), model(x),
                               rtol=1e-5, atol=1e-5)
  assert cnn.feature_map(x).shape == (2, 8, 8, 16)
  assert net.feature_map(x).shape == (2, 4, 4, 8)
  maps, _, targets = explain(net, np.zeros((4, 32, 32, 3), np.uint8), "gradcam",
                             np.array([0, 1, 2, 3]))
  assert maps.shape == (4, 32, 32) and (maps >= 0).all() and list(targets) == [0, 1, 2, 3]


def test_attention_rollout_hook():
  cnn = nnx.eval_shape(lambda: steps.models.create_model("simple_cnn", num_classes=5,
                                                         rngs=nnx.Rngs(0)))
  assert "a CNN: use gradcam" in methods.unsupported_reason(
      cnn, methods.parse_method("attention_rollout"))
  assert methods.unsupported_reason(cnn, methods.parse_method("gradcam")) is None
  assert methods.default_methods(cnn) == "integrated_gradients,gradcam,occlusion"


def hand_rollout(attention: np.ndarray) -> np.ndarray:
  """The CLS row [B, T] of (A_L + I)/2 @ ... @ (A_1 + I)/2, A_l the head-averaged attention of
  layer l ([B, layers, heads, T, T], rows summing to 1), by loops in float64."""
  batch, layers, _, tokens, _ = attention.shape
  rows = []
  for b in range(batch):
    total = np.eye(tokens)
    for layer in range(layers):
      total = (attention[b, layer].mean(axis=0) + np.eye(tokens)) / 2 @ total
    rows.append(total[0])
  return np.stack(rows)


def test_rollout_is_the_product_of_the_head_averaged_layers():
  """Random, far from identity attention, 3 layers of 4 heads: layers in reverse order, the max
  over heads or the last layer alone give other rows (differences above 0.01)."""
  logits = np.random.default_rng(0).normal(size=(2, 3, 4, 6, 6)) * 2
  attention = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  expected = hand_rollout(attention)[:, 1:]
  np.testing.assert_allclose(methods.rollout(jnp.asarray(attention, jnp.float32)), expected,
                             rtol=1e-5, atol=1e-7)
  for wrong in (attention[:, ::-1], attention[:, -1:]):
    assert np.abs(hand_rollout(wrong)[:, 1:] - expected).max() > 0.01


def _vit(num_registers: int, image_size: int = 28, seed: int = 0):
  """A 2-block ViT/14 (width 16, 2 heads) with weights N(0, 0.6), so that its attention is far
  from uniform."""
  vit = steps.models.create_model("vit_small_patch14", num_classes=len(CLASSES),
                                  rngs=nnx.Rngs(seed), embed_dim=16, depth=2, num_heads=2,
                                  num_registers=num_registers, image_size=image_size)
  rng = np.random.default_rng(seed)
  nnx.update(vit, jax.tree.map(lambda p: jnp.asarray(0.6 * rng.normal(size=p.shape), p.dtype),
                               nnx.state(vit, nnx.Param)))
  vit.eval()
  return vit


@pytest.mark.parametrize("num_registers", [0, 4])
def test_vit_attention_maps_are_the_attention_its_blocks_apply(num_registers):
  """On a non-square input (2 x 3 patches): one [heads, T, T] map per block, rows summing to 1,
  that mixes the values into exactly what the block's attention outputs."""
  tokens = 1 + num_registers + 2 * 3

  @nnx.jit
  def outputs(vit, x):  # (maps, [(attention output from the maps, the block's own)] per block)
    maps, pairs, h = vit.attention_maps(x), [], vit.tokens(x)
    for i, block in enumerate(vit.blocks):
      y = block.norm1(h)
      values = block.attn.qkv(y).reshape(2, tokens, 3, 2, 8)[:, :, 2]
      mixed = jnp.einsum("bhqk,bkhd->bqhd", maps[:, i], values).reshape(2, tokens, 16)
      pairs.append((block.attn.proj(mixed), block.attn(y)))
      h = block(h)
    return maps, pairs

  maps, pairs = outputs(_vit(num_registers),
                        jnp.asarray(np.random.default_rng(1).normal(size=(2, 28, 42, 3))))
  assert maps.shape == (2, 2, 2, tokens, tokens)
  np.testing.assert_allclose(maps.sum(-1), 1, rtol=1e-5)
  assert float(maps.max()) > 0.4  # not uniform (1 / tokens)
  for from_maps, applied in pairs:
    np.testing.assert_allclose(from_maps, applied, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_registers", [0, 4])
def test_attention_rollout_on_a_vit_maps_the_patch_tokens(num_registers):
  """Tokens CLS, registers, patches: the map is the rollout's CLS row over the patches (not the
  registers) on the 2 x 3 patch grid of a 28 x 42 input, resized bilinearly."""
  vit = _vit(num_registers)
  images = _random_images(4, 28, 42, seed=3)
  if num_registers:  # gradients of a ViT in the sharded program (they failed to trace)
    assert np.isfinite(explain(vit, images, "ig:steps=2")[0]).all()
  maps, _, _ = explain(vit, images, "attention_rollout")
  attention = nnx.jit(lambda vit, x: vit.attention_maps(steps.normalize_input(vit, x)))(
      vit, jnp.asarray(images))
  grid = hand_rollout(np.asarray(attention, np.float64))[:, 1 + num_registers:].reshape(4, 2, 3)
  expected = jax.image.resize(jnp.asarray(grid, jnp.float32), (4, 28, 42), "bilinear")
  np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-7)


def test_explain_uses_attention_rollout_on_a_vit_by_default(tmp_path):
  import ml_collections  # noqa: PLC0415

  config = _config()
  config.model, config.image_size = "vit_small_patch14", 14  # one patch: the least compute
  config.model_config = ml_collections.ConfigDict(
      dict(embed_dim=16, depth=2, num_heads=2, num_registers=4, image_size=14))
  ckpt = checkpointing.Checkpointer(str(tmp_path / "vit" / "checkpoints"))
  ckpt.save(1, model=_vit(4, image_size=14), optimizer=None, ema_model=None,
            data_iterator=iter(grain.MapDataset.range(1).to_iter_dataset()),
            metadata=checkpointing.run_metadata(config, CLASSES))
  ckpt.close()
  stderr = io.StringIO()
  explainer = driver.Explainer(str(tmp_path / "vit"), checkpoint="latest", methods=None,
                               target=None, out_dir=str(tmp_path / "out"), batch_size=4,
                               stderr=stderr)
  assert stderr.getvalue() == ""  # no method skipped
  assert [m.name for m in explainer.methods] == [
      "integrated_gradients", "attention_rollout", "occlusion"]


def test_choose_examples_takes_the_commonest_confusions_then_every_class():
  codes = ["A", "B", "C"]
  labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 0, 1])
  predictions = np.array([0, 1, 1, 1, 2, 1, 2, 2, 0, 0])  # A->B twice, B->C once, B->A once
  chosen = driver.choose_examples(labels, predictions, 7, codes)
  assert chosen[:2] == [(1, "confusion A -> B (2 in the split)"),
                        (9, "confusion B -> A (1 in the split)")]
  assert [i for i, _ in chosen[2:]] == [0, 3, 6, 2, 4]
  assert [why for _, why in chosen[2:5]] == ["class A", "class B", "class C"]
  assert len(driver.choose_examples(labels, labels, 50, codes)) == len(labels)  # all, no repeat
  assert driver.choose_examples(labels, predictions, 1, codes) == [(0, "class A")]


def test_heat_and_overlay():
  assert not render.heat(np.full((4, 4), -1.0)).any()  # no positive evidence: nothing shown
  value = render.heat(np.arange(16, dtype=np.float32).reshape(4, 4) - 8)
  assert value.max() == 1.0 and value[0, 0] == 0.0
  image = np.full((20, 20, 3), 200, np.uint8)
  out = render.overlay(image, np.zeros((4, 4)))
  np.testing.assert_array_equal(out, image)  # zero attribution is transparent


# ------------------------------------------------------------------------------------------------
# --mode=explain.

FAST = "gradcam,occlusion,ig:steps=4"  # every method path, little compute


def _explain_paths(workdir, paths, **kwargs):
  out, err = io.StringIO(), io.StringIO()
  status = driver.explain_paths(workdir, [str(p) for p in paths], stdout=out, stderr=err,
                                **kwargs)
  return status, [json.loads(line) for line in out.getvalue().splitlines()], \
      err.getvalue().splitlines()


def test_bad_inputs_are_reported_as_by_predict_and_the_rest_is_explained(trained, tmp_path):
  from bmcc import predict  # noqa: PLC0415
  from tests.test_predict import MIXED  # noqa: PLC0415 (predict's good and bad files)

  folder = tmp_path / "mixed"
  for rel, (make, _) in MIXED.items():
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    (folder / rel).write_bytes(make())
  (tmp_path / "PLM_00901.png").write_bytes(synthetic.image_bytes("PLM", 901))
  (tmp_path / "empty").mkdir()
  paths = [folder, tmp_path / "missing.jpg", tmp_path / "empty", tmp_path / "PLM_00901.png"]
  out_dir = tmp_path / "out"
  status, records, errors = _explain_paths(trained, paths, methods=FAST, out_dir=str(out_dir))
  expected_errors = io.StringIO()
  assert predict.predict_paths(trained, [str(p) for p in paths], stdout=io.StringIO(),
                               stderr=expected_errors) == status == 1
  assert errors == expected_errors.getvalue().splitlines()  # same lines, same order
  assert sum(e == "error" for _, e in MIXED.values()) + 2 == len(errors)
  good = [k for k, (_, e) in MIXED.items() if e in ("ok", "warn")]
  assert len(records) == len(good) + 1
  assert records[-1]["true"] == "PLM" and records[0]["true"] is None  # from the file name
  for r in records:
    assert r["code"] == r["target"] and r["code"] in CLASSES
    assert Image.open(r["picture"]).size == (192 * 4, 192 + 2 * 15 + 4)  # cell + 3 overlays
    assert set(r["maps"]) == {"gradcam", "occlusion", "integrated_gradients"}
    for path in r["maps"].values():
      attribution = np.load(path)
      assert attribution.shape == (SIZE, SIZE) and attribution.dtype == np.float32
      assert np.isfinite(attribution).all()
  assert "warning" not in records[0] and "note" in records[good.index("f_odd.png")]
  with open(out_dir / "index.jsonl") as f:
    assert [json.loads(line) for line in f] == records
  sheet = Image.open(out_dir / "contact_sheet.png")
  assert sheet.width == 112 * 4 and sheet.height > len(records) * 112


def test_target_and_argument_errors(trained, tmp_path):
  from bmcc.config_validation import ConfigError  # noqa: PLC0415

  image = tmp_path / "cell.jpg"
  image.write_bytes(synthetic.image_bytes("BLA", 950))
  status, records, errors = _explain_paths(trained, [image], methods="gradcam", target="LYT",
                                           out_dir=str(tmp_path / "o"))
  assert status == 0 and errors == [] and records[0]["target"] == "LYT"
  assert records[0]["target_probability"] < records[0]["probability"]
  with pytest.raises(ConfigError, match="not a class of this model"):
    _explain_paths(trained, [image], methods="gradcam", target="ABE")
  with pytest.raises(ConfigError, match="--method: Unknown explanation method 'lime'"):
    _explain_paths(trained, [image], methods="gradcam,lime")
  status, _, errors = _explain_paths(trained, [])
  assert status == 1 and errors == ["error: no image files or folders given"]


def test_main_explain_writes_overlays_and_contact_sheet(trained, tmp_path):
  """The issue's command, with the default methods, in a subprocess."""
  from tests import helpers  # noqa: PLC0415

  for i, code in enumerate(("EOS", "LYT")):
    (tmp_path / f"{code}_{i:05d}.jpg").write_bytes(synthetic.image_bytes(code, 960 + i))
  result = subprocess.run(
      helpers.main_command("tiny.py", trained, "--mode=explain", str(tmp_path / "EOS_00000.jpg"),
                           str(tmp_path / "LYT_00001.jpg")),
      cwd=helpers.REPO, env=helpers.cli_env(devices=2), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in result.stdout.splitlines()]
  assert [r["true"] for r in records] == ["EOS", "LYT"]
  out_dir = os.path.dirname(records[0]["picture"])
  assert os.path.dirname(out_dir) == os.path.join(trained, "explain")
  assert sorted(os.listdir(out_dir)) == sorted(
      ["contact_sheet.png", "index.jsonl"] + [f"000{i}_{c}_0000{i - 1}.{suffix}"
                                             for i, c in ((1, "EOS"), (2, "LYT"))
                                             for suffix in ("png", "integrated_gradients.npy",
                                                            "gradcam.npy", "occlusion.npy")])


def test_split_mode_explains_confusions_and_classes_into_tensorboard(trained, tmp_path,
                                                                    monkeypatch):
  """`--split` without TFDS: the prepared split is replaced by 12 cells (two of them labelled
  EBO though they are lymphocytes: the commonest confusion) in padded batches of 8."""
  from tensorboard.backend.event_processing import event_accumulator  # noqa: PLC0415

  from bmcc.data import input_pipeline, loading, pipeline  # noqa: PLC0415

  codes = ("EBO", "LYT", "NGS", "PLM", "EOS", "BLA")
  images = np.stack([cell(c, 970 + i)[0] for c in codes for i in range(2)])
  labels = np.array([CLASSES.index(c) for c in codes for _ in range(2)], np.int32)
  labels[2:4] = CLASSES.index("EBO")  # the two LYT cells
  batches = [pipeline.pad_batch({"image": images[i:i + 8], "label": labels[i:i + 8]}, 8)
             for i in (0, 8)]

  def eval_iter(config, builder, split, **kwargs):
    assert split == "test" and not kwargs  # the run's classes and size are in the config
    assert config.data.classes == CLASSES and config.image_size == SIZE
    return input_pipeline.EvalData(iter(batches), pipeline.ClassMapping.create(CLASSES), 12)

  monkeypatch.setattr(loading, "load_builder", lambda data_config: None)
  monkeypatch.setattr(input_pipeline, "create_eval_iter", eval_iter)
  out = io.StringIO()
  assert driver.explain_split(_config(), trained, split="test", num_examples=7, methods="gradcam",
                              out_dir=str(tmp_path / "split"), stdout=out) == 0
  records = [json.loads(line) for line in out.getvalue().splitlines()]
  assert records[0]["note"] == "confusion EBO -> LYT (2 in the split)"
  # Then round-robin over the classes in the model's order (no LYT or MON left in the split).
  assert [r["path"] for r in records] == [f"test[{i}]" for i in (2, 10, 0, 8, 4, 6, 11)]
  assert [r["true"] for r in records] == ["EBO", "BLA", "EBO", "EOS", "NGS", "PLM", "BLA"]
  assert records[1]["note"] == "class BLA"
  assert os.path.basename(records[0]["picture"]) == "0001_test_2_EBO.png"  # in the chosen order
  assert os.path.basename(records[1]["picture"]) == "0002_test_10_BLA.png"
  assert records[0]["code"] == "LYT"
  acc = event_accumulator.EventAccumulator(str(tmp_path / "split"), size_guidance={"tensors": 0})
  acc.Reload()
  assert set(acc.Tags()["tensors"]) == {"explain/test/panels", "explain/test/contact_sheet"}
  (event,) = acc.Tensors("explain/test/panels")
  assert event.step == TRAIN_STEPS
  assert len(event.tensor_proto.string_val) == 2 + 7  # width, height, then the 7 PNGs


# ------------------------------------------------------------------------------------------------
# Every mode reads the run it restores (`checkpointing.restore_run`).


def test_restore_run_takes_the_runs_data_selection_and_names_each_override(trained, caplog):
  config = _config()  # as the run was trained: nothing to override
  run = checkpointing.restore_run(trained, config, checkpoint="latest")
  assert run.overridden == {} and run.step == TRAIN_STEPS
  assert run.config.data.classes == CLASSES and run.config.image_size == SIZE
  config.data.split, config.data.fold, config.data.num_folds = "dinobloom", 1, 5
  config.data.classes, config.image_size = ("BLA", "EBO"), 64
  with caplog.at_level("WARNING"):
    run = checkpointing.restore_run(trained, config, checkpoint="latest")
  assert (run.config.data.split, run.config.data.fold, run.config.data.num_folds) == (
      "stratified", None, None)
  assert run.config.data.classes == CLASSES and run.config.image_size == SIZE
  assert run.overridden == {"data.split": ("dinobloom", "stratified"), "data.fold": (1, None),
                            "data.num_folds": (5, None),
                            "data.classes": (["BLA", "EBO"], list(CLASSES)),
                            "image_size": (64, SIZE)}
  (line,) = [r.getMessage() for r in caplog.records if "disagrees" in r.getMessage()]
  assert all(key in line for key in run.overridden) and "the run's values are used" in line
  assert config.data.split == "dinobloom"  # the caller's config is left as it was
  assert checkpointing.restore_run(trained, checkpoint="latest").config is None


@pytest.fixture(scope="module")
def dinobloom_run(trained, tmp_path_factory):
  """The trained test model saved again as if trained under the DinoBloom protocol."""
  model, meta, step = checkpointing.restore_model(trained, "latest")
  workdir = str(tmp_path_factory.mktemp("dinobloom") / "workdir")
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  ckpt.save(step, model=model, optimizer=None, ema_model=None,
            data_iterator=iter(grain.MapDataset.range(1).to_iter_dataset()),
            metadata={**meta, "protocol": "dinobloom"})
  ckpt.close()
  return workdir


def test_explain_split_and_evaluate_read_the_split_of_the_runs_protocol(dinobloom_run, tmp_path,
                                                                        monkeypatch):
  """A run trained under `data.split="dinobloom"`, explained and evaluated with a config that
  says "stratified": the split is read under the run's protocol (explain read the config's)."""
  from bmcc import evaluate  # noqa: PLC0415
  from bmcc.data import input_pipeline, loading, pipeline  # noqa: PLC0415

  images = np.stack([cell(c, 980)[0] for c in CLASSES])
  labels = np.arange(len(CLASSES), dtype=np.int32)
  protocols = []

  def eval_iter(config, builder, split, **kwargs):
    protocols.append(config.data.split)
    return input_pipeline.EvalData(iter([pipeline.pad_batch({"image": images, "label": labels},
                                                            8)]),
                                   pipeline.ClassMapping.create(config.data.classes), 8)

  monkeypatch.setattr(loading, "load_builder", lambda data_config: None)
  monkeypatch.setattr(input_pipeline, "create_eval_iter", eval_iter)
  config = _config()
  assert config.data.split == "stratified"
  assert driver.explain_split(config, dinobloom_run, split="validation", num_examples=2,
                              methods="gradcam", checkpoint="latest", batch_size=8,
                              out_dir=str(tmp_path / "explain"), stdout=io.StringIO()) == 0
  report = evaluate.evaluate_workdir(config, dinobloom_run, split="validation",
                                     checkpoint="latest")
  assert report["num_examples"] == 8
  assert protocols == ["dinobloom"] * 3  # explain: the confusion matrix, then the examples


# ------------------------------------------------------------------------------------------------
# Real cells, for `measure` (a run trained on real images): no drawn nucleus, so a stain proxy.

# May-Grünwald-Giemsa stains nuclear chromatin, granules and basophilic cytoplasm dark violet (blue
# well above green, green low); the plasma and the red cells around a cell are grey, pink or pale.
# The proxy of the drawn nucleus: pixels (at the model's input size) with blue - green >= 50 and
# green <= 90, in the 8-connected region nearest the image's centre (the dataset's cells are
# centred; stained neighbours count as "off"). Checked by eye on the 20 fixture cells and 16 test
# cells: it takes the centred cell's nucleus and any violet cytoplasm or granules, not the pale or
# pink cytoplasm (an eosinophil's orange granules are off); touching neighbours can join it.
STAIN_BLUE_OVER_GREEN, STAIN_MAX_GREEN = 50, 90


def stained_masks(images: np.ndarray) -> np.ndarray:
  """[N, H, W] bool: the dark-violet region of the centred cell of each uint8 image (see above)."""
  import scipy.ndimage  # noqa: PLC0415 (scikit-learn's dependency; only the real-cell measure)

  rgb = images.astype(np.int32)
  violet = (rgb[..., 2] - rgb[..., 1] >= STAIN_BLUE_OVER_GREEN) & (rgb[..., 1] <= STAIN_MAX_GREEN)
  masks = np.zeros(violet.shape, bool)
  for i, stained in enumerate(violet):
    regions, count = scipy.ndimage.label(stained, structure=np.ones((3, 3)))
    if count:
      ys, xs = np.nonzero(stained)
      centre = (np.asarray(stained.shape) - 1) / 2
      nearest = np.argmin((ys - centre[0]) ** 2 + (xs - centre[1]) ** 2)
      masks[i] = regions == regions[ys[nearest], xs[nearest]]
  return masks


def split_cells(workdir: str, split: str, per_class: int, checkpoint: str,
                data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(uint8 images, labels, file names): the first `per_class` cells of each class of the run's
  `split`, read as `--mode=explain --split` reads it (the run's config.json, its protocol and fold
  through `checkpointing.restore_run`; `driver.choose_examples` without confusions)."""
  import ml_collections  # noqa: PLC0415

  from bmcc import run_config  # noqa: PLC0415
  from bmcc.data import input_pipeline, loading  # noqa: PLC0415

  config = ml_collections.ConfigDict(run_config.load_run_config(workdir).to_dict())
  if data_dir is not None:
    config.data.data_dir = data_dir
  config = checkpointing.restore_run(workdir, config, checkpoint=checkpoint).config
  batches = list(input_pipeline.create_eval_iter(config, loading.load_builder(config.data),
                                                 split).batches)
  keep = np.concatenate([b["mask"] for b in batches]).astype(bool)
  images = np.concatenate([b["image"] for b in batches])[keep]
  labels = np.concatenate([b["label"] for b in batches])[keep]
  names = [str(n) for n in np.concatenate([b["file_name"] for b in batches])[keep]]
  codes = list(config.data.classes)
  chosen = [i for i, _ in driver.choose_examples(labels, labels, per_class * len(codes), codes)]
  return images[chosen], labels[chosen], [names[i] for i in chosen]


def file_cells(paths: list[str], size: int, codes: list[str]
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(uint8 images, labels (-1 if the name has no class code), paths) of image files and folders,
  found and decoded as by `--mode=predict` and `--mode=explain`."""
  from bmcc import predict  # noqa: PLC0415

  files, _ = predict.find_images(paths, sys.stderr)
  items = [predict._load(f, size) for f in files]
  for item in items:
    if item.error is not None:
      print(f"error: {item.path}: {item.error}", file=sys.stderr)
  items = [item for item in items if item.error is None]
  if not items:
    raise SystemExit("error: no readable image files in the given paths")

  def label(path):
    match = driver._CODE_IN_NAME.match(os.path.basename(path))
    return codes.index(match[1]) if match and match[1] in codes else -1

  return (np.stack([item.image for item in items]),
          np.array([label(item.path) for item in items], np.int32), [item.path for item in items])


def measure(workdir: str, *, split: str | None = None, paths: list[str] | None = None,
            per_class: int = 2, checkpoint: str = "latest", data_dir: str | None = None) -> None:
  """Prints the tests' measurements for a run (`checkpoint`: 'latest' or 'best').

  Synthetic cells (neither `split` nor `paths`): one drawn cell of each of the run's classes with
  a nucleus, scored against the drawn nucleus. Real cells: `per_class` cells of each class of the
  run's `split` (for a cross-validation fold, its test images), or the image files `paths`, scored
  against `stained_masks`. As many as fill whole shards of the local devices.
  """
  import ml_collections  # noqa: PLC0415

  model, meta, step = checkpointing.restore_model(workdir, checkpoint)
  size, codes = meta["image_size"], list(meta["classes"])
  if split is None and not paths:
    images, masks = examples([c for c in codes if c not in ("ART", "KSC")], size, per_class=1)
    labels, what, region = None, "synthetic cells", "drawn nucleus"
  else:
    if split is not None:
      images, labels, names = split_cells(workdir, split, per_class, checkpoint, data_dir)
      what = f"real cells of its {split} split ({meta.get('protocol', 'stratified')}" + (
          f", fold {meta['fold']} of {meta['num_folds']})" if meta.get("fold") is not None else ")")
    else:
      images, labels, names = file_cells(paths, size, codes)
      what = "real cells from files"
    masks = stained_masks(images)
    region = "stained centre (proxy)"
  n = len(images) // jax.local_device_count() * jax.local_device_count()  # whole shards
  images, masks = images[:n], masks[:n]
  random_model = steps.create_model(ml_collections.ConfigDict(
      {"model": meta["model"], "model_config": meta["model_config"], "seed": 1}), len(codes))
  print(f"{workdir}: {meta['model']} at {size} px, {checkpoint} checkpoint (step {step}), "
        f"{len(images)} {what}")
  if labels is not None:
    _, probs, predicted = explain(model, images, "gradcam" if hasattr(model, "feature_map")
                                  else "ig:steps=1")
    for name, label, p, m in zip(names, labels[:n], predicted, masks, strict=False):
      print(f"  {name}: true {codes[label] if label >= 0 else '?'}, predicted {codes[p]}; "
            f"stained centre {m.mean():.0%} of the image")
    known = labels[:n] >= 0
    print(f"  accuracy on these cells {(predicted[known] == labels[:n][known]).mean():.3f}")
  for baseline in ("mean", "black"):
    for num_steps in (32, 128):
      errors, _ = completeness_errors(model, images, baseline, num_steps)
      print(f"  IG completeness, {baseline} baseline, {num_steps} steps: max relative error "
            f"{errors.max():.4f}, median {np.median(errors):.4f}")
  for spec in ("ig", "ig:baseline=black", "ig:baseline=blurred", SMOOTHGRAD, "gradcam",
               "occlusion"):
    maps, _, targets = explain(model, images, spec)
    other, _, _ = explain(random_model, images, spec, targets)
    ratios, random = nucleus_ratios(maps, masks), nucleus_ratios(other, masks)
    rho = np.mean([spearman(np.abs(a), np.abs(b)) for a, b in zip(maps, other, strict=True)])
    top, rand = deletion_drops(model, images, maps, targets, patch=max(2, size // 8), k=4)
    print(f"  {spec}: Spearman |map| vs re-initialised {rho:.3f}; {region}/off ratio mean "
          f"{ratios.mean():.2f} (min {ratios.min():.2f}; re-initialised {random.mean():.2f}); "
          f"deletion drop top-4 {top.mean():.3f} vs random {rand.mean():.3f}")


def _main(argv: list[str]) -> None:
  import argparse  # noqa: PLC0415

  parser = argparse.ArgumentParser(
      prog="python -m tests.test_explain",
      description="The explanation sanity checks, measured on a run. Synthetic cells by default "
      "(a missing WORKDIR gets the test model trained into it); real cells with --split or "
      "--images.")
  parser.add_argument("workdir")
  parser.add_argument("--split", help="real cells of this split of the run (its protocol and "
                      "fold), e.g. test")
  parser.add_argument("--images", nargs="+", help="real image files or folders (CODE_nnnnn "
                      "names give the true class)")
  parser.add_argument("--per_class", type=int, default=2, help="--split: cells per class")
  parser.add_argument("--checkpoint", choices=("latest", "best"), default="latest")
  parser.add_argument("--data_dir", help="--split: the prepared dataset, if not the run's")
  args = parser.parse_args(argv)
  if args.split and args.images:
    parser.error("give --split or --images, not both")
  if not os.path.isdir(args.workdir):
    if args.split or args.images:
      parser.error(f"{args.workdir} is not a folder")
    print(f"trained the test model into {args.workdir}: test accuracy "
          f"{_train(args.workdir):.3f}")
  measure(args.workdir, split=args.split, paths=args.images, per_class=args.per_class,
          checkpoint=args.checkpoint, data_dir=args.data_dir)


if __name__ == "__main__":  # python -m tests.test_explain WORKDIR [--split=test | --images ...]
  _main(sys.argv[1:])
