"""The text report of bench/profile_kernels.py: environment, per-block table, whole-model table,
targets with their causes, correctness failures."""
from __future__ import annotations

import textwrap

from bench_common import MIB


def _f(value, spec: str, empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def _print_header(result: dict) -> None:
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


def _print_blocks(blocks: list) -> None:
    current = None
    for r in blocks:
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


def _print_whole(whole: list) -> None:
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


def _print_targets(targets: list) -> None:
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


def print_report(result: dict) -> None:
    _print_header(result)
    _print_blocks(result["blocks"])
    if result["whole_model"]:
        _print_whole(result["whole_model"])
    if result["targets"]:
        _print_targets(result["targets"])
    if result["failures"]:
        print()
        for failure in result["failures"]:
            print(f"CORRECTNESS FAILURE: {failure}")
