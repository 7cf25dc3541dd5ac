"""Helpers shared by the kernels: border handling, in-kernel weight generation, launch checks."""
from __future__ import annotations

import re
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl

from ..options import interpreting_triton as interpreting
from ..layout import (check_generated, check_generator, check_grid, check_padding,
                      patch_conv_rows)

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
def mirror_source(q, m, n, PAD_MODE: tl.constexpr, R: tl.constexpr):
    """The inverse of ``border_index`` along one axis, for the backward pass: the ``m``-th virtual
    index v (in [-R, n + R)) that ``border_index`` maps to the in-image index ``q``.

    m = 0 is q itself. With reflect padding, m = 1 is the mirror image -q beyond the first index
    (exists for 1 <= q <= R) and m = 2 the one beyond the last, 2 (n - 1) - q (for
    n - 1 - R <= q <= n - 2). With replicate padding, m = 1..R are -1..-R (exist for q = 0) and
    m = R + 1..2R are n..n + R - 1 (for q = n - 1). Returns (v, exists).
    """
    v = q
    exists = q == q
    if PAD_MODE == 1:
        if m == 1:
            v = -q
            exists = (q >= 1) & (q <= R)
        elif m == 2:
            v = 2 * (n - 1) - q
            exists = (q <= n - 2) & (q >= n - 1 - R)
    elif PAD_MODE == 2:
        if m > 0:
            if m <= R:
                v = q * 0 - m
                exists = q == 0
            else:
                v = q * 0 + (n - 1 + m - R)
                exists = q == n - 1
    return v, exists


def mirror_slots(padding_mode: str, halo: int) -> int:
    """How many virtual indices ``mirror_source`` enumerates per axis."""
    return {"zeros": 1, "reflect": 3, "replicate": 2 * halo + 1}[padding_mode] if halo else 1


