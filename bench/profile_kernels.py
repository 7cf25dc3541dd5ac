#!/usr/bin/env python
"""HyperSeg headline benchmark: every decoder meta block and the whole model.

Each meta block of a zoo model runs, on the real inputs the model gives it, in three ways:

* ``triton``:   the fused kernel path (``block.forward_fused``), weights generated in the kernel;
* ``torch``:    this package's pure-PyTorch reference (``block(x, decoder.block_weights(...))``);
* ``official``: the official HyperSeg algorithm, written out as the baseline in
  ``hyperseg/baseline.py``: a full weight map from the generator's grouped 1x1 conv, then patches
  cut with view/permute, unfold or F.unfold/F.fold and one grouped ``F.conv2d`` per layer with one
  group per patch.

For each: median time, bytes that must move and the achieved GB/s (and % of the device's peak
bandwidth), useful FLOPs and TFLOP/s, extra memory, and the max error against the reference.
Then the whole model (FPS, time per stage, peak memory) and the project's targets, all measured
in the same run.

    python bench/profile_kernels.py                      # hyperseg-m-cityscapes at 512x1024
    python bench/profile_kernels.py --model all --json out.json
    python bench/profile_kernels.py --quick              # small sizes, a few repeats (CI)
    python bench/profile_kernels.py --quick --interpret  # Triton kernels on CPU (correctness only)
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import textwrap
import time

QUICK_SIZE = (128, 256)
DTYPE_NAMES = ("fp32", "fp16", "bf16")
# Allowed max |err| relative to max(1, max|reference|).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 2e-2}
TF32_TOLERANCE = 5e-3        # fp32 with --tf32: operands rounded to 10 mantissa bits


def tolerance(dtype: str) -> float:
    """max |err| / max(1, max |ref|) allowed against the reference in ``dtype``."""
    if dtype == "fp32" and torch.backends.cudnn.allow_tf32:
        return TF32_TOLERANCE
    return TOLERANCE[dtype]
VARIANTS = ("triton", "torch", "official")
MIB = float(1 << 20)

# Filled in by _load_runtime(), after TRITON_INTERPRET has been decided: importing hyperseg imports
# timm, which imports torch._dynamo, which imports triton.
torch = F = hyperseg = baseline = None

_T0 = time.perf_counter()


def progress(message: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def _size(text: str):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x1024, got {text!r}")
    if h < 32 or w < 32:
        raise argparse.ArgumentTypeError(f"sides must be >= 32, got {text!r}")
    return h, w


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="profile_kernels.py", allow_abbrev=False,
        description="Time every HyperSeg decoder block (fused Triton kernel, torch reference, "
                    "official algorithm) and the whole model, against the hardware limit.")
    p.add_argument("--model", default="hyperseg-m-cityscapes",
                   help="zoo name or alias, or 'all' for the five zoo models "
                        "(default: hyperseg-m-cityscapes)")
    p.add_argument("--size", type=_size, default=None, metavar="HxW",
                   help="input size (default: each model's official resolution; 128x256 with "
                        "--quick or --interpret)")
    p.add_argument("--batch", type=_positive, default=1, help="batch size (default 1)")
    p.add_argument("--dtype", choices=DTYPE_NAMES + ("all",), default=None,
                   help="fp32, or fp16 / bf16 autocast (default: fp32 + fp16 on CUDA, fp32 on CPU; "
                        "all: fp32, fp16, bf16 on CUDA, fp32, bf16 on CPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--quick", action="store_true",
                   help="small size (128x256) and few repeats, for CI")
    p.add_argument("--interpret", action="store_true",
                   help="run the Triton kernels on CPU through the Triton interpreter "
                        "(sets TRITON_INTERPRET=1; correctness only, timings not meaningful)")
    p.add_argument("--repeats", type=_positive, default=None,
                   help="timed runs per measurement on CPU (default 5, --quick 3); on CUDA "
                        "triton.testing.do_bench runs for about repeats * 20 ms")
    p.add_argument("--warmup", type=int, default=None,
                   help="extra untimed runs before timing on CPU (default 0: the correctness "
                        "and memory runs come first)")
    p.add_argument("--json", default=None, metavar="PATH", help="write every figure to this JSON file")
    p.add_argument("--no-blocks", action="store_true", help="skip the per-block benchmark")
    p.add_argument("--no-whole", action="store_true", help="skip the whole-model benchmark")
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch CPU threads (default: torch's default, one per core; 1 when the "
                        "machine is busy at start)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights and the input")
    p.add_argument("--tf32", action="store_true",
                   help="fp32 on tf32 tensor cores: cuDNN, cuBLAS and the fused kernels (which "
                        "follow torch.backends.cudnn.allow_tf32), PyTorch's default for "
                        "convolutions; without it fp32 means IEEE fp32 everywhere")
    args = p.parse_args(argv)
    if args.interpret and args.device == "cuda":
        p.error("--interpret runs the kernels on CPU; it cannot be combined with --device cuda")
    if args.no_blocks and args.no_whole:
        p.error("--no-blocks and --no-whole leave nothing to measure")
    return args


def _load_runtime() -> None:
    global torch, F, hyperseg, baseline
    import torch as torch_module
    import torch.nn.functional as functional
    try:
        import hyperseg as hyperseg_module
        from hyperseg import baseline as baseline_module
    except ImportError as error:  # pragma: no cover - depends on the installation
        raise SystemExit(f"cannot import hyperseg ({error}); install the package first: pip install -e .")
    torch, F, hyperseg, baseline = torch_module, functional, hyperseg_module, baseline_module


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ------------------------------------------------------------------------------------------------
# Environment: device, versions, peak bandwidth
# ------------------------------------------------------------------------------------------------

def versions() -> dict:
    """The software versions (``hyperseg.benchmark.versions``, imported late: importing hyperseg
    imports triton, which must come after TRITON_INTERPRET is decided)."""
    from hyperseg.benchmark import versions as package_versions
    return package_versions()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    from hyperseg.benchmark import cpu_name
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _gpu_spec_bandwidth(name: str):
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
        spec = _gpu_spec_bandwidth(torch.cuda.get_device_name())
        if spec is not None:
            return {"gb_s": spec[0], "source": f"spec table: {spec[1]}",
                    "measured_copy_gb_s": measured}
        return {"gb_s": measured, "source": "measured device-to-device copy bandwidth (GPU not in the table)",
                "measured_copy_gb_s": measured}
    return {"gb_s": measured, "source": "measured copy bandwidth", "measured_copy_gb_s": measured}


# ------------------------------------------------------------------------------------------------
# Timing and memory
# ------------------------------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_cpu(fns: dict, repeats: int, warmup: int, after_run=None) -> dict:
    """{key: timing} of each function, ``repeats`` runs each after ``warmup``; the functions are
    interleaved run by run so that drifts of a shared machine hit them all alike. A timing holds
    median_ms, times_ms (every run) and the timer's name."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            out = fn()
            times[key].append((time.perf_counter() - t0) * 1e3)
            del out
            if after_run is not None:
                after_run(key)
    return {key: {"median_ms": statistics.median(t), "times_ms": t, "timer": "time.perf_counter"}
            for key, t in times.items()}


