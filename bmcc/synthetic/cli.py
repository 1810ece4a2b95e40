"""Command line: `python -m bmcc.synthetic OUT --scale 0.01 --layout kaggle --zip --corrupt`."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence

from PIL import Image, ImageDraw

from bmcc.data.classes import CODES, NAMES
from bmcc.synthetic.cells import IMAGE_SIZE, render_image
from bmcc.synthetic.layout import (
  DEFAULT_MINIMUM,
  DEFAULT_SCALE,
  LAYOUT_FOLDERS,
  default_counts,
  write_synthetic_dataset,
)


def contact_sheet(*, seed: int = 0, per_class: int = 1, image_size: int = IMAGE_SIZE,
                  columns: int = 7) -> Image.Image:
  """A labelled grid of `per_class` synthetic images of every class, for eyeballing."""
  label_h = 16
  n = len(CODES) * per_class
  rows = math.ceil(n / columns)
  sheet = Image.new("RGB", (columns * image_size, rows * (image_size + label_h)), "white")
  draw = ImageDraw.Draw(sheet)
  for k, (code, i) in enumerate((c, i) for c in CODES for i in range(1, per_class + 1)):
    x, y = (k % columns) * image_size, (k // columns) * (image_size + label_h)
    sheet.paste(Image.fromarray(render_image(code, i, seed=seed, image_size=image_size)),
                (x, y + label_h))
    draw.text((x + 3, y + 2), f"{code} {NAMES[code]} #{i}", fill="black")
  return sheet


def main(argv: Sequence[str] | None = None) -> int:
  """Command line: writes a synthetic dataset and prints a summary."""
  parser = argparse.ArgumentParser(
      prog="python -m bmcc.synthetic",
      description="Write a synthetic bone-marrow cell dataset in the real on-disk layout.")
  parser.add_argument("out", help="folder to write into")
  parser.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                      help="fraction of the real class counts (default %(default)s)")
  parser.add_argument("--minimum", type=int, default=DEFAULT_MINIMUM,
                      help="least images per class (default %(default)s)")
  parser.add_argument("--layout", choices=sorted(LAYOUT_FOLDERS), default="kaggle")
  parser.add_argument("--zip", action="store_true", help="write one zip archive")
  parser.add_argument("--corrupt", action="store_true", help="plant three undecodable files")
  parser.add_argument("--image-size", type=int, default=IMAGE_SIZE)
  parser.add_argument("--range-size", type=int, default=1000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workers", type=int, default=1)
  parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
  parser.add_argument("--sheet", help="also save a labelled contact sheet PNG here")
  args = parser.parse_args(argv)

  start = time.perf_counter()
  try:
    ds = write_synthetic_dataset(
        args.out, default_counts(args.scale, args.minimum), layout=args.layout,
        zip_archive=args.zip, corrupt=args.corrupt, image_size=args.image_size, seed=args.seed,
        num_workers=args.workers, range_size=args.range_size, overwrite=args.overwrite)
  except (FileExistsError, ValueError) as e:
    parser.error(str(e))
  elapsed = time.perf_counter() - start
  print(f"Wrote {ds.num_images} synthetic images ({len(ds.counts)} classes, layout {ds.layout}) "
        f"to {ds.path} in {elapsed:.1f} s ({ds.num_images / max(elapsed, 1e-9):.0f} images/s).")
  print("  " + "  ".join(f"{c}:{n}" for c, n in ds.counts.items()))
  for rel in ds.corrupt:
    print(f"  corrupt: {ds.folder_name}/{rel}")
  if args.sheet:
    contact_sheet(seed=args.seed, image_size=args.image_size).save(args.sheet)
    print(f"Contact sheet: {args.sheet}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
