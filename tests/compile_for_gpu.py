"""Compile every kernel variant for an NVIDIA GPU (sm_90) without needing one.

Triton's compiler and ptxas run on the CPU, so compile-time errors that the interpreter cannot
show (tl.dot operands under 16, unsupported dtype combinations, type errors in untaken
branches) appear here. Run in a process without TRITON_INTERPRET (the kernels must be real
JIT functions). Prints one line per variant with its compile time.
"""
import itertools
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hyperseg.kernels.meta_inverted_residual import _meta_inverted_residual_kernel  # noqa: E402
from hyperseg.kernels.patch_conv import _patch_conv_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_variant(fn, dtype, constexprs):
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            # activations in the input dtype; generator weights and BN vectors in float32
            signature[name] = f"*{dtype}" if name in ("x_ptr", "out_ptr", "w_ptr", "bias_ptr",
                                                       "sig_ptr") else "*fp32"
        else:
            signature[name] = "i32"
    index = {name: i for i, name in enumerate(fn.arg_names)}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(index[k],): v for k, v in constexprs.items()})
    start = time.time()
    triton.compile(source, target=TARGET, options={"num_warps": 4})
    return time.time() - start


def main(dtypes=("fp32", "fp16", "bf16")):
    worst = 0.0
    for dtype in dtypes:
        fp32 = dtype == "fp32"
        for generated, depthwise, k in itertools.product((False, True), (False, True), (1, 3, 5)):
            constexprs = dict(K=k, PAD_MODE=1, GENERATED=generated, HAS_BIAS=not generated,
                              HAS_AFFINE=generated, ACT=2 if generated else 0, DEPTHWISE=depthwise,
                              DOT_FP32=fp32, TAPS=triton.next_power_of_2(k * k), BLOCK_CO=32,
                              BLOCK_CI=32, BLOCK_P=64)
            seconds = compile_variant(_patch_conv_kernel, dtype, constexprs)
            worst = max(worst, seconds)
            print(f"patch_conv {dtype} generated={generated} depthwise={depthwise} k={k}: {seconds:.1f}s",
                  flush=True)
        for residual in (False, True):
            constexprs = dict(K=3, PAD_MODE=1, RESIDUAL=residual, DOT_FP32=fp32, TAPS=16, BLOCK_CI=64,
                              BLOCK_H=128, BLOCK_CO=32, BLOCK_P=64)
            seconds = compile_variant(_meta_inverted_residual_kernel, dtype, constexprs)
            worst = max(worst, seconds)
            print(f"meta_inverted_residual {dtype} residual={residual}: {seconds:.1f}s", flush=True)
    print(f"worst compile time {worst:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(tuple(sys.argv[1:]) or ("fp32", "fp16", "bf16")))
