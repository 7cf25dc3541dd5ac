"""The whole-model part of bench/profile_kernels.py: the model with each decoder (``triton``:
fused kernels, ``torch``: the reference, ``official``: ``hyperseg.baseline``'s official
decoder, with this package's backbone and context head), checked against the torch output,
timed with the time of each stage, and its peak and decoder memory measured."""
from __future__ import annotations

import statistics

from bench_common import autocast_for, interpreting, max_err, progress, tolerance, wrap
from hyperseg import baseline
from hyperseg.decoder import FUSED, REFERENCE
from hyperseg.timing import StageClock, sync, time_cpu

IMPLEMENTATION = {"triton": FUSED, "torch": REFERENCE}


def whole_functions(run, model, x, amp, backends, clock):
    """({key: function} to time, {backend: decoder-only function}): ``whole:<backend>`` for each
    backend; on CUDA also each stage on its own (timing inside a pass would need syncs)."""
    with amp():
        xp = baseline.pad_input(model, x)
        feats, head = model.backbone(xp)
        signal = model.context_head(head)
    inputs = [xp] + feats
    official = baseline.OfficialDecoder(model)

    def whole(backend):
        if backend == "official":
            return lambda: baseline.official_forward(model, x, clock, official)

        def forward():
            model.backend = backend
            return model(x)
        return forward

    def decoder(backend):
        if backend == "official":
            return lambda: official(inputs, signal)
        return lambda: model.decoder(inputs, signal, IMPLEMENTATION[backend])

    fns = {f"whole:{b}": wrap(amp, whole(b)) for b in backends}
    decoders = {b: wrap(amp, decoder(b)) for b in backends}
    if run.device == "cuda":
        fns.update({f"decoder:{b}": decoders[b] for b in backends})
        fns["backbone"] = wrap(amp, lambda: model.backbone(xp))
        fns["context_head"] = wrap(amp, lambda: model.context_head(head))
    return fns, decoders


def check_whole(run, fns, backends, dtype: str) -> dict:
    """{backend: (max |err| vs torch, bound)}; an fp32 excess is a failure, a half one a note:
    half-precision roundings compound level after level (the calibrated random BatchNorms amplify
    low-variance channels), so whole-model half outputs are reported, not asserted (every block
    is asserted on its own inputs)."""
    ref = fns["whole:torch"]()
    errors = {}
    for b in backends:
        out = fns[f"whole:{b}"]()
        sync(run.device)
        err, scale = max_err(out, ref)
        errors[b] = (err, tolerance(dtype) * scale)
        if err > tolerance(dtype) * scale:
            message = (f"{run.model} whole model {dtype}: {b} differs from torch: "
                       f"max |err| {err:.3e} > {tolerance(dtype) * scale:.3e}")
            if dtype == "fp32":
                run.fail(message)
            else:
                run.notes.append("Note: " + message + " (half precision, not asserted)")
                progress("note: " + message)
    return errors


def time_whole(run, fns, backends, clock, interp: bool) -> tuple:
    """(timings, {backend: {stage: ms}}): stage times from the forward hooks of the timed passes
    on CPU, from each stage timed alone on CUDA."""
    timed = {k: f for k, f in fns.items() if not (interp and k.endswith(":triton"))}
    stage_runs = {k: {n: [] for n in StageClock.STAGES} for k in fns}

    def collect(key):
        for n in StageClock.STAGES:
            stage_runs[key][n].append(clock.current[n])

    times = run.timer(timed, after_run=collect if clock is not None else None)
    if interp:          # one interpreted run each: proves it runs, times nothing useful
        times.update(time_cpu({k: f for k, f in fns.items() if k.endswith(":triton")}, 1, 0,
                              after_run=collect if clock is not None else None))
    if run.device == "cuda":
        stages = {b: {"backbone": times["backbone"]["median_ms"],
                      "context_head": times["context_head"]["median_ms"],
                      "decoder": times[f"decoder:{b}"]["median_ms"]} for b in backends}
    else:
        stages = {b: {n: statistics.median(v) for n, v in stage_runs[f"whole:{b}"].items()}
                  for b in backends}
    return times, stages


def bench_whole(run, model, x, dtype: str, use_triton: bool) -> list:
    """Records of the whole model with each decoder (see the module doc)."""
    amp = autocast_for(run.device, dtype)
    backends = (["triton"] if use_triton else []) + ["torch", "official"]
    model.backend = "torch"
    clock = StageClock(model) if run.device == "cpu" else None
    interp = use_triton and interpreting()
    try:
        fns, decoders = whole_functions(run, model, x, amp, backends, clock)
        errors = check_whole(run, fns, backends, dtype)
        progress(f"timing whole {run.model} {dtype} ({', '.join(backends)})")
        times, stages = time_whole(run, fns, backends, clock, interp)
    finally:
        if clock is not None:
            clock.remove()
    progress(f"memory whole {run.model} {dtype}")
    records = []
    for b in backends:
        if run.meter.method is None or (interp and b == "triton"):
            peak_bytes = dec_extra = None
        else:
            peak_bytes, out = run.meter.peak(fns[f"whole:{b}"])
            del out
            dec_extra = run.meter.extra(decoders[b])
        ms = times[f"whole:{b}"]["median_ms"]
        records.append(dict(
            run.context, dtype=dtype, precision="fp32" if dtype == "fp32" else f"{dtype} autocast",
            model=run.model, arch=model.config.arch, backend=b, batch=x.shape[0],
            image_size=list(x.shape[2:]), input_shape=list(x.shape), median_ms=ms,
            **{k: v for k, v in times[f"whole:{b}"].items() if k != "median_ms"},
            fps=x.shape[0] * 1e3 / ms,
            stages_ms=stages[b], stages_timer="forward hooks inside the timed passes"
            if run.device == "cpu" else "each stage timed on its own",
            peak_memory_bytes=peak_bytes, decoder_extra_memory_bytes=dec_extra,
            memory_method=run.meter.method, max_abs_err_vs_torch=errors[b][0],
            err_bound=errors[b][1], meaningful=not (b == "triton" and interpreting())))
    return records
