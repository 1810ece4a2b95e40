"""Checks `--mode=features` probe reports against scikit-learn fitted here on the saved features.

  # 1. A random-weight ViT-S/14 in DinoBloom's .pth layout (written without torch, ~88 MB):
  python bench/probe_check.py weights /tmp/DinoBloom-S-random.pth
  # 2. Features and probes on DinoBloom's split (the real images, prepared once):
  python main.py --config configs/dinobloom_s_probe.py --mode=features --workdir /tmp/probe \\
      --config.pretrained=/tmp/DinoBloom-S-random.pth --config.data.data_dir=... \\
      --config.data.manual_dir=...
  # 3. The reports against sklearn's LogisticRegression(C=D*K/100, max_iter=1000) and
  #    KNeighborsClassifier(n_neighbors=k) fitted on train + validation (exit 1 if not equal):
  python bench/probe_check.py check /tmp/probe

Not a test: a measurement tool for real data (README, "Pretrained backbones").
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import sys
import types
import zipfile

import numpy as np

_VIT_S = dict(embed_dim=384, depth=12, hidden=1536, grid=16)


def _torch_stand_ins() -> tuple[type, types.FunctionType]:
  """`torch.FloatStorage` and `torch._utils._rebuild_tensor_v2` stand-ins, for pickling only.

  torch.save's data.pkl names these two globals; pickle checks that a global can be imported
  under its name, so they are registered as modules of this process (never imported by bmcc).
  """
  if "torch" in sys.modules and not getattr(sys.modules["torch"], "_stand_in", False):
    raise SystemExit("error: run this without torch imported (it writes the format itself).")
  torch = types.ModuleType("torch")
  utils = types.ModuleType("torch._utils")
  torch._stand_in = True

  class FloatStorage:  # noqa: D101 (a name in the pickle, nothing else)
    pass

  def _rebuild_tensor_v2(*args):  # noqa: ARG001
    raise NotImplementedError

  FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  torch.FloatStorage, torch._utils = FloatStorage, utils
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  sys.modules["torch"], sys.modules["torch._utils"] = torch, utils
  return FloatStorage, _rebuild_tensor_v2


def write_torch_zip(path: str, state: dict, name: str = "archive") -> None:
  """Writes {key: float32 array} (nested dicts allowed) as torch.save's zip format."""
  storage_class, rebuild = _torch_stand_ins()
  arrays: list[np.ndarray] = []

  class Storage:
    def __init__(self, key: int):
      self.key = key

  class Tensor:
    def __init__(self, array: np.ndarray):
      self.storage = Storage(len(arrays))
      arrays.append(np.ascontiguousarray(array, np.float32))
      self.shape = array.shape

    def __reduce__(self):
      strides = tuple(int(np.prod(self.shape[i + 1:])) for i in range(len(self.shape)))
      return rebuild, (self.storage, 0, tuple(self.shape), strides, False,
                       collections.OrderedDict())

  def wrap(value):
    if isinstance(value, dict):
      return collections.OrderedDict((k, wrap(v)) for k, v in value.items())
    return Tensor(np.asarray(value))

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, Storage):
        return ("storage", storage_class, str(obj.key), "cpu", arrays[obj.key].size)
      return None

  import io
  buffer = io.BytesIO()
  Pickler(buffer, protocol=2).dump(wrap(state))
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    archive.writestr(f"{name}/data.pkl", buffer.getvalue())
    archive.writestr(f"{name}/byteorder", "little")
    for key, array in enumerate(arrays):
      archive.writestr(f"{name}/data/{key}", array.tobytes())
    archive.writestr(f"{name}/version", "3\n")