def _time_cuda_events(fn, repeats: int) -> list:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def time_cuda(fns: dict, repeats: int) -> dict:
    """{key: timing} of each function on the GPU: triton.testing.do_bench (its warm-up and L2
    flush; median, 20% and 80% quantiles), falling back to CUDA events."""
    out = {}
    for key, fn in fns.items():
        try:
            from triton.testing import do_bench
            q = do_bench(fn, warmup=25, rep=max(20, 20 * repeats), quantiles=[0.5, 0.2, 0.8])
            q = [float(v) for v in q] if isinstance(q, (list, tuple)) else [float(q)] * 3
            out[key] = {"median_ms": q[0], "quantiles_ms": {"p20": q[1], "p50": q[0], "p80": q[2]},
                        "timer": "triton.testing.do_bench"}
        except Exception as error:  # pragma: no cover - GPU only
            progress(f"do_bench failed ({type(error).__name__}: {error}); timing with CUDA events")
            t = _time_cuda_events(fn, max(10, repeats))
            out[key] = {"median_ms": statistics.median(t), "times_ms": t, "timer": "CUDA events"}
    return out


def _storage_bytes(out) -> int:
    if isinstance(out, (list, tuple)):
        return sum(_storage_bytes(o) for o in out)
    if torch.is_tensor(out):
        return out.untyped_storage().nbytes()
    return 0


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's own start/stop lines on fd 2; other lines are passed through."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if "profiler_st" in line or "gpuGetDeviceCount" in line or not line.strip():
                    continue
                print(line, file=sys.stderr)


