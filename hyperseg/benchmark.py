"""Frames per second as users measure it (``hyperseg benchmark``): batch 1, warm-up passes, then
N timed frames, each synchronised with the device, on a random model whose BatchNorm statistics
are calibrated on the input (so that it computes order-one activations, as a trained one does,
and the CPU meets no denormal floats).

Reported: FPS (frames / total time), latency p50 / p90 / p99, the first pass (which includes
torch.compile's compilation), peak memory, the device, the library versions, and the same
figures for the official algorithm's decoder (``hyperseg.baseline``, with the backbone and
context head shared, in float32, contiguous format, not compiled: the official code's settings),
so that the speed-up is one number.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the timed frames (weights
included); on CPU, the growth of the process's peak resident set size (``ru_maxrss``) from just
before the first forward pass to the end, which is 0 when an earlier step (building the model)
already reached a higher peak.
"""
from __future__ import annotations

import copy
import os
import platform
from typing import Dict, Optional, Tuple

import torch

from .baseline import OfficialDecoder, official_forward
from .calibration import calibrate_batchnorm
from .model import build
from .timing import time_frames


def versions() -> Dict[str, Optional[str]]:
    """Versions of Python and the libraries that set the speed."""
    import timm

    from . import __version__

    try:
        from importlib.metadata import version
        triton = version("triton")
    except Exception:                      # not installed (e.g. macOS)
        triton = None
    out = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton,
           "timm": timm.__version__, "hyperseg": __version__}
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with its core count and torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def run_benchmark(name: str, *, size: Optional[Tuple[int, int]] = None, device=None,
                  backend: str = "auto", precision: str = "fp32", channels_last: bool = True,
                  compile=False, frames: int = 50, warmup: int = 5,
                  baseline: bool = True) -> dict:
    """Benchmark the zoo model ``name`` (see the module doc); the result as a JSON-ready dict.

    ``compile`` is False, True or a ``torch.compile`` mode ("reduce-overhead": CUDA graphs).
    """
    if frames < 1 or warmup < 1:
        raise ValueError(f"frames and warmup must be >= 1, got {frames} and {warmup}")
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    model = build(name, backend=backend, precision=precision, channels_last=channels_last)
    size = tuple(size or model.config.input_size)
    torch.manual_seed(0)
    x = torch.randn(1, 3, *size)
    calibrate_batchnorm(model, x)
    model.to(device)
    x = x.to(device)
    reference = None
    if baseline:
        reference = copy.deepcopy(model)
        reference.channels_last, reference.precision = False, "fp32"
    if compile:
        model.compile(**({} if compile is True else {"mode": compile}))
    result = {"model": model.config.name, "size": list(size), "batch": 1, "device": str(device),
              "device_name": device_name(device), "backend": backend,
              "decoder": _decoder_path(model, x), "precision": precision,
              "channels_last": channels_last, "compile": compile, "versions": versions()}
    with torch.inference_mode():
        result["hyperseg"] = time_frames(lambda: model(x), device, frames, warmup)
        if reference is not None:
            decoder = OfficialDecoder(reference)
            result["official_decoder"] = time_frames(
                lambda: official_forward(reference, x, decoder=decoder), device, frames, warmup)
            result["speedup_vs_official_decoder"] = (result["hyperseg"]["fps"] /
                                                     result["official_decoder"]["fps"])
    return result


def _decoder_path(model, x) -> str:
    """The decoder implementation the model's forward takes on ``x`` (eval, no autograd)."""
    with torch.inference_mode():
        return model.resolve_backend(x)


def format_report(result: dict) -> str:
    """The benchmark as a few lines of text."""
    h, w = result["size"]
    v = result["versions"]
    compiled = {False: "no", True: "yes"}.get(result["compile"], result["compile"])
    lines = [f"{result['model']} at {h}x{w}, batch 1, {result['precision']}, decoder "
             f"{result['decoder']}, channels_last {'on' if result['channels_last'] else 'off'}, "
             f"compile {compiled}",
             f"device: {result['device_name']}",
             f"torch {v['torch']}, triton {v['triton'] or 'none'}, timm {v['timm']}, "
             f"hyperseg {v['hyperseg']}"
             + (f", torch built for CUDA {v['cuda']}" if v.get("cuda") else ""),
             f"{'':26s}{'FPS':>8s}{'p50 ms':>9s}{'p90 ms':>9s}{'p99 ms':>9s}{'peak MiB':>10s}"
             f"{'first s':>9s}"]
    rows = [("hyperseg", result["hyperseg"])]
    if "official_decoder" in result:
        rows.append(("official decoder (fp32)", result["official_decoder"]))
    for label, r in rows:
        lines.append(f"{label:26s}{r['fps']:8.2f}{r['p50_ms']:9.1f}{r['p90_ms']:9.1f}"
                     f"{r['p99_ms']:9.1f}{r['peak_memory_mib']:10.1f}{r['first_pass_s']:9.2f}")
    first = result["hyperseg"]
    lines.append(f"{first['frames']} timed frames after {first['warmup']} warm-up; peak memory: "
                 f"{first['memory_measure']}; random weights, BatchNorm calibrated on the input")
    if "speedup_vs_official_decoder" in result:
        lines.append(f"speed-up over the official decoder algorithm: "
                     f"{result['speedup_vs_official_decoder']:.2f}x")
    return "\n".join(lines)
