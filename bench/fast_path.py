#!/usr/bin/env python
"""What channels_last and torch.compile give for the whole model, side by side in one run.

Every variant is a copy of one model (same weights, BatchNorm statistics calibrated on the input
so that a random model computes order-one activations); the timed passes go round robin over
the variants, so a busy machine slows them alike. Medians and ratios to the eager,
contiguous-format model are printed (and written with --json).

    python bench/fast_path.py                          # hyperseg-m-cityscapes at 512x1024, CPU
    python bench/fast_path.py --size 128x256 --repeats 3 --no-compile
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time


def _size(text: str):
    """``hyperseg.options.parse_size`` ("HxW") with argparse's error type."""
    from hyperseg.options import parse_size
    try:
        return parse_size(text, native=False)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="hyperseg-m")
    p.add_argument("--size", type=_size, default=(512, 1024), metavar="HxW")
    p.add_argument("--repeats", type=int, default=7, help="timed passes per variant (default 7)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--json", metavar="FILE")
    return p.parse_args(argv)


def variants(model, with_compile: bool) -> dict:
    from hyperseg import baseline

    out = {}
    eager = copy.deepcopy(model)
    eager.channels_last = False
    out["eager"] = eager
    out["channels_last"] = copy.deepcopy(model)
    out["channels_last"].channels_last = True
    official = baseline.OfficialDecoder(eager)
    # our backbone and context head with the official decoder (hyperseg.baseline); the real
    # official model's whole-model time is measured by bench/official_speed.py
    out["official decoder"] = lambda x: baseline.official_forward(eager, x, decoder=official)
    if with_compile:
        for name, last in (("compile", False), ("compile+channels_last", True)):
            m = copy.deepcopy(model)
            m.channels_last = last
            m.compile()
            out[name] = m
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import hyperseg
    from hyperseg.calibration import calibrate_batchnorm
    from hyperseg.timing import time_cpu

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = hyperseg.build(args.model, backend="torch", channels_last=False)
    x = torch.randn(1, 3, *args.size)
    calibrate_batchnorm(model, x)
    fns = variants(model, not args.no_compile)
    first = {}
    with torch.inference_mode():
        for name, fn in fns.items():           # warm-up; the first pass compiles
            t0 = time.perf_counter()
            fn(x)
            first[name] = time.perf_counter() - t0
            fn(x)
            print(f"{name}: first pass {first[name]:.1f} s", file=sys.stderr, flush=True)
        reference = fns["eager"](x)
        errors = {name: ((fn(x) - reference).abs().max() / reference.abs().max()).item()
                  for name, fn in fns.items()}
        timed = time_cpu({name: (lambda fn=fn: fn(x)) for name, fn in fns.items()},
                         args.repeats, 0)                  # round robin over the variants
    times = {name: [t / 1e3 for t in timed[name]["times_ms"]] for name in fns}
    base = statistics.median(times["eager"])
    result = {"model": model.config.name, "size": list(args.size), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "repeats": args.repeats, "variants": {}}
    print(f"{model.config.name} {args.size[0]}x{args.size[1]}, fp32, batch 1, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}")
    print(f"{'variant':24s} {'median ms':>10s} {'speed-up':>9s} {'first pass s':>13s} {'max rel err':>12s}")
    for name, samples in times.items():
        median = statistics.median(samples)
        result["variants"][name] = {"median_ms": median * 1e3, "samples_ms": [t * 1e3 for t in samples],
                                    "speedup_vs_eager": base / median, "first_pass_s": first[name],
                                    "max_rel_err": errors[name]}
        print(f"{name:24s} {median * 1e3:10.1f} {base / median:8.2f}x {first[name]:13.1f} "
              f"{errors[name]:12.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
