"""bench/recipes.py, the recipe study: every variant's overrides apply to configs/cpu_quick.py the
way main.py parses them and give a valid config that differs from the base (all20's
`--config.data.classes=None` included); the table reads the
finished variants and the PyTorch rows, with each variant's difference from the base."""

from __future__ import annotations

import json
import os
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from bmcc import config_validation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
import recipes  # noqa: E402

import main  # noqa: E402  (its --config.<key>=None handling)


def _parsed(overrides: list[str]):
  """configs/cpu_quick.py with the overrides, parsed as main.py does (ml_collections' config flag,
  then main.py's `--config.<key>=None`)."""
  values = flags.FlagValues()
  argv = ["prog", f"--config={os.path.join(REPO, 'configs', 'cpu_quick.py')}", *overrides]
  argv, none_keys = main._take_none_overrides(argv)
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  for key in none_keys:
    main._set_none(values.config, key)
  return values.config


@pytest.mark.parametrize("name", sorted(recipes.VARIANTS))
def test_every_variant_is_a_valid_change_of_the_base(name):
  base = _parsed(recipes.BASE)
  config = _parsed(recipes.BASE + recipes.VARIANTS[name][1])
  config_validation.validate(config)
  if name == "base":
    assert config.to_dict() == base.to_dict()
  else:  # a real change (an override of a key the base lacks fails in the parse above)
    assert config.to_dict() != base.to_dict()
  if name == "all20":
    assert config.data.classes is None
  if name == "matek_norm":  # the adopted variant is configs/cpu_quick.py as it stands
    assert config.to_dict() == _parsed([]).to_dict()


def _finished(out: str, name: str, balanced: list[float], seconds: float) -> None:
  workdir = os.path.join(out, name)
  os.makedirs(workdir)
  metrics = {key: {"mean": sum(balanced) / len(balanced), "std": 0.01, "folds": balanced}
             for key in recipes.METRICS}
  with open(os.path.join(workdir, "cv_summary.json"), "w") as f:
    json.dump({"complete": True, "num_folds": len(balanced), "metrics": metrics}, f)
  with open(os.path.join(workdir, "run.json"), "w") as f:
    json.dump({"seconds": seconds, "epochs": 4.0}, f)


def test_table_rows_and_differences_from_base(tmp_path):
  out = str(tmp_path)
  _finished(out, "base", [0.5, 0.6, 0.7], 120.0)
  _finished(out, "ema", [0.55, 0.65, 0.75], 60.0)
  os.makedirs(os.path.join(out, "wide"))  # unfinished: no row
  torch_row = {"variant": "torch_plain_cnn", "change": "PyTorch", "folds": 3, "epochs": 4.0,
               "minutes": 3.0, "balanced_accuracy": {"mean": 0.58, "std": 0.02, "folds": []},
               "accuracy": {"mean": 0.6, "std": 0.02, "folds": []}}
  with open(os.path.join(out, "torch_baseline.json"), "w") as f:
    json.dump({"row": torch_row}, f)
  rows = [r for n in recipes.VARIANTS if (r := recipes.read_row(n, out)) is not None]
  assert [r["variant"] for r in rows] == ["base", "ema"]
  assert rows[0]["minutes"] == 2.0
  recipes.write_table(rows, out)
  table = open(os.path.join(out, "recipes.md")).read().splitlines()
  assert table[2].startswith(f"| base | {recipes.VARIANTS['base'][0]} | 3 x 4.0 | 0.600 ± 0.010 |")
  assert "| +0.050 | 1.0 |" in table[3]
  assert table[4].startswith("| torch_plain_cnn | PyTorch | 3 x 4.0 | 0.580 ± 0.020 |")
  assert "| -0.020 | 3.0 |" in table[4]
  assert [r["variant"] for r in json.load(open(os.path.join(out, "recipes.json")))] == [
      "base", "ema", "torch_plain_cnn"]
