"""Tests of bmcc.models.pretrained: every supported checkpoint format reproduces the features of
the reference PyTorch model (timm / torchvision) to 1e-4; position-embedding resampling from 224 to
252 px matches DINOv2's; full-size key layouts agree with timm's and torchvision's parameter
counts; corrupt, truncated and foreign files give errors that say what is wrong. Position
embeddings resample by the rule of the file's origin: DINOv2's for original DINOv2 files without
registers, timm's antialiased bicubic for registers and timm files (518 -> 224 px with registers
matches timm to 1e-5 relative).

The fixtures in tests/fixtures/pretrained/ (tiny random-weight models, their files in each format,
an input batch and the reference features) come from tests/fixtures/make_pretrained_fixtures.py,
which needs torch; these tests do not.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from bmcc import models
from bmcc.models import pretrained, weight_files
from bmcc.models import weight_layouts as layouts

FIXTURES = Path(__file__).parent / "fixtures" / "pretrained"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
IMAGES = np.load(FIXTURES / MANIFEST["images"])  # uint8 [2, 252, 252, 3]
CASES = [(name, file) for name, fixture in MANIFEST["fixtures"].items()
         for file in fixture["files"]]
TOLERANCE = dict(rtol=1e-4, atol=1e-4)
# PyTorch position-embedding resampling references (tests/fixtures/make_resample_fixtures.py).
RESAMPLED = np.load(FIXTURES / "resample_references.npz")

# timm `vit_*_patch14_dinov2` (num_classes=0, img_size=224) and torchvision counts, as in
# tests/test_vit.py and tests/test_models.py (torchvision's minus its 1000-class head).
FULL_SIZE_PARAMS = {
    "vit_small_patch14": 21_628_800,
    "vit_base_patch14": 85_724_928,
    "vit_large_patch14": 303_227_904,
    "vit_giant_patch14": 1_134_769_664,
    "resnet50": 25_557_032 - (2048 * 1000 + 1000),
    "resnext50_32x4d": 25_028_904 - (2048 * 1000 + 1000),
}


def _inputs(size: int) -> np.ndarray:
  """The fixture batch cropped to `size`, normalised with the pretrained weights' statistics."""
  norm = pretrained.normalization("vit_small_patch14")
  x = IMAGES[:, :size, :size].astype(np.float32)
  return ((x - np.float32(norm.mean)) / np.float32(norm.std)).astype(np.float32)


def _reference(fixture: dict, key: str = "features") -> np.ndarray:
  return np.load(FIXTURES / fixture[key])


def _load(name: str, file: str, **kwargs) -> nnx.Module:
  fixture = MANIFEST["fixtures"][name]
  return pretrained.load_backbone(fixture["arch"], FIXTURES / file,
                                  **{**fixture["model_config"], **kwargs})


@pytest.mark.parametrize("name,file", CASES)
def test_load_backbone_matches_reference_features(name, file):
  fixture = MANIFEST["fixtures"][name]
  model = _load(name, file)
  features = model.features(_inputs(fixture["image_size"]))
  np.testing.assert_allclose(features, _reference(fixture), **TOLERANCE)
  assert model.input_mean == pretrained.IMAGENET.mean
  assert model.input_std == pretrained.IMAGENET.std
  assert model.pretrained.tensors == len(layouts.expected_keys(model))


@pytest.mark.parametrize("file,layout", [
    ("vit_plain_timm.safetensors", "timm ViT layout"),
    ("vit_plain_dinobloom.pth", "DINOv2 training checkpoint (teacher), original DINOv2 layout"),
    ("vit_registers_dinov2.pth", "original DINOv2 layout"),
    ("resnet_torchvision.pth", "torchvision/timm ResNet layout"),
])
def test_layout_detection(file, layout):
  state, detected, path = pretrained.read_state_dict(FIXTURES / file)
  assert detected == layout and path == str(FIXTURES / file)
  # Canonical keys only: heads of the training checkpoint and DINOv2's mask token are gone.
  assert not any(k.startswith(("backbone.", "dino_head.", "ibot_head.")) for k in state)
  assert "mask_token" not in state and "register_tokens" not in state


