"""64-bit indexing: kernels on tensors of more than 2**31 elements (issue 17).

Each case runs a kernel on a tensor of more than 2**31 elements and compares its output (its
gradients, for the backward) on the last patch row, which lies beyond the 32-bit offsets, with the
reference computed on a crop of the last patch rows only (the reference on the whole tensor would
need several times its memory). Patches are independent but for the halo of 3x3 taps, so the
inverted residual's crop holds one more patch row above the compared one, whose halo then comes
from real pixels as in the whole image. Three settings:

* on a GPU with >= 60 GiB the in-process tests run the large case (float16);
* elsewhere they run the same comparison on a small image, so that the logic is exercised
  everywhere (CI);
* ``HYPERSEG_LARGE_INDEX=1 pytest -m slow -s -n 0 tests/test_kernel_large_index.py`` runs the
  large case on CPU through the Triton interpreter, one subprocess per op (``-k OP`` for one op;
  2 to 7 minutes per op, 16 minutes in all on 2 busy CPU cores, at most 6.4 GiB resident; figures in
  README.md, *Reliability*).

The CPU geometries (``CPU_LARGE``) make the large tensor's channel index times H * W, the product
the kernels compute in 64 bits, exceed 2**31 by itself in its last channels: the interpreter, like
a GPU, computes int32 arithmetic with wrap-around, so dropping one ``.to(tl.int64)`` there gives a
wrong offset (tested: each op then reads or writes unmapped memory and its subprocess crashes).
Among such geometries they take the fewest interpreted programs and loop trips, with tiles as large
as the launchers allow: the interpreter's cost is mostly a fixed price per interpreted operation
(tens of microseconds), so large tiles and few loop trips make it fast. The large tensor is made
with ``torch.empty`` and only its compared rows are written: pages never written take no memory on
Linux and reading them maps the zero page, so an 8 GiB float32 input costs the crop only. The
inverted residual's large tensor is its output (8,192 channels, float16: 4.1 GiB): its input would
be expanded in 16-channel x 32-pixel tiles, about 5.8 million interpreted dots for 2**31 elements
(2 to 3 hours, timed at 1/64 of the size). The backward case calls the backward op with an output
gradient of more than 2**31 elements, which both gradient kernels read (the forward would write an
output as large).
"""
import json
import os
import resource
import subprocess
import sys
import time
from collections import namedtuple

import pytest
import torch

from hyperseg import kernels, ops
from kernel_utils import DEVICE, assert_grads_match, assert_matches

LARGE = DEVICE == "cuda" and torch.cuda.get_device_properties(0).total_memory >= 60 * 2 ** 30
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
LARGE_ENV = "HYPERSEG_LARGE_INDEX"

# input channels, H, W, patch rows, patch columns, output channels (the inverted residual has
# 2 x input channels hidden)
Geometry = namedtuple("Geometry", "c h w ph pw cout")

SMALL = {
    "patch_conv2d": Geometry(4, 32, 48, 8, 8, 4),
    "patch_conv2d_backward": Geometry(4, 16, 32, 8, 8, 8),
    "meta_patch_conv": Geometry(6, 16, 32, 8, 8, 16),
    "meta_inverted_residual": Geometry(5, 32, 32, 8, 8, 8),
}
# a GPU with >= 60 GiB: C * H * W > 2**31 in the input (in the output gradient for the backward)
GPU_LARGE = {
    "patch_conv2d": Geometry(48, 8192, 8256, 64, 64, 48),    # the last channels' c * H * W > 2**31
    "patch_conv2d_backward": Geometry(16, 1024, 2080, 32, 32, 1024),
    "meta_patch_conv": Geometry(82, 5184, 5184, 64, 64, 16),
    "meta_inverted_residual": Geometry(34, 8192, 8192, 128, 128, 8),
}
# CPU, through the interpreter: 2080 patches of 32x32 pixels and 1024 channels (one program per
# patch, 128-channel tiles; the backward reads 1024 output-gradient channels); 256 channels in
# patches of 8 x 16384 pixels (the fused kernel's tiles are a patch row wide); the inverted
# residual's output of 8192 channels, 64 x 128 patches (one 128-pixel band of all 8192 outputs per
# tile, the most a tile may hold, and few halo pixels per band)
CPU_LARGE = {
    "patch_conv2d": (Geometry(1024, 1024, 2080, 32, 32, 16), torch.float32),
    "patch_conv2d_backward": (Geometry(16, 1024, 2080, 32, 32, 1024), torch.float32),
    "meta_patch_conv": (Geometry(256, 520, 16384, 8, 16384, 16), torch.float32),
    "meta_inverted_residual": (Geometry(8, 2112, 128, 64, 128, 8192), torch.float16),
}


