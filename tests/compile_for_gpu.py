"""Compile every kernel variant for an NVIDIA GPU (sm_90) without needing one.

Triton's compiler and ptxas run on the CPU, so compile-time errors that the interpreter cannot
show (tl.dot operands under 16, unsupported dtype combinations, type errors in untaken
branches) appear here. Run in a process without TRITON_INTERPRET (the kernels must be real
JIT functions). Prints one line per variant with its compile time.
"""
import contextlib
import itertools
import multiprocessing
import os
import sys
import time
import traceback

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hyperseg.kernels.generate_weights import (_generate_weights_kernel,  # noqa: E402
                                               _generate_weights_signal_grad_kernel,
                                               _generate_weights_weight_grad_kernel)
from hyperseg.kernels.meta_inverted_residual import _meta_inverted_residual_kernel  # noqa: E402
from hyperseg.kernels.meta_patch_conv import (_meta_conv_patch_kernel,  # noqa: E402
                                              _meta_conv_many_patches_kernel)
from hyperseg.kernels.patch_conv import (_patch_conv_input_grad_kernel, _patch_conv_kernel,  # noqa: E402
                                         _patch_conv_weight_grad_kernel)

TARGET = GPUTarget("cuda", 90, 32)
# Pointers to activations (and to the per-patch kernels, the signal and their gradients) have the
# input dtype; generator weights, BatchNorm vectors and the bias gradient are float32.
FLOAT32_POINTERS = ("gen_ptr", "dgen_ptr", "db_ptr", "s1_ptr", "t1_ptr", "s2_ptr", "t2_ptr",
                    "s3_ptr", "t3_ptr", "scale_ptr", "shift_ptr", "wscr_ptr", "yscr_ptr")


def compile_variant(fn, dtype, constexprs):
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in FLOAT32_POINTERS and dtype != "fp64" else f"*{dtype}"
        else:
            signature[name] = "i32"
    index = {name: i for i, name in enumerate(fn.arg_names)}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(index[k],): v for k, v in constexprs.items()})
    start = time.time()
    warps = 8 if fn is _meta_inverted_residual_kernel else 4
    triton.compile(source, target=TARGET, options={"num_warps": warps})
    return time.time() - start


def report(name, dtype, seconds):
    print(f"{name} {dtype}: {seconds:.1f}s", flush=True)
    return seconds


def vector(dtype):
    """Pixels per vector of the 3x3 depthwise vector taps (8 bytes; none for float64)."""
    return {"fp32": 2, "fp16": 4, "bf16": 4}.get(dtype, 1)


