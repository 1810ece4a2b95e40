#!/usr/bin/env bash
# GPU measurements for bmcc on one H100/H200, in under 10 minutes, as one Markdown table.
#
#   bash bench/gpu.sh                       # on the GPU machine, from anywhere in the repo
#   BMCC_GPU_SH_SMOKE=1 BMCC_GPU_SH_BUDGET=900 bash bench/gpu.sh  # the logic, on a CPU (tiny.py)
#
# Rows: (1) ResNet-50, 224 px, bf16, batch 256 (configs/resnet50.py: its step updates the weight
# average too), on a device-resident random batch (the step alone);
# (2) the same step fed by our full grain input pipeline (decode + augment in 8 worker processes)
# over a prepared synthetic dataset of 250 x 250 JPEGs, and the ratio (2)/(1); (3) the input
# pipeline alone on the host (bench/input_pipeline.py, if present: the same dataset, image size,
# batch and workers); (4) the simple CNN (configs/simple_cnn.py, 250 px, float32, batch 128) on a
# device-resident batch; (5) ViT-S/14 and (6) ViT-B/14 (configs/dinobloom_s_probe.py and
# configs/dinobloom_b_finetune.py: 224 px, bf16, batch 256, random weights: nothing is
# downloaded) on a device-resident batch. Every bench/train_step.py row also times the eval-mode
# forward pass alone (`model.features`, what --mode=features runs): the "forward images/s" column.
# (2) reads batches exactly as training does (a thread puts them on the devices ahead of the step). Each row is one run of bench/train_step.py
# (or bench/input_pipeline.py) under its own `timeout`; the whole script stops starting runs when
# its budget (BMCC_GPU_SH_BUDGET seconds, default 540) is spent. A run that fails or times out
# shows as such in the table; the others still run. The table is printed at the end and written
# to $OUT/gpu_table.md, the runs' full output to $OUT/gpu_logs.txt, if $OUT is set.
#
# Nothing is installed from the network (the GPU machine is offline). The GPU machine's python3
# has jax, flax, optax, numpy, absl, etils, protobuf, pillow, opencv and pyyaml but not
# ml_collections, grain or tensorflow_datasets. Rows (1), (4), (5) and (6) need only
# ml-collections; rows (2) and (3) need grain and TFDS (TF-less: TFDS reads and prepares ArrayRecord
# datasets without TensorFlow). If a folder `.whl/` is in the repo root, its wheels are installed with
# `pip install --no-index --no-deps --target /tmp/bmcc-site` and put first on PYTHONPATH. Make it
# here (Python 3.12, x86-64 Linux wheels; the versions of constraints.txt, the ones tested), with
# `.whl/` ignored by git (`echo /.whl/ >> .git/info/exclude`):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 tensorflow-datasets==4.9.10 \
#     tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 protobuf==7.36.2 \
#     etils==1.15.0 dm-tree==0.1.10 immutabledict==4.3.1 importlib-resources==7.1.0 \
#     portpicker==1.6.0 termcolor==3.3.0 toml==0.10.2
#   python3 -m pip wheel --no-deps -w .whl promise==2.3   # sdist only on PyPI: build it here
#
# Those are exactly the distributions (beyond what the GPU machine has) that the pipeline mode
# imports with TensorFlow hidden, traced on the CPU. protobuf and etils are on the GPU machine
# already; they travel too because tensorflow-metadata's and googleapis-common-protos' generated
# code needs protobuf >= 6.33 and TFDS needs etils >= 1.9.1. simple-parsing (a TFDS requirement)
# is not imported when reading or preparing. With the device tool, carry `.whl` (64 MiB in all).
#
# Environment: PYTHON (default python3), OUT, BMCC_GPU_SH_SMOKE, BMCC_GPU_SH_BUDGET,
# BMCC_INPUT_PIPELINE_ARGS (extra arguments for bench/input_pipeline.py), JAX_COMPILATION_CACHE_DIR
# (default /tmp/bmcc-jax-cache: row (2) reuses row (1)'s compiled step).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/bmcc-jax-cache}"
PYTHON="${PYTHON:-python3}"
SMOKE="${BMCC_GPU_SH_SMOKE:-0}"
BUDGET="${BMCC_GPU_SH_BUDGET:-540}"
START_SECONDS=$SECONDS