def test_registers_folded_into_cls_token():
  timm_state, _, _ = pretrained.read_state_dict(FIXTURES / "vit_registers_timm.safetensors")
  dinov2_state, _, _ = pretrained.read_state_dict(FIXTURES / "vit_registers_dinov2.pth")
  assert sorted(timm_state) == sorted(dinov2_state)
  for key, value in timm_state.items():
    np.testing.assert_allclose(dinov2_state[key], value, rtol=1e-6, atol=1e-6, err_msg=key)


def test_block_chunked_dinov2_keys():
  # DINOv2 trained with block_chunks > 0 names block i `blocks.<chunk>.<i>.`.
  teacher = weight_files.read(FIXTURES / "vit_plain_dinobloom.pth")["teacher"]
  chunked = {k.replace("backbone.blocks.1.", "backbone.blocks.1.1."): v
             for k, v in teacher.items()}
  assert "backbone.blocks.1.1.attn.qkv.weight" in chunked
  state, _ = layouts.canonical_state_dict({"teacher": chunked})
  reference, _ = layouts.canonical_state_dict({"teacher": teacher})
  assert sorted(state) == sorted(reference)


def test_position_embedding_224_run_at_252():
  # A DINOv2-layout file without registers (DinoBloom's) resamples as DINOv2 does (offset 0.1);
  # the same weights in a timm file as timm does (antialiased, no offset).
  fixture = MANIFEST["fixtures"]["vit_plain"]
  model = _load("vit_plain", "vit_plain_dinobloom.pth")
  assert model.grid == 16 and model.pretrained.position_grid == (16, 16)
  assert model.resampling == "dinov2"
  np.testing.assert_allclose(model.features(_inputs(252)), _reference(fixture, "features_252"),
                             **TOLERANCE)
  model = _load("vit_plain", "vit_plain_timm.safetensors")
  assert model.resampling == "antialias"
  np.testing.assert_allclose(model.features(_inputs(252)), RESAMPLED["features_plain_timm_252"],
                             **TOLERANCE)


def _relative_error(actual, expected) -> float:
  return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


def test_registers_518_px_weights_match_timm_at_224():
  # DINOv2-reg weights are stored for 518 px (37 x 37 patches); used at 224 px they must give
  # timm's (and DINOv2-reg's) features: antialiased bicubic, no offset. DINOv2's offset rule
  # (the rule for files without registers) misses by ~10% here.
  registers = dict(MANIFEST["fixtures"]["vit_registers"]["model_config"])
  path = FIXTURES / "vit_registers518_timm.safetensors"
  model = pretrained.load_backbone("vit_base_patch14", path, image_size=224, **registers)
  loaded = model.pretrained
  assert loaded.position_grid == (37, 16) and loaded.position_resampling == "antialias"
  assert _relative_error(model.pos_embed[...], RESAMPLED["pos_registers518_224"]) < 2e-6
  assert _relative_error(model.features(_inputs(224)),
                         RESAMPLED["features_registers518_224"]) < 1e-5
  # Kept at 518 px and resampled at run time: the same, on square and non-square inputs.
  model = pretrained.load_backbone("vit_base_patch14", path, **registers)
  assert model.grid == 37 and model.resampling == "antialias"
  assert _relative_error(model.features(_inputs(224)),
                         RESAMPLED["features_registers518_224"]) < 1e-5
  assert _relative_error(model.features(_inputs(252)[:, :224]),
                         RESAMPLED["features_registers518_224x252"]) < 1e-5


@pytest.mark.parametrize("file,rule", [
    ("vit_plain_dinobloom.pth", "dinov2"),  # original DINOv2 layout, no registers
    ("vit_swiglu_dinobloom.pth", "dinov2"),
    ("vit_plain_timm.safetensors", "antialias"),  # timm layout
    ("vit_registers_dinov2.pth", "antialias"),  # registers (DINOv2's *_reg hub models)
    ("vit_registers_timm.safetensors", "antialias"),
])
def test_resampling_rule_follows_the_file_origin(file, rule):
  state, layout, _ = pretrained.read_state_dict(FIXTURES / file)
  assert layouts.vit_position_resampling(state, layout) == rule