def forward_variants(dtype):
    """The inference kernels: fp32 with tf32 (3) and IEEE (1) dots, half precision with 0."""
    modes = (3, 1) if dtype == "fp32" else (0,)
    for depthwise, k in itertools.product((False, True), (1, 3, 5)):
        constexprs = dict(K=k, PAD_MODE=1, HAS_BIAS=True, DEPTHWISE=depthwise, DOT_MODE=int(dtype == "fp32"),
                          ACC=tl.float32, BLOCK_CO=32, BLOCK_CI=32, BLOCK_P=64, FMA=False,
                          TAIL=not depthwise, PW=8, VEC=vector(dtype) if depthwise and k == 3 else 1,
                          W_ALIGN=1 if depthwise else 8)      # (dense: rows padded to 8)
        yield f"patch_conv depthwise={depthwise} k={k}", _patch_conv_kernel, constexprs
    # 1x1 on multiply-adds: tiny patches (4 pixels), and 8 output channels
    for block_co, block_ci, block_p in ((32, 16, 4), (8, 8, 64)):
        yield (f"patch_conv fma {block_co}x{block_ci}x{block_p}", _patch_conv_kernel,
               dict(K=1, PAD_MODE=0, HAS_BIAS=True, DEPTHWISE=False, DOT_MODE=int(dtype == "fp32"),
                    ACC=tl.float32, BLOCK_CO=block_co, BLOCK_CI=block_ci, BLOCK_P=block_p, FMA=True,
                    TAIL=False, PW=2 if block_p == 4 else 8, VEC=1,
                    W_ALIGN=8 if block_p == 4 else 2))    # (tiny patches: rows padded to 8)
    for mode in modes:
        for patch, spg in (((1, 1), 13), ((2, 2), 6)):
            yield (f"meta_conv_many_patches patch={patch} spg={spg} dot_mode={mode}",
                   _meta_conv_many_patches_kernel,
                   dict(CIN=82, COUT=64, PH=patch[0], PW=patch[1], SPG=spg, GEN_STRIDE=16 if spg > 8 else 8,
                        GEN_DOT=spg >= 12, HAS_AFFINE=True, ACT=1, DOT_MODE=mode,
                        BLOCK_N=64 if patch == (1, 1) else 32, BLOCK_O=2, BLOCK_C=32, BLOCK_S=16,
                        BLOCK_PH=patch[0], BLOCK_PW=patch[1], TILE_W=32, GW_ALIGN=16))
        for depthwise, k, groups in ((False, 1, 1), (False, 3, 2), (True, 3, 48), (True, 5, 48)):
            cin = 48 if groups > 1 else 94
            yield (f"meta_conv_patch depthwise={depthwise} k={k} dot_mode={mode}", _meta_conv_patch_kernel,
                   dict(CIN=cin, COUT=48 if groups > 1 else 32, GROUPS=groups, PH=8, PW=8, K=k,
                        PAD_MODE=1, DEPTHWISE=depthwise, HAS_AFFINE=True, ACT=2, SPG=13,
                        GEN_STRIDE=16, DOT_MODE=mode, BAND=8, BLOCK_W=8, BLOCK_CO=32,
                        BLOCK_K=16, BLOCK_R=64, BLOCK_S=16,
                        VEC={"fp32": 2, "bf16": 4}.get(dtype, 1) if depthwise and k == 3 else 1))
        for residual in (False, True):
            yield (f"meta_inverted_residual residual={residual} dot_mode={mode}",
                   _meta_inverted_residual_kernel,
                   dict(CIN=34, HIDDEN=68, COUT=34 if residual else 19, PH=16, PW=16, K=3,
                        PAD_MODE=1, RESIDUAL=residual, SPG=80, GEN_STRIDE=80, DOT_MODE=mode,
                        BAND=8 if mode == 1 else 16, BLOCK_W=16, HALO_CHUNK=32, BLOCK_K=16,
                        BLOCK_H=16, BLOCK_CO=64 if residual else 32, BLOCK_R=64, BLOCK_S=16))


