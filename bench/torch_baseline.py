"""A plain PyTorch CNN on bmcc's cross-validation folds: the row every recipe is compared with.

Run in a scratch environment with torch (torch is not a bmcc dependency):

  python -m venv /tmp/torch-venv && /tmp/torch-venv/bin/pip install torch numpy pillow
  python bench/recipes.py DATA_DIR --out OUT --folds 3 --export_folds   # bmcc's folds
  /tmp/torch-venv/bin/python bench/torch_baseline.py --folds_dir OUT/folds_k3 \\
      --images_dir /path/to/bone_marrow_cell_dataset --epochs 6 --out OUT/torch_baseline.json

For each fold: the files bmcc trains, validates and tests on (`bench/recipes.py --export_folds`),
decoded with PIL at 64 px (`draft` then bilinear with antialiasing, loaded into memory once),
normalised by the training images' channel means and standard deviations. The model: 4 blocks of
two 3x3 conv + batch norm + ReLU then 2x2 max pooling (32, 64, 128, 256 channels), global average
pooling, one linear layer (PyTorch's default initialisation). Adam 1e-3, batch 64, a linear
warm-up over the first epoch then cosine decay to 0, random rotations by multiples of 90 degrees
and flips, cross-entropy. Validation every 2 epochs and at the end; the test uses the weights of
the best validation balanced accuracy (as bmcc's `final_eval_checkpoint='best'`). Writes per-fold
test balanced accuracy and accuracy, their mean and standard deviation over the folds and the wall
time to `--out` (the row `bench/recipes.py` adds to its table).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import time

import numpy as np
import torch
from PIL import Image
from torch import nn


def load(files: list[list[str]], images_dir: str, classes: list[str], size: int
         ) -> tuple[torch.Tensor, torch.Tensor]:
  """uint8 [N, 3, size, size] images and int64 [N] labels of (relative path, class) pairs."""
  images = np.empty((len(files), size, size, 3), np.uint8)
  for i, (name, _) in enumerate(files):
    with Image.open(os.path.join(images_dir, name)) as image:
      image.draft("RGB", (size, size))
      images[i] = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
  labels = np.array([classes.index(code) for _, code in files], np.int64)
  return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def block(a: int, b: int) -> nn.Sequential:
  return nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
                       nn.Conv2d(b, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
                       nn.MaxPool2d(2))


def plain_cnn(num_classes: int, widths=(32, 64, 128, 256), dense: int = 0, dropout: float = 0.0,
              init: str = "pytorch") -> nn.Module:
  """The plain CNN; `dense` > 0 adds bmcc's dense + ReLU layer before the head, `dropout` drops
  before the head, `init='lecun'` initialises kernels as flax does (bmcc's `init='lecun'`)."""
  layers, previous = [], 3
  for width in widths:
    layers.append(block(previous, width))
    previous = width
  head = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
  if dense:
    head += [nn.Linear(previous, dense), nn.ReLU()]
    previous = dense
  if dropout:
    head.append(nn.Dropout(dropout))
  model = nn.Sequential(*layers, *head, nn.Linear(previous, num_classes))
  if init == "lecun":  # flax's lecun_normal: truncated normal, variance 1 / fan_in; zero biases
    for module in model.modules():
      if isinstance(module, (nn.Conv2d, nn.Linear)):
        fan_in = module.weight[0].numel()
        std = math.sqrt(1 / fan_in) / 0.87962566103423978
        nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
        if module.bias is not None:
          nn.init.zeros_(module.bias)
  return model


def dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
  """Each image of the batch in one of its 8 orientations, uniformly."""
  out = torch.empty_like(x)
  choice = torch.randint(0, 8, (x.shape[0],), generator=generator)
  for k in range(8):
    idx = (choice == k).nonzero().flatten()
    if len(idx):
      y = torch.rot90(x[idx], k % 4, dims=(2, 3))
      out[idx] = torch.flip(y, dims=(3,)) if k >= 4 else y
  return out


def scores(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std,
           num_classes: int) -> dict:
  model.eval()
  predictions = []
  with torch.no_grad():
    for start in range(0, len(images), 256):
      x = (images[start:start + 256].float() - mean) / std
      predictions.append(model(x).argmax(1))
  predicted = torch.cat(predictions)
  recalls = [float((predicted[labels == c] == c).float().mean())
             for c in range(num_classes) if (labels == c).any()]
  return {"balanced_accuracy": float(np.mean(recalls)),
          "accuracy": float((predicted == labels).float().mean())}


def run_fold(path: str, args: argparse.Namespace) -> dict:
  with open(path) as f:
    fold = json.load(f)
  classes = fold["classes"]
  data = {role: load(fold[role], args.images_dir, classes, args.image_size)
          for role in ("train", "validation", "test")}
  torch.manual_seed(args.seed + fold["fold"])
  generator = torch.Generator().manual_seed(args.seed + fold["fold"])
  train_x, train_y = data["train"]
  mean = train_x.float().mean(dim=(0, 2, 3), keepdim=True)
  std = train_x.float().std(dim=(0, 2, 3), keepdim=True)
  model = plain_cnn(len(classes), dense=args.dense, dropout=args.dropout, init=args.init)
  optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
  steps_per_epoch = len(train_x) // args.batch_size
  total = int(args.epochs * steps_per_epoch)
  warmup = steps_per_epoch

  def lr_factor(step: int) -> float:
    if step < warmup:
      return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

  scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
  loss_fn = nn.CrossEntropyLoss()
  best, best_state, step = -1.0, None, 0
  eval_every = 2 * steps_per_epoch
  start = time.time()
  while step < total:
    order = torch.randperm(len(train_x), generator=generator)
    for i in range(steps_per_epoch):
      if step >= total:
        break
      idx = order[i * args.batch_size:(i + 1) * args.batch_size]
      x = dihedral(train_x[idx], generator)
      x = (x.float() - mean) / std
      model.train()
      loss = loss_fn(model(x), train_y[idx])
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
      scheduler.step()
      step += 1
      if step % eval_every == 0 or step == total:
        val = scores(model, *data["validation"], mean, std, len(classes))
        print(f"fold {fold['fold']} step {step}/{total}: loss {loss.item():.3f}, validation "
              f"balanced accuracy {val['balanced_accuracy']:.4f}", flush=True)
        if val["balanced_accuracy"] > best:
          best = val["balanced_accuracy"]
          best_state = {k: v.clone() for k, v in model.state_dict().items()}
  model.load_state_dict(best_state)
  test = scores(model, *data["test"], mean, std, len(classes))
  test.update(fold=fold["fold"], seconds=time.time() - start, best_validation=best,
              train=len(train_x), test=len(data["test"][0]))
  print(f"fold {fold['fold']}: test {test}", flush=True)
  return test


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--folds_dir", required=True)
  parser.add_argument("--images_dir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--epochs", type=float, default=6.0)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--learning_rate", type=float, default=1e-3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--threads", type=int, default=2)
  # Twins of bmcc variants: bmcc's dense head (256, dropout 0.3) and flax's initialisation.
  parser.add_argument("--dense", type=int, default=0, help="dense layer before the head; 0: none")
  parser.add_argument("--dropout", type=float, default=0.0, help="dropout before the head")
  parser.add_argument("--init", choices=("pytorch", "lecun"), default="pytorch")
  parser.add_argument("--variant", default="torch_plain_cnn", help="the row's name")
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  start = time.time()
  folds = [run_fold(path, args)
           for path in sorted(glob.glob(os.path.join(args.folds_dir, "fold_*.json")))]
  twin = [f"{k} {getattr(args, k)}" for k, default in (("dense", 0), ("dropout", 0.0),
                                                       ("init", "pytorch"))
          if getattr(args, k) != default]
  row = {"variant": args.variant, "change": "PyTorch plain CNN (bench/torch_baseline.py)"
         + (f", {', '.join(twin)}" if twin else ""),
         "folds": len(folds), "epochs": args.epochs, "minutes": (time.time() - start) / 60}
  for key in ("balanced_accuracy", "accuracy"):
    values = [f[key] for f in folds]
    row[key] = {"mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                "folds": values}
  with open(args.out, "w") as f:
    json.dump({"row": row, "folds": folds, "torch": torch.__version__, "args": vars(args)}, f,
              indent=2)
  print(json.dumps(row))


if __name__ == "__main__":
  main()