class MemoryMeter:
    """Extra memory of a call: the peak allocated during it, above what was allocated before it,
    minus the bytes of the tensors it returns.

    CUDA: ``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated``. CPU: the allocation
    and free events recorded by ``torch.profiler`` (``profile_memory=True``) replayed in time
    order. The CPU method is verified on a known pattern first; if it fails, figures are None.
    """

    def __init__(self, device: str):
        self.device = device
        self.method = None
        self.works = False
        self.last_top_ops = None
        if device == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
            self.works = True
            return
        for method in ("event_tree", "function_events"):
            self.method = method
            try:
                got = self.extra(self._known_pattern)
            except Exception:
                continue
            if got is not None and abs(got - (8 << 20)) <= 64 << 10:
                self.works = True
                return
        self.method = None

    @staticmethod
    def _known_pattern():
        scratch = torch.empty(2 << 20)           # 8 MiB, freed before return
        scratch.fill_(1.0)
        out = torch.empty(1 << 20)               # 4 MiB, returned
        out.copy_(scratch[: 1 << 20])
        del scratch
        return out

    def peak(self, fn):
        """(peak bytes allocated during fn above the level before it, fn's output)."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base, out
        from torch.profiler import ProfilerActivity, profile
        with _quiet_stderr():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                out = fn()
        if self.method == "event_tree":
            deltas = []
            stack = list(prof.profiler.kineto_results.experimental_event_tree())
            while stack:
                event = stack.pop()
                size = getattr(event.extra_fields, "alloc_size", None)
                if size is not None and getattr(event.extra_fields, "device", None) == torch.device("cpu"):
                    deltas.append((event.start_time_ns, size))
                stack.extend(event.children)
        else:   # op granularity: each op's own net allocation, plus the stand-alone frees
            deltas = [(e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                      if e.self_cpu_memory_usage]
        self.last_top_ops = self._top_ops(prof)
        deltas.sort(key=lambda d: d[0])
        level = top = 0
        for _, size in deltas:
            level += size
            top = max(top, level)
        return top, out

    @staticmethod
    def _top_ops(prof, count: int = 3):
        """The ops with the most self CPU time in a profiled call: [[name, % of the total]]."""
        try:
            rows = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()
                    if not e.key.startswith("[")]
        except Exception:
            return None
        total = sum(t for _, t in rows) or 1.0
        rows.sort(key=lambda r: -r[1])
        return [[name, round(100.0 * t / total, 1)] for name, t in rows[:count]]

    def extra(self, fn):
        if self.method is None:
            return None
        top, out = self.peak(fn)
        return max(0, top - _storage_bytes(out))


class StageClock:
    """CPU wall time of the backbone, context head and decoder inside one whole forward pass,
    taken by forward hooks (no synchronisation needed on CPU)."""

    STAGES = ("backbone", "context_head", "decoder")

    def __init__(self, model):
        self.current, self.started, self.handles = {}, {}, []
        for name in self.STAGES:
            module = getattr(model, name)
            self.handles.append(module.register_forward_pre_hook(
                lambda m, args, n=name: self.started.__setitem__(n, time.perf_counter())))
            self.handles.append(module.register_forward_hook(
                lambda m, args, out, n=name: self.current.__setitem__(
                    n, (time.perf_counter() - self.started[n]) * 1e3)))

    def remove(self):
        for handle in self.handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------
# Model preparation
# ------------------------------------------------------------------------------------------------

def autocast_for(device: str, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext
    half = torch.float16 if dtype == "fp16" else torch.bfloat16
    return lambda: torch.autocast(device_type=device, dtype=half)


def _wrap(ctx, fn):
    def run():
        with ctx():
            return fn()
    return run


def _max_err(got, ref):
    err = (got.float() - ref.float()).abs().max().item()
    scale = max(1.0, ref.float().abs().max().item())
    return err, scale


# ------------------------------------------------------------------------------------------------
# Per-block benchmark
# ------------------------------------------------------------------------------------------------

def block_label(block) -> str:
    if hasattr(block, "hidden"):
        return f"IR-{block.version} k{block.kernel_size}"
    return "MetaConv" if block.groups == 1 else f"MetaConv g{block.groups}"


def block_cost(block, x, signal, generator) -> dict:
    """The bytes that must move and the useful FLOPs of one block.

    Bytes: the input read once (for k x k blocks every patch with its k//2 halo), the output
    written once, the generator's signal slice and the generator rows the block uses.
    FLOPs: weight generation (2 * rows * signal channels per group, per patch) and the
    convolutions (v1: the expand over patch + halo); BN, activations and the residual not counted.
    """
    b, cin, h, w = x.shape
    gh, gw = signal.shape[-2:]
    ph, pw, n = h // gh, w // gw, b * gh * gw
    k = getattr(block, "kernel_size", 1)
    halo = k // 2
    cout = block.out_channels
    spg = generator.weight.shape[1]
    elt = x.element_size()
    detail = {
        "input": n * cin * (ph + 2 * halo) * (pw + 2 * halo) * elt,
        "output": b * cout * h * w * elt,
        "signal": b * generator.signal_channels * gh * gw * signal.element_size(),
        "generator": block.num_params * spg * generator.weight.element_size(),
    }
    flops = {"weight_generation": 2 * block.num_params * spg * n}
    if hasattr(block, "hidden"):
        hid = block.hidden
        expand_pixels = n * (ph + 2 * halo) * (pw + 2 * halo) if block.version == "v1" else b * h * w
        flops["expand"] = 2 * hid * cin * expand_pixels
        flops["depthwise"] = 2 * hid * k * k * b * h * w
        flops["project"] = 2 * cout * hid * b * h * w
    else:
        flops["conv"] = 2 * cout * (cin // block.groups) * b * h * w
    return {"bytes": sum(detail.values()), "bytes_detail": detail,
            "flops": sum(flops.values()), "flops_detail": flops, "grid": [gh, gw], "patch": [ph, pw]}


def predicted_floors(run, model, x, dtype: str) -> dict:
    """{level: floor in µs} from bench/kernel_roofline.py: the roofline floor of each block on the
    GPU in use (an H200's figures on an H200, else an H100's), at the peak the kernels run at
    (tensor cores for fp16 / bf16; for fp32 tf32 tensor cores when
    ``torch.backends.cudnn.allow_tf32`` is on, else FFMA). None on a CPU."""
    if run["device"] != "cuda":
        return {}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from kernel_roofline import block_floors
    gpu = "h200" if "H200" in torch.cuda.get_device_name() else "h100"
    peak = None
    if dtype == "fp32":
        peak = "tf32_tensor" if torch.backends.cudnn.allow_tf32 else "fp32_fma"
    return block_floors(model, tuple(x.shape[2:]), x.shape[0], dtype, gpu=gpu, peak=peak)


def bench_blocks(run, model, x, dtype: str, use_triton: bool) -> list:
    device, meter = run["device"], run["meter"]
    amp = autocast_for(device, dtype)
    d = model.decoder
    floors = predicted_floors(run, model, x, dtype)
    model.backend = "torch"
    with amp():
        inputs, signal = baseline.decoder_inputs(model, x)
        levels, prev = [], None
        for level, block in enumerate(d.blocks):
            xl = d.level_input(level, inputs, prev)
            prev = block(xl, d.block_weights(level, signal))
            levels.append((xl, prev))
    del inputs

    records = []
    for level, block in enumerate(d.blocks):
        xl, ref = levels[level]
        index, start = d.sources[level]
        gen = d.generators[index]
        fns = {}
        if use_triton:
            fns["triton"] = _wrap(amp, lambda b=block, xl=xl, g=gen, s=start: b.forward_fused(xl, signal, g, s))
        fns["torch"] = _wrap(amp, lambda b=block, xl=xl, lv=level: b(xl, d.block_weights(lv, signal)))
        fns["official"] = _wrap(amp, lambda b=block, xl=xl, g=gen, s=start: baseline.official_block(
            b, xl, baseline.official_weights(g, signal, s, b.num_params)))
        cost = block_cost(block, xl, signal, gen)
        label = (f"{run['model']} L{level} {block_label(block)} {xl.shape[1]}->{block.out_channels} "
                 f"@{xl.shape[2]}x{xl.shape[3]} {dtype}")

        checked = {}
        for variant, fn in fns.items():
            out = fn()
            _sync(device)
            err, scale = _max_err(out, ref)
            bound = tolerance(dtype) * scale
            ok = bool(err <= bound) and tuple(out.shape) == tuple(ref.shape)
            checked[variant] = (err, bound, ok)
            if not ok:
                run["failures"].append(f"{label}: {variant} differs from the torch reference: "
                                       f"max |err| {err:.3e} > {bound:.3e}")
                progress("CORRECTNESS FAILURE: " + run["failures"][-1])
            del out
        good = {v: fn for v, fn in fns.items() if checked[v][2]}
        interp_triton = "triton" in good and _interpreting()
        # The interpreter's work happens in numpy, outside the torch allocator: no memory figure.
        extra, top_ops = {}, {}
        for v, fn in good.items():
            if not (v == "triton" and interp_triton):
                meter.last_top_ops = None
                extra[v] = meter.extra(fn)
                top_ops[v] = meter.last_top_ops
        progress(f"timing {label}")
        timed = {v: fn for v, fn in good.items() if not (v == "triton" and interp_triton)}
        if device == "cuda":
            times = time_cuda(timed, run["repeats"])
        else:
            times = time_cpu(timed, run["repeats"], run["warmup"])
        if interp_triton:        # one interpreted run: it proves the kernel runs, times nothing useful
            times.update(time_cpu({"triton": good["triton"]}, 1, 0))

        for variant in VARIANTS:
            if variant not in fns:
                continue
            err, bound, ok = checked[variant]
            rec = dict(run["context"], dtype=dtype, model=run["model"], arch=model.config.arch,
                       image_size=list(x.shape[2:]), batch=x.shape[0], level=level,
                       block=block_label(block), block_class=type(block).__name__,
                       variant=variant, input_shape=list(xl.shape), output_shape=list(ref.shape),
                       signal_shape=list(signal.shape), grid=cost["grid"], patch=cost["patch"],
                       bytes=cost["bytes"], bytes_detail=cost["bytes_detail"],
                       flops=cost["flops"], flops_detail=cost["flops_detail"],
                       max_abs_err=err, ref_scale=bound / tolerance(dtype), err_bound=bound,
                       correct=ok,
                       meaningful=not (variant == "triton" and _interpreting()))
            if level in floors:
                rec["floor_us"] = floors[level]
            if variant in times:
                med = times[variant]["median_ms"]
                if level in floors and rec["meaningful"]:
                    rec["x_floor"] = med * 1e3 / floors[level]
                gbs = cost["bytes"] / (med * 1e-3) / 1e9
                rec.update(times[variant], gb_s=gbs,
                           peak_bw_gb_s=run["peak_bw"]["gb_s"],
                           pct_peak_bw=100.0 * gbs / run["peak_bw"]["gb_s"],
                           tflop_s=cost["flops"] / (med * 1e-3) / 1e12,
                           extra_memory_bytes=extra.get(variant),
                           memory_method=meter.method if extra.get(variant) is not None else None)
                if top_ops.get(variant):
                    rec["top_ops_self_cpu_pct"] = top_ops[variant]
            records.append(rec)
        for rec in records[-len(fns):]:
            base = next((r for r in records[-len(fns):] if r["variant"] == "official"), None)
            if base is not None and rec.get("median_ms") and base.get("median_ms") and rec["meaningful"]:
                rec["speedup_vs_official"] = base["median_ms"] / rec["median_ms"]
    return records


# ------------------------------------------------------------------------------------------------
# Whole-model benchmark
# ------------------------------------------------------------------------------------------------

def bench_whole(run, model, x, dtype: str, use_triton: bool) -> list:
    device, meter = run["device"], run["meter"]
    amp = autocast_for(device, dtype)
    backends = (["triton"] if use_triton else []) + ["torch", "official"]
    model.backend = "torch"
    with amp():
        xp = baseline.pad_input(model, x)
        feats, head = model.backbone(xp)
        signal = model.context_head(head)
    inputs = [xp] + feats

    clock = StageClock(model) if device == "cpu" else None

    def whole(backend):
        if backend == "official":
            return lambda: baseline.official_forward(model, x, clock)

        def forward():
            model.backend = backend
            return model(x)
        return forward

    def decoder(backend):
        if backend == "official":
            return lambda: baseline.official_decoder(model, inputs, signal)
        return lambda: model.decoder(inputs, signal, backend)

    fns = {f"whole:{b}": _wrap(amp, whole(b)) for b in backends}
    decoders = {b: _wrap(amp, decoder(b)) for b in backends}
    if device == "cuda":        # stages timed on their own (timing inside a pass would need syncs)
        fns.update({f"decoder:{b}": decoders[b] for b in backends})
        fns["backbone"] = _wrap(amp, lambda: model.backbone(xp))
        fns["context_head"] = _wrap(amp, lambda: model.context_head(head))

    try:
        ref = fns["whole:torch"]()
        errors = {}
        for b in backends:
            out = fns[f"whole:{b}"]()
            _sync(device)
            err, scale = _max_err(out, ref)
            errors[b] = (err, tolerance(dtype) * scale)
            if err > tolerance(dtype) * scale:
                message = (f"{run['model']} whole model {dtype}: {b} differs from torch: "
                           f"max |err| {err:.3e} > {tolerance(dtype) * scale:.3e}")
                if dtype == "fp32":
                    run["failures"].append(message)
                    progress("CORRECTNESS FAILURE: " + message)
                else:
                    # Half-precision roundings compound level after level (the calibrated random
                    # BatchNorms amplify low-variance channels), so whole-model half outputs are
                    # reported, not asserted; every block is asserted on its own inputs.
                    run["notes"].append("Note: " + message + " (half precision, not asserted)")
                    progress("note: " + message)
        del ref, out

        interp = use_triton and _interpreting()
        progress(f"timing whole {run['model']} {dtype} ({', '.join(backends)})")
        timed = {k: f for k, f in fns.items() if not (interp and k.endswith(":triton"))}
        stage_runs = {k: {n: [] for n in StageClock.STAGES} for k in fns}

        def collect(key):
            for n in StageClock.STAGES:
                stage_runs[key][n].append(clock.current[n])

        if device == "cuda":
            times = time_cuda(timed, run["repeats"])
        else:
            times = time_cpu(timed, run["repeats"], run["warmup"], after_run=collect)
        if interp:          # one interpreted run each: proves it runs, times nothing useful
            times.update(time_cpu({k: f for k, f in fns.items() if k.endswith(":triton")}, 1, 0,
                                  after_run=collect if clock is not None else None))
        if device == "cuda":
            stages = {b: {"backbone": times["backbone"]["median_ms"],
                          "context_head": times["context_head"]["median_ms"],
                          "decoder": times[f"decoder:{b}"]["median_ms"]} for b in backends}
        else:
            stages = {b: {n: statistics.median(v) for n, v in stage_runs[f"whole:{b}"].items()}
                      for b in backends}
    finally:
        if clock is not None:
            clock.remove()
    med = {k: t["median_ms"] for k, t in times.items()}

    progress(f"memory whole {run['model']} {dtype}")
    records = []
    for b in backends:
        if meter.method is None or (interp and b == "triton"):
            peak_bytes = dec_extra = None
        else:
            peak_bytes, out = meter.peak(fns[f"whole:{b}"])
            del out
            dec_extra = meter.extra(decoders[b])
        ms = med[f"whole:{b}"]
        records.append(dict(
            run["context"], dtype=dtype, precision="fp32" if dtype == "fp32" else f"{dtype} autocast",
            model=run["model"], arch=model.config.arch, backend=b, batch=x.shape[0],
            image_size=list(x.shape[2:]), input_shape=list(x.shape), median_ms=ms,
            **{k: v for k, v in times[f"whole:{b}"].items() if k != "median_ms"},
            fps=x.shape[0] * 1e3 / ms,
            stages_ms=stages[b], stages_timer="forward hooks inside the timed passes"
            if device == "cpu" else "each stage timed on its own",
            peak_memory_bytes=peak_bytes, decoder_extra_memory_bytes=dec_extra,
            memory_method=meter.method, max_abs_err_vs_torch=errors[b][0], err_bound=errors[b][1],
            meaningful=not (b == "triton" and _interpreting())))
    return records


# ------------------------------------------------------------------------------------------------
# Targets
# ------------------------------------------------------------------------------------------------

def _target(run, name, value, threshold, op, cause_fn, **scope):
    if value is None:
        status = "not measured"
    elif op == ">=":
        status = "met" if value >= threshold else "missed"
    else:
        status = "met" if value <= threshold else "missed"
    rec = dict(run["context"], target=name, measured=value, threshold=threshold, comparison=op,
               status=status, **scope)
    if status == "missed":
        rec["cause"] = cause_fn()
    return rec


def evaluate_targets(run, blocks: list, whole: list) -> list:
    targets = []
    device = run["device"]
    keys = []                       # in the order measured
    for r in blocks + whole:
        key = (r["model"], r["dtype"], tuple(r["image_size"]), r["batch"])
        if key not in keys:
            keys.append(key)
    for model, dtype, size, batch in keys:
        scope = dict(model=model, dtype=dtype, image_size=list(size), batch=batch)
        bl = [r for r in blocks if (r["model"], r["dtype"], tuple(r["image_size"]), r["batch"])
              == (model, dtype, size, batch)]
        wh = {r["backend"]: r for r in whole if r["meaningful"] and (
            r["model"], r["dtype"], tuple(r["image_size"]), r["batch"]) == (model, dtype, size, batch)}
        by = {}
        for r in bl:
            if r["meaningful"]:     # interpreted kernels are checked, never rated
                by.setdefault(r["level"], {})[r["variant"]] = r
        if device == "cuda":
            for level in sorted(by):
                fused, off = by[level].get("triton"), by[level].get("official")
                ratio = (off["median_ms"] / fused["median_ms"]
                         if fused and off and fused.get("median_ms") and off.get("median_ms") else None)

                def cause(f=fused, o=off):
                    why = (f"fused {f['median_ms'] * 1e3:.1f} us at {f['pct_peak_bw']:.0f}% of peak "
                           f"BW, {f['tflop_s']:.2f} TFLOP/s; official {o['median_ms'] * 1e3:.1f} us")
                    if f["median_ms"] < 0.02:
                        why += "; the fused launch is latency-bound (< 20 us)"
                    return why
                targets.append(_target(run, f"L{level} fused >= 10x official", ratio, 10.0, ">=",
                                       cause, level=level, **scope))
            largest = sorted(by, key=lambda lv: -math.prod(by[lv]["torch"]["output_shape"][2:]))[:2]
            for level in sorted(largest):
                fused = by[level].get("triton")
                pct = fused.get("pct_peak_bw") if fused else None

                def cause(f=fused):
                    intensity = f["flops"] / f["bytes"]
                    needed = 0.5 * f["peak_bw_gb_s"] * 1e9 * intensity / 1e12
                    return (f"{f['gb_s']:.0f} GB/s of {f['peak_bw_gb_s']:.0f} in "
                            f"{f['median_ms'] * 1e3:.1f} us, {f['tflop_s']:.2f} TFLOP/s; at "
                            f"{intensity:.1f} FLOP/byte, 50% of peak bandwidth needs "
                            f"{needed:.1f} TFLOP/s")
                targets.append(_target(run, f"L{level} fused >= 50% of peak BW", pct, 50.0, ">=",
                                       cause, level=level, **scope))
            if dtype in ("fp32", "fp16"):
                tri, tor = wh.get("triton"), wh.get("torch")
                ratio = tor["median_ms"] / tri["median_ms"] if tri and tor else None

                def cause(tri=tri, tor=tor):
                    rest = tri["stages_ms"]["backbone"] + tri["stages_ms"]["context_head"]
                    bound = tor["median_ms"] / max(rest, 1e-9)
                    return (f"backbone + context head {rest:.2f} ms = "
                            f"{100 * rest / tri['median_ms']:.0f}% of the triton total; decoder "
                            f"torch {tor['stages_ms']['decoder']:.2f} ms vs triton "
                            f"{tri['stages_ms']['decoder']:.2f} ms; even a free decoder gives "
                            f"{bound:.2f}x")
                targets.append(_target(
                    run, "whole triton >= 2x torch", ratio, 2.0, ">=", cause,
                    set_for="hyperseg-m-cityscapes 512x1024 (ratio reported for every model)",
                    **scope))
        else:
            complete = all(by[lv].get(v, {}).get("median_ms") for lv in by for v in ("torch", "official"))
            if bl:
                tor_sum = sum(by[lv]["torch"]["median_ms"] for lv in by) if complete else None
                off_sum = sum(by[lv]["official"]["median_ms"] for lv in by) if complete else None
                ratio = off_sum / tor_sum if complete else None

                def cause():
                    shares = {lv: by[lv]["torch"]["median_ms"] / tor_sum for lv in by}
                    top = max(shares, key=shares.get)
                    worst = min(by, key=lambda lv: by[lv]["torch"].get("speedup_vs_official", 1e9))
                    why = (f"L{top} ({by[top]['torch']['block']}) is {100 * shares[top]:.0f}% of "
                           f"the torch decoder time, {by[top]['torch']['speedup_vs_official']:.2f}x "
                           f"there; slowest vs official: L{worst} at "
                           f"{by[worst]['torch']['speedup_vs_official']:.2f}x")
                    ops = by[top]["torch"].get("top_ops_self_cpu_pct")
                    if ops:
                        why += f"; torch L{top} time: " + ", ".join(f"{n} {p:.0f}%" for n, p in ops)
                    return why
                targets.append(_target(run, "decoder torch >= 1.5x official (sum of blocks)",
                                       ratio, 1.5, ">=", cause, **scope))
            if "torch" in wh and "official" in wh:
                tor, off = wh["torch"], wh["official"]

                def cause(tor=tor, off=off):
                    return (f"decoder torch {tor['stages_ms']['decoder']:.1f} ms vs official "
                            f"{off['stages_ms']['decoder']:.1f} ms; shared backbone "
                            f"{tor['stages_ms']['backbone']:.1f} ms (run-to-run noise "
                            f"{_spread(tor):.0f}%)")
                targets.append(_target(run, "whole torch no slower than official decoder",
                                       off["median_ms"] / tor["median_ms"], 1.0, ">=", cause, **scope))
                te, oe = tor["decoder_extra_memory_bytes"], off["decoder_extra_memory_bytes"]
                ratio = te / oe if te is not None and oe else None

                def cause(te=te, oe=oe, by=by):
                    top = max(by, key=lambda lv: by[lv]["torch"].get("extra_memory_bytes") or 0)
                    return (f"torch decoder {te / MIB:.1f} MiB vs official {oe / MIB:.1f} MiB; "
                            f"largest torch block extra at L{top}: "
                            f"{(by[top]['torch'].get('extra_memory_bytes') or 0) / MIB:.1f} MiB vs "
                            f"{(by[top]['official'].get('extra_memory_bytes') or 0) / MIB:.1f} MiB")
                targets.append(_target(run, "decoder extra memory torch <= 0.5x official",
                                       ratio, 0.5, "<=", cause, **scope))
    return targets


def _spread(rec) -> float:
    """(max - min) / median of a record's runs, in %; from the 20-80% quantiles on CUDA."""
    if "times_ms" in rec:
        lo, hi = min(rec["times_ms"]), max(rec["times_ms"])
    else:
        lo, hi = rec["quantiles_ms"]["p20"], rec["quantiles_ms"]["p80"]
    return 100.0 * (hi - lo) / rec["median_ms"] if rec["median_ms"] else 0.0


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def _f(value, spec: str, empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def print_report(result: dict) -> None:
    env = result["environment"]
    v = env["versions"]
    bw = result["peak_bandwidth"]
    print(f"HyperSeg decoder benchmark | {env['device']} | torch {v['torch']} | triton "
          f"{v['triton']} | timm {v['timm']}")
    print(f"peak bandwidth {bw['gb_s']:.1f} GB/s ({bw['source']}); timer: "
          f"{result['settings']['timer']}; extra memory: "
          f"{result['settings']['memory_method'] or 'unavailable'}")
    for note in result["notes"]:
        print(note)
    current = None
    for r in result["blocks"]:
        key = (r["model"], tuple(r["image_size"]), r["batch"])
        if key != current:
            current = key
            print()
            print(f"{r['model']} ({r['arch']}), image {r['image_size'][0]}x{r['image_size'][1]}, "
                  f"batch {r['batch']}: decoder blocks")
            print(f"{'dtype':5s} {'L':>1s} {'block':13s} {'in->out @ HxW':17s} {'variant':8s} "
                  f"{'ms':>8s} {'vs off':>6s} {'GB/s':>6s} {'%peak':>5s} {'TFLOP/s':>7s} "
                  f"{'xtra MiB':>8s} {'max err':>7s} {'floor us':>8s} {'x floor':>7s}")
        io = f"{r['input_shape'][1]}->{r['output_shape'][1]} @{r['input_shape'][2]}x{r['input_shape'][3]}"
        ms = _f(r.get("median_ms"), ".3f")
        if not r["meaningful"] and r.get("median_ms") is not None:
            ms = "interp"
        extra = r.get("extra_memory_bytes")
        print(f"{r['dtype']:5s} {r['level']:1d} {r['block']:13s} {io:17s} {r['variant']:8s} "
              f"{ms:>8s} {_f(r.get('speedup_vs_official'), '.2f'):>6s} "
              f"{_f(r.get('gb_s') if r['meaningful'] else None, '.1f'):>6s} "
              f"{_f(r.get('pct_peak_bw') if r['meaningful'] else None, '.1f'):>5s} "
              f"{_f(r.get('tflop_s') if r['meaningful'] else None, '.3f'):>7s} "
              f"{_f(None if extra is None else extra / MIB, '.1f'):>8s} "
              f"{r['max_abs_err']:7.1e} {_f(r.get('floor_us'), '.1f'):>8s} "
              f"{_f(r.get('x_floor'), '.1f'):>7s}")
    whole = result["whole_model"]
    if whole:
        print()
        print("whole model (backbone and context head shared; 'decoder' picks the decoder)")
        print(f"{'model':22s} {'HxW':9s} {'precision':13s} {'decoder':8s} {'FPS':>7s} {'ms':>8s} "
              f"{'backbone':>8s} {'context':>7s} {'decoder':>8s} {'peak MiB':>8s} {'dec MiB':>7s}")
        for r in whole:
            s = r["stages_ms"]
            fps = _f(r["fps"], ".2f") if r["meaningful"] else "interp"
            ms = _f(r["median_ms"], ".2f") if r["meaningful"] else "interp"
            dec = _f(s["decoder"], ".2f") if r["meaningful"] else "interp"
            peak = r["peak_memory_bytes"]
            dex = r["decoder_extra_memory_bytes"]
            print(f"{r['model']:22s} {r['image_size'][0]}x{r['image_size'][1]:<5d} "
                  f"{r['precision']:13s} {r['backend']:8s} {fps:>7s} {ms:>8s} "
                  f"{s['backbone']:8.2f} {s['context_head']:7.2f} {dec:>8s} "
                  f"{_f(None if peak is None else peak / MIB, '.1f'):>8s} "
                  f"{_f(None if dex is None else dex / MIB, '.1f'):>7s}")
    targets = result["targets"]
    if targets:
        print()
        print(f"{'target':46s} {'model':22s} {'HxW':9s} {'dtype':5s} {'measured':>8s} "
              f"{'status':>12s}")
        for t in targets:
            size = f"{t['image_size'][0]}x{t['image_size'][1]}"
            print(f"{t['target']:46s} {t['model']:22s} {size:9s} {t['dtype']:5s} "
                  f"{_f(t['measured'], '.2f'):>8s} {t['status']:>12s}")
            if t.get("cause"):
                print(textwrap.fill(t["cause"], width=118, initial_indent="    cause: ",
                                    subsequent_indent="           "))
    if result["failures"]:
        print()
        for failure in result["failures"]:
            print(f"CORRECTNESS FAILURE: {failure}")


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"      # before anything imports triton
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    _load_runtime()

    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.interpret else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.dtype == "all":
        dtypes = ["fp32", "fp16", "bf16"] if device == "cuda" else ["fp32", "bf16"]
    elif args.dtype:
        dtypes = [args.dtype]
    else:
        dtypes = ["fp32", "fp16"] if device == "cuda" else ["fp32"]
    small = args.quick or args.interpret
    repeats = args.repeats or (3 if small else 5)
    # The correctness check and the memory measurement run every function before it is timed.
    warmup = 0 if args.warmup is None else args.warmup
    if args.model == "all":
        names = hyperseg.list_models(include_aliases=False)
    else:
        try:
            names = [hyperseg.get_config(args.model).name]
        except ValueError as error:
            raise SystemExit(str(error))
    # fp32 means fp32 (no tf32 in cuDNN, cuBLAS or the fused kernels) unless --tf32 says otherwise.
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32

    notes = []
    triton_ok = hyperseg.triton_available()
    use_triton = triton_ok and (device == "cuda" or args.interpret)
    if device == "cpu" and not args.interpret:
        notes.append("Triton timings need a GPU (CUDA): on CPU the fused kernels run only through "
                     "the Triton interpreter (--interpret, correctness only).")
    elif not triton_ok:
        notes.append("The Triton kernels (hyperseg.kernels) could not be imported: no triton rows.")
    elif _interpreting():
        notes.append("Triton kernels run in the Triton interpreter: their timings are not "
                     "meaningful (correctness only).")

    if device == "cpu" and load_start is not None and load_start > 0.5 * (os.cpu_count() or 1):
        if args.threads is None and torch.get_num_threads() > 1:
            # Several OpenMP threads stall at every barrier while another process holds a core
            # (seen here: 5x slower and erratic); one thread stays steady.
            torch.set_num_threads(1)
            notes.append(f"Warning: the machine is busy (1-min load average {load_start:.1f} on "
                         f"{os.cpu_count()} cores): using 1 torch thread (--threads N overrides); "
                         f"CPU timings are less reliable.")
        else:
            notes.append(f"Warning: the machine is busy (1-min load average {load_start:.1f} on "
                         f"{os.cpu_count()} cores): CPU timings are unreliable.")
    if device == "cpu":
        notes.append(f"CPU timings use {torch.get_num_threads()} torch thread(s) on "
                     f"{os.cpu_count()} cores (--threads N to choose).")
    if small or args.size is not None:
        notes.append("The targets are set for each model's official resolution (hyperseg-m: "
                     "512x1024); at other sizes they are indicative only.")
    progress(f"device {device}; measuring peak bandwidth")
    peak_bw = peak_bandwidth(device)
    meter = MemoryMeter(device)
    if not meter.works:
        notes.append("Extra-memory measurement failed its self-check on this torch build: "
                     "memory figures are left empty.")
    context = {"device": device_name(device), "device_type": device, "versions": versions(),
               "tf32": bool(args.tf32)}
    run = {"device": device, "meter": meter, "repeats": repeats, "warmup": warmup,
           "peak_bw": peak_bw, "context": context, "failures": [], "notes": notes}

    blocks, whole = [], []
    torch.set_grad_enabled(False)
    for name in names:
        config = hyperseg.get_config(name)
        size = args.size or (QUICK_SIZE if small else tuple(config.input_size))
        torch.manual_seed(args.seed)
        model = hyperseg.build(name, backend="torch").to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        x = torch.randn(args.batch, 3, *size, device=device)
        progress(f"{name} at {size[0]}x{size[1]}, batch {args.batch}: calibrating BatchNorm")
        hyperseg.model.calibrate_batchnorm(model, x)
        run["model"] = name
        for dtype in dtypes:
            if not args.no_blocks:
                blocks += bench_blocks(run, model, x, dtype, use_triton)
            if not args.no_whole:
                whole += bench_whole(run, model, x, dtype, use_triton)
        del model, x
        if device == "cuda":
            torch.cuda.empty_cache()

    targets = evaluate_targets(run, blocks, whole)
    result = {
        "schema": "hyperseg-bench/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [os.path.basename(sys.argv[0])] + list(sys.argv[1:] if argv is None else argv),
        "settings": {"models": names, "size": list(args.size) if args.size else None,
                     "batch": args.batch, "dtypes": dtypes, "repeats": repeats, "warmup": warmup,
                     "quick": args.quick, "interpret": _interpreting(), "seed": args.seed,
                     "timer": "triton.testing.do_bench median" if device == "cuda"
                     else "time.perf_counter median, variants interleaved",
                     "memory_method": meter.method, "tf32": False,
                     "torch_threads": torch.get_num_threads(),
                     "load_average_1min": {"start": load_start,
                                           "end": os.getloadavg()[0] if load_start is not None else None},
                     "weights": "random init, BatchNorm statistics calibrated on the input"},
        "environment": context,
        "peak_bandwidth": dict(peak_bw, **context),
        "definitions": {
            "bytes": "input read once (k x k blocks: each patch with its halo), output written "
                     "once, the generator's signal slice, the generator rows the block uses",
            "flops": "weight generation 2*rows*signal_channels_per_group per patch + the "
                     "convolutions (v1 expand over patch + halo); BN/activations not counted",
            "extra_memory_bytes": "peak allocated during the call above the level before it, "
                                  "minus the bytes of its output",
            "peak_memory_bytes": "peak allocated during a forward above the level before it "
                                 "(weights and input), output included",
            "speedup_vs_official": "official median / this variant's median",
            "tolerance": TOLERANCE,
        },
        "blocks": blocks,
        "whole_model": whole,
        "targets": targets,
        "notes": notes,
        "failures": run["failures"],
    }
    print_report(result)
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(folder, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        progress(f"wrote {args.json}")
    progress("done")
    return 1 if run["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
