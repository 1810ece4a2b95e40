"""Prediction: a checkpoint + a folder of good and bad files -> JSON lines, error lines, status."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import subprocess
import sys
import zlib

import grain
import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from bmcc import checkpointing, predict, steps, synthetic
from bmcc.data import classes, decode
from configs import demo, tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 32
NUM_CLASSES = 21


def _tiny_config():
  config = demo.get_config()
  config.image_size = IMAGE_SIZE
  config.model_config.features = (8, 16)
  config.model_config.dense = 16
  config.eval_batch_size = 8
  return config


def _random_model(config) -> nnx.Module:
  """The config's model with seeded random weights (numpy), batch-norm statistics included.

  Built abstractly and filled from numpy: running the model's own initialisers would cost ~30 s
  of one-off XLA compilation on a CPU, the weights' values do not matter here.
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: steps.create_model(config, NUM_CLASSES)))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = path[-1].key
    if name == "var":
      value = rng.uniform(0.5, 2.0, leaf.shape)
    elif name == "scale":
      value = rng.uniform(0.8, 1.2, leaf.shape)
    elif name in ("bias", "mean"):
      value = rng.normal(0.0, 0.1, leaf.shape)
    else:  # kernels
      value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
    return np.asarray(value, leaf.dtype)

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, state)


def _write_checkpoint(workdir: str) -> None:
  """Saves a random model in the real checkpoint layout: state, data iterator, run metadata."""
  config = _tiny_config()
  model = _random_model(config)
  optimizer = nnx.Optimizer(model, steps.create_optimizer(config, steps.create_learning_rate_fn(
      config, steps.resolve_durations(config, 100))), wrt=nnx.Param)
  data_iterator = iter(grain.MapDataset.range(4).to_iter_dataset())
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  ckpt.save(3, model=model, optimizer=optimizer, ema_model=None, data_iterator=data_iterator,
            metadata=checkpointing.run_metadata(config, classes.CODES))
  ckpt.close()
  # As a training run writes it; the data of the smallest synthetic dataset, in the test's folder.
  config.data.synthetic = tiny.get_config().data.synthetic
  config.data.cache_dir = os.path.join(workdir, "cache")
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array, mode).save(buf, format="PNG")
  return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
  """A 1x1 PNG whose header claims width x height (the IHDR CRC fixed up): a decompression bomb."""
  data = bytearray(_png(np.zeros((1, 1, 3), np.uint8)))
  assert data[12:16] == b"IHDR"
  data[16:24] = struct.pack(">II", width, height)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  return bytes(data)


