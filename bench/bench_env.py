"""The hardware side of bench/profile_kernels.py: the device's name and its peak bandwidth (a
vendor spec table for known GPUs, else a measured large copy)."""
from __future__ import annotations

import os
import statistics
import time

import torch

from hyperseg.benchmark import cpu_name


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def gpu_spec_bandwidth(name: str):
    """(GB/s, label) of known GPUs' peak DRAM bandwidth (vendor specs), or None."""
    n = name.upper()
    if "A100" in n:
        if "80GB" in n or "80G" in n:
            return (1935.0, "A100 80GB PCIe") if "PCIE" in n else (2039.0, "A100 80GB SXM")
        return 1555.0, "A100 40GB"
    table = [("GH200", 4000.0, "GH200 (HBM3)"), ("H200", 4800.0, "H200"),
             ("H100 PCIE", 2000.0, "H100 PCIe"), ("H100 NVL", 3900.0, "H100 NVL"),
             ("H100", 3350.0, "H100 SXM"), ("H800", 3350.0, "H800 SXM"), ("L40S", 864.0, "L40S"),
             ("L4", 300.0, "L4"), ("A10G", 600.0, "A10G"), ("A10", 600.0, "A10"),
             ("V100", 900.0, "V100"), ("RTX 4090", 1008.0, "RTX 4090"), ("T4", 320.0, "T4")]
    for pattern, gbs, label in table:
        if pattern in n:
            return gbs, label
    return None


def copy_bandwidth(device: str, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """GB/s of a large tensor copy: 2 * nbytes (read + write) over the median time."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 1):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            elapsed = time.perf_counter() - t0
        if i:                       # the first copy touches the pages
            times.append(elapsed)
    del src, dst
    return 2 * nbytes / statistics.median(times) / 1e9


def peak_bandwidth(device: str) -> dict:
    measured = copy_bandwidth(device)
    if device == "cuda":
        spec = gpu_spec_bandwidth(torch.cuda.get_device_name())
        if spec is not None:
            return {"gb_s": spec[0], "source": f"spec table: {spec[1]}",
                    "measured_copy_gb_s": measured}
        return {"gb_s": measured, "source": "measured device-to-device copy bandwidth (GPU not in the table)",
                "measured_copy_gb_s": measured}
    return {"gb_s": measured, "source": "measured copy bandwidth", "measured_copy_gb_s": measured}
