"""Every kernel variant compiles for an NVIDIA GPU (sm_90), checked without a GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")


def _cuda_backend_available():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _cuda_backend_available(), reason="triton without its NVIDIA backend")
def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)      # compile for real, not from a cache
    result = subprocess.run([sys.executable, str(SCRIPT), "fp32", "bf16", "fp64"], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    # forward: 6 patch_conv and 2 on multiply-adds, and per dot mode (fp32: tf32 and IEEE; bf16:
    # one) 2 many-patches, 4 patch and 2 inverted-residual variants; backward: 18 per dtype (fp64
    # too), 6 of them on multiply-adds (the generator's signal and weight gradients for narrow
    # groups are two), 2 generators (plain and padded rows)
    assert result.stdout.count(": ") == (8 + 2 * 8 + 18) + (8 + 8 + 18) + 18
    worst = float(result.stdout.strip().splitlines()[-1].split()[-1].rstrip("s"))
    assert worst < 60, f"a kernel variant took {worst:.0f} s to compile"
