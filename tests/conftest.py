"""Test set-up: run Triton kernels through the interpreter when no GPU is present.

``TRITON_INTERPRET`` must be set before anything imports triton; conftest.py is imported by pytest
before any test module, so setting it here is early enough.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _exact_float32():
    """float32 means float32 in the tests: no tf32 in cuDNN, cuBLAS or the fused kernels (which
    follow ``torch.backends.cudnn.allow_tf32``); tests of tf32 switch it on themselves."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


_DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16",
              torch.bfloat16: "bf16"}


def pytest_make_parametrize_id(config, val, argname):
    """Readable ids for parametrised cases: a (2, 3) grid is ``grid2x3`` (not ``grid0``), a
    dtype ``fp32``, a bool ``contiguous`` / ``not-contiguous``; other values keep pytest's id."""
    if isinstance(val, (tuple, list)) and val and all(isinstance(v, int) for v in val):
        return f"{argname}{'x'.join(map(str, val))}"
    if isinstance(val, torch.dtype):
        return _DTYPE_IDS.get(val, str(val).replace("torch.", ""))
    if isinstance(val, bool):
        return argname if val else f"not-{argname}"
    return None
