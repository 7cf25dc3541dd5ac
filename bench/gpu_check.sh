#!/usr/bin/env bash
# The one prepared GPU run (for a session lent an NVIDIA GPU through the device tool):
#   run: bash bench/gpu_check.sh            (writes everything under $OUT, or ./gpu-out)
# 1. install without touching the machine's torch / triton (no package registry there);
# 2. the kernel (forward and backward), triton-backend and training tests on the GPU, without the
#    interpreter, and the > 2**31-element cases (64-bit indexing);
# 3. the benchmark: hyperseg-m at 512x1024 (fp32 + fp16, then fp32 on tf32), then every zoo model
#    at its official size; each block beside its roofline floor;
# 4. one training step of hyperseg-m, backend torch vs triton, fp32.
# Timeouts add up to 7 minutes, leaving a rerun inside one session's 15 minutes of device time.
set -uo pipefail
out="${OUT:-./gpu-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/environment.txt"
pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-' | tr -cd 'A-Za-z0-9_.-')
day=$(date -u +%Y-%m-%d)
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_kernel_patch_conv.py \
  tests/test_kernel_meta_inverted_residual.py tests/test_kernel_tf32.py tests/test_kernel_autotune.py \
  tests/test_kernel_patch_conv_backward.py tests/test_kernel_generate_weights.py \
  tests/test_triton_backend.py tests/test_triton_training.py tests/test_kernel_large_index.py \
  2>&1 | tee "$out/gpu-tests.txt" | tail -25
timeout 90 python bench/profile_kernels.py --json "$out/bench-$gpu-$day-hyperseg-m.json" 2>&1 \
  | tee "$out/bench-hyperseg-m.txt" | tail -40
timeout 45 python bench/profile_kernels.py --tf32 --dtype fp32 --no-whole \
  --json "$out/bench-$gpu-$day-hyperseg-m-tf32.json" 2>&1 | tee "$out/bench-hyperseg-m-tf32.txt" | tail -20
timeout 90 python bench/profile_kernels.py --model all --no-whole --json "$out/bench-$gpu-$day-all.json" 2>&1 \
  | tee "$out/bench-all.txt" | tail -60
timeout 45 python bench/train_step.py --amp off --json "$out/train-step-$gpu-$day-off.json" 2>&1 \
  | tee "$out/train-step-off.txt" | tail -6