if compgen -G ".whl/*.whl" >/dev/null; then
  echo "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/bmcc-site (no index)"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/bmcc-site .whl/*.whl
  export PYTHONPATH="/tmp/bmcc-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # grain's worker processes import bmcc

if [[ "$SMOKE" == 1 ]]; then
  # The same runs on configs/tiny.py (32 px CNN, synthetic data) with a few steps: checks the logic.
  RESNET=(--config configs/tiny.py)
  CNN=(--config configs/tiny.py)
  SYNTHETIC_STEPS=(--warmup 1 --steps 4)
  PIPELINE_STEPS=(--warmup 2 --steps 8)
  RESNET_LABEL="tiny (smoke, stands in for ResNet-50)"
  PIPELINE=(--config configs/tiny.py --rounds 1 --warmup_batches 2 --num_batches 8)
  PIPELINE_LABEL="tiny"
  CNN_LABEL="tiny (smoke, stands in for the simple CNN)"
  VIT_S=(--config configs/tiny.py)
  VIT_B=(--config configs/tiny.py)
  VIT_S_LABEL="tiny (smoke, stands in for ViT-S/14)"
  VIT_B_LABEL="tiny (smoke, stands in for ViT-B/14)"
else
  RESNET=(--config configs/resnet50.py --config.image_size=224 --config.batch_size=256
          --config.model_config.dtype=bfloat16)
  CNN=(--config configs/simple_cnn.py)
  SYNTHETIC_STEPS=(--warmup 5 --steps 30)
  # The warm-up outlasts the workers' start; the timed steps outnumber the batches they read ahead.
  PIPELINE_STEPS=(--warmup 16 --steps 60)
  RESNET_LABEL="ResNet-50, 224 px, bf16, batch 256, EMA"  # configs/resnet50.py keeps an EMA
  # ResNet-50's data settings on the synthetic set that train_step.py --input=pipeline prepares
  # (demo's spec: the same digest, so the same prepared dataset in ~/.cache/bmcc).
  PIPELINE=(--config configs/demo.py --config.image_size=224 --config.batch_size=256
            --config.data.num_workers=8 --rounds 1 --warmup_batches 16 --num_batches 60)
  PIPELINE_LABEL="224 px, batch 256, 8 workers"
  CNN_LABEL="simple CNN, 250 px, fp32, batch 128"
  VIT_S=(--config configs/dinobloom_s_probe.py --config.model_config.dtype=bfloat16
         --config.batch_size=256)
  VIT_B=(--config configs/dinobloom_b_finetune.py --config.batch_size=256)
  VIT_S_LABEL="ViT-S/14, 224 px, bf16, batch 256"  # all layers train, as after unfreezing
  VIT_B_LABEL="ViT-B/14, 224 px, bf16, batch 256, layer decay, drop path, EMA"
fi

LOGS="$(mktemp -d /tmp/bmcc-gpu-sh.XXXXXX)"
ROWS=()  # the table's rows
declare -A IPS  # images/s by run name

# value KEY LOG: the value of the last `KEY=value` line of LOG (first word), or "n/a".
value() {
  local v
  v="$(grep -E "^$1=" "$2" | tail -n 1 | cut -d= -f2- | cut -d' ' -f1 || true)"
  echo "${v:-n/a}"
}

# measure NAME LABEL INPUT TIMEOUT COMMAND...: runs COMMAND under `timeout` (cut to what is left of
# the budget), shows its key lines, and adds a table row; never fails the script.
measure() {
  local name="$1" label="$2" input="$3" limit="$4"
  shift 4
  local log="$LOGS/$name.log" left=$((BUDGET - (SECONDS - START_SECONDS))) rc=0 status
  if ((left < 30)); then
    ROWS+=("| $label | $input | skipped: time budget spent | | | | | |")
    echo "== $name: skipped (${left} s of the budget left)"
    return 0
  fi
  if ((limit > left)); then limit=$left; fi
  echo "== $name (timeout ${limit} s): $*"
  if timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1; then rc=0; else rc=$?; fi
  grep -E "^(device|model|parameters|dataset|compile_seconds|warmup_seconds|step_seconds|\
train_flops_per_image|forward_flops_per_image_hlo|achieved_tflops_per_device|\
peak_tflops_per_device|fraction_of_peak|forward_images_per_second|tensorflow_imported|\
images_per_second)[=:]" "$log" || true
  if ((rc == 0)); then
    status="$(value images_per_second "$log")"
  else
    status="failed (exit $rc)"
    if ((rc == 124 || rc == 137)); then status="timed out (${limit} s)"; fi
    echo "-- $name: $status; last lines:"
    tail -n 15 "$log"
  fi
  local step_ms="n/a" step
  step="$(value step_seconds "$log")"
  if [[ "$step" != n/a ]]; then
    step_ms="$(awk -v s="$step" 'BEGIN { printf "%.1f", 1000 * s }')"
  fi
  ROWS+=("| $label | $input | $status | $step_ms | $(value train_flops_per_image "$log") \
| $(value achieved_tflops_per_device "$log") | $(value fraction_of_peak "$log") \
| $(value forward_images_per_second "$log") |")
  IPS[$name]="$(value images_per_second "$log")"
  return 0
}

echo "bmcc GPU measurements ($( ((SMOKE == 1)) && echo smoke || echo full ), budget ${BUDGET} s)"
DEVICE="$(timeout 120 "$PYTHON" -c 'import jax; d = jax.devices(); print(
  f"{d[0].device_kind} x{len(d)} ({d[0].platform}), jax {jax.__version__}")' 2>/dev/null \
  || echo unknown)"
echo "device: $DEVICE"

measure resnet_synthetic "$RESNET_LABEL" "in-memory batch" 150 \
  "$PYTHON" bench/train_step.py "${RESNET[@]}" "${SYNTHETIC_STEPS[@]}"
measure resnet_pipeline "$RESNET_LABEL" "grain pipeline, synthetic JPEGs" 180 \
  "$PYTHON" bench/train_step.py "${RESNET[@]}" --input=pipeline "${PIPELINE_STEPS[@]}"
if [[ -f bench/input_pipeline.py ]]; then
  # shellcheck disable=SC2086  # extra arguments are meant to split
  measure input_pipeline "input pipeline alone, $PIPELINE_LABEL" "synthetic JPEGs (host only)" 90 \
    "$PYTHON" bench/input_pipeline.py "${PIPELINE[@]}" ${BMCC_INPUT_PIPELINE_ARGS:-}
else
  ROWS+=("| input pipeline alone | synthetic JPEGs | n/a: bench/input_pipeline.py missing \
| | | | | |")
fi
measure cnn_synthetic "$CNN_LABEL" "in-memory batch" 120 \
  "$PYTHON" bench/train_step.py "${CNN[@]}" "${SYNTHETIC_STEPS[@]}"
measure vit_s_synthetic "$VIT_S_LABEL" "in-memory batch" 120 \
  "$PYTHON" bench/train_step.py "${VIT_S[@]}" "${SYNTHETIC_STEPS[@]}"
measure vit_b_synthetic "$VIT_B_LABEL" "in-memory batch" 150 \
  "$PYTHON" bench/train_step.py "${VIT_B[@]}" "${SYNTHETIC_STEPS[@]}"

ratio="$(awk -v p="${IPS[resnet_pipeline]:-n/a}" -v s="${IPS[resnet_synthetic]:-n/a}" \
  'BEGIN { if (p + 0 > 0 && s + 0 > 0) printf "%.3f", p / s; else print "n/a" }')"
TABLE="$LOGS/gpu_table.md"
{
  echo "Device: $DEVICE; $(date -u +%Y-%m-%dT%H:%MZ); $((SECONDS - START_SECONDS)) s in all."
  echo
  echo "| model | input | images/s | step ms | train FLOP/image | TFLOP/s/device \
| fraction of peak | forward images/s |"
  echo "|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "Pipeline-fed / in-memory images/s ($RESNET_LABEL): $ratio"
} >"$TABLE"
echo
cat "$TABLE"
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  cp "$TABLE" "$OUT/gpu_table.md"
  for log in "$LOGS"/*.log; do
    echo "===== $(basename "$log")"
    cat "$log"
  done >"$OUT/gpu_logs.txt"
fi