def _randn(*shape, dtype, scale=1.0, last_rows=None):
    """Random values in ``dtype`` made on the device in chunks (no float32 copy of a large
    tensor). ``last_rows``: only the last rows (dim -2) are written, the rest is left uninitialised
    (on CPU its pages are never touched, so they take no memory)."""
    out = torch.empty(shape, device=DEVICE, dtype=dtype)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    if last_rows is None:
        parts = out.view(-1).split(2 ** 24)
    else:
        parts = out.view(-1, *shape[-2:])[:, -last_rows:]
    for part in parts:
        part.copy_(torch.randn(part.shape, device=DEVICE, generator=gen) * scale)
    return out


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def _largest(**tensors):
    name, t = max(tensors.items(), key=lambda item: item[1].numel())
    return {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
            "elements": t.numel()}


# Each case returns the compared (kernel, reference) pairs, the kernel's seconds and its largest
# tensor. ``crop``: write only the compared rows of the large tensor (the CPU case).

def _patch_conv2d(g, dtype, crop):
    x = _randn(1, g.c, g.h, g.w, dtype=dtype, last_rows=g.ph if crop else None)
    weight = _randn(1, g.h // g.ph, g.w // g.pw, g.cout, g.c, 1, 1, dtype=dtype, scale=g.c ** -0.5)
    with torch.no_grad():
        got, seconds = _timed(kernels.patch_conv2d, x, weight)
        ref = ops.patch_conv2d(x[..., -g.ph:, :].float(), weight[:, -1:].float())
    return {"output": (got[..., -g.ph:, :], ref)}, seconds, _largest(x=x, output=got)


def _patch_conv2d_backward(g, dtype, crop):
    x = _randn(1, g.c, g.h, g.w, dtype=dtype)
    weight = _randn(1, g.h // g.ph, g.w // g.pw, g.cout, g.c, 1, 1, dtype=dtype, scale=g.c ** -0.5)
    dout = _randn(1, g.cout, g.h, g.w, dtype=dtype, last_rows=g.ph if crop else None)
    # the input- and weight-gradient kernels (the bias gradient is summed in the latter)
    (dx, dw, db), seconds = _timed(torch.ops.hyperseg.patch_conv2d_backward, dout, x, weight,
                                   True, True, True, "reflect", 1)
    xc = x[..., -g.ph:, :].float().requires_grad_()
    wc = weight[:, -1:].float().requires_grad_()
    bc = torch.zeros(wc.shape[:4], device=DEVICE, requires_grad=True)
    ops.patch_conv2d(xc, wc, bc).backward(dout[..., -g.ph:, :].float())
    compared = {"input gradient": (dx[..., -g.ph:, :], xc.grad),
                "weight gradient": (dw[:, -1:], wc.grad), "bias gradient": (db[:, -1:], bc.grad)}
    return compared, seconds, _largest(dout=dout, x=x)


def _meta_patch_conv(g, dtype, crop):
    s = 32
    x = _randn(1, g.c, g.h, g.w, dtype=dtype, last_rows=g.ph if crop else None)
    signal = _randn(1, s, g.h // g.ph, g.w // g.pw, dtype=dtype)
    gen = _randn(g.cout * g.c, s // 4, 1, 1, dtype=dtype, scale=(g.c * s / 4) ** -0.5)
    kw = dict(out_channels=g.cout, generator_groups=4, activation="relu")
    with torch.no_grad():
        got, seconds = _timed(kernels.meta_patch_conv, x, signal, gen, **kw)
        ref = ops.meta_patch_conv(x[..., -g.ph:, :].float(), signal[..., -1:, :].float(),
                                  gen.float(), **kw)
    return {"output": (got[..., -g.ph:, :], ref)}, seconds, _largest(x=x, output=got)


def _meta_inverted_residual(g, dtype, crop):
    hidden, s = 2 * g.c, 32
    rows = hidden * g.c + hidden * 9 + g.cout * hidden
    x = _randn(1, g.c, g.h, g.w, dtype=dtype)       # the large tensor on CPU is the output
    signal = _randn(1, s, g.h // g.ph, g.w // g.pw, dtype=dtype)
    gen = _randn(rows, s // 4, 1, 1, dtype=dtype, scale=(s / 4) ** -0.5 / 4)
    norms = [(torch.full((n,), 0.5, device=DEVICE), torch.zeros(n, device=DEVICE))
             for n in (hidden, hidden, g.cout)]
    kw = dict(hidden=hidden, out_channels=g.cout, generator_groups=4, norm1=norms[0],
              norm2=norms[1], norm3=norms[2])
    with torch.no_grad():
        got, seconds = _timed(kernels.meta_inverted_residual, x, signal, gen, **kw)
        # two patch rows: the compared (last) row's top halo is real pixels, as in the whole image
        ref = ops.meta_inverted_residual(x[..., -2 * g.ph:, :].float(),
                                         signal[..., -2:, :].float(), gen.float(), **kw)
    compared = {"output": (got[..., -g.ph:, :], ref[..., -g.ph:, :])}
    return compared, seconds, _largest(x=x, output=got)


CASES = {"patch_conv2d": _patch_conv2d, "patch_conv2d_backward": _patch_conv2d_backward,
         "meta_patch_conv": _meta_patch_conv, "meta_inverted_residual": _meta_inverted_residual}


def _assert_close(op, name, got, ref, dtype):
    if op.endswith("_backward"):
        assert_grads_match(got, ref, dtype, name)
    else:
        assert_matches(got, ref.to(got.dtype), dtype)


@pytest.mark.parametrize("op", list(CASES))
def test_kernel_on_more_than_2_31_elements(op):
    """The large case on a GPU with >= 60 GiB, the small image elsewhere."""
    compared, _, _ = CASES[op](GPU_LARGE[op] if LARGE else SMALL[op], DTYPE, crop=False)
    for name, (got, ref) in compared.items():
        _assert_close(op, name, got, ref, DTYPE)


def test_the_large_cases_are_large():
    """The large cases' largest tensor (the largest of input and output channels times H * W),
    on CPU and on a GPU, has more than 2**31 elements and the offset of its last channel,
    channel * H * W, is beyond 2**31 by itself (so a 32-bit product of the two wraps)."""
    for g in [g for g, _ in CPU_LARGE.values()] + list(GPU_LARGE.values()):
        assert (max(g.c, g.cout) - 1) * g.h * g.w >= 2 ** 31, g


def _run_on_cpu(op):
    """The CPU large case of ``op`` in this process (the slow test's subprocess): prints a JSON
    line (the largest tensor, the kernel's seconds, the peak resident memory, max |err| and max
    |ref| per compared tensor), then asserts the match."""
    g, dtype = CPU_LARGE[op]
    start = time.perf_counter()
    compared, seconds, largest = CASES[op](g, dtype, crop=True)
    errors = {name: {"err": (got.float() - ref.float()).abs().max().item(),
                     "ref": ref.float().abs().max().item()}
              for name, (got, ref) in compared.items()}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(json.dumps({"op": op, "largest": largest, "kernel_s": round(seconds, 1),
                      "total_s": round(time.perf_counter() - start, 1),
                      "peak_gib": round(peak, 2), "compared": errors}), flush=True)
    for name, (got, ref) in compared.items():
        _assert_close(op, name, got, ref, dtype)


@pytest.mark.slow
@pytest.mark.skipif(LARGE_ENV not in os.environ,
                    reason=f"the large case on CPU (minutes per op): set {LARGE_ENV}=1")
@pytest.mark.parametrize("op", list(CPU_LARGE))
def test_kernel_on_more_than_2_31_elements_on_cpu(op):
    """The large case through the Triton interpreter, in a subprocess: its peak memory is the
    case's own, a crash (a wrong offset may read unmapped memory) fails the test instead of
    killing pytest, and OpenBLAS runs one thread (the interpreter's tl.dot calls numpy's matmul
    on small tiles, about 3x slower with 2 threads on 2 busy cores)."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OPENBLAS_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-X", "faulthandler", __file__, op],
                            capture_output=True, text=True, env=env, timeout=4 * 3600)
    lines = result.stdout.splitlines()
    assert lines, f"exit code {result.returncode}, no report\n{result.stderr[-4000:]}"
    report = json.loads(lines[-1])
    largest = report["largest"]
    errors = ", ".join(f"{name} max |err| {e['err']:.2e} (max |ref| {e['ref']:.2f})"
                       for name, e in report["compared"].items())
    print(f"\n{op}: {largest['name']} {tuple(largest['shape'])} {largest['dtype']}, "
          f"{largest['elements']:,} elements; kernel {report['kernel_s']:.0f} s, "
          f"case {report['total_s']:.0f} s, peak resident memory {report['peak_gib']:.2f} GiB; "
          f"{errors}")
    assert result.returncode == 0, f"exit code {result.returncode}\n{result.stderr[-4000:]}"
    assert largest["elements"] > 2 ** 31
    assert report["peak_gib"] < 8, "the untouched pages of the large tensor should take no memory"


if __name__ == "__main__":
    _run_on_cpu(sys.argv[1])
