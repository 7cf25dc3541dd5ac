"""Timers and memory meters of the benchmarks (``hyperseg benchmark`` and ``bench/``).

* ``time_frames``: N synchronised frames after warm-up passes, latency percentiles, FPS and peak
  memory, as users measure a model;
* ``time_cpu``: several functions timed run by run in turn (``time.perf_counter``), so that the
  drifts of a shared machine hit them all alike; ``time_cuda``: ``triton.testing.do_bench``
  (its warm-up and L2 flush), else CUDA events (``time_cuda_events``);
* ``MemoryMeter``: the extra memory of a call (CUDA allocator peaks, or on CPU the allocation
  events ``torch.profiler`` records); ``StageClock``: the wall time of a model's stages inside one
  forward pass; ``peak_rss_bytes``: the process's peak resident set size.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

PERCENTILES = (50, 90, 99)
MIB = float(1 << 20)


def sync(device) -> None:
    """Wait for the device (a ``torch.device`` or its type name) to finish its work."""
    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # KiB on Linux


def time_frames(fn: Callable[[], object], device: torch.device, frames: int,
                warmup: int) -> dict:
    """Run ``fn`` ``warmup`` times, then ``frames`` timed times, synchronising the device around
    each: FPS, mean and percentile latencies, the first pass, and peak memory (CUDA:
    ``torch.cuda.max_memory_allocated``; CPU: the growth of the peak RSS from before the first
    pass, 0 when an earlier step already reached a higher peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = peak_rss_bytes()
    first = None
    for i in range(warmup):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i == 0:
            first = time.perf_counter() - t0
    latencies: List[float] = []
    for _ in range(frames):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        latencies.append(time.perf_counter() - t0)
    ms = np.array(latencies) * 1e3
    out = {"fps": frames / float(np.sum(latencies)), "mean_ms": float(ms.mean()),
           "first_pass_s": first, "frames": frames, "warmup": warmup}
    out.update({f"p{q}_ms": float(np.percentile(ms, q)) for q in PERCENTILES})
    if device.type == "cuda":
        out["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / MIB
        out["memory_measure"] = "torch.cuda.max_memory_allocated"
    else:
        out["peak_memory_mib"] = max(0, peak_rss_bytes() - rss_before) / MIB
        out["memory_measure"] = "peak RSS growth (ru_maxrss)"
    return out


def time_cpu(fns: Dict[str, Callable], repeats: int, warmup: int,
             after_run: Optional[Callable[[str], None]] = None) -> dict:
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


def time_cuda_events(fn: Callable, repeats: int) -> List[float]:
    """Milliseconds of ``repeats`` runs of ``fn`` between CUDA events, after one untimed run."""
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


def time_cuda(fns: Dict[str, Callable], repeats: int,
              log: Callable[[str], None] = print) -> dict:
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
            log(f"do_bench failed ({type(error).__name__}: {error}); timing with CUDA events")
            t = time_cuda_events(fn, max(10, repeats))
            out[key] = {"median_ms": statistics.median(t), "times_ms": t, "timer": "CUDA events"}
    return out


def storage_bytes(out) -> int:
    """Bytes of the storages of a tensor or a (nested) list / tuple of tensors."""
    if isinstance(out, (list, tuple)):
        return sum(storage_bytes(o) for o in out)
    if torch.is_tensor(out):
        return out.untyped_storage().nbytes()
    return 0


@contextlib.contextmanager
def quiet_stderr():
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
        with quiet_stderr():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                out = fn()
        deltas = self._deltas(prof)
        self.last_top_ops = self._top_ops(prof)
        deltas.sort(key=lambda d: d[0])
        level = top = 0
        for _, size in deltas:
            level += size
            top = max(top, level)
        return top, out

    def _deltas(self, prof) -> list:
        """(time, bytes) of every CPU allocation (+) and free (-) the profiler recorded."""
        if self.method == "event_tree":
            deltas = []
            stack = list(prof.profiler.kineto_results.experimental_event_tree())
            while stack:
                event = stack.pop()
                size = getattr(event.extra_fields, "alloc_size", None)
                if size is not None and getattr(event.extra_fields, "device", None) == torch.device("cpu"):
                    deltas.append((event.start_time_ns, size))
                stack.extend(event.children)
            return deltas
        # op granularity: each op's own net allocation, plus the stand-alone frees
        return [(e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                if e.self_cpu_memory_usage]

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
        return max(0, top - storage_bytes(out))


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
