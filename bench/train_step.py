"""Time one training step (forward, loss, backward) of a zoo model with backend "torch" and
backend "triton" in the same run, and check that both give the same gradients first.

Also per decoder block: forward + backward time of each backend beside the block's static floor
(three times the inference roofline floor of bench/kernel_roofline.py: the forward, the input
gradient and the weight gradient each move and compute about what the forward does), and the
memory the decoder keeps for the backward pass (bytes of the distinct tensors autograd saves
during the decoder's forward, measured with torch.autograd.graph.saved_tensors_hooks: exact on
any device, CPU included), and the peak memory of a whole step: CUDA's peak allocation on a GPU,
the replayed allocation events of torch.profiler on CPU.

    python bench/train_step.py                              # hyperseg-m, 512x1024, batch 2, CUDA
    python bench/train_step.py --amp fp16 --json step.json
    python bench/train_step.py --quick --interpret          # CPU, Triton interpreter: checks only

On CPU the triton backend runs only through the Triton interpreter (--interpret), whose timings
mean nothing; there the script is a correctness check. Performance figures come from a GPU run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hyperseg-m-cityscapes", help="zoo model name")
    p.add_argument("--size", default=None, metavar="HxW", help="input size (default 512x1024; --quick 64x64)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 2)")
    p.add_argument("--amp", choices=("off", "fp16", "bf16"), default="off", help="autocast dtype")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default 10; --quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --quick 0)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--quick", action="store_true", help="64x64, one step: a smoke run")
    p.add_argument("--interpret", action="store_true",
                   help="run the Triton kernels through the interpreter (CPU)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures to this JSON file")
    args = p.parse_args(argv)
    quick = args.quick
    args.size = tuple(int(v) for v in (args.size or ("64x64" if quick else "512x1024")).split("x"))
    args.batch = args.batch or 2
    args.repeats = args.repeats or (1 if quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (0 if quick else 3)
    return args


def _gpu_key(device_name: str) -> str:
    return "h200" if "H200" in device_name else "h100"


class SavedBytes:
    """Bytes of the distinct tensor storages autograd saves for backward inside ``module``'s
    forward (a context manager around one step)."""

    def __init__(self, module):
        import torch
        self.module, self.torch, self.storages = module, torch, {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        storage = t.untyped_storage()
        self.storages[(storage.data_ptr(), t.device)] = storage.nbytes()
        return t

    def __enter__(self):
        self.handles = [self.module.register_forward_pre_hook(lambda *a: self.hooks.__enter__()),
                        self.module.register_forward_hook(lambda *a: self.hooks.__exit__(None, None, None))]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    @property
    def mib(self) -> float:
        return sum(self.storages.values()) / 2 ** 20


def level_inputs(model, x):
    """(signal, [input of each decoder level]) of ``model`` on ``x``, without autograd."""
    import torch
    with torch.no_grad():
        feats, head = model.backbone(x)
        signal = model.context_head(head)
        per_level = [level.input for level in model.decoder.levels([x] + feats, signal)]
    return signal, per_level


def time_blocks(nets, x, args, device, autocast_dtype, sync):
    """{level: {backend: median forward+backward ms}} of every decoder block."""
    import torch
    from hyperseg.decoder import AUTOGRAD_KERNELS, REFERENCE
    signal, per_level = level_inputs(nets["torch"], x)
    times = {}
    for level in range(len(per_level)):
        times[level] = {}
        for name, net in nets.items():
            decoder = net.decoder
            xin = per_level[level].detach().requires_grad_()
            sig = signal.detach().requires_grad_()

            def run():
                with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    y = decoder.run_level(level, xin, sig,
                                          REFERENCE if name == "torch" else AUTOGRAD_KERNELS)
                y.float().square().mean().backward()
            samples = []
            for i in range(args.warmup + args.repeats):
                sync()
                begin = time.perf_counter()
                run()
                sync()
                if i >= args.warmup:
                    samples.append(1e3 * (time.perf_counter() - begin))
            times[level][name] = statistics.median(samples)
    return times


def report_blocks(models, x, args, device, autocast_dtype, sync, results) -> None:
    """Per-block forward+backward times beside the static floor, into ``results``."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from kernel_roofline import block_floors
    dtype = {"off": "fp32"}.get(args.amp, args.amp)
    gpu = _gpu_key(results["device"])
    floors = block_floors(models["torch"], args.size, args.batch, dtype, gpu)
    times = time_blocks(models, x, args, device, autocast_dtype, sync)
    results["blocks"] = []
    print(f"  per block, forward + backward (floor: 3x the inference roofline on {gpu}, {dtype}):")
    for level, per_backend in times.items():
        row = dict(level=level, floor_us=3 * floors[level],
                   **{f"{name}_ms": ms for name, ms in per_backend.items()})
        results["blocks"].append(row)
        print(f"    L{level}: torch {per_backend['torch']:.2f} ms, triton {per_backend['triton']:.2f} ms, "
              f"floor {row['floor_us']:.1f} us")