def test_load_into_resamples_by_the_file_rule_unless_the_model_names_one():
  # A registry-built 224 px model with registers, from the 518 px file: antialiased at load;
  # the model's own run-time rule stays its config's (so restored checkpoints resample alike).
  registers = dict(MANIFEST["fixtures"]["vit_registers"]["model_config"], num_registers=4)
  path = FIXTURES / "vit_registers518_timm.safetensors"
  for named, used in (("auto", "antialias"), ("dinov2", "dinov2")):
    model = nnx.eval_shape(lambda named=named: models.create_model(
        "vit_base_patch14", num_classes=0, rngs=nnx.Rngs(0), pos_embed_resampling=named,
        **registers))
    loaded = pretrained.load_into(model, "vit_base_patch14", path)
    assert loaded.position_resampling == used and model.pos_embed_resampling == named
    expected = RESAMPLED["pos_registers518_224"]
    error = _relative_error(model.pos_embed[...], expected)
    assert error < 2e-6 if used == "antialias" else error > 1e-2


def test_position_embedding_resampled_at_load():
  fixture = MANIFEST["fixtures"]["vit_plain"]
  model = _load("vit_plain", "vit_plain_dinobloom.pth", image_size=252)
  assert model.grid == 18 and model.pretrained.position_grid == (16, 18)
  assert model.pos_embed.shape == (1, 1 + 18 * 18, 16)
  np.testing.assert_allclose(model.features(_inputs(252)), _reference(fixture, "features_252"),
                             **TOLERANCE)


def test_load_into_registry_model_keeps_its_head():
  fixture = MANIFEST["fixtures"]["resnext"]
  model = models.create_model(fixture["arch"], num_classes=21,
                              rngs=nnx.Rngs(jax.random.key(0, impl="rbg")),
                              **fixture["model_config"])
  head = np.array(model.head.kernel[...])
  loaded = pretrained.load_into(model, fixture["arch"], FIXTURES / fixture["files"][0])
  assert np.array_equal(model.head.kernel[...], head)
  model.eval()
  np.testing.assert_allclose(model.features(_inputs(56)), _reference(fixture), **TOLERANCE)
  assert loaded.layout == "torchvision/timm ResNet layout" and loaded.position_grid is None
  assert loaded.normalization == pretrained.IMAGENET
  assert json.dumps(dataclasses.asdict(loaded))  # JSON-serialisable for run metadata
  with pytest.raises(TypeError, match="VisionTransformer"):
    pretrained.load_into(model, "vit_small_patch14", FIXTURES / "vit_plain_timm.safetensors")


def test_new_head_and_eval_mode():
  model = _load("vit_swiglu", "vit_swiglu_timm.safetensors", num_classes=5)
  logits = model(_inputs(56))
  assert logits.shape == (2, 5) and model.head.kernel.shape == (16, 5)
  assert model.blocks[0].drop_path.deterministic  # eval mode
  assert _load("resnet", "resnet_timm.safetensors")(_inputs(56)).shape == (2, 0)


@pytest.mark.parametrize("arch", sorted(FULL_SIZE_PARAMS))
def test_full_size_layout_matches_reference_counts(arch):
  model = nnx.eval_shape(lambda: models.create_model(arch, num_classes=21, rngs=nnx.Rngs(0)))
  targets = layouts.expected_keys(model)
  params = sum(math.prod(t.file_shape) for k, t in targets.items() if "running_" not in k)
  assert params == FULL_SIZE_PARAMS[arch]
  assert layouts.describe({k: t.file_shape for k, t in targets.items()}).endswith(f": {arch}")