def random_dinobloom_s(seed: int = 0) -> dict:
  """A random ViT-S/14 in DinoBloom's checkpoint layout: {"teacher": {"backbone.*": ...}}."""
  rng = np.random.default_rng(seed)
  d, hidden, grid = _VIT_S["embed_dim"], _VIT_S["hidden"], _VIT_S["grid"]

  def normal(*shape, std=0.02):
    return (std * rng.standard_normal(shape)).astype(np.float32)

  def norm(prefix):
    return {f"{prefix}.weight": 1 + normal(d, std=0.1), f"{prefix}.bias": normal(d, std=0.1)}

  state = {"mask_token": normal(1, d), "cls_token": normal(1, 1, d),
           "pos_embed": normal(1, 1 + grid * grid, d),
           "patch_embed.proj.weight": normal(d, 3, 14, 14), "patch_embed.proj.bias": normal(d)}
  for i in range(_VIT_S["depth"]):
    b = f"blocks.{i}"
    state.update(norm(f"{b}.norm1"))
    state.update({f"{b}.attn.qkv.weight": normal(3 * d, d), f"{b}.attn.qkv.bias": normal(3 * d),
                  f"{b}.attn.proj.weight": normal(d, d), f"{b}.attn.proj.bias": normal(d),
                  f"{b}.ls1.gamma": np.full(d, 0.5, np.float32)})
    state.update(norm(f"{b}.norm2"))
    state.update({f"{b}.mlp.fc1.weight": normal(hidden, d), f"{b}.mlp.fc1.bias": normal(hidden),
                  f"{b}.mlp.fc2.weight": normal(d, hidden), f"{b}.mlp.fc2.bias": normal(d),
                  f"{b}.ls2.gamma": np.full(d, 0.5, np.float32)})
  state.update(norm("norm"))
  teacher = {f"backbone.{k}": v for k, v in state.items()}
  teacher["dino_head.mlp.0.weight"] = normal(8, d)  # dropped by the loader, as in DinoBloom's
  return {"teacher": teacher}


def _load(workdir: str, split: str):
  with np.load(os.path.join(workdir, f"features_{split}.npz"), allow_pickle=False) as data:
    return data["embeddings"], data["labels"].astype(np.int64)


def check(workdir: str) -> int:
  """Compares every eval_<split>[_knn<k>].json with sklearn fitted here; 0 if all agree."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score
  from sklearn.neighbors import KNeighborsClassifier

  parts = [_load(workdir, s) for s in ("train", "validation")]
  x = np.concatenate([p[0] for p in parts]).astype(np.float64)  # as DinoBloom's code reads them
  y = np.concatenate([p[1] for p in parts])
  d, k = x.shape[1], np.unique(y).size
  print(f"fit on train + validation: {y.size} images, D = {d}, K = {k}, C = {d * k / 100:g}")
  estimators = {"linear": LogisticRegression(C=d * k / 100, max_iter=1000).fit(x, y)}
  for n in (1, 20):
    estimators[f"knn{n}"] = KNeighborsClassifier(n_neighbors=n).fit(x, y)
  failures = 0
  for split in ("validation", "test"):
    xt, yt = _load(workdir, split)
    for name, model in estimators.items():
      with open(os.path.join(workdir, f"eval_{split if name == 'linear' else f'{split}_{name}'}"
                                      ".json")) as f:
        report = json.load(f)
      pred = model.predict(xt.astype(np.float64))
      num = len(report["confusion_matrix"]["class_order"])
      counts = confusion_matrix(yt, pred, labels=np.arange(num)).tolist()
      ours = (report["accuracy"], report["balanced_accuracy"], report["weighted_f1"])
      theirs = (float(np.mean(pred == yt)), balanced_accuracy_score(yt, pred),
                f1_score(yt, pred, average="weighted"))
      same = (counts == report["confusion_matrix"]["counts"]
              and report["probe"]["n_fit"] == y.size
              and np.allclose(ours, theirs, rtol=0, atol=1e-12))
      failures += not same
      print(f"{split:10s} {name:7s} report acc {ours[0]:.4f} bal {ours[1]:.4f} wF1 {ours[2]:.4f}"
            f" | sklearn acc {theirs[0]:.4f} bal {theirs[1]:.4f} wF1 {theirs[2]:.4f}"
            f" | n_fit {report['probe']['n_fit']} | {'EQUAL' if same else 'DIFFERENT'}")
  linear = estimators["linear"]
  print(f"sklearn linear: n_iter {int(linear.n_iter_[0])}; report: "
        f"{json.dumps(report_settings(workdir))}")
  return 1 if failures else 0


def report_settings(workdir: str) -> dict:
  with open(os.path.join(workdir, "eval_test.json")) as f:
    return json.load(f)["probe"]["settings"]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  weights = sub.add_parser("weights", help="write a random ViT-S/14 in DinoBloom's .pth layout")
  weights.add_argument("path")
  weights.add_argument("--seed", type=int, default=0)
  checker = sub.add_parser("check", help="compare a features run's reports with sklearn")
  checker.add_argument("workdir")
  args = parser.parse_args()
  if args.command == "weights":
    write_torch_zip(args.path, random_dinobloom_s(args.seed))
    print(f"wrote {args.path} ({os.path.getsize(args.path)} bytes)")
    return 0
  return check(args.workdir)


if __name__ == "__main__":
  sys.exit(main())
