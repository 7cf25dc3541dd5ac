"""The per-block part of bench/profile_kernels.py: every decoder level of a model, on the inputs
the model gives it, run as the fused Triton kernel (``triton``), this package's PyTorch
reference (``torch``) and the official algorithm (``official``, ``hyperseg.baseline``); each
checked against the reference, its extra memory measured, timed, and costed (bytes that must
move, useful FLOPs, the roofline floor on a GPU)."""
from __future__ import annotations

import os
import sys

import torch

from bench_common import VARIANTS, autocast_for, interpreting, max_err, progress, tolerance, wrap
from hyperseg import baseline
from hyperseg.decoder import FUSED, REFERENCE, MetaInvertedResidual
from hyperseg.timing import sync, time_cpu


def block_label(block) -> str:
    if isinstance(block, MetaInvertedResidual):
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
    spg = generator.weight.shape[1]
    elt = x.element_size()
    detail = {
        "input": n * cin * (ph + 2 * halo) * (pw + 2 * halo) * elt,
        "output": b * block.out_channels * h * w * elt,
        "signal": b * generator.signal_channels * gh * gw * signal.element_size(),
        "generator": block.num_params * spg * generator.weight.element_size(),
    }
    flops = {"weight_generation": 2 * block.num_params * spg * n}
    if isinstance(block, MetaInvertedResidual):
        hid = block.hidden
        expand_pixels = n * (ph + 2 * halo) * (pw + 2 * halo) if block.version == "v1" else b * h * w
        flops["expand"] = 2 * hid * cin * expand_pixels
        flops["depthwise"] = 2 * hid * k * k * b * h * w
        flops["project"] = 2 * block.out_channels * hid * b * h * w
    else:
        flops["conv"] = 2 * block.out_channels * (cin // block.groups) * b * h * w
    return {"bytes": sum(detail.values()), "bytes_detail": detail,
            "flops": sum(flops.values()), "flops_detail": flops, "grid": [gh, gw], "patch": [ph, pw]}


def predicted_floors(run, model, x, dtype: str) -> dict:
    """{level: floor in µs} from bench/kernel_roofline.py: the roofline floor of each block on the
    GPU in use (an H200's figures on an H200, else an H100's), at the peak the kernels run at
    (tensor cores for fp16 / bf16; for fp32 tf32 tensor cores when
    ``torch.backends.cudnn.allow_tf32`` is on, else FFMA). None on a CPU."""
    if run.device != "cuda":
        return {}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from kernel_roofline import block_floors
    gpu = "h200" if "H200" in torch.cuda.get_device_name() else "h100"
    peak = None
    if dtype == "fp32":
        peak = "tf32_tensor" if torch.backends.cudnn.allow_tf32 else "fp32_fma"
    return block_floors(model, tuple(x.shape[2:]), x.shape[0], dtype, gpu=gpu, peak=peak)


def level_functions(level, amp, use_triton: bool) -> dict:
    """{variant: function} running one ``DecoderLevel`` three ways, under ``amp``."""
    fns = {}
    if use_triton:
        fns["triton"] = wrap(amp, lambda: level.run(FUSED))
    fns["torch"] = wrap(amp, lambda: level.run(REFERENCE))
    fns["official"] = wrap(amp, lambda: baseline.official_level(level))
    return fns


def check_variants(run, fns: dict, ref, dtype: str, label: str) -> dict:
    """{variant: (max |err|, bound, ok)} of each function's output against the reference."""
    checked = {}
    for variant, fn in fns.items():
        out = fn()
        sync(run.device)
        err, scale = max_err(out, ref)
        bound = tolerance(dtype) * scale
        ok = bool(err <= bound) and tuple(out.shape) == tuple(ref.shape)
        checked[variant] = (err, bound, ok)
        if not ok:
            run.fail(f"{label}: {variant} differs from the torch reference: "
                     f"max |err| {err:.3e} > {bound:.3e}")
        del out
    return checked


def measure_variants(run, good: dict, label: str):
    """(extra memory, top ops, timings) of the functions that passed the check. Interpreted
    kernels run once (proof that they run) and get no memory figure (the interpreter's work
    happens in numpy, outside the torch allocator)."""
    interp_triton = "triton" in good and interpreting()
    extra, top_ops = {}, {}
    for v, fn in good.items():
        if not (v == "triton" and interp_triton):
            run.meter.last_top_ops = None
            extra[v] = run.meter.extra(fn)
            top_ops[v] = run.meter.last_top_ops
    progress(f"timing {label}")
    times = run.timer({v: fn for v, fn in good.items() if not (v == "triton" and interp_triton)})
    if interp_triton:
        times.update(time_cpu({"triton": good["triton"]}, 1, 0))
    return extra, top_ops, times


def block_record(run, model, x, dtype, level, variant, checked, cost, measured, floors) -> dict:
    """One JSON record: a variant of one level, with its cost, error, time and memory."""
    extra, top_ops, times = measured
    err, bound, ok = checked[variant]
    xl, ref, block = level.input, level.output, level.block
    rec = dict(run.context, dtype=dtype, model=run.model, arch=model.config.arch,
               image_size=list(x.shape[2:]), batch=x.shape[0], level=level.index,
               block=block_label(block), block_class=type(block).__name__,
               variant=variant, input_shape=list(xl.shape), output_shape=list(ref.shape),
               signal_shape=list(level.signal.shape), grid=cost["grid"], patch=cost["patch"],
               bytes=cost["bytes"], bytes_detail=cost["bytes_detail"],
               flops=cost["flops"], flops_detail=cost["flops_detail"],
               max_abs_err=err, ref_scale=bound / tolerance(dtype), err_bound=bound,
               correct=ok, meaningful=not (variant == "triton" and interpreting()))
    floor = floors.get(level.index)
    if floor is not None:
        rec["floor_us"] = floor
    if variant in times:
        med = times[variant]["median_ms"]
        if floor is not None and rec["meaningful"]:
            rec["x_floor"] = med * 1e3 / floor
        gbs = cost["bytes"] / (med * 1e-3) / 1e9
        rec.update(times[variant], gb_s=gbs, peak_bw_gb_s=run.peak_bw["gb_s"],
                   pct_peak_bw=100.0 * gbs / run.peak_bw["gb_s"],
                   tflop_s=cost["flops"] / (med * 1e-3) / 1e12,
                   extra_memory_bytes=extra.get(variant),
                   memory_method=run.meter.method if extra.get(variant) is not None else None)
        if top_ops.get(variant):
            rec["top_ops_self_cpu_pct"] = top_ops[variant]
    return rec


def bench_blocks(run, model, x, dtype: str, use_triton: bool) -> list:
    """Records of every level of ``model`` on ``x``, three variants each (see the module doc)."""
    amp = autocast_for(run.device, dtype)
    floors = predicted_floors(run, model, x, dtype)
    with amp():
        inputs, signal = baseline.decoder_inputs(model, x)
        levels = list(model.decoder.levels(inputs, signal, implementation=REFERENCE))
    del inputs
    records = []
    for level in levels:
        block, xl = level.block, level.input
        fns = level_functions(level, amp, use_triton)
        cost = block_cost(block, xl, signal, level.generator)
        label = (f"{run.model} L{level.index} {block_label(block)} {xl.shape[1]}->"
                 f"{block.out_channels} @{xl.shape[2]}x{xl.shape[3]} {dtype}")
        checked = check_variants(run, fns, level.output, dtype, label)
        measured = measure_variants(run, {v: f for v, f in fns.items() if checked[v][2]}, label)
        mine = [block_record(run, model, x, dtype, level, v, checked, cost, measured, floors)
                for v in VARIANTS if v in fns]
        base = next(r for r in mine if r["variant"] == "official")
        for rec in mine:
            if rec.get("median_ms") and base.get("median_ms") and rec["meaningful"]:
                rec["speedup_vs_official"] = base["median_ms"] / rec["median_ms"]
        records += mine
    return records
