#!/usr/bin/env python
"""HyperSeg headline benchmark: every decoder meta block and the whole model.

Each meta block of a zoo model runs, on the real inputs the model gives it, in three ways:

* ``triton``:   the fused kernels (``DecoderLevel.run(FUSED)``), weights generated in the kernel;
* ``torch``:    this package's PyTorch reference (``DecoderLevel.run(REFERENCE)``, ``hyperseg.ops``);
* ``official``: the official HyperSeg decoder, written op for op in ``hyperseg/baseline.py``
  (checked against the real official code for values and speed: bench/official_speed.py).

For each: median time, bytes that must move and the achieved GB/s (and % of the device's peak
bandwidth), useful FLOPs and TFLOP/s, extra memory, and the max error against the reference.
Then the whole model (FPS, time per stage, peak memory) and the project's targets, all measured
in the same run.

    python bench/profile_kernels.py                      # hyperseg-m-cityscapes at 512x1024
    python bench/profile_kernels.py --model all --json out.json
    python bench/profile_kernels.py --quick              # small sizes, a few repeats (CI)
    python bench/profile_kernels.py --quick --interpret  # Triton kernels on CPU (correctness only)

This file is the command line; the work is done by bench/bench_env.py (device, peak bandwidth),
bench_blocks.py, bench_whole.py, bench_targets.py and bench_report.py, with the timers and the
memory meter of ``hyperseg.timing``. They import torch and hyperseg, so they are imported only
after TRITON_INTERPRET is decided (importing hyperseg imports timm, torch._dynamo, triton).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

QUICK_SIZE = (128, 256)
DTYPE_NAMES = ("fp32", "fp16", "bf16")


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
    p.add_argument("--size", default=None, metavar="HxW",
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
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"      # before anything imports triton
    if args.size is not None:
        # hyperseg.options.parse_size, imported once TRITON_INTERPRET is decided (importing
        # hyperseg imports triton); sides >= 32
        from hyperseg.options import parse_size
        try:
            args.size = parse_size(args.size, native=False, min_side=32)
        except ValueError as error:
            p.error(f"argument --size: {error}")
    if args.interpret and args.device == "cuda":
        p.error("--interpret runs the kernels on CPU; it cannot be combined with --device cuda")
    if args.no_blocks and args.no_whole:
        p.error("--no-blocks and --no-whole leave nothing to measure")
    return args


def plan(args, torch, hyperseg) -> dict:
    """The device, dtypes, models, repeats and warm-up the arguments ask for."""
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.interpret else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.dtype == "all":
        dtypes = ["fp32", "fp16", "bf16"] if device == "cuda" else ["fp32", "bf16"]
    else:
        dtypes = [args.dtype] if args.dtype else ["fp32", "fp16"] if device == "cuda" else ["fp32"]
    small = args.quick or args.interpret
    if args.model == "all":
        names = hyperseg.list_models(include_aliases=False)
    else:
        try:
            names = [hyperseg.get_config(args.model).name]
        except ValueError as error:
            raise SystemExit(str(error))
    # The correctness check and the memory measurement run every function before it is timed.
    return dict(device=device, dtypes=dtypes, small=small, names=names,
                repeats=args.repeats or (3 if small else 5),
                warmup=0 if args.warmup is None else args.warmup)


def setting_notes(args, device: str, triton_ok: bool, load_start, torch, interpreting) -> list:
    """Notes on what the run can measure; on a busy CPU, one torch thread unless --threads."""
    notes = []
    if device == "cpu" and not args.interpret:
        notes.append("Triton timings need a GPU (CUDA): on CPU the fused kernels run only through "
                     "the Triton interpreter (--interpret, correctness only).")
    elif not triton_ok:
        notes.append("The Triton kernels (hyperseg.kernels) could not be imported: no triton rows.")
    elif interpreting():
        notes.append("Triton kernels run in the Triton interpreter: their timings are not "
                     "meaningful (correctness only).")
    cores = os.cpu_count() or 1
    if device == "cpu" and load_start is not None and load_start > 0.5 * cores:
        busy = (f"Warning: the machine is busy (1-min load average {load_start:.1f} on "
                f"{os.cpu_count()} cores): ")
        if args.threads is None and torch.get_num_threads() > 1:
            # Several OpenMP threads stall at every barrier while another process holds a core
            # (seen here: 5x slower and erratic); one thread stays steady.
            torch.set_num_threads(1)
            notes.append(busy + "using 1 torch thread (--threads N overrides); CPU timings are "
                                "less reliable.")
        else:
            notes.append(busy + "CPU timings are unreliable.")
    if device == "cpu":
        notes.append(f"CPU timings use {torch.get_num_threads()} torch thread(s) on "
                     f"{os.cpu_count()} cores (--threads N to choose).")
    if args.quick or args.interpret or args.size is not None:
        notes.append("The targets are set for each model's official resolution (hyperseg-m: "
                      "512x1024); at other sizes they are indicative only.")
    return notes


def measure(run, args, settings: dict, use_triton: bool) -> tuple:
    """(block records, whole-model records) of every model and dtype."""
    import torch

    import hyperseg
    from bench_blocks import bench_blocks
    from bench_common import progress
    from bench_whole import bench_whole
    from hyperseg.calibration import calibrate_batchnorm
    blocks, whole = [], []
    torch.set_grad_enabled(False)
    for name in settings["names"]:
        config = hyperseg.get_config(name)
        size = args.size or (QUICK_SIZE if settings["small"] else tuple(config.input_size))
        torch.manual_seed(args.seed)
        model = hyperseg.build(name, backend="torch").to(run.device)
        for p in model.parameters():
            p.requires_grad_(False)
        x = torch.randn(args.batch, 3, *size, device=run.device)
        progress(f"{name} at {size[0]}x{size[1]}, batch {args.batch}: calibrating BatchNorm")
        calibrate_batchnorm(model, x)
        run.model = name
        for dtype in settings["dtypes"]:
            if not args.no_blocks:
                blocks += bench_blocks(run, model, x, dtype, use_triton)
            if not args.no_whole:
                whole += bench_whole(run, model, x, dtype, use_triton)
        del model, x
        if run.device == "cuda":
            torch.cuda.empty_cache()
    return blocks, whole


DEFINITIONS = {
    "bytes": "input read once (k x k blocks: each patch with its halo), output written "
             "once, the generator's signal slice, the generator rows the block uses",
    "flops": "weight generation 2*rows*signal_channels_per_group per patch + the "
             "convolutions (v1 expand over patch + halo); BN/activations not counted",
    "extra_memory_bytes": "peak allocated during the call above the level before it, "
                          "minus the bytes of its output",
    "peak_memory_bytes": "peak allocated during a forward above the level before it "
                         "(weights and input), output included",
    "speedup_vs_official": "official median / this variant's median",
}


def main(argv=None) -> int:
    args = parse_args(argv)                       # sets TRITON_INTERPRET for --interpret
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    import torch

    import hyperseg
    from bench_common import TOLERANCE, Run, interpreting, progress
    from bench_env import device_name, peak_bandwidth
    from bench_report import print_report
    from bench_targets import evaluate_targets
    from hyperseg.benchmark import versions
    from hyperseg.timing import MemoryMeter

    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    settings = plan(args, torch, hyperseg)
    device = settings["device"]
    # fp32 means fp32 (no tf32 in cuDNN, cuBLAS or the fused kernels) unless --tf32 says otherwise.
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    triton_ok = hyperseg.triton_available()
    notes = setting_notes(args, device, triton_ok, load_start, torch, interpreting)
    progress(f"device {device}; measuring peak bandwidth")
    run = Run(device=device, meter=MemoryMeter(device), repeats=settings["repeats"],
              warmup=settings["warmup"], peak_bw=peak_bandwidth(device), notes=notes,
              context={"device": device_name(device), "device_type": device,
                       "versions": versions(), "tf32": bool(args.tf32)})
    if not run.meter.works:
        notes.append("Extra-memory measurement failed its self-check on this torch build: "
                     "memory figures are left empty.")
    use_triton = triton_ok and (device == "cuda" or args.interpret)
    blocks, whole = measure(run, args, settings, use_triton)
    result = {
        "schema": "hyperseg-bench/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [os.path.basename(sys.argv[0])] + list(sys.argv[1:] if argv is None else argv),
        "settings": {"models": settings["names"], "size": list(args.size) if args.size else None,
                     "batch": args.batch, "dtypes": settings["dtypes"],
                     "repeats": run.repeats, "warmup": run.warmup, "quick": args.quick,
                     "interpret": interpreting(), "seed": args.seed,
                     "timer": "triton.testing.do_bench median" if device == "cuda"
                     else "time.perf_counter median, variants interleaved",
                     "memory_method": run.meter.method, "tf32": False,
                     "torch_threads": torch.get_num_threads(),
                     "load_average_1min": {"start": load_start,
                                           "end": os.getloadavg()[0] if load_start is not None else None},
                     "weights": "random init, BatchNorm statistics calibrated on the input"},
        "environment": run.context,
        "peak_bandwidth": dict(run.peak_bw, **run.context),
        "definitions": dict(DEFINITIONS, tolerance=TOLERANCE),
        "blocks": blocks,
        "whole_model": whole,
        "targets": evaluate_targets(run, blocks, whole),
        "notes": notes,
        "failures": run.failures,
    }
    print_report(result)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        progress(f"wrote {args.json}")
    progress("done")
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
