"""Helpers shared by the kernels: border handling, in-kernel weight generation, launch checks."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

PADDING_CODES = {"zeros": 0, "reflect": 1, "replicate": 2}
ACTIVATION_CODES = {None: 0, "relu": 1, "relu6": 2}


@triton.jit
def border_index(i, n, PAD_MODE: tl.constexpr):
    """Map a row/column index that may lie one halo outside [0, n) back into the image.

    Returns (index, valid): reflect and replicate always give a valid in-image index; zeros marks
    outside positions invalid (their loads are masked to 0).
    """
    if PAD_MODE == 1:  # reflect (the edge pixel is not repeated)
        i = tl.where(i < 0, -i, i)
        i = tl.where(i > n - 1, 2 * (n - 1) - i, i)
        valid = i == i
    elif PAD_MODE == 2:  # replicate
        i = tl.minimum(tl.maximum(i, 0), n - 1)
        valid = i == i
    else:  # zeros
        valid = (i >= 0) & (i < n)
        i = tl.minimum(tl.maximum(i, 0), n - 1)
    return i, valid


@triton.jit
def patch_pixels(pid_patch, pid_p, H, W, GH, GW, BLOCK_P: tl.constexpr):
    """The pixels of one program: ``pid_patch`` numbers a patch of one image (b, gi, gj), and
    ``pid_p`` a block of BLOCK_P of its pixels in row-major order. Returns the image index ``b``,
    the patch's grid position (gi, gj), the pixels' image rows and columns, and their mask."""
    gj = pid_patch % GW
    gi = (pid_patch // GW) % GH
    b = pid_patch // (GH * GW)
    PH = H // GH
    PW = W // GW
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    return b, gi, gj, gi * PH + p // PW, gj * PW + p % PW, p < PH * PW


@triton.jit
def generate_rows(rows, mask, sig_base, gen_ptr, sig_offset, gen_spg, gen_rpg, GHW):
    """Generated parameters of one patch: for every entry of ``rows`` (a tile of output-row indices
    of the generator's grouped 1x1 convolution), the dot product of that row of the generator
    weight with the signal channels of the row's group, at this patch.

    ``sig_base`` points at signal[b, 0, gi, gj] (channel stride GHW); the generator weight is
    (R, gen_spg) row-major; row r belongs to group r // gen_rpg, which reads signal channels
    sig_offset + group * gen_spg + s. Computed in float32 registers, never stored.
    """
    rows64 = rows.to(tl.int64)
    chan = sig_offset + (rows64 // gen_rpg) * gen_spg
    acc = tl.zeros(rows.shape, dtype=tl.float32)
    for s in range(gen_spg):
        g = tl.load(gen_ptr + rows64 * gen_spg + s, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(sig_base + (chan + s) * GHW, mask=mask, other=0.0).to(tl.float32)
        acc += g * v
    return acc


@triton.jit
def activate(t, ACT: tl.constexpr):
    if ACT == 1:
        t = tl.maximum(t, 0.0)
    elif ACT == 2:
        t = tl.minimum(tl.maximum(t, 0.0), 6.0)
    return t


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors through the Triton interpreter."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cpu" and not interpreting():
        raise RuntimeError("the Triton kernels need CUDA tensors; CPU tensors run only through the "
                           "Triton interpreter (set TRITON_INTERPRET=1 before importing triton)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the Triton kernels need CUDA (or interpreted CPU) tensors, got {device}")


def check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the kernels take float32, float16 or bfloat16 inputs, got {x.dtype}")


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Dots run in float32 (IEEE) for float32 inputs, and always in the interpreter, whose bf16
    dot is wrong; on a GPU half-precision inputs use tensor cores with float32 accumulation."""
    return dtype == torch.float32 or interpreting()


def block(n: int, low: int = 16, high: int = 128) -> int:
    """A power-of-two block size covering ``n``, within [low, high] (tl.dot needs >= 16)."""
    return max(low, min(high, triton.next_power_of_2(max(1, n))))


# Upper bound of the pixels one program handles; None: the default below. Tests lower it to run
# several pixel blocks per patch through the interpreter.
MAX_PIXEL_BLOCK = None


def pixel_block(n: int) -> int:
    """Pixels per program. On a GPU 64 bounds the registers a tile needs; the interpreter pays a
    fixed cost per program and vectorises within one, so there a whole patch (up to 1024) is one
    tile."""
    high = MAX_PIXEL_BLOCK or (1024 if interpreting() else 64)
    return block(n, high=high)
