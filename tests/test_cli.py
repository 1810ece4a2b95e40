"""main.py's command line: --help, and bad input failing fast with one line and exit status 2."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys

import pytest

from tests import helpers


def _main(*args: str, importtime: bool = False, timeout: int = 120
          ) -> subprocess.CompletedProcess:
  command = [sys.executable, *(["-X", "importtime"] if importtime else []),
             os.path.join(helpers.REPO, "main.py"), *args]
  return subprocess.run(command, cwd=helpers.REPO, env=helpers.cli_env(), capture_output=True,
                        text=True, timeout=timeout)


def _split_importtime(stderr: str) -> tuple[list[str], set[str]]:
  """(the stderr lines that are not `-X importtime` lines, the top-level modules imported)."""
  lines, modules = [], set()
  for line in stderr.splitlines():
    if line.startswith("import time:"):
      modules.add(line.rsplit("|", 1)[-1].strip().split(".")[0])
    else:
      lines.append(line)
  return lines, modules


def test_help_exits_0_and_lists_every_config_with_its_first_docstring_line():
  result = _main("--help")
  assert result.returncode == 0, result.stderr
  assert "--workdir" in result.stdout and "--mode" in result.stdout
  configs = sorted(n for n in os.listdir(os.path.join(helpers.REPO, "configs"))
                   if n.endswith(".py") and not n.startswith("_"))
  assert len(configs) >= 6
  for name in configs:
    with open(os.path.join(helpers.REPO, "configs", name)) as f:
      first = ast.get_docstring(ast.parse(f.read())).strip().splitlines()[0]
    assert any(f"configs/{name}" in line and first in line
               for line in result.stdout.splitlines()), (name, first)
  full = _main("--helpfull")
  assert full.returncode == 0 and "--verbosity" in full.stdout


@pytest.mark.parametrize("args, expected", [
    # A typo in an override: the key, and ml_collections' suggestion.
    (["--config", "configs/tiny.py", "--workdir", "w", "--config.batchsize=3"],
     "--config.batchsize: the config has no key 'batchsize'; did you mean --config.batch_size?"),
    (["--config", "configs/tiny.py", "--workdir", "w", "--config.data.crop_scal=(1,1)"],
     "--config.data.crop_scal: the config has no key 'crop_scal'"),
    (["--config", "configs/nope.py", "--workdir", "w"],
     "--config configs/nope.py: no such file; the configs are: configs/cpu_quick.py, "
     "configs/default.py"),
    (["--config", "configs/tiny.py", "--workdir", "w", "--config.batch_size=abc"],
     "flag --config.batch_size=abc: invalid literal for int()"),
    (["--config", "configs/tiny.py", "--workdir", "w", "--mode=explode"],
     "flag --mode=explode: value should be one of"),
    (["--config", "configs/tiny.py", "--workdir", "w", "--no_such_flag"],
     "Unknown command line flag 'no_such_flag'"),
    # Usage: predict without files, any mode without --workdir, train without --config.
    (["--mode=predict", "--workdir", "w"], "--mode=predict needs image files or folders"),
    (["--mode=predict", "cell.jpg"], "--mode=predict needs --workdir"),
    (["--mode=evaluate"], "--mode=evaluate needs --workdir"),
    (["--config", "configs/tiny.py"], "--mode=train needs --workdir"),
    (["--workdir", "w"], "--mode=train needs --config"),
    (["--config", "configs/tiny.py", "--workdir", "w", "cell.jpg"],
     "--mode=train takes no arguments, got 'cell.jpg'"),
    (["--mode=evaluate", "--workdir", "w", "--config.eval_batch_size=8"],
     "--config.eval_batch_size needs --config <file> before it"),
    (["--mode=export", "--workdir", "w", "--format=tflite"],
     "--format=tflite: use onnx, stablehlo or onnx,stablehlo."),
    (["--mode=evaluate", "--workdir", "w", "--model=m.onnx"],
     "--model is for --mode=predict (got --mode=evaluate)."),
    (["--mode=predict", "--model=m.pt", "cell.jpg"],
     "--model=m.pt: give a .onnx file written by --mode=export."),
])
def test_bad_command_line_is_one_error_line_with_status_2_before_jax(args, expected):
  result = _main(*args, importtime=True)  # nothing is written: every case fails first
  lines, modules = _split_importtime(result.stderr)
  assert result.returncode == 2, result.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  assert expected in lines[0], lines[0]
  assert "jax" not in modules and "tensorflow" not in modules  # failed before any heavy import
  assert result.stdout == ""


def test_bad_config_value_is_one_error_line_with_status_2(tmp_path):
  result = _main("--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"),
                 "--config.data.balance_alpha=-0.5",
                 f"--config.data.cache_dir={tmp_path / 'never'}")
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.splitlines() == [
      "error: config.data.balance_alpha=-0.5 must be a number in [0, inf) (0: natural sampling, "
      "1: uniform over classes)."]
  assert not os.path.exists(tmp_path / "never")  # no data work was done


def test_vit_image_size_off_the_patch_grid_is_refused_before_data_work(tmp_path):
  result = _main("--config", "configs/dinobloom_s_probe.py", "--mode=features", "--workdir",
                 str(tmp_path / "w"), "--config.image_size=250",
                 f"--config.data.cache_dir={tmp_path / 'never'}")
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.splitlines() == [
      "error: config.image_size=250 is not a multiple of vit_small_patch14's 14 px patch (its "
      "last 12 px rows and columns would be ignored): use 238 or 252."]
  assert not os.path.exists(tmp_path / "never")  # no data work was done


def test_evaluate_without_config_and_without_config_json_says_so(tmp_path):
  result = _main("--mode=evaluate", "--workdir", str(tmp_path))
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.splitlines()
  assert len(lines) == 1 and "config.json' does not exist" in lines[0], lines
  assert "pass --config configs/<name>.py" in lines[0]


def _keys_documented_as_none() -> list[str]:
  """The keys of configs/default.py whose comment offers None, or whose default is None."""
  keys, comment = [], ""
  with open(os.path.join(helpers.REPO, "configs", "default.py")) as f:
    for line in f:
      text = line.strip()
      if text.startswith("#"):
        comment += text
        continue
      match = re.match(r"config\.([\w.]+) = (.*)", text)
      if match:
        value, _, trailing = match.group(2).partition("#")
        if "None" in comment + trailing or value.strip() in ("None", "placeholder(str)",
                                                              "placeholder(int)",
                                                              "placeholder(float)",
                                                              "placeholder(tuple)"):
          keys.append(match.group(1))
      comment = ""
  return keys


def test_every_key_documented_as_accepting_none_takes_none_on_the_command_line():
  """`--config.KEY=None` sets None whatever the key's type (float('None') failed before)."""
  keys = _keys_documented_as_none()
  assert {"grad_clip_norm", "ema_decay", "data.num_folds", "data.synthetic", "pretrained",
          "finetune.head_learning_rate", "plateau_patience", "num_train_steps"} <= set(keys)
  script = ("import json, sys; import main; main.parse_flags(sys.argv); "
            "print(json.dumps({k: eval('main.FLAGS.config.' + k) for k in " + repr(keys) + "}))")
  args = ["--config", "configs/default.py", "--config.batch_size=8",
          *[f"--config.{key}=None" for key in keys]]
  result = subprocess.run([sys.executable, "-c", script, *args], cwd=helpers.REPO,
                          env=helpers.cli_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads(result.stdout) == dict.fromkeys(keys)
  # A key the config does not have is still one error line; None then meets validation.
  unknown = _main("--config", "configs/tiny.py", "--workdir", "w", "--config.grad_clip=None")
  assert unknown.returncode == 2 and unknown.stderr.splitlines() == [
      "error: --config.grad_clip: the config has no key 'grad_clip'"]


@pytest.mark.parametrize("mode", ["train", "features"])
def test_a_missing_pretrained_file_fails_before_data_work_and_creates_no_folder(tmp_path, mode):
  workdir, cache = tmp_path / "w", tmp_path / "never"
  result = _main("--config", "configs/dinobloom_s_probe.py", "--workdir", str(workdir),
                 f"--mode={mode}", f"--config.pretrained={tmp_path / 'missing.pth'}",
                 f"--config.data.data_dir={cache}", f"--config.data.manual_dir={cache}")
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.splitlines() == [
      f"error: config.pretrained='{tmp_path / 'missing.pth'}': no such file (give a "
      ".pth/.safetensors file, or a hub id written hf-hub:owner/repo[/file])."]
  assert not workdir.exists() and not cache.exists()  # no folder, no data work
