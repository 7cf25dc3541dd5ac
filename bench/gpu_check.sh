#!/usr/bin/env bash
# The one prepared GPU run (for a session lent an NVIDIA GPU through the device tool):
#   run: bash bench/gpu_check.sh            (writes everything under $OUT, or ./gpu-out)
# 1. install without touching the machine's torch / triton (no package registry there);
# 2. the kernel (forward and backward), triton-backend and training tests on the GPU, without the
#    interpreter, and the > 2**31-element cases (64-bit indexing);
# 3. a training step of hyperseg-m at 512x1024, backend torch vs triton: the official recipe
#    (batch 16, fp16 autocast; issue 13's target), then batch 2 in fp32;
# 4. the benchmark: hyperseg-m at 512x1024 (fp32 + fp16, then fp32 on tf32), then every zoo model
#    at its official size; each block beside its roofline floor.
# Each step has its own timeout (a step that runs out loses only its own figures); they add up to
# under 7 minutes, leaving a rerun inside one session's 15 minutes of device time.
# Output: log.txt (the environment and every step's output, in order) and one JSON per
# measurement, 6 files in all (the device tool brings back at most 8).
set -uo pipefail
out="${OUT:-./gpu-out}"
mkdir -p "$out"
log="$out/log.txt"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

# step NAME SECONDS LINES COMMAND...: run COMMAND under a timeout, its output appended to log.txt
# under a header and its last LINES lines printed; the header records the exit status.
step() {
  local name=$1 seconds=$2 lines=$3
  shift 3
  local start=$SECONDS
  echo "=== $name (timeout ${seconds}s)" >> "$log"
  timeout "$seconds" "$@" > "$out/step.txt" 2>&1
  local status=$?
  cat "$out/step.txt" >> "$log"
  echo "=== $name: exit $status after $((SECONDS - start)) s" | tee -a "$log"
  tail -n "$lines" "$out/step.txt"
  rm -f "$out/step.txt"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$log"
step install 30 3 pip install -q --no-deps --no-build-isolation -e .
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-' | tr -cd 'A-Za-z0-9_.-')
day=$(date -u +%Y-%m-%d)
# pytest-xdist (on the device's image) spreads the tests over 8 processes, test by test (--dist
# load; pyproject's default keeps a module on one worker): most of their time is Triton compiling
# each kernel specialisation once, on one CPU core per process. Without xdist, pyproject's
# "-n auto" is dropped (-o addopts=) and the tests run in one process.
parallel="-o addopts= -p no:xdist"
python -c "import xdist" > /dev/null 2>&1 && parallel="-n 8 --dist load"
step tests 110 25 python -m pytest -q -p no:cacheprovider $parallel tests/test_kernel_patch_conv.py \
  tests/test_kernel_meta_inverted_residual.py tests/test_kernel_tf32.py tests/test_kernel_autotune.py \
  tests/test_kernel_patch_conv_backward.py tests/test_kernel_generate_weights.py \
  tests/test_triton_backend.py tests/test_triton_training.py tests/test_kernel_large_index.py
step train-fp16-b16 60 8 python bench/train_step.py --amp fp16 --batch 16 \
  --json "$out/train-step-$gpu-$day-fp16-b16.json"
step train-fp32 45 6 python bench/train_step.py --amp off --json "$out/train-step-$gpu-$day-fp32.json"
step bench-hyperseg-m 70 40 python bench/profile_kernels.py --json "$out/bench-$gpu-$day-hyperseg-m.json"
step bench-tf32 45 20 python bench/profile_kernels.py --tf32 --dtype fp32 --no-whole \
  --json "$out/bench-$gpu-$day-hyperseg-m-tf32.json"
step bench-all 55 60 python bench/profile_kernels.py --model all --no-whole \
  --json "$out/bench-$gpu-$day-all.json"