def _symmetric_image(size: int) -> np.ndarray:
  """A random image invariant under all 8 rotations/flips (integer orbit sums: exact)."""
  base = np.random.default_rng(3).integers(0, 256, (size, size, 3)).astype(np.int32)
  views = [np.rot90(base, k) for k in range(4)]
  views += [v[:, ::-1] for v in views]
  return (sum(views) // 8).astype(np.uint8)


def _write(path, data: bytes) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


GOOD = ["good/BLA_1.jpg", "good/LYT_2.JPG", "good/EBO_3.jpeg", "good/sub/NGS_4.jpg"]
# Files of the mixed folder: name -> (bytes factory, expected: 'ok' | 'warn' | 'error').
MIXED = {
    "a_good.jpg": (lambda: synthetic.image_bytes("BLA", 5), "ok"),
    "b_grey.png": (lambda: _png(synthetic.render_image("EOS", 1)[..., 0], "L"), "ok"),
    "c_rgba.png": (lambda: _png(np.dstack([synthetic.render_image("MON", 1),
                                           np.full((250, 250), 200, np.uint8)])), "ok"),
    "d_palette.png": (lambda: _encode(Image.fromarray(synthetic.render_image("PLM", 1))
                                      .convert("P"), "PNG"), "ok"),
    "e_16bit.tif": (lambda: _encode(Image.fromarray(
        synthetic.render_image("LYT", 1)[..., 1].astype(np.uint16) * 257), "TIFF"), "ok"),
    "f_odd.png": (lambda: _png(synthetic.render_image("NGB", 1)[40:100, 30:130]), "warn"),
    "g_truncated.jpg": (lambda: synthetic.image_bytes("PMO", 1)[:3000], "error"),
    "h_text.jpg": (lambda: synthetic.TEXT_NOT_JPEG, "error"),
    "i_bomb.png": (lambda: _bomb_png(100_000, 100_000), "error"),
    "j_empty.bmp": (lambda: b"", "error"),
    "notes.txt": (lambda: b"not picked: wrong extension", None),
    ".hidden.jpg": (lambda: b"not picked: hidden", None),
    "nested/deeper/k_good.tiff": (lambda: _encode(Image.fromarray(
        synthetic.render_image("MYB", 1)), "TIFF"), "ok"),
}


def _encode(image: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format=fmt)
  return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("predict")
  workdir = str(root / "workdir")
  _write_checkpoint(workdir)
  for i, rel in enumerate(GOOD):
    code = os.path.basename(rel).split("_")[0]
    _write(root / rel, synthetic.image_bytes(code, i + 1))
  for rel, (make, _) in MIXED.items():
    _write(root / "mixed" / rel, make())
  _write(root / "sym.png", _png(_symmetric_image(IMAGE_SIZE)))
  return {"root": root, "workdir": workdir}


def _run(workdir, paths, **kwargs):
  out, err = io.StringIO(), io.StringIO()
  status = predict.predict_paths(workdir, [str(p) for p in paths], stdout=out, stderr=err,
                                 **kwargs)
  records = [json.loads(line) for line in out.getvalue().splitlines()]
  errors = err.getvalue().splitlines()
  return status, records, errors


def test_collect_images_walks_folders_sorted_and_keeps_missing_paths(setup):
  root = setup["root"]
  found = predict.collect_images(
      [root / "mixed", root / "missing.jpg", root / "good" / "BLA_1.jpg"])
  names = [os.path.relpath(p, root) for p in found]
  expected = sorted(k for k, (_, e) in MIXED.items() if e is not None and "/" not in k)
  assert names == ([f"mixed/{n}" for n in expected] + ["mixed/nested/deeper/k_good.tiff",
                   "missing.jpg", "good/BLA_1.jpg"])


def test_good_folder_predicts_every_image_with_status_0(setup):
  root = setup["root"]
  status, records, errors = _run(setup["workdir"], [root / "good"], top_k=NUM_CLASSES,
                                 batch_size=3)
  assert status == 0 and errors == []
  assert [os.path.relpath(r["path"], root) for r in records] == sorted(GOOD)
  for r in records:
    assert set(r) == {"path", "code", "name", "probability", "top_k"}  # no warning at 250 px
    probs = [t["probability"] for t in r["top_k"]]
    assert len(probs) == NUM_CLASSES and abs(sum(probs) - 1) < 1e-4
    assert probs == sorted(probs, reverse=True)
    assert (r["code"], r["name"], r["probability"]) == tuple(r["top_k"][0][k] for k in
                                                            ("code", "name", "probability"))


def test_bad_files_get_one_error_line_each_and_the_rest_is_predicted(setup, tmp_path):
  root = setup["root"]
  csv_path = str(tmp_path / "out.csv")
  paths = [root / "mixed", root / "missing.jpg", root / "good" / "sub"]
  status, records, errors = _run(setup["workdir"], paths, output_csv=csv_path)
  assert status == 1
  ok = [k for k, (_, e) in MIXED.items() if e in ("ok", "warn")]
  bad = [k for k, (_, e) in MIXED.items() if e == "error"]
  assert len(records) == len(ok) + 1
  assert len(errors) == len(bad) + 1
  for name in bad:
    assert sum(f"mixed/{name}: " in line for line in errors) == 1, (name, errors)
  assert all(line.startswith("error: ") for line in errors)
  assert any("missing.jpg: No such file or directory" in line for line in errors)
  # Worded as the dataset preparation words it (bmcc/data/validation.py).
  assert any(line.endswith("j_empty.bmp: empty file (0 bytes)") for line in errors), errors
  assert any("i_bomb.png: refused as a possible decompression bomb" in line for line in errors)
  assert any("g_truncated.jpg: cannot decode: image file is truncated" in line
             for line in errors)
  by_name = {os.path.basename(r["path"]): r for r in records}
  for name in ok:
    record = by_name[os.path.basename(name)]
    assert len(record["top_k"]) == 3
    assert ("warning" in record) == (MIXED[name][1] == "warn"), record
  assert "100x60 px" in by_name["f_odd.png"]["warning"]
  with open(csv_path, newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(ok) + len(bad) + 2  # one row per file, in input order
  assert [r["path"] for r in rows if not r["error"]] == [r["path"] for r in records]
  assert all(len(r["top_k_codes"].split()) == 3 for r in rows if not r["error"])


def test_decompression_bomb_warning_range_also_fails(setup, tmp_path, monkeypatch):
  # PIL only *warns* between 1x and 2x MAX_IMAGE_PIXELS; predict must refuse those too.
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
  _write(tmp_path / "warn_range.png", _png(np.full((400, 300, 3), 128, np.uint8)))  # 1.2x
  _write(tmp_path / "error_range.png", _png(np.full((500, 500, 3), 128, np.uint8)))  # 2.5x
  _write(tmp_path / "fine.jpg", synthetic.image_bytes("BAS", 1))  # 62,500 px
  status, records, errors = _run(setup["workdir"], [tmp_path])
  assert status == 1
  assert [os.path.basename(r["path"]) for r in records] == ["fine.jpg"]
  assert len(errors) == 2 and all("decompression bomb" in e for e in errors), errors


def test_read_image_matches_the_training_decoder(setup):
  data = synthetic.image_bytes("BLA", 7)
  path = _write(setup["root"] / "decoder" / "x.jpg", data)
  image, size = decode.read_image(path, IMAGE_SIZE)
  assert size == (250, 250)
  np.testing.assert_array_equal(image, decode.decode_image(data, IMAGE_SIZE))
  # 16-bit: scaled to 8 bits, not clipped to white.
  grey, _ = decode.read_image(setup["root"] / "mixed" / "e_16bit.tif", IMAGE_SIZE)
  assert grey.dtype == np.uint8 and 30 < grey.mean() < 250


def test_load_model_restores_the_saved_weights(setup):
  model, meta, step = checkpointing.restore_model(setup["workdir"], "best")  # no best: the latest
  assert step == 3 and meta["image_size"] == IMAGE_SIZE and len(meta["classes"]) == NUM_CLASSES
  expected = nnx.to_pure_dict(nnx.state(_random_model(_tiny_config())))
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model)), expected)


