"""PyTorch's figure for bench/predict.py: torchvision's ResNet-50 on the same images, on the CPU.

  python3.12 -m venv /tmp/torch-venv && /tmp/torch-venv/bin/pip install torch torchvision \\
      -c constraints.txt -e .
  /tmp/torch-venv/bin/python bench/predict_torch.py --num_images 128 --batch_size 32 --repeats 2 \\
      > bench/results/predict_torch_resnet50.txt

torch is not a dependency of bmcc: run this in a scratch environment. It writes the same synthetic
250 x 250 JPEGs as bench/predict.py (`bmcc.synthetic.image_bytes`, all 21 classes in turn),
decodes them with bmcc's decoder at 224 px (`bmcc.data.decode.read_image`, as `--mode=predict`
does), and times torchvision's `resnet50(weights=None, num_classes=21)` in eval mode under
`torch.inference_mode()`: model-only (one decoded batch, NCHW float32, normalised, repeated) and
end to end (decode in a thread pool, normalise, infer, softmax). Each measurement is the fastest of
`--repeats`. Random weights: the speed does not depend on them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bmcc import synthetic  # noqa: E402
from bmcc.data import classes  # noqa: E402
from bmcc.data.decode import read_image  # noqa: E402
from bmcc.data.normalization import MEAN_RGB, STDDEV_RGB  # noqa: E402

SIZE = 224


def _write_images(folder: str, n: int) -> list[str]:
  paths = []
  for i in range(n):
    code = classes.CODES[i % len(classes.CODES)]
    path = os.path.join(folder, f"{code}_{i + 1:05d}.jpg")
    with open(path, "wb") as f:
      f.write(synthetic.image_bytes(code, i // len(classes.CODES) + 1))
    paths.append(path)
  return paths


def _to_tensor(images: np.ndarray) -> torch.Tensor:
  mean = torch.tensor(MEAN_RGB, dtype=torch.float32).view(1, 3, 1, 1)
  std = torch.tensor(STDDEV_RGB, dtype=torch.float32).view(1, 3, 1, 1)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
  return (x - mean) / std


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_images", type=int, default=128)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  model = torchvision.models.resnet50(weights=None, num_classes=len(classes.CODES)).eval()
  with tempfile.TemporaryDirectory(prefix="bmcc-bench-torch-") as tmp:
    paths = _write_images(tmp, args.num_images)
    pool = concurrent.futures.ThreadPoolExecutor(args.threads)
    decode = lambda path: read_image(path, SIZE)[0]  # noqa: E731
    first = np.stack(list(pool.map(decode, paths[:args.batch_size])))
    with torch.inference_mode():
      batch = _to_tensor(first)
      model(batch)  # warm-up
      runs = max(1, len(paths) // len(first))
      model_seconds = []
      for _ in range(args.repeats):
        start = time.time()
        for _ in range(runs):
          model(batch)
        model_seconds.append(time.time() - start)
      end_to_end = []
      for _ in range(args.repeats):
        start = time.time()
        for i in range(0, len(paths), args.batch_size):
          images = np.stack(list(pool.map(decode, paths[i:i + args.batch_size])))
          torch.softmax(model(_to_tensor(images)), dim=-1).numpy()
        end_to_end.append(time.time() - start)
  print(f"torch={torch.__version__} torchvision={torchvision.__version__} "
        f"threads={torch.get_num_threads()} model=resnet50 image_size={SIZE} "
        f"batch={args.batch_size} images={len(paths)}")
  print(f"torch_model_only_images_per_second={runs * len(first) / min(model_seconds):.1f}")
  print(f"torch_images_per_second={len(paths) / min(end_to_end):.1f}")


if __name__ == "__main__":
  main()