def backward_variants(dtype):
    mode = {"fp64": 2, "fp32": 1}.get(dtype, 0)
    acc = tl.float64 if dtype == "fp64" else tl.float32
    for depthwise, k, pad in ((False, 1, 1), (False, 3, 1), (True, 3, 0), (True, 5, 2)):
        slots = {0: 1, 1: 3, 2: 2 * (k // 2) + 1}[pad] if k > 1 else 1
        # TAIL (rank-1 multiply-adds for the channels past the last multiple of 16): the input
        # gradient has it in its 1x1 path only
        tail = not depthwise
        yield (f"patch_conv input grad depthwise={depthwise} k={k} pad={pad}", _patch_conv_input_grad_kernel,
               dict(K=k, PAD_MODE=pad, SLOTS=slots, DEPTHWISE=depthwise, DOT_MODE=mode, ACC=acc,
                    BLOCK_CI=32, BLOCK_CO=32, BLOCK_P=64, FMA=False, TAIL=tail and k == 1, PW=8,
                    VEC=vector(dtype) if depthwise and k == 3 else 1,
                    W_ALIGN=1 if depthwise else 8))
        yield (f"patch_conv weight grad depthwise={depthwise} k={k} pad={pad}", _patch_conv_weight_grad_kernel,
               dict(K=k, PAD_MODE=pad, HAS_BIAS=True, DEPTHWISE=depthwise, DOT_MODE=mode, ACC=acc,
                    BLOCK_CO=32, BLOCK_CI=32, BLOCK_P=64, FMA=False, TAIL=tail, PW=8,
                    VEC=vector(dtype) if depthwise and k == 3 else 1))
    for block_co, block_ci, block_p in ((32, 16, 4), (8, 8, 64)):
        yield (f"patch_conv input grad fma {block_co}x{block_ci}x{block_p}", _patch_conv_input_grad_kernel,
               dict(K=1, PAD_MODE=0, SLOTS=1, DEPTHWISE=False, DOT_MODE=mode, ACC=acc,
                    BLOCK_CI=block_ci, BLOCK_CO=block_co, BLOCK_P=block_p, FMA=True, TAIL=False,
                    PW=2 if block_p == 4 else 8, VEC=1, W_ALIGN=8 if block_p == 4 else 2))
        yield (f"patch_conv weight grad fma {block_co}x{block_ci}x{block_p}", _patch_conv_weight_grad_kernel,
               dict(K=1, PAD_MODE=0, HAS_BIAS=True, DEPTHWISE=False, DOT_MODE=mode, ACC=acc,
                    BLOCK_CO=block_co, BLOCK_CI=block_ci, BLOCK_P=block_p, FMA=True, TAIL=False,
                    PW=2 if block_p == 4 else 8, VEC=1))
    for padded in (False, True):
        yield (f"generate_weights padded={padded}", _generate_weights_kernel,
               dict(ACC=acc, BLOCK_N=32, BLOCK_R=64, COUNT_ALIGN=8, GHW_ALIGN=4, PADDED=padded))
    for fma in (False, True):
        yield (f"generate_weights signal grad fma={fma}", _generate_weights_signal_grad_kernel,
               dict(DOT_MODE=mode, ACC=acc, BLOCK_N=32, BLOCK_R=16, BLOCK_S=8 if fma else 32,
                    FMA=fma, GHW_ALIGN=16, ROW_ALIGN=4))
    yield ("generate_weights weight grad", _generate_weights_weight_grad_kernel,
           dict(DOT_MODE=mode, ACC=acc, BLOCK_R=32, BLOCK_S=32, BLOCK_N=32, FMA=False,
                GHW_ALIGN=16, ROW_ALIGN=8))
    yield ("generate_weights weight grad fma", _generate_weights_weight_grad_kernel,
           dict(DOT_MODE=mode, ACC=acc, BLOCK_R=32, BLOCK_S=4, BLOCK_N=32, FMA=True, GHW_ALIGN=4,
                ROW_ALIGN=1))


def variants(dtypes):
    """(name, dtype, fn, constexprs) of every variant to compile for ``dtypes``."""
    out = []
    for dtype in dtypes:
        if dtype != "fp64":     # the fused inference kernels take no float64
            out += [(name, dtype, fn, c) for name, fn, c in forward_variants(dtype)]
        out += [(name, dtype, fn, c) for name, fn, c in backward_variants(dtype)]
    return out


_VARIANTS = []      # what the forked workers of main compile, by index (nothing is pickled)


def _compile(index):
    """(name, dtype, seconds, None), or (name, dtype, None, the traceback) if it did not compile
    (as text: a compiler exception need not survive the trip back from a worker)."""
    name, dtype, fn, constexprs = _VARIANTS[index]
    try:
        return name, dtype, compile_variant(fn, dtype, constexprs), None
    except Exception:  # noqa: BLE001 - printed and counted by main
        return name, dtype, None, traceback.format_exc()


def main(dtypes=("fp32", "fp16", "bf16", "fp64"), jobs=None):
    """Compile every variant on ``jobs`` forked processes (default: the CPU count, at most 4;
    each compile is single-threaded), printing one line per variant in order; 1 if any failed."""
    global _VARIANTS
    _VARIANTS = variants(dtypes)
    jobs = min(jobs or os.cpu_count() or 1, 4)
    worst, failed = 0.0, 0
    with contextlib.ExitStack() as stack:
        if jobs > 1:
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(jobs))
            results = pool.imap(_compile, range(len(_VARIANTS)))
        else:
            results = map(_compile, range(len(_VARIANTS)))
        for name, dtype, seconds, error in results:
            if error:
                failed += 1
                print(f"{name} {dtype} FAILED\n{error}", file=sys.stderr, flush=True)
            else:
                worst = max(worst, report(name, dtype, seconds))
    print(f"worst compile time {worst:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(tuple(sys.argv[1:]) or ("fp32", "fp16", "bf16", "fp64")))
