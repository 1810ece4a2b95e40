"""What `--mode=features` embeds, how its cache is keyed and which probes it fits: the ViT's token
pooling ("cls", DinoBloom's; "cls_mean_patch", DINOv2's linear evaluation; the patch tokens),
computed by hand from the blocks' output; the weight file's fingerprint (size and SHA-256 of its
content); `config.probe` as `bmcc.probe.ProbeSettings`."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from flax import nnx

from bmcc import features
from bmcc.models import pretrained
from tests.test_pretrained import FIXTURES, MANIFEST, TOLERANCE, _inputs, _reference
from tests.test_vit import _images, _tiny


def _by_hand(model, x):
  """Final-norm tokens from the model's parts, one block after another."""
  tokens = model.tokens(x)
  for block in model.blocks:
    tokens = block(tokens)
  return np.asarray(model.norm(tokens), np.float32)


def test_cls_mean_patch_is_cls_then_mean_of_patch_tokens():
  registers = 2  # between the CLS token and the patches: not part of the patch mean
  x = _images(56)
  cls_model = _tiny(num_registers=registers)
  both = nnx.clone(cls_model)  # the same weights, DINOv2's pooling
  both.pooling = "cls_mean_patch"
  tokens = _by_hand(cls_model, x)  # [2, 1 + R + 16, 32]: CLS, registers, a 4 x 4 patch grid
  assert tokens.shape == (2, 1 + registers + 16, 32)
  np.testing.assert_allclose(cls_model.features(x), tokens[:, 0], rtol=1e-5, atol=1e-6)
  patches = tokens[:, 1 + registers:]
  np.testing.assert_allclose(both.patch_tokens(x), patches, rtol=1e-5, atol=1e-6)
  expected = np.concatenate([tokens[:, 0], patches.mean(axis=1)], axis=1)
  np.testing.assert_allclose(both.features(x), expected, rtol=1e-5, atol=1e-6)
  # A model built with the pooling has its head on the 2 D pooled features.
  built = _tiny(num_registers=registers, pooling="cls_mean_patch")
  assert built.num_features == 64 and cls_model.num_features == 32
  assert built.head.kernel.shape == (64, 5) and built(x).shape == (2, 5)


def test_unknown_pooling_is_refused():
  with pytest.raises(ValueError, match="pooling must be one of cls, cls_mean_patch"):
    _tiny(pooling="mean")


def test_pretrained_cls_half_matches_pytorch():
  """With DINOv2's pooling the first D values are still the PyTorch reference's CLS token."""
  fixture = MANIFEST["fixtures"]["vit_plain"]
  model = pretrained.load_backbone(fixture["arch"], FIXTURES / "vit_plain_dinobloom.pth",
                                   **fixture["model_config"], pooling="cls_mean_patch")
  out = np.asarray(model.features(_inputs(fixture["image_size"])))
  assert out.shape == (_reference(fixture).shape[0], 32) and model.head.kernel.shape == (32, 0)
  np.testing.assert_allclose(out[:, :16], _reference(fixture), **TOLERANCE)
  assert not np.allclose(out[:, 16:], out[:, :16], atol=1e-3)


def test_weights_fingerprint_is_size_and_sha256_of_the_content(tmp_path, monkeypatch):
  monkeypatch.setattr(features, "_HASH_CHUNK", 4)  # several chunks
  data = bytes(range(10))
  (tmp_path / "a.pth").write_bytes(data)
  (tmp_path / "b.pth").write_bytes(data)
  expected = {"bytes": 10, "sha256": hashlib.sha256(data).hexdigest()}
  assert features.weights_fingerprint(tmp_path / "a.pth") == expected
  assert features.weights_fingerprint(tmp_path / "b.pth") == expected  # the name does not count
  (tmp_path / "a.pth").write_bytes(data[:9] + b"\xff")
  assert features.weights_fingerprint(tmp_path / "a.pth")["sha256"] != expected["sha256"]


def test_probe_settings_follow_the_config():
  from bmcc import probe
  from configs import dinobloom_s_probe

  config = dinobloom_s_probe.get_config()
  assert features.probe_settings(config) == probe.ProbeSettings()  # DinoBloom's by default
  assert probe.ProbeSettings() == probe.ProbeSettings(
      fit_on=("train", "validation"), c=None, max_iter=1000, knn_k=(1, 20))
  config.probe.c, config.probe.c_sweep, config.probe.max_iter = "sweep", (-2.0, 1.0, 4), 50
  config.probe.fit_on, config.probe.knn_k, config.probe.weighted_knn_k = ("train",), (5,), ()
  assert features.probe_settings(config) == probe.ProbeSettings(
      fit_on=("train",), c="sweep", c_sweep=(-2.0, 1.0, 4), max_iter=50, knn_k=(5,),
      weighted_knn_k=())
  config.probe.c = 2.5
  assert features.probe_settings(config).c == 2.5