def test_describe_fixtures():
  def describe(file):
    return layouts.describe(pretrained.read_state_dict(FIXTURES / file)[0])

  assert describe("vit_plain_dinobloom.pth") == (
      "a ViT (width 16, 2 blocks, GELU MLP, no registers, 14 px patches, 16x16 position grid "
      "(224 px)): a non-standard size")
  assert "SwiGLU, no registers" in describe("vit_swiglu_dinobloom.pth")
  assert "4 registers, 14 px patches, 4x4 position grid (56 px)" in describe(
      "vit_registers_dinov2.pth")
  assert describe("resnext_torchvision.pth") == (
      "a ResNet (bottleneck blocks (2, 1, 1, 1), 3x3 convolution groups 4, stem width 4): "
      "a non-standard ResNet")


def test_normalization():
  assert pretrained.normalization("resnext50_32x4d") == pretrained.Normalization(
      mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
  with pytest.raises(ValueError, match="supported: vit_small_patch14"):
    pretrained.normalization("resnet18")


# --- Files that do not fit -------------------------------------------------------------------


def test_file_of_another_architecture():
  with pytest.raises(pretrained.PretrainedWeightsError) as info:
    pretrained.load_backbone("vit_small_patch14", FIXTURES / "resnet_torchvision.pth")
  message = str(info.value)
  assert "do not fit vit_small_patch14 as built, a ViT (width 384, 12 blocks" in message
  assert "The file looks like a ResNet (bottleneck blocks (2, 1, 1, 1)" in message
  # 12 blocks of 14 tensors, plus cls_token, pos_embed, patch_embed.proj.*, norm.*.
  assert "missing from the file (174): blocks.0.attn.proj.bias, " in message
  assert "unexpected in the file (100): bn1.bias, " in message


def test_registers_into_a_model_without():
  with pytest.raises(pretrained.PretrainedWeightsError) as info:
    _load("vit_registers", "vit_registers_dinov2.pth", num_registers=0)
  message = str(info.value)
  assert "unexpected in the file (1): reg_token" in message
  assert "wrong shape (1): pos_embed: file [1, 16, 16], model [1, 17, 16]" in message
  assert "looks like a ViT (width 16, 2 blocks, GELU MLP, 4 registers" in message


def test_wrong_width_lists_shapes():
  # Every tensor is D wide: 2 blocks of 14, cls_token, pos_embed, patch_embed.proj.*, norm.*.
  expected = r"wrong shape \(34\): blocks.0.attn.proj.bias: file \[16\], model \[32\]"
  with pytest.raises(pretrained.PretrainedWeightsError, match=expected):
    _load("vit_plain", "vit_plain_timm.safetensors", embed_dim=32)


def test_truncated_safetensors(tmp_path):
  data = (FIXTURES / "vit_plain_timm.safetensors").read_bytes()
  path = tmp_path / "model.safetensors"
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(pretrained.PretrainedWeightsError,
                     match=r"truncated safetensors file: tensor '.*' needs bytes up to \d+, the "
                           rf"file has {len(data) // 2} \(incomplete download\?\)"):
    pretrained.load_backbone("vit_small_patch14", path)
  path.write_bytes(data[:100])
  with pytest.raises(pretrained.PretrainedWeightsError, match="truncated safetensors file: the "
                                                              "header needs"):
    pretrained.load_backbone("vit_small_patch14", path)


def test_corrupt_files(tmp_path):
  garbage = tmp_path / "weights.bin"
  garbage.write_bytes(np.random.default_rng(0).bytes(1000))
  with pytest.raises(pretrained.PretrainedWeightsError, match="not a recognised weight file"):
    pretrained.load_backbone("resnet50", garbage)
  torch_zip = (FIXTURES / "resnet_torchvision.pth").read_bytes()
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(torch_zip[:len(torch_zip) // 2])
  with pytest.raises(pretrained.PretrainedWeightsError, match="corrupt or truncated PyTorch file"):
    pretrained.load_backbone("resnet50", truncated)
  header = tmp_path / "header.safetensors"
  header.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}")
  with pytest.raises(pretrained.PretrainedWeightsError, match="corrupt safetensors header"):
    pretrained.load_backbone("resnet50", header)


def test_pickle_with_other_objects_is_refused(tmp_path):
  # A torch-style zip whose data.pkl references a global that is not a tensor or container:
  # refused before anything is called, as torch.load(weights_only=True) would.
  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00echo\x85R.")
  with pytest.raises(pretrained.PretrainedWeightsError, match="holds a os.system object"):
    pretrained.load_backbone("resnet50", path)


def _pad_header(data: bytes, residue: int = 128) -> bytes:
  """A safetensors file's bytes with its header padded with spaces (as the format allows) to a
  length of `residue` mod 256: its first byte is then `residue`."""
  length = int.from_bytes(data[:8], "little")
  header = data[8:8 + length].rstrip(b" ")
  padded = header + b" " * ((residue - len(header)) % 256)
  return len(padded).to_bytes(8, "little") + padded + data[8 + length:]


SAFETENSORS_CASES = [(name, file) for name, file in CASES if file.endswith(".safetensors")]


@pytest.mark.parametrize("name,file", SAFETENSORS_CASES)
def test_safetensors_whose_header_length_starts_with_the_pickle_byte(name, file, tmp_path):
  # 1 safetensors file in 256 has a header length whose first byte is 0x80, the pickle protocol
  # byte; its structure, not that byte, decides (a `.bin` name gives no hint either).
  data = _pad_header((FIXTURES / file).read_bytes())
  assert data[0] == 0x80 and int.from_bytes(data[:8], "little") % 256 == 128
  path = tmp_path / "weights.bin"
  path.write_bytes(data)
  fixture = MANIFEST["fixtures"][name]
  model = _load(name, str(path))
  np.testing.assert_allclose(model.features(_inputs(fixture["image_size"])),
                             _reference(fixture), **TOLERANCE)
  assert model.pretrained.tensors == len(layouts.expected_keys(model))
  # Truncated in its data, it is still recognised as safetensors, and said to be truncated.
  path.write_bytes(data[:len(data) - 100])
  with pytest.raises(pretrained.PretrainedWeightsError, match="truncated safetensors file"):
    _load(name, str(path))


def test_legacy_pickle_is_not_taken_for_safetensors(tmp_path):
  # A pre-1.6 torch.save file: pickle protocol 2 and torch's magic number, no safetensors header.
  path = tmp_path / "legacy.pth"
  path.write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19." + bytes(100))
  monkeypatch = pytest.MonkeyPatch()
  with monkeypatch.context() as patch:
    patch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(pretrained.PretrainedWeightsError, match="legacy .pre-1.6. PyTorch file"):
      pretrained.load_backbone("resnet50", path)


def test_safetensors_half_precision(tmp_path):
  import ml_dtypes

  values = np.array([[1.5, -2.25], [0.125, 3.0]], np.float32)
  tensors = {"a": values.astype(np.float16), "b": values.astype(ml_dtypes.bfloat16)}
  header, offset, blobs = {}, 0, []
  for name, array in tensors.items():
    blob = array.tobytes()
    header[name] = {"dtype": {"a": "F16", "b": "BF16"}[name], "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(blob)]}
    offset += len(blob)
    blobs.append(blob)
  text = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
  path = tmp_path / "half.safetensors"
  path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
  read = weight_files.read(path)
  assert set(read) == {"a", "b"}
  for array in read.values():
    np.testing.assert_array_equal(np.asarray(array, np.float32), values)


def test_sources(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="No weight file at"):
    pretrained.load_backbone("resnet50", tmp_path / "missing.pth")
  with pytest.raises(ValueError, match="not of the form hf-hub:owner/repo"):
    weight_files.resolve("hf-hub:just-a-name")
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed: no network
  with pytest.raises(ImportError, match="needs huggingface_hub"):
    pretrained.load_backbone("vit_small_patch14", "hf-hub:1aurent/vit_small_patch14_224.dinobloom")
  # A local copy under any name loads the same.
  copy = tmp_path / "renamed"
  shutil.copy(FIXTURES / "vit_swiglu_timm.safetensors", copy)
  model = _load("vit_swiglu", str(copy))
  np.testing.assert_allclose(model.features(_inputs(56)),
                             _reference(MANIFEST["fixtures"]["vit_swiglu"]), **TOLERANCE)
