#!/usr/bin/env bash
# GPU measurements for bmcc on one H100/H200 against PyTorch on the same card, in one call.
#
#   OUT=/some/dir bash bench/gpu.sh          # on the GPU machine, from anywhere in the repo
#   BMCC_GPU_SH_SMOKE=1 BMCC_GPU_SH_BUDGET=3000 TORCH_PYTHON=/path/to/venv/bin/python \
#     OUT=/tmp/out bash bench/gpu.sh         # the logic, on a CPU (tiny sizes)
#
# Rows, most important first (each one process under its own `timeout`; the script stops
# starting rows when its budget, BMCC_GPU_SH_BUDGET seconds (default 460), is spent, and every
# row's time is printed):
#  1. bmcc ResNet-50 training step (configs/resnet50.py: 224 px, bf16, batch 256, EMA) on a
#     device-resident random batch (bench/train_step.py), with --memory (the compiled step's
#     memory_analysis() against memory_stats()'s peak, bench/memory_check.py), --profile_dir (a
#     jax.profiler trace of 3 more steps, summarised by bench/profile_summary.py) and --hlo_out
#     (the optimised HLO the profile's op names refer to);
#  2. the same for ViT-B/14 (configs/dinobloom_b_finetune.py: 224 px, bf16, batch 256, layer
#     decay, drop path, EMA; random weights, nothing downloaded);
#  3. PyTorch's ResNet-50 step (bench/torch_reference.py: torchvision, AMP bf16, channels-last,
#     eager then torch.compile under a time cap) and 4. timm's vit_base_patch14_dinov2 at 224 px;
#  5. the input pipeline alone on the host's cores (bench/input_pipeline.py: demo's synthetic
#     250 px JPEGs, 224 px out, batch 256, 8 and 16 grain workers);
#  6. ViT-S/14 and 7. ViT-G/14 features (eval-mode forward, bf16, random weights; train_step.py
#     --forward_only; batch 1024 and 512);
#  8. ViT-B/14 again with cuDNN's fused attention (--attention_impl=cudnn; XLA's is the default);
#  9. ResNet-50 fed by the grain pipeline (--input=pipeline), and its ratio to row 1;
#  10. the simple CNN (configs/simple_cnn.py, 250 px, fp32, batch 128).
# BMCC_GPU_SH_ROWS=name,name,... runs only those rows (names: bmcc_resnet50 bmcc_vit_b
# torch_resnet50 torch_vit_b input_pipeline features_vit_s features_vit_g bmcc_vit_b_cudnn
# resnet50_pipeline simple_cnn).
#
# Outputs: the tables last on stdout; with $OUT set, in it (at most 8 files): gpu_table.md (the
# tables), gpu_logs.txt (every row's full output), gpu_profile.txt (the profile summaries and the
# memory lines), profile_<row>.tar.gz (the trace folders, for TensorBoard's profile plugin or
# Perfetto; left out if over 15 MiB) and hlo.tar.gz (the compiled steps' optimised HLO).
#
# Nothing is installed from the network (the GPU machine is offline). The GPU machine's python3
# has jax, flax, optax, numpy, absl, etils, protobuf, pillow, opencv and pyyaml but not
# ml_collections, grain or tensorflow_datasets. The bmcc step and features rows need only
# ml-collections; rows 5 and 9 need grain and TFDS (TF-less: TFDS reads and prepares ArrayRecord
# datasets without TensorFlow); the PyTorch rows need torch, torchvision and timm (there already)
# and run with PYTHONPATH as the script found it (the carried protobuf and etils stay out). If a
# folder `.whl/` is in the repo root, its wheels are installed with
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
#     portpicker==1.6.0 termcolor==3.3.0 toml==0.10.2 flax==0.12.12 optax==0.2.8
#   python3 -m pip wheel --no-deps -w .whl promise==2.3   # sdist only on PyPI: build it here
#
# flax and optax travel too (pure Python, 1 MB): the GPU machine's versions are not recorded, and
# bmcc needs flax >= 0.12.8 (nnx.EMA); flax 0.12.12 needs jax >= 0.11.1 (the machine has 0.11.2;
# checked with jax 0.11.2 from PyPI in a venv without grain, clu, TFDS, ml-collections or TF).
#
# Those are exactly the distributions (beyond what the GPU machine has) that the pipeline mode
# imports with TensorFlow hidden, traced on the CPU. protobuf and etils are on the GPU machine
# already; they travel too because tensorflow-metadata's and googleapis-common-protos' generated
# code needs protobuf >= 6.33 and TFDS needs etils >= 1.9.1. simple-parsing (a TFDS requirement)
# is not imported when reading or preparing. With the device tool, carry `.whl` (64 MiB in all).
#
# Environment: PYTHON (default python3), TORCH_PYTHON (default $PYTHON: the PyTorch rows), OUT,
# BMCC_GPU_SH_SMOKE, BMCC_GPU_SH_SMOKE_TIMEOUT_SCALE (smoke rows' time-outs x this, default 6),
# BMCC_GPU_SH_BUDGET, BMCC_GPU_SH_ROWS, BMCC_INPUT_PIPELINE_ARGS (extra
# arguments for bench/input_pipeline.py), JAX_COMPILATION_CACHE_DIR (default /tmp/bmcc-jax-cache:
# row 9 reuses row 1's compiled step).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/bmcc-jax-cache}"
PYTHON="${PYTHON:-python3}"
TORCH_PYTHON="${TORCH_PYTHON:-$PYTHON}"
SMOKE="${BMCC_GPU_SH_SMOKE:-0}"
BUDGET="${BMCC_GPU_SH_BUDGET:-460}"
ONLY=",${BMCC_GPU_SH_ROWS:-},"
START_SECONDS=$SECONDS
ORIGINAL_PYTHONPATH="${PYTHONPATH:-}"

