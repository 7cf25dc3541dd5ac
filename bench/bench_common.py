"""What the modules of bench/profile_kernels.py share: the run's settings and findings (``Run``),
tolerances, progress lines, autocast and error helpers.

The bench modules import torch and hyperseg at module level: profile_kernels.py imports them only
after it has decided TRITON_INTERPRET (importing hyperseg imports timm, torch._dynamo, triton).
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List

import torch

from hyperseg.options import interpreting_triton as interpreting  # noqa: F401  (for bench/)
from hyperseg.timing import MemoryMeter

VARIANTS = ("triton", "torch", "official")
DTYPE_NAMES = ("fp32", "fp16", "bf16")
MIB = float(1 << 20)
# Allowed max |err| relative to max(1, max|reference|).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 2e-2}
TF32_TOLERANCE = 5e-3        # fp32 with --tf32: operands rounded to 10 mantissa bits

_T0 = time.perf_counter()


def progress(message: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def tolerance(dtype: str) -> float:
    """max |err| / max(1, max |ref|) allowed against the reference in ``dtype``."""
    if dtype == "fp32" and torch.backends.cudnn.allow_tf32:
        return TF32_TOLERANCE
    return TOLERANCE[dtype]


@dataclass
class Run:
    """The settings of one benchmark run and what it found along the way."""
    device: str
    meter: MemoryMeter
    repeats: int
    warmup: int
    peak_bw: dict
    context: dict                       # device, versions: copied into every record
    notes: List[str] = field(default_factory=list)
    failures: List[str] = field(default_factory=list)
    model: str = ""                     # the zoo model being measured

    def fail(self, message: str) -> None:
        self.failures.append(message)
        progress("CORRECTNESS FAILURE: " + message)

    def timer(self, fns: dict, after_run=None) -> dict:
        """``time_cuda`` on the GPU, else ``time_cpu`` with the run's repeats and warm-up."""
        from hyperseg.timing import time_cpu, time_cuda
        if self.device == "cuda":
            return time_cuda(fns, self.repeats, log=progress)
        return time_cpu(fns, self.repeats, self.warmup, after_run=after_run)


def autocast_for(device: str, dtype: str) -> Callable:
    if dtype == "fp32":
        return contextlib.nullcontext
    half = torch.float16 if dtype == "fp16" else torch.bfloat16
    return lambda: torch.autocast(device_type=device, dtype=half)


def wrap(ctx, fn):
    def run():
        with ctx():
            return fn()
    return run


def max_err(got, ref):
    """(max |got - ref|, max(1, max |ref|))."""
    err = (got.float() - ref.float()).abs().max().item()
    scale = max(1.0, ref.float().abs().max().item())
    return err, scale