@triton.jit
def patch_pixels(pid_patch, pid_p, H, GH, GW, PW: tl.constexpr, BLOCK_P: tl.constexpr):
    """The pixels of one program: ``pid_patch`` numbers a patch of one image (b, gi, gj), and
    ``pid_p`` a block of BLOCK_P of its pixels in row-major order; the image is GW * PW wide.
    Returns the image index ``b``, the patch's grid position (gi, gj), the pixels' image rows and
    columns, and their mask. With
    the patch width a compile-time constant the compiler sees runs of PW contiguous columns
    starting at a multiple of PW (vector loads and stores where PW allows)."""
    gj = pid_patch % GW
    gi = (pid_patch // GW) % GH
    b = pid_patch // (GH * GW)
    PH = H // GH
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    return b, gi, gj, gi * PH + p // PW, gj * PW + p % PW, p < PH * PW


@triton.jit
def tap_source(yy, xx, t, H, W, K: tl.constexpr, PAD_MODE: tl.constexpr):
    """Offsets in a channel plane of the pixels tap t of a k x k convolution reads for output
    pixels (yy, xx), borders resolved by PAD_MODE, and which of them exist. A 1x1 convolution
    reads the pixels themselves (no border arithmetic, so runs of columns stay contiguous)."""
    if K == 1:
        return yy * W + xx, yy == yy
    else:
        R: tl.constexpr = K // 2
        sy, vy = border_index(yy + (t // K - R), H, PAD_MODE)
        sx, vx = border_index(xx + (t % K - R), W, PAD_MODE)
        return sy * W + sx, vy & vx


@triton.jit
def shift_pairs(prev, cur, nxt):
    """Tiles whose last axis holds aligned pairs of pixels (x[2a], x[2a + 1]); prev / nxt: the
    pairs one pair to the left / right. Returns the tiles of the pixels one to the left and one
    to the right, (x[2a - 1], x[2a]) and (x[2a + 1], x[2a + 2]), moved within each thread's
    registers (split / join of the pair axis), not reloaded."""
    p0, p1 = tl.split(prev)
    c0, c1 = tl.split(cur)
    n0, n1 = tl.split(nxt)
    return tl.join(p1, c0), tl.join(c1, n0)


@triton.jit
def shift_vectors(prev, cur, nxt, VEC: tl.constexpr, ROWS: tl.constexpr, GROUPS: tl.constexpr):
    """``shift_pairs`` for (ROWS, GROUPS, VEC) tiles of vectors of VEC = 2 or 4 pixels: a vector
    of 4 is a pair of pairs (x[2a + b] at [a, b]); its odd elements shift as pairs, and its even
    ones move up."""
    if VEC == 2:
        left, right = shift_pairs(prev, cur, nxt)
    else:
        p0, p1 = tl.split(tl.reshape(prev, (ROWS, GROUPS, 2, 2)))
        c0, c1 = tl.split(tl.reshape(cur, (ROWS, GROUPS, 2, 2)))
        n0, n1 = tl.split(tl.reshape(nxt, (ROWS, GROUPS, 2, 2)))
        odd_left, _ = shift_pairs(p1, c1, n1)
        _, even_right = shift_pairs(p0, c0, n0)
        left = tl.reshape(tl.join(odd_left, c0), (ROWS, GROUPS, 4))
        right = tl.reshape(tl.join(c1, even_right), (ROWS, GROUPS, 4))
    return left, right


@triton.jit
def vector_pixels(p0, gi, gj, PH, PW: tl.constexpr, VEC: tl.constexpr, BLOCK_P: tl.constexpr):
    """The pixel block of a patch starting at its pixel p0 (row-major) as (BLOCK_P / VEC, VEC)
    tiles: image rows and columns and the mask. With PW and p0 multiples of VEC each row of the
    tile is VEC contiguous columns from an aligned start, in one row of the patch."""
    q = p0 + tl.arange(0, BLOCK_P // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    return gi * PH + q // PW, gj * PW + q % PW, q < PH * PW


@triton.jit
def depthwise3_vectors(rows, w_taps, co, co_mask, yy, xx, p_mask, H, W, PAD_MODE: tl.constexpr,
                       VEC: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr,
                       ACC: tl.constexpr):
    """The 3 x 3 depthwise taps of a tile of a patch away from the image's left and right borders
    (``yy``, ``xx``, ``p_mask``: (groups, VEC) pixels, each group VEC contiguous columns from an
    aligned start; ``rows``: (BLOCK_CO, 1, 1) channel planes; ``w_taps``: the patch's kernel,
    (channels, 3, 3) contiguous). Per tap row, three aligned vector loads (the pixels' own
    vectors and the vectors beside them); the shifted columns come from registers
    (``shift_vectors``). Returns the (BLOCK_CO, groups, VEC) sums in ACC."""
    GROUPS: tl.constexpr = BLOCK_P // VEC
    acc = tl.zeros((BLOCK_CO, GROUPS, VEC), dtype=ACC)
    for dy in tl.static_range(3):
        sy, vy = border_index(yy + (dy - 1), H, PAD_MODE)
        at = rows + (sy * W + xx)[None, :, :]
        mask = co_mask[:, None, None] & (p_mask & vy)[None, :, :]
        w_row = w_taps + co * 9 + dy * 3
        cur = tl.load(at, mask=mask, other=0.0).to(ACC)  # interior: vector of PW
        acc += tl.load(w_row + 1, mask=co_mask, other=0.0).to(ACC)[:, None, None] * cur
        prev = tl.load(at - VEC, mask=mask, other=0.0).to(ACC)  # interior: vector of PW
        left, _ = shift_vectors(prev, cur, cur, VEC, BLOCK_CO, GROUPS)  # one side at a time:
        acc += tl.load(w_row, mask=co_mask, other=0.0).to(ACC)[:, None, None] * left  # fewer regs
        nxt = tl.load(at + VEC, mask=mask, other=0.0).to(ACC)  # interior: vector of PW
        _, right = shift_vectors(cur, cur, nxt, VEC, BLOCK_CO, GROUPS)
        acc += tl.load(w_row + 2, mask=co_mask, other=0.0).to(ACC)[:, None, None] * right
    return acc


def tap_vector(dtype: torch.dtype, kernel_size: int, pw: int, block_p: int = 0,
               narrower: bool = True) -> int:
    """Pixels per aligned vector of a 3 x 3 depthwise kernel's vector taps (``depthwise3_vectors``):
    up to 8 bytes (2 float32, 4 half-precision pixels), the most that divides the patch width
    and the pixel block ``block_p`` (if given) (``narrower``: down to 2 pixels; else exactly 8
    bytes); 1 (the per-tap path) for other kernel sizes, float64, or odd widths."""
    vec = {torch.float32: 2, torch.float16: 4, torch.bfloat16: 4}.get(dtype, 1)
    if kernel_size != 3:
        return 1
    while vec > 1 and (pw % vec or block_p % vec):
        vec = vec // 2 if narrower else 1
    return vec


@triton.jit
def dot_acc(a, b, acc, DOT_MODE: tl.constexpr):
    """``acc + a @ b``. DOT_MODE 0: operands in b's (half) precision with float32 accumulation
    (tensor cores); 1: float32 operands, IEEE (no tf32); 2: float64; 3: float32 operands on tf32
    tensor cores (what ``torch.backends.cudnn.allow_tf32`` allows PyTorch's convolutions)."""
    if DOT_MODE == 2:
        return acc + tl.dot(a.to(tl.float64), b.to(tl.float64))
    elif DOT_MODE == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT_MODE == 3:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    else:
        return tl.dot(a.to(b.dtype), b, acc)


@triton.jit
def mac(a, b, acc, DOT_MODE: tl.constexpr, FMA: tl.constexpr):
    """``acc + a @ b``: ``dot_acc`` on tensor cores, or with ``FMA`` broadcast multiply-adds in
    acc's precision, for tiles with a dimension below tl.dot's 16 (the pixels of tiny patches,
    the channels of narrow groups): a dot would pad it to 16 and execute the padding."""
    if FMA:
        return acc + tl.sum(a.to(acc.dtype)[:, :, None] * b.to(acc.dtype)[None, :, :], axis=1)
    else:
        return dot_acc(a, b, acc, DOT_MODE)


@triton.jit
def generate_params(dst_ptr, n_rows, row0, sig_base, gen_ptr, sig_offset, rpg, GHW,
                    SPG: tl.constexpr, GEN_STRIDE: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_S: tl.constexpr):
    """One patch's generated parameters, rows ``row0 .. row0 + n_rows`` of the generator's grouped
    1x1 convolution at this patch, written as float32 to ``dst_ptr[0 .. n_rows)``.

    Row r of the generator weight (row-major, GEN_STRIDE >= SPG floats apart, a multiple of 4 so
    that loads are 16-byte vectors) belongs to group r // rpg, which reads signal channels
    sig_offset + group * SPG + s; ``sig_base`` points at signal[b, 0, gi, gj] (channel stride
    GHW). A tile is BLOCK_R consecutive rows x BLOCK_S of their inputs: one contiguous span of the
    generator, read once per patch. The generator's loads cover its zero columns up to GEN_STRIDE
    (so that the mask is constant over each aligned vector); the signal's stop at SPG."""
    for r0 in range(0, n_rows, BLOCK_R):
        i = r0 + tl.arange(0, BLOCK_R)
        rmask = i < n_rows
        row = (row0 + i).to(tl.int64)
        chan = sig_offset + (row // rpg) * SPG
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for s0 in range(0, SPG, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            g = tl.load(  # interior: vector of GEN_STRIDE
                gen_ptr + row[:, None] * GEN_STRIDE + s[None, :],
                mask=rmask[:, None] & (s < GEN_STRIDE)[None, :], other=0.0)
            v = tl.load(sig_base + (chan[:, None] + s[None, :]) * GHW,
                        mask=rmask[:, None] & (s < SPG)[None, :], other=0.0)
            acc += tl.sum(g.to(tl.float32) * v.to(tl.float32), axis=1)
        tl.store(dst_ptr + i, acc, mask=rmask)


@triton.jit
def patch_params_to_scratch(pid, wscr_ptr, count, sig_ptr, SIG_C, GH, GW, gen_ptr, sig_offset,
                            rpg, row_start, SPG: tl.constexpr, GEN_STRIDE: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """The prologue of the one-program-per-patch kernels: program ``pid`` is patch (gi, gj) of
    image b; it generates the patch's ``count`` parameters (``generate_params``) into its slot of
    the float32 scratch buffer, then waits at a barrier until every thread's stores are visible.
    Returns (b, gi, gj, slot pointer)."""
    gj = pid % GW
    gi = (pid // GW) % GH
    b = pid // (GH * GW)
    sig_base = sig_ptr + b.to(tl.int64) * SIG_C * GH * GW + gi * GW + gj
    wscr = wscr_ptr + pid.to(tl.int64) * count
    generate_params(wscr, count, row_start, sig_base, gen_ptr, sig_offset, rpg, GH * GW,
                    SPG, GEN_STRIDE, BLOCK_R, BLOCK_S)
    tl.debug_barrier()
    return b, gi, gj, wscr


@triton.jit
def activate(t, ACT: tl.constexpr):
    if ACT == 1:
        t = tl.maximum(t, 0.0)
    elif ACT == 2:
        t = tl.minimum(tl.maximum(t, 0.0), 6.0)
    return t


def autotuned(kernel, key, warps=(4, 8), prune=None, stages=(3,)):
    """``kernel`` autotuned over ``warps`` warps per program (and ``stages`` software-pipelining
    stages: 3 is Triton's default) on a GPU: the first launch with a new
    ``key`` (argument names: the block's shape) times each configuration and keeps the fastest.
    ``prune(configs, args) -> configs`` drops configurations that do not suit a launch before any
    is timed. Under the interpreter (decided at import, like ``triton.jit`` itself) the plain
    kernel; its launchers then give ``num_warps`` themselves. The kernels write only their outputs
    and their own scratch, so repeated launches while tuning are harmless."""
    if interpreting():
        return kernel
    prune_by = None
    if prune is not None:
        prune_by = {"early_config_prune": lambda configs, args, **kwargs: prune(configs, {**args, **kwargs})}
    configs = [triton.Config({}, num_warps=w, num_stages=n) for w in warps for n in stages]
    return triton.autotune(configs, key=list(key), prune_configs_by=prune_by)(kernel)


def alignment(n: int) -> int:
    """The largest power of two up to 16 that divides ``n`` (16 for 0): the kernels' *_ALIGN
    arguments, from which the compiler learns that rows of length ``n`` start aligned (Triton
    itself only marks integers divisible by 16)."""
    return 16 if n == 0 else min(16, n & -n)


def launch_options(kernel, num_warps: int) -> dict:
    """Launch keywords: ``num_warps`` for a plain kernel, none for an autotuned one (its
    configuration chooses)."""
    return {} if isinstance(kernel, triton.runtime.Autotuner) else {"num_warps": num_warps}


def _release(version: str) -> tuple:
    """(major, minor) of a version string such as '3.6.0', '2.4.0rc1' or '3.7rc1': the leading
    digits of its first two parts."""
    parts = (version.split("+")[0].split(".") + ["0"])[:2]
    return tuple(int(re.match(r"\d*", part).group() or 0) for part in parts)


def interpreter_problem(triton_version: str = triton.__version__,
                        numpy_version: str = np.__version__) -> Optional[str]:
    """Why the Triton interpreter cannot run these kernels with these versions, or None. Up to
    Triton 3.6 it turns a loop bound computed from a program id into an int by converting a
    one-element array, which NumPy 2.4 refuses (Triton 3.7 fixed it); a GPU is not affected."""
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"the Triton {triton_version} interpreter cannot run these kernels with NumPy "
                f"{numpy_version} (it converts one-element arrays to int, which NumPy 2.4 "
                f"refuses): install triton>=3.7 or numpy<2.4 to run them on CPU")
    return None


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors through the Triton interpreter."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cpu" and not interpreting():
        raise RuntimeError("the Triton kernels need CUDA tensors; CPU tensors run only through the "
                           "Triton interpreter (set TRITON_INTERPRET=1 before importing triton)")
    problem = interpreter_problem() if device.type == "cpu" else None
    if problem:
        raise RuntimeError(problem)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the Triton kernels need CUDA (or interpreted CPU) tensors, got {device}")


def check_dtype(x: torch.Tensor, float64: bool = False) -> None:
    """The kernels take float32, float16 and bfloat16; ``float64``: also float64 (the unfused ops,
    so that ``torch.autograd.gradcheck`` can run on them)."""
    allowed = (torch.float32, torch.float16, torch.bfloat16) + ((torch.float64,) if float64 else ())
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"this kernel takes {names} inputs, got {x.dtype}")


def autocast(*tensors):
    """The tensors as autocast would pass them to a convolution: inside an autocast region,
    float32 / float16 / bfloat16 tensors in its dtype (float64 and None unchanged)."""
    device = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.dtype in (torch.float32, torch.float16, torch.bfloat16)
                 else t for t in tensors)


def dot_mode(dtype: torch.dtype) -> int:
    """The DOT_MODE of ``dot_acc`` for inputs of ``dtype``, in every kernel (fused inference and
    training alike), following PyTorch's policy for convolutions: float32 on tf32 tensor cores
    when ``torch.backends.cudnn.allow_tf32`` is on (PyTorch's default), exact IEEE float32 when it
    is off; half precision on tensor cores with float32 accumulation; float64 exactly. The
    interpreter computes every non-float64 dot in float32 (its bfloat16 dot is wrong), so there
    tf32 and IEEE give the same, exact result."""
    if dtype == torch.float64:
        return 2
    if interpreting():
        return 1
    if dtype == torch.float32:
        return 3 if torch.backends.cudnn.allow_tf32 else 1
    return 0


def generator_layout(generator_weight: torch.Tensor):
    """The generator weight (R, SPG, 1, 1) as the fused kernels read it: (R, GEN_STRIDE) row-major
    with GEN_STRIDE = SPG rounded up to a multiple of 4 (zero columns appended when needed) so that
    every row starts 16-byte aligned; returns (weight, SPG, GEN_STRIDE)."""
    rows, spg = generator_weight.shape[:2]
    flat = generator_weight.reshape(rows, spg)
    stride = -(-spg // 4) * 4
    if stride != spg:
        flat = torch.nn.functional.pad(flat, (0, stride - spg))
    return flat.contiguous(), spg, stride


def generation_rows(signal_block: int, element_size: int, max_warps: int) -> int:
    """Generator rows per tile of ``generate_params``: 64, or more where a tile of 64 rows x
    ``signal_block`` inputs would give a thread of ``max_warps`` warps less than one 8-byte vector
    of the generator."""
    return max(64, 32 * max_warps * max(1, 8 // element_size) // signal_block)


def signal_block(spg: int) -> int:
    """Signal inputs per generation tile: the power of two in 4..32 that pads SPG least (larger on
    ties, fewer loop trips)."""
    return min((-(-spg // s) * s, -s, s) for s in (4, 8, 16, 32))[2]


def accumulator(dtype: torch.dtype):
    """The Triton dtype in which kernels accumulate: float64 for float64 inputs, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def block(n: int, low: int = 16, high: int = 128) -> int:
    """A power-of-two block size covering ``n``, within [low, high] (tl.dot needs >= 16)."""
    return max(low, min(high, triton.next_power_of_2(max(1, n))))


# Upper bound of the channels one tile of the backward kernels holds; None: the GPU bound given
# at each call, or 128 in the interpreter (fewer, larger programs). Tests lower it to run several
# channel blocks through the interpreter.
MAX_CHANNEL_BLOCK = None


def tight_block(n: int, high: int) -> int:
    """The power-of-two block in [16, high] that pads ``n`` least (the larger on a tie): 34
    channels in blocks of 16 (48 computed, not 64), 68 in 16 (80, not 128), 82 in 32 (96)."""
    candidates = [b for b in (16, 32, 64, 128) if b <= max(16, high)]
    return min(candidates, key=lambda b: (triton.cdiv(n, b) * b, -b))


def channel_block(n: int, gpu_high: int, tight: bool = True) -> int:
    """Channels per tile in the training kernels: on a GPU the power of two up to ``gpu_high``
    that pads ``n`` least (``tight_block``), or with ``tight=False`` the one covering ``n``; in the
    interpreter, which pays per program, up to 128 (``MAX_CHANNEL_BLOCK``, which tests lower,
    overrides both)."""
    if MAX_CHANNEL_BLOCK:
        return block(n, high=MAX_CHANNEL_BLOCK)
    if interpreting():
        return block(n, high=128)
    return tight_block(n, gpu_high) if tight else block(n, high=gpu_high)


# Upper bound of the pixels one program handles; None: the default below. Tests lower it to run
# several pixel blocks per patch through the interpreter.
MAX_PIXEL_BLOCK = None


def pixel_block(n: int, low: int = 16) -> int:
    """Pixels per program. On a GPU 64 bounds the registers a tile needs; the interpreter pays a
    fixed cost per program and vectorises within one, so there a whole patch (up to 1024) is one
    tile. ``low``: 16 for tiles that feed tl.dot; 1 where smaller patches run on multiply-adds
    (``mac``), so that their pixels are not padded to 16."""
    high = MAX_PIXEL_BLOCK or (1024 if interpreting() else 64)
    return block(n, low=min(low, high), high=high)


# ------------------------------------------------------------------------------------------------
# Argument checks of the launchers: the shape contract of ``hyperseg.layout`` (shared with the
# reference ops, same messages), plus what only the kernels restrict (dtype, device, k <= 5)
# ------------------------------------------------------------------------------------------------

def check_common(x: torch.Tensor, grid, kernel_size: int, groups: int, padding_mode: str,
                 float64: bool = False) -> None:
    """x (B, C, H, W) of a supported dtype, tiled by ``grid``; k in {1, 3, 5}; groups divide C."""
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, Cin, H, W), got {tuple(x.shape)}")
    check_dtype(x, float64)
    check_grid(x, grid)
    if kernel_size % 2 == 0 or kernel_size < 1 or kernel_size > 5:
        raise ValueError(f"kernel size must be 1, 3 or 5, got {kernel_size}")
    check_padding(padding_mode, kernel_size // 2, x.shape[-2:])
    if groups < 1 or x.shape[1] % groups:
        raise ValueError(f"{x.shape[1]} input channels do not split into {groups} groups")


def check_generated_op(x, signal, generator_weight, *, out_channels, signal_offset,
                       generator_groups, row_start, groups, kernel_size, padding_mode,
                       float64=False) -> int:
    """The checks of a patch-wise convolution whose kernels are generated from the signal;
    returns its row count (``hyperseg.layout.patch_conv_rows``)."""
    cin = check_generated(x, signal, out_channels, groups)
    check_common(x, tuple(signal.shape[2:4]), kernel_size, groups, padding_mode, float64)
    count = patch_conv_rows(cin, out_channels, groups, kernel_size)
    check_generator(signal, generator_weight, signal_offset, generator_groups, row_start, count)
    return count


def output_like(x: torch.Tensor, channels: int) -> torch.Tensor:
    """An uninitialised (B, channels, H, W) tensor like x."""
    return x.new_empty((x.shape[0], channels, x.shape[2], x.shape[3]))
