"""Throughput and peak memory of preparing the TFDS dataset: `bone_marrow.prepare()`.

  python bench/build_dataset.py                               # 20,000 images, Kaggle folder
  python bench/build_dataset.py --zip                         # the same as the Kaggle zip
  python bench/build_dataset.py --num_images 5000 --layout tcia --repeats 2
  python bench/build_dataset.py --workdir /tmp/bm --keep      # keep (and reuse) the download
  python bench/build_dataset.py --manual_dir ~/Downloads/bm   # a real download instead

Writes a synthetic download of about `--num_images` 250 x 250 JPEGs in the real on-disk layout
(`synthetic.default_counts` scaled to the total, so the classes keep the real imbalance; written
with 2 worker processes, not timed). A download already in `--workdir` with the same spec is
reused. Then, for each of `--repeats` runs, a fresh child process imports the builder, times
`bone_marrow.prepare(data_dir, manual_dir)` into an empty data dir (discovery, validation, shard
writing, build report) and exits; its peak resident set comes from `os.wait4`. A second child that
only imports the same modules gives the baseline RSS, so the build's own share is visible.

Prints per run `seconds`, `images_per_second`, `peak_rss_mib` and the child's CPU time per image
(a steadier figure than wall time when other jobs share the cores; the load average is printed
too), then the largest peak (`peak_rss_mib=<float>`) and, as the last line, the fastest run's
rate: `images_per_second=<float>`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_SPEC_FILE = "bench_spec.json"
_CHILD_IMPORTS = "import tensorflow_datasets; from bmcc.data import bone_marrow, discovery"


def _counts(num_images: int) -> dict[str, int]:
  """Per-class counts in the real proportions, summing to about `num_images` (each class >= 1)."""
  from bmcc import synthetic
  from bmcc.data import classes

  return synthetic.default_counts(scale=num_images / classes.TOTAL_IMAGES, minimum=1)


def _write_download(workdir: str, num_images: int, layout: str, zip_archive: bool) -> str:
  """Writes (or reuses) the synthetic download; returns the manual dir to prepare from."""
  from bmcc import synthetic

  manual_dir = os.path.join(workdir, "download")
  spec = {"counts": _counts(num_images), "layout": layout, "zip": zip_archive, "seed": 0}
  spec_path = os.path.join(manual_dir, _SPEC_FILE)
  if os.path.exists(spec_path):
    with open(spec_path, encoding="utf-8") as f:
      if json.load(f) == spec:
        print(f"reusing the download in {manual_dir}", flush=True)
        return manual_dir
  shutil.rmtree(manual_dir, ignore_errors=True)
  start = time.perf_counter()
  ds = synthetic.write_synthetic_dataset(
      manual_dir, spec["counts"], layout=layout, zip_archive=zip_archive, seed=0, num_workers=2)
  print(f"wrote {ds.num_images} images ({layout}, {'zip' if zip_archive else 'folder'}) to "
        f"{ds.path} in {time.perf_counter() - start:.1f} s (not timed)", flush=True)
  with open(spec_path, "w", encoding="utf-8") as f:
    json.dump(spec, f)
  return manual_dir


def _run_child(code: str) -> tuple[str, float, float]:
  """Runs `code` in a fresh Python; returns (stdout, peak RSS in MiB, CPU seconds) of that child."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  out = proc.stdout.read()
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode != 0:
    raise RuntimeError(f"child failed with exit code {proc.returncode}:\n{out}\n{code}")
  return out, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime  # ru_maxrss is in KiB.


def _build_code(data_dir: str, manual_dir: str) -> str:
  return "\n".join([
      "import json, logging, sys, time",
      _CHILD_IMPORTS,
      "logging.disable(logging.WARNING)",
      "start = time.perf_counter()",
      f"builder = bone_marrow.prepare({data_dir!r}, {manual_dir!r})",
      "seconds = time.perf_counter() - start",
      "n = sum(builder.info.splits[s].num_examples for s in builder.info.splits)",
      "tf = 'tensorflow' in sys.modules",
      "print(json.dumps({'seconds': seconds, 'images': n, 'tensorflow_imported': tf}))",
  ])


def main(argv: list[str] | None = None) -> int:
  """Writes the download, times the builds, prints the summary."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_images", type=int, default=20_000,
                      help="images in the synthetic download (about; default %(default)s)")
  parser.add_argument("--layout", choices=("kaggle", "tcia"), default="kaggle")
  parser.add_argument("--zip", action="store_true", help="prepare from the zip as downloaded")
  parser.add_argument("--workdir", help="where the download and the shards go (default: a "
                      "temporary folder, deleted unless --keep)")
  parser.add_argument("--keep", action="store_true",
                      help="keep the workdir (its download is reused by the next run)")
  parser.add_argument("--repeats", type=int, default=1, help="timed builds (default 1)")
  parser.add_argument("--manual_dir", help="prepare this existing download (a real one, say) "
                      "instead of writing a synthetic one; --num_images, --layout, --zip unused")
  args = parser.parse_args(argv)

  workdir = args.workdir or tempfile.mkdtemp(prefix="bmcc-bench-build-")
  os.makedirs(workdir, exist_ok=True)
  try:
    if args.manual_dir:
      manual_dir = os.path.abspath(args.manual_dir)
    else:
      manual_dir = _write_download(workdir, args.num_images, args.layout, args.zip)
    _, base_rss, _ = _run_child(_CHILD_IMPORTS)
    print(f"baseline_rss_mib={base_rss:.1f} (a process that only imports the builder)")
    rates, peaks = [], []
    for run in range(args.repeats):
      data_dir = os.path.join(workdir, "tfds")
      shutil.rmtree(data_dir, ignore_errors=True)
      load = os.getloadavg()[0]
      out, peak, cpu = _run_child(_build_code(data_dir, manual_dir))
      result = json.loads(out.strip().splitlines()[-1])
      n, seconds = result["images"], result["seconds"]
      rates.append(n / seconds)
      peaks.append(peak)
      print(f"run {run + 1}: {n} images in {seconds:.2f} s, images_per_second={n / seconds:.1f}, "
            f"peak_rss_mib={peak:.1f} (build's own share {peak - base_rss:.1f} MiB), "
            f"cpu_ms_per_image={1000 * cpu / n:.2f} (whole child, imports included), "
            f"tensorflow_imported={result['tensorflow_imported']}, load_avg_before={load:.2f}",
            flush=True)
    shutil.rmtree(os.path.join(workdir, "tfds"), ignore_errors=True)
    source = "zip" if args.zip else "folder"
    print(f"cpus={os.cpu_count()} load_avg_1min={os.getloadavg()[0]:.2f} "
          f"source={args.manual_dir or f'synthetic {args.layout} {source}'}")
    print(f"peak_rss_mib={max(peaks):.1f}")
    print(f"images_per_second={max(rates):.1f}")
  finally:
    if not args.keep:
      shutil.rmtree(workdir, ignore_errors=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