def test_dihedral_average_is_the_mean_over_the_8_views_and_invariant(setup):
  model, _, _ = checkpointing.restore_model(setup["workdir"])
  images = np.random.default_rng(0).integers(0, 256, (4, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  views = []
  for k in range(4):
    rotated = np.rot90(images, k, axes=(1, 2))
    views += [rotated, rotated[:, :, ::-1]]
  expected = np.mean([np.asarray(steps.eval_step(model, np.ascontiguousarray(v)))
                      for v in views], axis=0)
  tta = np.asarray(steps.dihedral_average(model, images))
  np.testing.assert_allclose(tta, expected, atol=1e-6)
  np.testing.assert_allclose(tta.sum(-1), 1, atol=1e-5)
  turned = np.asarray(steps.dihedral_average(model, np.ascontiguousarray(
      np.rot90(images, 1, axes=(1, 2))[:, ::-1])))
  np.testing.assert_allclose(turned, tta, atol=1e-6)


def test_tta_equals_plain_prediction_on_a_fully_symmetric_image(setup):
  path = setup["root"] / "sym.png"
  _, plain, _ = _run(setup["workdir"], [path], top_k=NUM_CLASSES)
  _, tta, _ = _run(setup["workdir"], [path], top_k=NUM_CLASSES, tta=True)
  assert plain[0]["code"] == tta[0]["code"]
  a = {t["code"]: t["probability"] for t in plain[0]["top_k"]}
  b = {t["code"]: t["probability"] for t in tta[0]["top_k"]}
  assert max(abs(a[c] - b[c]) for c in a) < 1e-5


def test_nothing_found_fails_and_says_so(setup, tmp_path):
  (tmp_path / "empty").mkdir()
  status, records, errors = _run(setup["workdir"], [tmp_path / "empty"])
  assert status == 1 and records == []
  assert any("empty: no image files" in e for e in errors)
  assert errors[-1] == "error: no image files found in the given paths"


def test_cli_end_to_end(setup):
  root = setup["root"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  args = [str(root / "good" / "BLA_1.jpg"), str(root / "mixed")]
  # No --config: the batch size comes from the workdir's config.json.
  proc = subprocess.run(
      [sys.executable, "main.py", "--mode=predict", "--workdir", setup["workdir"], "--top_k=2",
       *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr
  records = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout: only JSON
  # stderr: only the error lines, then one summary line (no logging).
  *errors, summary = proc.stderr.splitlines()
  _, expected, expected_errors = _run(setup["workdir"], args, top_k=2)
  num_bad = sum(e == "error" for _, e in MIXED.values())
  assert len(records) == 1 + sum(e in ("ok", "warn") for _, e in MIXED.values())
  assert errors == expected_errors and len(errors) == num_bad
  assert summary == (f"predicted {len(records)} of {len(records) + num_bad} file(s); "
                     f"{num_bad} failed")
  assert [r["path"] for r in records] == [r["path"] for r in expected]
  assert [r["code"] for r in records] == [r["code"] for r in expected]
  for got, want in zip(records, expected, strict=True):
    assert abs(got["probability"] - want["probability"]) < 1e-4
    assert len(got["top_k"]) == 2


def test_cli_evaluate_reads_the_workdirs_config(setup):
  """--mode=evaluate without --config: data and batch size from the workdir's config.json."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, "main.py", "--mode=evaluate", "--workdir", setup["workdir"],
       "--split=validation"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(setup["workdir"], "eval_validation_best.json")) as f:
    report = json.load(f)
  assert report["checkpoint_step"] == 3 and report["num_examples"] > 0
  assert os.path.isdir(os.path.join(setup["workdir"], "cache"))  # the config's cache_dir
