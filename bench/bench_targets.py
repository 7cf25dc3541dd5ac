"""The project's speed targets, rated on the figures of one bench/profile_kernels.py run: on a
GPU each fused block against the official algorithm and the peak bandwidth, and the whole model
triton vs torch; on a CPU the torch decoder against the official one (time and extra memory).
A missed target carries its likely cause."""
from __future__ import annotations

import math

from bench_common import MIB


def target(run, name, value, threshold, op, cause_fn, **scope) -> dict:
    if value is None:
        status = "not measured"
    elif op == ">=":
        status = "met" if value >= threshold else "missed"
    else:
        status = "met" if value <= threshold else "missed"
    rec = dict(run.context, target=name, measured=value, threshold=threshold, comparison=op,
               status=status, **scope)
    if status == "missed":
        rec["cause"] = cause_fn()
    return rec


def spread(rec) -> float:
    """(max - min) / median of a record's runs, in %; from the 20-80% quantiles on CUDA."""
    if "times_ms" in rec:
        lo, hi = min(rec["times_ms"]), max(rec["times_ms"])
    else:
        lo, hi = rec["quantiles_ms"]["p20"], rec["quantiles_ms"]["p80"]
    return 100.0 * (hi - lo) / rec["median_ms"] if rec["median_ms"] else 0.0


def _fused_vs_official(run, by, scope) -> list:
    out = []
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
        out.append(target(run, f"L{level} fused >= 10x official", ratio, 10.0, ">=", cause,
                          level=level, **scope))
    return out


def _fused_bandwidth(run, by, scope) -> list:
    out = []
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
        out.append(target(run, f"L{level} fused >= 50% of peak BW", pct, 50.0, ">=", cause,
                          level=level, **scope))
    return out


def _whole_triton(run, wh, scope) -> dict:
    tri, tor = wh.get("triton"), wh.get("torch")
    ratio = tor["median_ms"] / tri["median_ms"] if tri and tor else None

    def cause():
        rest = tri["stages_ms"]["backbone"] + tri["stages_ms"]["context_head"]
        bound = tor["median_ms"] / max(rest, 1e-9)
        return (f"backbone + context head {rest:.2f} ms = "
                f"{100 * rest / tri['median_ms']:.0f}% of the triton total; decoder "
                f"torch {tor['stages_ms']['decoder']:.2f} ms vs triton "
                f"{tri['stages_ms']['decoder']:.2f} ms; even a free decoder gives "
                f"{bound:.2f}x")
    return target(run, "whole triton >= 2x torch", ratio, 2.0, ">=", cause,
                  set_for="hyperseg-m-cityscapes 512x1024 (ratio reported for every model)",
                  **scope)


def _decoder_blocks_cpu(run, by, scope) -> dict:
    complete = all(by[lv].get(v, {}).get("median_ms") for lv in by for v in ("torch", "official"))
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
    return target(run, "decoder torch >= 1.5x official (sum of blocks)", ratio, 1.5, ">=",
                  cause, **scope)


def _whole_cpu(run, wh, by, scope) -> list:
    tor, off = wh["torch"], wh["official"]

    def cause_time():
        return (f"decoder torch {tor['stages_ms']['decoder']:.1f} ms vs official "
                f"{off['stages_ms']['decoder']:.1f} ms; shared backbone "
                f"{tor['stages_ms']['backbone']:.1f} ms (run-to-run noise {spread(tor):.0f}%)")
    te, oe = tor["decoder_extra_memory_bytes"], off["decoder_extra_memory_bytes"]
    ratio = te / oe if te is not None and oe else None

    def cause_memory():
        top = max(by, key=lambda lv: by[lv]["torch"].get("extra_memory_bytes") or 0)
        return (f"torch decoder {te / MIB:.1f} MiB vs official {oe / MIB:.1f} MiB; "
                f"largest torch block extra at L{top}: "
                f"{(by[top]['torch'].get('extra_memory_bytes') or 0) / MIB:.1f} MiB vs "
                f"{(by[top]['official'].get('extra_memory_bytes') or 0) / MIB:.1f} MiB")
    return [target(run, "whole torch no slower than official decoder",
                   off["median_ms"] / tor["median_ms"], 1.0, ">=", cause_time, **scope),
            target(run, "decoder extra memory torch <= 0.5x official", ratio, 0.5, "<=",
                   cause_memory, **scope)]


def evaluate_targets(run, blocks: list, whole: list) -> list:
    """Every target for each (model, dtype, size, batch) measured, in the order measured."""
    keys = []
    for r in blocks + whole:
        key = (r["model"], r["dtype"], tuple(r["image_size"]), r["batch"])
        if key not in keys:
            keys.append(key)
    targets = []
    for key in keys:
        model, dtype, size, batch = key
        scope = dict(model=model, dtype=dtype, image_size=list(size), batch=batch)

        def same(r):
            return (r["model"], r["dtype"], tuple(r["image_size"]), r["batch"]) == key
        bl = [r for r in blocks if same(r)]
        wh = {r["backend"]: r for r in whole if r["meaningful"] and same(r)}
        by = {}
        for r in bl:
            if r["meaningful"]:     # interpreted kernels are checked, never rated
                by.setdefault(r["level"], {})[r["variant"]] = r
        if run.device == "cuda":
            targets += _fused_vs_official(run, by, scope) + _fused_bandwidth(run, by, scope)
            if dtype in ("fp32", "fp16"):
                targets.append(_whole_triton(run, wh, scope))
        else:
            if bl:
                targets.append(_decoder_blocks_cpu(run, by, scope))
            if "torch" in wh and "official" in wh:
                targets += _whole_cpu(run, wh, by, scope)
    return targets
