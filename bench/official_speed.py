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
and in channels_last format.
Rounds alternate the variants; the figures are medians. The official code imports ``ffmpeg``
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
import types

import torch

import hyperseg
from hyperseg import baseline
from hyperseg.benchmark import cpu_name
from hyperseg.calibration import calibrate_batchnorm
from hyperseg.official import official_names
from hyperseg.options import parse_size
from hyperseg.timing import time_cpu

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", required=True, help="a clone of YuvalNirkin/hyperseg")
    p.add_argument("--model", default="hyperseg-m-cityscapes", choices=sorted(CONFIGS))
    p.add_argument("--size", type=lambda t: parse_size(t, native=False), default=(512, 1024),
                   metavar="HxW")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--no-whole", action="store_true", help="blocks only")
    args = p.parse_args(argv)
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
          f"{os.cpu_count()} cores; medians of {args.rounds} alternating rounds")
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
            med = alternate(fns, max(3, args.rounds // 2))
            for key, ms in med.items():
                print(f"whole model, {key:26s} {ms:9.1f} ms  official / this {med['official model'] / ms:.3f}")
        print(f"load average at end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