def gradient_errors(reference, other) -> dict:
    """{decoder parameter: largest difference between the two models' gradients}, relative to
    the reference gradient's largest value, or to 1e-3 of the reference decoder's largest
    gradient for gradients that are (nearly) zero and hold rounding noise only."""
    pairs = [(name, p.grad.double(), q.grad.double()) for (name, p), q in
             zip(reference.decoder.named_parameters(), other.decoder.parameters())]
    largest = max(r.abs().max().item() for _, r, _ in pairs)
    return {name: (g - r).abs().max().item() / max(r.abs().max().item(), 1e-3 * largest)
            for name, r, g in pairs}


def gradient_check(errors: dict, noise, tolerance: float):
    """(passed, worst excess): each triton-vs-torch error within the tolerance, or within 3x the
    reference's own rounding error (``noise``: torch at the step's precision against torch in
    float64), where the gradient is dominated by rounding: an untrained model's small
    gradients cancel, and there two correct float32 implementations differ by percents."""
    excess = {name: err / max(tolerance, 3 * (noise or {}).get(name, 0.0))
              for name, err in errors.items()}
    worst = max(excess.values())
    return worst <= 1.0, worst


@contextlib.contextmanager
def interpreter_cycles_collected():
    """Within: each launch through the Triton interpreter is followed by a garbage collection.
    The interpreter's argument-copy closures (``GridExecutor._init_args_hst``'s ``_to_cpu``, which
    calls itself) form a reference cycle per launch that keeps the arguments' storage alive until
    Python's cyclic collector runs, memory a GPU launch does not hold (at 64x64 it left 0.17 MiB
    alive after a step, and set the triton step's peak). Nothing changes outside the
    interpreter."""
    try:
        from triton.runtime.interpreter import GridExecutor
    except ImportError:
        yield
        return
    original = GridExecutor.__call__

    def call(self, *args, **kwargs):
        try:
            return original(self, *args, **kwargs)
        finally:
            gc.collect()

    GridExecutor.__call__ = call
    try:
        yield
    finally:
        GridExecutor.__call__ = original


def step_peaks(models, step):
    """{backend: peak MiB of one training step on CPU above the level before it}, from the
    allocation events ``hyperseg.timing.MemoryMeter`` replays (None when that meter does not
    work with this torch). The Triton interpreter's own numpy temporaries are not torch
    allocations and are not counted: on a GPU a kernel allocates nothing but its outputs."""
    from hyperseg.timing import MemoryMeter
    meter = MemoryMeter("cpu")
    if not meter.works:
        return None
    peaks = {}
    for name, net in models.items():
        step(net)
        # the previous step's gradients are freed before the measured step, so that every free
        # the meter replays is of memory allocated within the step (frees of older memory are
        # replayed with or without their size, depending on the allocation's history)
        net.zero_grad(set_to_none=True)
        gc.collect()
        with interpreter_cycles_collected():
            peaks[name] = meter.peak(lambda: step(net))[0] / 2 ** 20
    return peaks