if compgen -G ".whl/*.whl" >/dev/null; then
  echo "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/bmcc-site (no index)"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/bmcc-site .whl/*.whl
  export PYTHONPATH="/tmp/bmcc-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # grain's worker processes import bmcc

if [[ "$SMOKE" == 1 ]]; then
  # Tiny sizes on the CPU: checks the logic, not the speed.
  RESNET=(--config configs/tiny.py)
  VIT_B=(--config configs/dinobloom_b_finetune.py --config.image_size=28 --config.batch_size=4)
  STEPS=(--warmup 1 --steps 2 --forward_steps 1)
  PROFILE_STEPS=2
  # float32: bfloat16 is emulated on most CPUs (25 s a step); the short cap tests the time-out.
  TORCH_RESNET=(--model resnet50 --device cpu --dtype float32 --batch 4 --image_size 32
                --steps 2 --warmup 1 --forward_steps 1 --compile_timeout 20)
  TORCH_VIT_B=(--model vit_base_patch14 --device cpu --dtype float32 --batch 4 --image_size 28
               --steps 2 --warmup 1 --forward_steps 1 --compile off)
  PIPELINE=(--config configs/tiny.py --workers=0,1 --rounds 1 --warmup_batches 2 --num_batches 8)
  VIT_S_FEATURES=(--config configs/tiny.py --forward_only --forward_steps 2)
  # ViT-L/14 stands in for ViT-G/14 (the same code path; 1.1e9 float32 parameters are too many
  # for a shared CPU machine).
  VIT_G_FEATURES=(--config configs/dinobloom_s_probe.py --config.model=vit_large_patch14
                  --config.model_config.dtype=bfloat16 --config.image_size=14 --batch_size 2
                  --forward_only --forward_steps 1)
  PIPELINE_STEPS=(--warmup 2 --steps 8 --forward_steps 0)
  CNN=(--config configs/tiny.py)
  RESNET_LABEL="tiny CNN (smoke, stands in for ResNet-50)"
  VIT_B_LABEL="ViT-B/14 at 28 px, batch 4 (smoke)"
  PIPELINE_LABEL="tiny (smoke), 0 and 1 workers"
  VIT_S_LABEL="tiny CNN (smoke, stands in for ViT-S/14)"
  VIT_G_LABEL="ViT-L/14 at 14 px, batch 2 (smoke, stands in for ViT-G/14)"
  CNN_LABEL="tiny (smoke, stands in for the simple CNN)"
else
  RESNET=(--config configs/resnet50.py --config.image_size=224 --config.batch_size=256
          --config.model_config.dtype=bfloat16)
  VIT_B=(--config configs/dinobloom_b_finetune.py --config.batch_size=256)
  # No forward-only timing in the step rows (it costs a compile; the features rows time ViTs').
  STEPS=(--warmup 5 --steps 30 --forward_steps 0)
  PROFILE_STEPS=3
  TORCH_RESNET=(--model resnet50 --batch 256 --image_size 224 --steps 30 --warmup 5
                --forward_steps 10 --compile_timeout 90)
  TORCH_VIT_B=(--model vit_base_patch14 --batch 256 --image_size 224 --steps 30 --warmup 5
               --forward_steps 10 --compile_timeout 90)
  # Demo's synthetic set (prepared on first use in ~/.cache/bmcc), 224 px, batch 256.
  PIPELINE=(--config configs/demo.py --config.image_size=224 --config.batch_size=256
            --workers=8,16 --rounds 1 --warmup_batches 8 --num_batches 40)
  VIT_S_FEATURES=(--config configs/dinobloom_s_probe.py --config.model_config.dtype=bfloat16
                  --batch_size 1024 --forward_only --forward_steps 20)
  VIT_G_FEATURES=(--config configs/dinobloom_s_probe.py --config.model=vit_giant_patch14
                  --config.model_config.dtype=bfloat16 --batch_size 512 --forward_only
                  --forward_steps 10)
  # The warm-up outlasts the workers' start; the timed steps outnumber the batches they read ahead.
  PIPELINE_STEPS=(--warmup 16 --steps 60 --forward_steps 0)
  CNN=(--config configs/simple_cnn.py)
  RESNET_LABEL="ResNet-50, 224 px, bf16, batch 256, EMA"  # configs/resnet50.py keeps an EMA
  VIT_B_LABEL="ViT-B/14, 224 px, bf16, batch 256, layer decay, drop path, EMA"
  PIPELINE_LABEL="224 px, batch 256, 8 and 16 workers"
  VIT_S_LABEL="ViT-S/14 features, 224 px, bf16, batch 1024"
  VIT_G_LABEL="ViT-G/14 features, 224 px, bf16, batch 512"
  CNN_LABEL="simple CNN, 250 px, fp32, batch 128"
fi

LOGS="$(mktemp -d /tmp/bmcc-gpu-sh.XXXXXX)"
ROWS=()  # the main table's rows
declare -A IPS  # images/s by row name

# value KEY LOG: the value of the last `KEY=value` line of LOG (first word), or "n/a".
value() {
  local v
  v="$(grep -E "^$1=" "$2" 2>/dev/null | tail -n 1 | cut -d= -f2- | cut -d' ' -f1 || true)"
  echo "${v:-n/a}"
}

# wanted NAME: whether BMCC_GPU_SH_ROWS (if set) names the row.
wanted() {
  [[ "$ONLY" == ",," || "$ONLY" == *",$1,"* ]]
}

# measure NAME LABEL INPUT TIMEOUT COMMAND...: runs COMMAND under `timeout` (cut to what is left of
# the budget), shows its key lines, and adds a table row; never fails the script.
measure() {
  local name="$1" label="$2" input="$3" limit="$4"
  shift 4
  wanted "$name" || return 0
  local log="$LOGS/$name.log" left=$((BUDGET - (SECONDS - START_SECONDS))) rc=0 status
  local row_start=$SECONDS
  if ((left < 30)); then
    ROWS+=("| $name | $label | $input | skipped: time budget spent | | | | | | |")
    echo "== $name: skipped (${left} s of the budget left)"
    return 0
  fi
  # The smoke run's rows compile real models on a slow shared CPU: give them longer.
  if [[ "$SMOKE" == 1 ]]; then limit=$((limit * ${BMCC_GPU_SH_SMOKE_TIMEOUT_SCALE:-6})); fi
  if ((limit > left)); then limit=$left; fi
  echo "== $name (timeout ${limit} s, $((SECONDS - START_SECONDS)) s elapsed): $*"
  if timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1; then rc=0; else rc=$?; fi
  grep -E "^(device|model|parameters|batch|dataset|compile_seconds|forward_compile_seconds|\
warmup_seconds|step_seconds|eager_step_seconds|compiled_step_seconds|eager_warmup_seconds|\
train_flops_per_image|forward_flops_per_image_hlo|achieved_tflops_per_device|\
peak_tflops_per_device|fraction_of_peak|forward_images_per_second|forward_tflops_per_device|\
eager_images_per_second|compiled_images_per_second|peak_memory_gib|memory_[a-z_]+|median|\
profile_seconds|tensorflow_imported|images_per_second)[=: ]" "$log" || true
  status="$(value images_per_second "$log")"
  if ((rc != 0)); then
    local failure="failed (exit $rc)"
    if ((rc == 124 || rc == 137)); then failure="timed out (${limit} s)"; fi
    # A figure printed before the failure (train_step.py prints it before profiling) stands.
    if [[ "$status" == n/a ]]; then status="$failure"; else status="$status ($failure after it)"; fi
    echo "-- $name: $status; last lines:"
    tail -n 15 "$log"
  fi
  local step_ms="n/a" step
  step="$(value step_seconds "$log")"
  [[ "$step" == n/a ]] && step="$(value forward_step_seconds "$log")"
  if [[ "$step" != n/a ]]; then
    step_ms="$(awk -v s="$step" 'BEGIN { printf "%.1f", 1000 * s }')"
  fi
  local tflops
  tflops="$(value achieved_tflops_per_device "$log")"
  [[ "$tflops" == n/a ]] && tflops="$(value forward_tflops_per_device "$log")"
  ROWS+=("| $name | $label | $input | $status | $step_ms | $(value train_flops_per_image "$log") \
| $tflops | $(value fraction_of_peak "$log") | $(value forward_images_per_second "$log") \
| $((SECONDS - row_start)) |")
  IPS[$name]="$(value images_per_second "$log")"
  echo "-- $name: images/s $status; $((SECONDS - row_start)) s ($((SECONDS - START_SECONDS)) s elapsed)"
  return 0
}

# torch_row NAME LABEL TIMEOUT ARGS...: bench/torch_reference.py with the PYTHONPATH the script found.
torch_row() {
  local name="$1" label="$2" limit="$3"
  shift 3
  if [[ -n "$ORIGINAL_PYTHONPATH" ]]; then
    measure "$name" "$label" "in-memory batch" "$limit" \
      env PYTHONPATH="$ORIGINAL_PYTHONPATH" "$TORCH_PYTHON" bench/torch_reference.py "$@"
  else
    measure "$name" "$label" "in-memory batch" "$limit" \
      env -u PYTHONPATH "$TORCH_PYTHON" bench/torch_reference.py "$@"
  fi
  if [[ -f "$LOGS/$name.log" ]]; then
    IPS[${name}_eager]="$(value eager_images_per_second "$LOGS/$name.log")"
    IPS[${name}_compiled]="$(value compiled_images_per_second "$LOGS/$name.log")"
  fi
}

# bmcc_step NAME LABEL TIMEOUT ARGS...: bench/train_step.py with the memory check, a profile and
# the optimised HLO.
bmcc_step() {
  local name="$1" label="$2" limit="$3"
  shift 3
  measure "$name" "$label" "in-memory batch" "$limit" \
    "$PYTHON" bench/train_step.py "$@" "${STEPS[@]}" --memory --profile_dir "$LOGS/profile_$name" \
    --profile_steps "$PROFILE_STEPS" --hlo_out "$LOGS/hlo_$name.txt"
}

echo "bmcc GPU measurements ($( ((SMOKE == 1)) && echo smoke || echo full ), budget ${BUDGET} s)"
DEVICE="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  2>/dev/null | head -n 1 || true)"
JAX_VERSION="$(timeout 60 "$PYTHON" -c 'import jax; print(jax.__version__)' 2>/dev/null \
  || echo unknown)"
DEVICE="${DEVICE:-no nvidia-smi (CPU?)}; jax $JAX_VERSION; $(nproc) cores"
echo "device: $DEVICE"

bmcc_step bmcc_resnet50 "bmcc $RESNET_LABEL" 150 "${RESNET[@]}"
bmcc_step bmcc_vit_b "bmcc $VIT_B_LABEL" 150 "${VIT_B[@]}"
torch_row torch_resnet50 "PyTorch ResNet-50 (torchvision, AMP bf16, channels-last), same input" \
  170 "${TORCH_RESNET[@]}"
torch_row torch_vit_b "PyTorch ViT-B/14 (timm vit_base_patch14_dinov2, AMP bf16, SDPA), same input" \
  170 "${TORCH_VIT_B[@]}"
# shellcheck disable=SC2086  # extra arguments are meant to split
measure input_pipeline "input pipeline alone, $PIPELINE_LABEL" "synthetic JPEGs (host only)" 120 \
  "$PYTHON" bench/input_pipeline.py "${PIPELINE[@]}" ${BMCC_INPUT_PIPELINE_ARGS:-}
measure features_vit_s "bmcc $VIT_S_LABEL" "in-memory batch" 90 \
  "$PYTHON" bench/train_step.py "${VIT_S_FEATURES[@]}"
measure features_vit_g "bmcc $VIT_G_LABEL" "in-memory batch" 150 \
  "$PYTHON" bench/train_step.py "${VIT_G_FEATURES[@]}"
measure bmcc_vit_b_cudnn "bmcc $VIT_B_LABEL, cuDNN attention" "in-memory batch" 150 \
  "$PYTHON" bench/train_step.py "${VIT_B[@]}" "${STEPS[@]}" --attention_impl=cudnn
measure resnet50_pipeline "bmcc $RESNET_LABEL" "grain pipeline, synthetic JPEGs" 180 \
  "$PYTHON" bench/train_step.py "${RESNET[@]}" --input=pipeline "${PIPELINE_STEPS[@]}"
measure simple_cnn "bmcc $CNN_LABEL" "in-memory batch" 90 \
  "$PYTHON" bench/train_step.py "${CNN[@]}" "${STEPS[@]}"

# ratio A B: A / B to 3 decimals, or n/a.
ratio() {
  awk -v a="${1:-n/a}" -v b="${2:-n/a}" \
    'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.3f", a / b; else print "n/a" }'
}

TABLE="$LOGS/gpu_table.md"
{
  torch_version="$(grep -h -o -E "torch=[^ ]+" "$LOGS"/torch_*.log 2>/dev/null | head -n 1 || true)"
  echo "Device: $DEVICE; ${torch_version:-torch not run}; $(date -u +%Y-%m-%dT%H:%MZ); \
$((SECONDS - START_SECONDS)) s in all."
  echo
  echo "| row | model | input | images/s | step ms | train FLOP/image | TFLOP/s/device \
| fraction of peak | forward images/s | seconds |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "bmcc against PyTorch (training images/s, same card, same batch; ratio > 1: bmcc faster):"
  echo
  echo "| model | bmcc | PyTorch eager | PyTorch compiled | bmcc / best PyTorch |"
  echo "|---|---|---|---|---|"
  for pair in "resnet50:ResNet-50" "vit_b:ViT-B/14"; do
    key="${pair%%:*}"
    best="$(awk -v e="${IPS[torch_${key}_eager]:-n/a}" -v c="${IPS[torch_${key}_compiled]:-n/a}" \
      'BEGIN { b = (e + 0 > c + 0) ? e : c; if (b + 0 > 0) print b; else print "n/a" }')"
    echo "| ${pair#*:} | ${IPS[bmcc_$key]:-n/a} | ${IPS[torch_${key}_eager]:-n/a} \
| ${IPS[torch_${key}_compiled]:-n/a} | $(ratio "${IPS[bmcc_$key]:-}" "$best") |"
  done
  echo
  echo "ViT-B/14 cuDNN attention / XLA attention: $(ratio "${IPS[bmcc_vit_b_cudnn]:-}" \
"${IPS[bmcc_vit_b]:-}"); pipeline-fed / in-memory ResNet-50: $(ratio \
"${IPS[resnet50_pipeline]:-}" "${IPS[bmcc_resnet50]:-}"); input pipeline alone / ResNet-50 \
step: $(ratio "${IPS[input_pipeline]:-}" "${IPS[bmcc_resnet50]:-}"); input pipeline alone / \
ViT-B step: $(ratio "${IPS[input_pipeline]:-}" "${IPS[bmcc_vit_b]:-}")"
  echo
  echo "Memory (compiled step's memory_analysis() against memory_stats() after the steps):"
  echo
  for name in bmcc_resnet50 bmcc_vit_b; do
    [[ -f "$LOGS/$name.log" ]] || continue
    grep -E "^memory_" "$LOGS/$name.log" | sed "s/^/- $name: /" || true
  done
  for name in torch_resnet50 torch_vit_b; do
    [[ -f "$LOGS/$name.log" ]] || continue
    grep -E "^peak_memory_gib=" "$LOGS/$name.log" | sed "s/^/- $name: /" || true
  done
} >"$TABLE"

# The profile summaries and memory lines, for gpu_profile.txt.
PROFILE="$LOGS/gpu_profile.txt"
for name in bmcc_resnet50 bmcc_vit_b; do
  [[ -f "$LOGS/$name.log" ]] || continue
  echo "===== $name"
  grep -E "^(model|step_seconds|memory_[a-z_]+|profile_seconds)=" "$LOGS/$name.log" || true
  awk '/^trace: /{on=1} /^step_seconds=/{on=0} on' "$LOGS/$name.log"
  echo
done >"$PROFILE"

echo
cat "$PROFILE"
echo
cat "$TABLE"
echo "total: $((SECONDS - START_SECONDS)) s"
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  cp "$TABLE" "$OUT/gpu_table.md"
  cp "$PROFILE" "$OUT/gpu_profile.txt"
  for log in "$LOGS"/*.log; do
    echo "===== $(basename "$log")"
    cat "$log"
  done >"$OUT/gpu_logs.txt"
  limit_bytes=$((15 * 1024 * 1024))
  for name in bmcc_resnet50 bmcc_vit_b; do
    [[ -d "$LOGS/profile_$name" ]] || continue
    tar -czf "$OUT/profile_$name.tar.gz" -C "$LOGS" "profile_$name" || true
    if [[ -f "$OUT/profile_$name.tar.gz" ]] \
        && (($(stat -c %s "$OUT/profile_$name.tar.gz") > limit_bytes)); then
      echo "profile_$name.tar.gz is over 15 MiB: left out (the summary is in gpu_profile.txt)"
      rm -f "$OUT/profile_$name.tar.gz"
    fi
  done
  if compgen -G "$LOGS/hlo_*.txt" >/dev/null; then
    tar -czf "$OUT/hlo.tar.gz" -C "$LOGS" $(cd "$LOGS" && ls hlo_*.txt) || true
    if (($(stat -c %s "$OUT/hlo.tar.gz") > limit_bytes)); then
      echo "hlo.tar.gz is over 15 MiB: left out"
      rm -f "$OUT/hlo.tar.gz"
    fi
  fi
  echo "written to $OUT: $(ls "$OUT" | tr '\n' ' ')"
fi
