#!/usr/bin/env python
"""Time hyperseg/baseline.py (the official decoder written op for op, the baseline of every speed
claim) against the real official code, on CPU, block by block and for the whole model.

Needs a local clone of github.com/YuvalNirkin/hyperseg (never vendored, not used by tests or CI):

    git clone https://github.com/YuvalNirkin/hyperseg /tmp/official
    python bench/official_speed.py --official /tmp/official --threads 1,2

The official model (v1_0 architectures only: their level modules generate their own weights, as
``baseline.official_level`` does) is built from its training configuration with random weights,
and this package's model gets the same weights through ``hyperseg.official.official_names``.
Each level's official module and ``baseline.official_level`` run on the same input; then the whole
official model, our backbone and context head with the official decoder
(``baseline.official_forward``), and our model (torch backend, fp32, not compiled) in contiguous
and in channels_last format. ``--compile`` adds our model with torch.compile and channels_last
(the best CPU settings) to the same rounds: compiled afresh at each thread count (Inductor's CPU
kernels are specialised on the thread count), in a fresh temporary Inductor cache unless
``--inductor-cache DIR`` names one, so that the first pass, timed apart and printed, is a cold
compile (after the first thread count, kernels whose code is the same may come from that cache);
its logits are checked against the eager channels_last model's.
Rounds alternate the variants; the figures are medians. Every whole-model variant's logits are
compared with the official model's (max |err| printed). The official code imports ``ffmpeg``
(video I/O only): an empty ``ffmpeg.py`` on the path is enough.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import importlib
import os
import sys
import tempfile
import types

import torch

import hyperseg
from hyperseg import baseline
from hyperseg.benchmark import cpu_name
from hyperseg.calibration import calibrate_batchnorm
from hyperseg.official import official_names
from hyperseg.options import parse_size
from hyperseg.timing import time_cpu

# Allowed max |err| of the compiled model's logits against the eager ones, relative to
# max(1, max |eager logits|). Through the whole model fp32 rounding grows: measured against a
# float64 pass, hyperseg-m's eager fp32 logits (ours contiguous or channels_last, and the official
# model's) are off by up to 9e-5 relative at 512x1024 and 1.8e-3 at 64x128. The check catches a
# wrong compiled graph (errors of order one), not rounding.
COMPILE_TOLERANCE = 5e-3

CONFIGS = {"hyperseg-m-cityscapes": ("cityscapes_efficientnet_b1_hyperseg-m", 19),
           "hyperseg-s-camvid": ("camvid_efficientnet_b1_hyperseg-s", 12),
           "hyperseg-l-camvid": ("camvid_efficientnet_b1_hyperseg-l", 12)}


@contextlib.contextmanager
def official_package(root: str):
    """The official package as ``hyperseg`` in ``sys.modules`` (ours put back afterwards): it
    imports its own modules by that name, some of them inside functions."""
    sys.modules.setdefault("ffmpeg", types.ModuleType("ffmpeg"))
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == "hyperseg"}
    sys.path.insert(0, os.path.abspath(root))
    try:
        yield
    finally:
        sys.path.remove(os.path.abspath(root))
        for key in [k for k in sys.modules if k.split(".")[0] == "hyperseg"]:
            del sys.modules[key]
        sys.modules.update(ours)


def build_official(root: str, name: str) -> torch.nn.Module:
    """The official model of zoo ``name``, from the ``model = partial(...)`` line of its config."""
    config, num_classes = CONFIGS[name]
    tree = ast.parse(open(os.path.join(root, "configs", "train", config + ".py")).read())
    call = next(node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                and getattr(node.targets[0], "id", None) == "model")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg != "pretrained"}
    args = [ast.literal_eval(a) for a in call.args[1:]]
    with official_package(root):
        module = importlib.import_module("hyperseg.models.hyperseg_v1_0")
        return module.hyperseg_efficientnet(*args, pretrained=False, num_classes=num_classes,
                                            **kwargs)


def alternate(fns: dict, rounds: int) -> dict:
    """{key: median ms}: one run of each function per round, in turn, after one warm-up each."""
    return {key: t["median_ms"] for key, t in time_cpu(fns, rounds, warmup=1).items()}


def max_error(out: torch.Tensor, ref: torch.Tensor) -> tuple:
    """(max |out - ref|, that error relative to max(1, max |ref|))."""
    err = (out - ref).abs().max().item()
    return err, err / max(1.0, ref.abs().max().item())


def compiled_copy(model: torch.nn.Module, x: torch.Tensor) -> tuple:
    """(a torch.compile'd copy of ``model``, its first pass on ``x`` in seconds): the compile.
    Dynamo's caches are reset first, so that nothing compiled at another thread count is reused."""
    torch._dynamo.reset()
    compiled = copy.deepcopy(model)
    compiled.compile()
    first = time_cpu({"first pass": lambda: compiled(x)}, 1, warmup=0)["first pass"]["median_ms"]
    return compiled, first / 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", required=True, help="a clone of YuvalNirkin/hyperseg")
    p.add_argument("--model", default="hyperseg-m-cityscapes", choices=sorted(CONFIGS))
    p.add_argument("--size", type=lambda t: parse_size(t, native=False), default=(512, 1024),
                   metavar="HxW")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--no-whole", action="store_true", help="blocks only")
    p.add_argument("--compile", action="store_true",
                   help="also time our model with torch.compile + channels_last (whole model; "
                        "the first pass compiles, minutes on a CPU, timed apart)")
    p.add_argument("--inductor-cache", metavar="DIR",
                   help="with --compile: Inductor's cache (default: a fresh temporary directory, "
                        "so that the first pass is a cold compile)")
    args = p.parse_args(argv)
    if args.compile and args.no_whole:
        p.error("--compile times the whole model: it cannot go with --no-whole")
    if not os.path.isdir(os.path.join(args.official, "configs", "train")):
        p.error(f"--official {args.official}: not a clone of github.com/YuvalNirkin/hyperseg "
                "(no configs/train folder)")
    if args.compile:      # Inductor reads the variable at each use (importing timm sets a default)
        fresh = None if args.inductor_cache else tempfile.TemporaryDirectory(prefix="inductor-")
        cache = args.inductor_cache or fresh.name           # fresh: removed when the script ends
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    ours = hyperseg.build(args.model, backend="torch", channels_last=False).eval()
    x = torch.randn(1, 3, *args.size)
    calibrate_batchnorm(ours, x)
    official = build_official(args.official, args.model).eval()
    names = official_names(ours)
    missing, unexpected = official.load_state_dict(
        {names[k]: v for k, v in ours.state_dict().items()}, strict=False)
    assert not unexpected and all(".coord" in k for k in missing), (missing, unexpected)
    inputs, signal = baseline.decoder_inputs(ours, x)
    levels = list(ours.decoder.levels(inputs, signal))
    decoder = baseline.OfficialDecoder(ours)
    fast = copy.deepcopy(ours)
    fast.channels_last = True                     # hyperseg.build's default
    print(f"{args.model} {args.size[0]}x{args.size[1]} fp32 CPU: {cpu_name()}, "
          f"{os.cpu_count()} cores; medians of {args.rounds} alternating rounds "
          f"({max(3, args.rounds // 2)} for the whole model); torch {torch.__version__}")
    if args.compile:
        print(f"torch.compile: Inductor cache {cache}")
    failed = False
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        print(f"\n{threads} thread(s), load average at start {os.getloadavg()}")
        print(f"{'level':34s} {'official ms':>11s} {'baseline ms':>11s} {'ratio':>6s} {'max err':>8s}")
        total = [0.0, 0.0]
        for lv in levels:
            module = getattr(official.decoder, f"level_{lv.index}")
            fns = {"official": lambda m=module, lv=lv: m(lv.input, signal),
                   "baseline": lambda lv=lv: baseline.official_level(lv)}
            err = (fns["official"]() - fns["baseline"]()).abs().max().item()
            med = alternate(fns, args.rounds)
            total = [total[0] + med["official"], total[1] + med["baseline"]]
            label = (f"L{lv.index} {type(lv.block).__name__} {lv.input.shape[1]}->"
                     f"{lv.block.out_channels} @{lv.input.shape[2]}x{lv.input.shape[3]}")
            print(f"{label:34s} {med['official']:11.2f} {med['baseline']:11.2f} "
                  f"{med['baseline'] / med['official']:6.3f} {err:8.1e}")
        print(f"{'sum of blocks':34s} {total[0]:11.2f} {total[1]:11.2f} {total[1] / total[0]:6.3f}")
        if not args.no_whole:
            fns = {"official model": lambda: official(x),
                   "ours + baseline decoder": lambda: baseline.official_forward(ours, x, None, decoder),
                   "ours, contiguous": lambda: ours(x),
                   "ours, channels_last": lambda: fast(x)}
            if args.compile:
                print(f"load average before compiling {os.getloadavg()}", flush=True)
                compiled, first_s = compiled_copy(fast, x)
                err, rel = max_error(compiled(x), fast(x))
                ok = rel <= COMPILE_TOLERANCE
                failed |= not ok
                print(f"torch.compile + channels_last: first pass (compile) {first_s:.1f} s; "
                      f"logits vs eager channels_last: max |err| {err:.1e}, relative {rel:.1e} "
                      f"({'within' if ok else 'OVER'} {COMPILE_TOLERANCE:.0e})", flush=True)
                fns["ours, compiled + channels_last"] = lambda: compiled(x)
            reference = fns["official model"]()
            errors = {key: max_error(fn(), reference) for key, fn in fns.items()}
            med = alternate(fns, max(3, args.rounds // 2))
            for key, ms in med.items():
                print(f"whole model, {key:32s} {ms:9.1f} ms  official / this "
                      f"{med['official model'] / ms:.3f}  max err vs official {errors[key][0]:.1e} "
                      f"(relative {errors[key][1]:.1e})")
        print(f"load average at end {os.getloadavg()}", flush=True)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