def time_steps(models, step, args, device, sync, results) -> None:
    """Median time (and on CUDA the peak memory) of a whole training step per backend."""
    import torch
    for name, net in models.items():
        for _ in range(args.warmup):
            step(net)
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            step(net)
            sync()
            times.append(time.perf_counter() - start)
        entry = {"median_ms": 1e3 * statistics.median(times), "times_ms": [1e3 * t for t in times]}
        if device == "cuda":
            entry["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
        results["backends"][name] = entry
        memory = f", peak {entry['peak_memory_mib']:.0f} MiB" if "peak_memory_mib" in entry else ""
        print(f"  {name:6s} train step median {entry['median_ms']:.1f} ms{memory}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"          # before anything imports triton
    import torch
    import torch.nn.functional as F

    import hyperseg

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not args.interpret:
        print("the triton backend needs CUDA or --interpret on CPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = hyperseg.build(args.model, backend="torch").to(device).train()
    x = torch.randn(args.batch, 3, *args.size, device=device)
    target = torch.randint(0, model.num_classes, (args.batch, *args.size), device=device)
    autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.amp)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step(net):
        net.zero_grad(set_to_none=True)
        torch.manual_seed(1)                          # the same drop-path draws for both backends
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = F.cross_entropy(net(x), target, ignore_index=255)
        loss.backward()
        return loss

    def exact_step(net):
        net.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        F.cross_entropy(net(x.double()), target, ignore_index=255).backward()

    models = {"torch": model, "triton": copy.deepcopy(model)}
    models["triton"].backend = "triton"
    # the same gradients first (decoder generators: the parameters the kernels differentiate),
    # and the memory each decoder keeps for the backward pass
    saved = {}
    for name, net in models.items():
        with SavedBytes(net.decoder) as meter:
            step(net)
        saved[name] = meter.mib
    errors = gradient_errors(models["torch"], models["triton"])
    worst = max(errors.values())
    tolerance = 1e-3 if autocast_dtype is None else 1e-1
    noise = None
    if worst > tolerance:
        # how far the reference itself is from float64 there (only paid for when needed)
        exact = copy.deepcopy(models["torch"]).double()
        exact_step(exact)
        noise = gradient_errors(exact, models["torch"])
    passed, excess = gradient_check(errors, noise, tolerance)
    results = {"model": args.model, "size": list(args.size), "batch": args.batch, "amp": args.amp,
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "worst_decoder_grad_rel_err": worst, "backends": {}}
    print(f"{args.model} {args.size[0]}x{args.size[1]} batch {args.batch} amp {args.amp} on {results['device']}")
    results["decoder_grad_check_passed"] = passed
    line = f"decoder gradients, triton vs torch: worst relative error {worst:.2e} (tolerance {tolerance:g}"
    if noise is not None:
        results["reference_grad_rounding"] = max(noise.values())
        line += (f", or 3x the reference's own error against float64, up to {max(noise.values()):.2e}"
                 f" here: {'within' if passed else 'NOT within'} it")
    print(line + ")")
    results["decoder_saved_mib"] = saved
    print("decoder memory kept for backward: " + ", ".join(f"{k} {v:.1f} MiB" for k, v in saved.items()))
    if device == "cpu":
        # the peak of one whole step above the memory held before it; the backends share all but
        # the decoder, so the difference is the decoder's
        peaks = step_peaks(models, step)
        if peaks is not None:
            results["step_peak_mib"] = peaks
            print("peak of one training step (torch.profiler allocations): "
                  + ", ".join(f"{k} {v:.1f} MiB" for k, v in peaks.items()))
    report_blocks(models, x, args, device, autocast_dtype, sync, results)

    time_steps(models, step, args, device, sync, results)
    ratio = results["backends"]["torch"]["median_ms"] / results["backends"]["triton"]["median_ms"]
    results["triton_speedup"] = ratio
    print(f"  triton vs torch: {ratio:.2f}x" + ("  (interpreter: not a performance figure)"
                                               if device == "cpu" else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
