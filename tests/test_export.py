"""Export: ONNX graphs and StableHLO files that compute what JAX computes, and predict without JAX.

ONNX Runtime's probabilities must match JAX's within 1e-4 at batch sizes 1 and 7 for the simple
CNN, a ResNet and a ViT with registers (fixture sizes, seeded random weights); a StableHLO file
must give JAX's output exactly after a round trip.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from bmcc import export, predict, steps, synthetic
from bmcc.config_validation import ConfigError
from bmcc.data import classes
from tests import test_predict

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")

from bmcc import onnx_graph, onnx_predict  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> (model, model_config, image size): fixture-sized members of each family.
MODELS = {
    "simple_cnn": ("simple_cnn", dict(features=(8, 16), dense=16), 32),
    "resnet": ("resnet18", dict(width=8), 32),  # the stem's padded max pool and strided convs
    "vit_registers": ("vit_small_patch14", dict(embed_dim=32, depth=2, num_heads=2,
                                                num_registers=2, image_size=28), 28),
}


def _random_model(name: str, model_config: dict, num_classes: int = 5) -> nnx.Module:
  """The model with seeded numpy weights (no initialiser compilation), batch-norm statistics
  away from 0/1 and a non-default input normalisation, so every part of the graph matters."""
  config = ml_collections.ConfigDict({"model": name, "model_config": model_config, "seed": 0})
  graphdef, state = nnx.split(nnx.eval_shape(lambda: steps.create_model(config, num_classes)))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    key = path[-1].key
    if key == "var":
      value = rng.uniform(0.5, 2.0, leaf.shape)
    elif key == "scale":
      value = rng.uniform(0.8, 1.2, leaf.shape)
    elif key in ("bias", "mean"):
      value = rng.normal(0.0, 0.1, leaf.shape)
    else:
      fan_in = np.prod(leaf.shape[:-1]) if leaf.ndim > 1 else 1
      value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), leaf.shape)
    return np.asarray(value, leaf.dtype)

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state)))
  model = nnx.merge(graphdef, state)
  model.input_mean, model.input_std = (120.0, 110.0, 100.0), (50.0, 60.0, 70.0)
  return model


def _images(batch: int, size: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module", params=list(MODELS))
def converted(request):
  name, model_config, size = MODELS[request.param]
  fn = export.probability_fn(_random_model(name, model_config))
  model = onnx_graph.convert(fn, export.input_spec(size, 1))
  return fn, model, size


@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_runtime_matches_jax(converted, batch):
  fn, model, size = converted
  session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
  [inp], [out] = session.get_inputs(), session.get_outputs()
  assert (inp.name, inp.type, inp.shape[1:]) == ("images", "tensor(uint8)", [size, size, 3])
  assert isinstance(inp.shape[0], str) and out.name == "probabilities"  # a dynamic batch
  images = _images(batch, size, seed=batch)
  want = export.reference_probabilities(fn, images)
  got = session.run(None, {"images": images})[0]
  assert got.shape == want.shape == (batch, 5) and got.dtype == np.float32
  assert np.abs(got - want).max() <= 1e-4
  assert want.std() > 0.01  # the weights make the classes differ: a real comparison


def test_stablehlo_round_trip_is_exact(converted, tmp_path):
  fn, _, size = converted
  path = str(tmp_path / "model.stablehlo")
  export.export_stablehlo(fn, size, path, {"classes": ["A"]})
  loaded = export.load_stablehlo(path)
  for batch in (1, 7):
    images = _images(batch, size, seed=10 + batch)
    np.testing.assert_array_equal(np.asarray(loaded.call(images)),
                                  export.reference_probabilities(fn, images))
  with open(path + ".json") as f:
    assert json.load(f) == {"classes": ["A"]}


def test_a_bfloat16_model_is_exported_computing_in_float32():
  """ONNX Runtime's CPU kernels lack bfloat16 convolutions: the graph of a bfloat16 ResNet is
  the float32 computation with the same weights."""
  name, model_config, size = MODELS["resnet"]
  bf16 = _random_model(name, {**model_config, "dtype": "bfloat16"})
  f32 = export.probability_fn(_random_model(name, model_config))
  model = onnx_graph.convert(export.probability_fn(export.float32_copy(bf16)),
                             export.input_spec(size, 1))
  session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
  images = _images(3, size, seed=5)
  got = session.run(None, {"images": images})[0]
  assert np.abs(got - export.reference_probabilities(f32, images)).max() <= 1e-4
  assert bf16.compute_dtype == jnp.bfloat16  # the copy changed, not the model


def test_an_unsupported_operation_is_named_in_one_line():
  def min_pool(images):  # reduce_window_min: no jax2onnx plugin
    x = jax.lax.reduce_window(images.astype(jnp.float32), jnp.inf, jax.lax.min, (1, 2, 2, 1),
                              (1, 2, 2, 1), "VALID")
    return x.mean(axis=(1, 2))

  with pytest.raises(ConfigError, match=r"no conversion for the operation reduce_window_min;"):
    onnx_graph.convert(min_pool, export.input_spec(8, 1))


# ------------------------------------------------------------------------------------------------
# A run's workdir -> export -> predict with ONNX Runtime, against predict with JAX.

TEST_REPORT = {"accuracy": 0.5, "balanced_accuracy": 0.25, "macro_f1": 0.2, "weighted_f1": 0.4,
               "num_examples": 12, "protocol": "stratified"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  workdir = str(root / "workdir")
  test_predict._write_checkpoint(workdir)  # step 3, simple CNN at 32 px, all 21 classes
  with open(os.path.join(workdir, "eval_test.json"), "w") as f:
    json.dump(TEST_REPORT, f)
  written = export.export_workdir(workdir)
  for i, rel in enumerate(test_predict.GOOD):
    test_predict._write(root / rel, synthetic.image_bytes(os.path.basename(rel)[:3], i + 1))
  for rel, (make, _) in test_predict.MIXED.items():
    test_predict._write(root / "mixed" / rel, make())
  return {"root": root, "workdir": workdir, "written": written}


def test_export_writes_the_files_with_metadata(exported):
  written = exported["written"]
  assert sorted(written) == ["card", "onnx", "stablehlo"]
  assert all(os.path.dirname(p) == os.path.join(exported["workdir"], "export")
             for p in written.values())
  props = {p.key: p.value for p in onnx.load(written["onnx"]).metadata_props}
  meta = json.loads(props["bmcc"])
  with open(written["stablehlo"] + ".json") as f:
    assert json.load(f) == meta  # float32 both (the ONNX graph computes in float32 always)
  assert meta["classes"] == list(classes.CODES)
  assert meta["class_names"] == [classes.NAMES[c] for c in classes.CODES]
  assert (meta["image_size"], meta["step"], meta["protocol"]) == (test_predict.IMAGE_SIZE, 3,
                                                                   "stratified")
  assert meta["model"] == "simple_cnn" and meta["bmcc_version"]
  assert len(meta["normalization"]["mean"]) == len(meta["normalization"]["std"]) == 3
  assert meta["test_metrics"]["balanced_accuracy"] == 0.25
  assert meta["test_metrics"]["split"] == "test"
  with open(written["card"]) as f:
    card = f.read()
  assert "| balanced_accuracy | 0.250 |" in card
  assert f"| {classes.CODES.index('BLA')} | BLA | Blast |" in card
  assert "onnxruntime" in card and "no patient-level" in card and "synthetic" in card


def _records(text: str) -> list[dict]:
  return [json.loads(line) for line in text.splitlines()]


def test_predict_with_the_onnx_model_needs_no_jax_and_matches(exported):
  """main.py --mode=predict --model=model.onnx with jax made unimportable: the same JSON lines
  (top-1 and probabilities within 1e-4), error lines, summary and exit status as predict with
  the workdir's checkpoint."""
  root = exported["root"]
  args = [str(root / "good"), str(root / "mixed")]
  code = ("import runpy, sys; sys.modules['jax'] = None; sys.argv = sys.argv[1:]; "
          "runpy.run_path('main.py', run_name='__main__')")
  proc = subprocess.run(
      [sys.executable, "-c", code, "main.py", "--mode=predict",
       f"--model={exported['written']['onnx']}", "--top_k=3", *args],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr
  out, err = io.StringIO(), io.StringIO()
  assert predict.predict_paths(exported["workdir"], args, top_k=3, stdout=out, stderr=err) == 1
  got, want = _records(proc.stdout), _records(out.getvalue())
  *errors, summary = proc.stderr.splitlines()
  num_bad = sum(e == "error" for _, e in test_predict.MIXED.values())
  num_good = len(test_predict.GOOD) + sum(e in ("ok", "warn") for _, e in
                                          test_predict.MIXED.values())
  assert errors == err.getvalue().splitlines() and len(errors) == num_bad
  assert summary == f"predicted {num_good} of {num_good + num_bad} file(s); {num_bad} failed"
  assert [r["path"] for r in got] == [r["path"] for r in want] and len(want) == num_good
  for g, w in zip(got, want, strict=True):
    assert g["code"] == w["code"] and g.get("warning") == w.get("warning")
    assert [t["code"] for t in g["top_k"]] == [t["code"] for t in w["top_k"]]
    assert max(abs(a["probability"] - b["probability"])
               for a, b in zip(g["top_k"], w["top_k"], strict=True)) <= 1e-4


def test_onnx_tta_matches_jax_tta(exported):
  files = [str(exported["root"] / "good")]
  out_onnx, out_jax = io.StringIO(), io.StringIO()
  assert onnx_predict.predict_paths(exported["written"]["onnx"], files, tta=True,
                                    stdout=out_onnx, stderr=io.StringIO()) == 0
  assert predict.predict_paths(exported["workdir"], files, tta=True, stdout=out_jax) == 0
  for g, w in zip(_records(out_onnx.getvalue()), _records(out_jax.getvalue()), strict=True):
    assert g["code"] == w["code"] and abs(g["probability"] - w["probability"]) <= 1e-4


@pytest.mark.parametrize("mode_args, blocked", [
    (["--mode=export", "--workdir={workdir}"], "jax2onnx"),
    (["--mode=predict", "--model={onnx}", "{image}"], "onnxruntime"),
])
def test_without_the_extra_one_line_names_the_install(exported, mode_args, blocked):
  values = {"workdir": exported["workdir"], "onnx": exported["written"]["onnx"],
            "image": str(exported["root"] / "good" / "BLA_1.jpg")}
  code = (f"import runpy, sys; sys.modules[{blocked!r}] = None; sys.argv = sys.argv[1:]; "
          "runpy.run_path('main.py', run_name='__main__')")
  proc = subprocess.run([sys.executable, "-c", code, "main.py",
                         *[a.format(**values) for a in mode_args]],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and proc.stdout == ""
  [line] = proc.stderr.splitlines()
  assert line.startswith("error: ") and "pip install 'bmcc[export]'" in line
