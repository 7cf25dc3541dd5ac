"""Weight generation (the official ``signal2weights``) with its backward, for training.

The fused inference kernels generate each patch's weights in registers and never store them. A
training step needs the weights' gradient, so there the generation is its own op: a grouped 1x1
convolution of the signal, written as (B, GH, GW, count) per-patch parameter vectors, with Triton
kernels for the gradients of the signal and of the generator weight. Reference semantics:
``hyperseg.ops.generate_weights``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..layout import check_generator
from ._common import (accumulator, alignment, autocast, block, channel_block, check_device,
                      check_dtype, dot_mode, mac)


@triton.jit
def _generate_weights_kernel(
        sig_ptr, gen_ptr, out_ptr, N, GHW, S, SPG, RPG, start, count, width, ROW, ROW_S,
        ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        COUNT_ALIGN: tl.constexpr, GHW_ALIGN: tl.constexpr, PADDED: tl.constexpr):
    # Program (patch block, column block): out[n, j] = sum_s gen[start + r, s] * signal[n, c(r) + s]
    # for the generated row r that column j holds, where c(r) is the first signal channel of
    # row start + r's group. The output is (patches, width) row-major, so each tile row stores
    # BLOCK_R contiguous values, from an offset that is a multiple of COUNT_ALIGN (a power of two
    # dividing width, from the launcher); a tile column of the signal is BLOCK_N consecutive
    # patches (GHW_ALIGN: a power of two dividing the patches per image, hence also N). Unpadded,
    # column j holds row j (width = count); PADDED, the count rows come in runs of ROW that start
    # every ROW_S columns (width = count / ROW x ROW_S), and the columns between runs hold zeros.
    width = width // COUNT_ALIGN * COUNT_ALIGN
    GHW = GHW // GHW_ALIGN * GHW_ALIGN
    N = N // GHW_ALIGN * GHW_ALIGN          # (N = images x GHW)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    n_mask = n < N
    j_mask = j < width
    if PADDED:
        run = j // ROW_S
        r = run * ROW + (j - run * ROW_S)
        r_mask = j_mask & (j - run * ROW_S < ROW)
    else:
        r = j
        r_mask = j_mask
    rows = (start + r).to(tl.int64)
    chan = (rows // RPG) * SPG
    sig_n = (n // GHW).to(tl.int64) * S * GHW + n % GHW
    mask = n_mask[:, None] & r_mask[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=ACC)
    for s in range(SPG):
        g = tl.load(gen_ptr + rows * SPG + s, mask=r_mask, other=0.0).to(ACC)
        v = tl.load(  # interior: vector
            sig_ptr + sig_n[:, None] + (chan + s)[None, :] * GHW, mask=mask, other=0.0)
        acc += v.to(ACC) * g[None, :]
    tl.store(  # interior: vector when COUNT_ALIGN >= 4
        out_ptr + n.to(tl.int64)[:, None] * width + j[None, :], acc.to(out_ptr.dtype.element_ty),
        mask=n_mask[:, None] & j_mask[None, :])


@triton.jit
def _generate_weights_signal_grad_kernel(
        dout_ptr, gen_ptr, dsig_ptr, N, GHW, S, SPG, RPG, start, count, patch_stride, G0,
        gen_stride, DOT_MODE: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, FMA: tl.constexpr, GHW_ALIGN: tl.constexpr,
        ROW_ALIGN: tl.constexpr, GEN_ALIGN: tl.constexpr):
    # Program (patch block, group and signal block within it): dsignal[n, g * SPG + s] = sum over
    # the rows r of group g that were generated (start <= r < start + count) of
    # dout[n, r - start] * gen[r, s]: per block of BLOCK_R rows, the (BLOCK_N x BLOCK_R) tile of
    # the output gradient (each patch's row of count values, read along it) times the rows'
    # (BLOCK_R x BLOCK_S) generator tile, on a dot (or with FMA, at most 8 signal inputs or 16
    # rows per group, broadcast multiply-adds). Groups G0 onwards: those that hold generated rows
    # (the launcher zeroes the others). Each program owns its outputs (no atomics); the row
    # blocks come in a fixed order. GHW_ALIGN: a power of two dividing the patches per image;
    # a patch's count values start patch_stride (>= count) values after the previous patch's;
    # ROW_ALIGN: a power of two dividing patch_stride (at most a 16-byte vector), so that they
    # start aligned; the row blocks start at the offset of the group's first generated row in
    # them rounded down to ROW_ALIGN, and end at its last rounded up: whatever the rows per
    # group (odd in most models), start and count, each tile row of the output gradient is
    # read as aligned vectors. The values this rounding reads outside the group's rows (the
    # neighbouring groups', or the padding after count) are set to zero in registers (a select,
    # not a product, so that not even a NaN there reaches this group's sums), and no generator
    # rows are read for them. The generator's rows of SPG values start every gen_stride (>= SPG;
    # GEN_ALIGN, a power of two dividing it, at most a 16-byte vector), zeros after the SPG: on
    # dots the launcher pads them to 16 bytes, so that each tile row of the generator is read as
    # aligned vectors even where SPG is odd (the columns past SPG are never stored).
    GHW = GHW // GHW_ALIGN * GHW_ALIGN
    gen_stride = gen_stride // GEN_ALIGN * GEN_ALIGN
    N = N // GHW_ALIGN * GHW_ALIGN          # (N = images x GHW)
    patch_stride = patch_stride // ROW_ALIGN * ROW_ALIGN
    n_s_blocks = tl.cdiv(SPG, BLOCK_S)
    g = G0 + tl.program_id(1) // n_s_blocks
    s = (tl.program_id(1) % n_s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = s < SPG
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    # the group's generated rows, as offsets into a patch's count values: o_lo .. o_hi
    o_lo = tl.maximum(start, g * RPG) - start
    o_hi = tl.minimum(start + count, g * RPG + RPG) - start
    o_first = o_lo // ROW_ALIGN * ROW_ALIGN
    o_end = (o_hi + ROW_ALIGN - 1) // ROW_ALIGN * ROW_ALIGN    # (<= patch_stride)
    acc = tl.zeros((BLOCK_N, BLOCK_S), dtype=ACC)
    for k in range(0, tl.cdiv(o_hi - o_first, BLOCK_R)):
        o = o_first + k * BLOCK_R + tl.arange(0, BLOCK_R)
        in_group = (o >= o_lo) & (o < o_hi)
        d = tl.load(  # interior: vector of ROW_ALIGN
            dout_ptr + n.to(tl.int64)[:, None] * patch_stride + o[None, :],
            mask=n_mask[:, None] & (o < o_end)[None, :], other=0.0)
        d = tl.where(in_group[None, :], d, 0.0)
        w = tl.load(  # interior: vector of GEN_ALIGN
            gen_ptr + (start + o).to(tl.int64)[:, None] * gen_stride + s[None, :],
            mask=in_group[:, None] & (s < gen_stride)[None, :], other=0.0)
        acc = mac(d, w.to(d.dtype), acc, DOT_MODE, FMA)
    off = (n // GHW).to(tl.int64)[:, None] * S * GHW + (g * SPG + s)[None, :] * GHW + (n % GHW)[:, None]
    tl.store(dsig_ptr + off, acc.to(dsig_ptr.dtype.element_ty),  # interior: vector
             mask=n_mask[:, None] & s_mask[None, :])


@triton.jit
def _generate_weights_weight_grad_kernel(
        dout_ptr, sig_ptr, dgen_ptr, N, GHW, S, SPG, RPG, start, count, patch_stride,
        DOT_MODE: tl.constexpr, ACC: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, FMA: tl.constexpr,
        GHW_ALIGN: tl.constexpr, ROW_ALIGN: tl.constexpr):
    # Program (group and row block within it, signal block): dgen[r, s] = sum over all patches n
    # of dout[n, r - start] * signal[n, group * SPG + s], one dot per block of patches, in a
    # fixed order (deterministic). Rows that were not generated keep the launcher's zeros. With FMA
    # (at most 8 signal inputs per group, which a dot would pad to 16: 2x or more) the product is
    # summed from broadcast multiply-adds over a (BLOCK_R, BLOCK_N, BLOCK_S) tile instead.
    # GHW_ALIGN: a power of two dividing the patches per image; a patch's count values start
    # patch_stride (>= count) values after the previous patch's, and ROW_ALIGN, a power of two
    # dividing patch_stride (at most a 16-byte vector), aligns them. A group's row blocks start
    # at its first generated row's offset in them rounded down to ROW_ALIGN, so that each tile
    # column of the output gradient (a patch's values for the block's rows) is read as aligned
    # vectors whatever the rows per group (odd in most models), start and count: the rows of the
    # previous group in the first block, and those past the group's end (or count's) in the
    # last, are read but not stored (each row of the product is its own sum; the neighbouring
    # group's programs own them). Only generated rows are stored: the launcher zeroes the others.
    GHW = GHW // GHW_ALIGN * GHW_ALIGN
    N = N // GHW_ALIGN * GHW_ALIGN          # (N = images x GHW)
    patch_stride = patch_stride // ROW_ALIGN * ROW_ALIGN
    n_row_blocks = tl.cdiv(RPG + ROW_ALIGN - 1, BLOCK_R)
    group = tl.program_id(0) // n_row_blocks
    # the group's generated rows, as offsets into a patch's count values: o_lo .. o_hi
    o_lo = tl.maximum(start, group * RPG) - start
    o_hi = tl.minimum(start + count, group * RPG + RPG) - start
    o_end = (o_hi + ROW_ALIGN - 1) // ROW_ALIGN * ROW_ALIGN    # (<= patch_stride)
    o = (o_lo // ROW_ALIGN * ROW_ALIGN + (tl.program_id(0) % n_row_blocks) * BLOCK_R
         + tl.arange(0, BLOCK_R))
    r_mask = (o >= o_lo) & (o < o_hi)
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = s < SPG
    chan = group * SPG + s
    if tl.max(r_mask.to(tl.int32), axis=0) > 0:
        acc = tl.zeros((BLOCK_R, BLOCK_S), dtype=ACC)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < N
            d = tl.load(  # interior: vector of ROW_ALIGN
                dout_ptr + n.to(tl.int64)[None, :] * patch_stride + o[:, None],
                mask=(o < o_end)[:, None] & n_mask[None, :], other=0.0)
            sig_n = (n // GHW).to(tl.int64) * S * GHW + n % GHW
            v = tl.load(sig_ptr + sig_n[:, None] + chan[None, :] * GHW,  # interior: vector
                        mask=n_mask[:, None] & s_mask[None, :], other=0.0)
            acc = mac(d, v, acc, DOT_MODE, FMA)
        tl.store(dgen_ptr + (start + o).to(tl.int64)[:, None] * SPG + s[None, :],
                 acc.to(dgen_ptr.dtype.element_ty), mask=r_mask[:, None] & s_mask[None, :])


def signal_channels(start: int, count: int, spg: int, rpg: int) -> Tuple[int, int]:
    """The signal channels c0 .. c1 read by generated rows start .. start + count: those of the
    groups the rows fall in (empty when count is 0)."""
    if count <= 0:
        return 0, 0
    return start // rpg * spg, ((start + count - 1) // rpg + 1) * spg


def _generated_rows(group: int, start: int, count: int, rpg: int) -> int:
    """How many of ``group``'s rows fall in the generated rows start .. start + count."""
    return min(start + count, group * rpg + rpg) - max(start, group * rpg)


def generation_tiles(n: int, width: int) -> Tuple[int, int]:
    """(BLOCK_N, BLOCK_R) of the forward, for ``n`` patches of ``width`` values: on a GPU, 32
    patches a tile whenever there are more than 16 (the interpreter takes up to 128), even where
    16 would pad fewer (the 656 patches of hyperseg-s-camvid's training step): Triton 3.6 (the
    GPU machine's) compiles the 16-patch bf16 tile to 32 registers and 4 spilled bytes, the
    32-patch one to 56 and no spill (Triton 3.8: 32 and 56, no spill); up to 64 values."""
    return channel_block(n, 32, tight=False), block(width, high=64)


def signal_grad_tiles(n: int, rows: int, spg: int, element_size: int):
    """(BLOCK_N, BLOCK_R, BLOCK_S, FMA) of the signal gradient, for ``n`` patches and at most
    ``rows`` generated rows per group of ``spg`` signal inputs: a dot over blocks of rows (at
    least 16 rows per group and 9 inputs: a dot pads less than 2x), else broadcast multiply-adds
    over a (BLOCK_N, BLOCK_R, BLOCK_S) tile of at most 4,096 products (2,048 for 16-bit inputs)."""
    fma = spg <= 8 or rows < 16
    if not fma:
        return channel_block(n, 32), channel_block(rows, 32), channel_block(spg, 32), False
    block_s = triton.next_power_of_2(spg)
    tile = 4096 if element_size >= 4 else 2048
    block_r = min(channel_block(rows, 16), max(1, tile // (16 * block_s)))
    block_n = min(channel_block(n, 32), max(1, tile // (block_r * block_s)))
    return block_n, block_r, block_s, True


def padded_rows(weight: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """A (rows, SPG) generator weight with each row padded by zeros to a multiple of 16 bytes
    (the weight itself where its rows already are one), and that row stride: the signal
    gradient's dots read the generator's rows as aligned vectors through it (SPG = 13 in fp16:
    rows of 16, a 32 KB copy per thousand rows)."""
    spg = weight.shape[1]
    stride = gradient_stride(spg, weight.element_size())
    if stride == spg:
        return weight, spg
    return torch.nn.functional.pad(weight, (0, stride - spg)), stride


def gradient_stride(count: int, element_size: int) -> int:
    """The patch stride at which to hand ``count`` generated values' gradient (elements of
    ``element_size`` bytes) to ``generate_weights_backward``: count rounded up to a multiple of
    16 bytes, so that each patch's values start 16-byte aligned, which lets both gradient kernels
    read them as 16-byte vectors (count = 882 in 16-bit: 888, +0.7%)."""
    per_vector = max(1, 16 // element_size)
    return -(-count // per_vector) * per_vector


def gradient_warps(block_n: int, block_r: int) -> int:
    """Warps of a gradient program whose output-gradient tile is ``block_n`` patches x
    ``block_r`` rows: two for a tile of at most 256 values (16 x 16), so that each thread still
    reads 4 of them (8 bytes in 16-bit; four warps would give each thread 2, 4 bytes), else
    four."""
    return 2 if block_n * block_r <= 256 else 4


def _shapes(signal: torch.Tensor, weight: torch.Tensor, groups: int):
    b, width, gh, gw = signal.shape
    rows, spg = weight.shape[:2]
    return b * gh * gw, gh * gw, width, spg, rows // groups


# PyTorch custom ops (see the note in patch_conv.py): opaque to torch.compile, with fake
# implementations; they take validated, contiguous arguments only.

def _padded_width(count: int, row: int, row_stride: int) -> int:
    """Values per patch of ``count`` generated in runs of ``row`` every ``row_stride``."""
    return count if row_stride == row else count // row * row_stride


@torch.library.custom_op("hyperseg::generate_weights", mutates_args=())
def _generate_weights_op(signal: torch.Tensor, weight: torch.Tensor, groups: int, start: int,
                         count: int, row: int, row_stride: int) -> torch.Tensor:
    """(B, GH, GW, width): the count generated values per patch, in runs of ``row`` values
    that start every ``row_stride`` (>= row; ``row`` divides count) with zeros between them:
    width = count / row x row_stride (count when row_stride == row)."""
    n, ghw, channels, spg, rpg = _shapes(signal, weight, groups)
    padded = row_stride != row
    width = _padded_width(count, row, row_stride)
    out = signal.new_empty(signal.shape[0], *signal.shape[2:], width)
    block_n, block_r = generation_tiles(n, width)
    _generate_weights_kernel[(triton.cdiv(n, block_n), triton.cdiv(width, block_r))](
        signal, weight, out, n, ghw, channels, spg, rpg, start, count, width, row, row_stride,
        ACC=accumulator(signal.dtype), BLOCK_N=block_n, BLOCK_R=block_r,
        COUNT_ALIGN=alignment(width), GHW_ALIGN=alignment(ghw), PADDED=padded, num_warps=4)
    return out


@_generate_weights_op.register_fake
def _generate_weights_fake(signal, weight, groups, start, count, row, row_stride):
    return signal.new_empty(signal.shape[0], *signal.shape[2:], _padded_width(count, row, row_stride))


@torch.library.custom_op("hyperseg::generate_weights_backward", mutates_args=())
def _generate_weights_backward_op(dout: torch.Tensor, signal: torch.Tensor, weight: torch.Tensor,
                                  groups: int, start: int, count: int, signal_grad: bool,
                                  weight_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dsignal, dweight); a gradient not asked for is an empty tensor. ``dout`` (B, GH, GW, P):
    the gradient of each patch's count generated values, in the first count of its P (the rest
    is never used: a P rounded up to a 16-byte multiple, ``gradient_stride``, makes each patch's
    values start aligned)."""
    dout = dout.contiguous()
    n, ghw, width, spg, rpg = _shapes(signal, weight, groups)
    acc, mode = accumulator(signal.dtype), dot_mode(signal.dtype)
    patch_stride = dout.shape[3]
    # both kernels read each patch's values in runs that start at multiples of row_align: what
    # divides the patch stride, up to a 16-byte vector
    row_align = min(alignment(patch_stride), max(1, 16 // dout.element_size()))
    dsig = dgen = None
    if signal_grad:
        # only the groups holding generated rows have a gradient: the kernel covers their
        # channels c0 .. c1, the others are zeros
        c0, c1 = signal_channels(start, count, spg, rpg)
        dsig = (torch.empty_like if (c0, c1) == (0, width) else torch.zeros_like)(signal)
        if c1 > c0:
            g0, g1 = c0 // spg, c1 // spg
            rows = max(_generated_rows(g, start, count, rpg) for g in range(g0, g1))
            block_n, block_r, block_s, fma = signal_grad_tiles(n, rows, spg, signal.element_size())
            grid = (triton.cdiv(n, block_n), (g1 - g0) * triton.cdiv(spg, block_s))
            # on dots, the generator's rows padded to 16 bytes, read as aligned vectors; the
            # multiply-adds' generator tiles hold 1 or 2 values per thread, and vector reads of
            # them cost registers (sm_90, 16-bit: 60 -> 71), so they read the rows where they
            # lie, value by value (GEN_ALIGN 1)
            gen = weight.reshape(weight.shape[0], spg)
            gen, gen_stride = (gen, spg) if fma else padded_rows(gen)
            gen_align = 1 if fma else min(alignment(gen_stride), 16 // gen.element_size())
            _generate_weights_signal_grad_kernel[grid](
                dout, gen, dsig, n, ghw, width, spg, rpg, start, count, patch_stride, g0,
                gen_stride, DOT_MODE=mode, ACC=acc, BLOCK_N=block_n, BLOCK_R=block_r,
                BLOCK_S=block_s, FMA=fma, GHW_ALIGN=alignment(ghw), ROW_ALIGN=row_align,
                GEN_ALIGN=gen_align, num_warps=gradient_warps(block_n, block_r))
    if weight_grad:
        # the kernel stores the generated rows only
        every_row = (start, count) == (0, weight.shape[0])
        dgen = torch.empty_like(weight) if every_row else torch.zeros_like(weight)
        fma = spg <= 8         # padded to 16 by a dot (9 to 15: a dot still, on tensor cores)
        if fma:
            # the signal inputs padded to a power of two only; a 3-D tile of at most 4,096
            # products (2,048 for 16-bit inputs, whose conversions take registers too)
            tile = 4096 if signal.element_size() >= 4 else 2048
            block_s = triton.next_power_of_2(spg)
            block_r = min(channel_block(rpg, 32), max(1, tile // (16 * block_s)))
            block_n = min(channel_block(n, 32), max(1, tile // (block_r * block_s)))
        else:
            block_r, block_s, block_n = channel_block(rpg, 32), channel_block(spg, 32), channel_block(n, 32)
        grid = (groups * triton.cdiv(rpg + row_align - 1, block_r), triton.cdiv(spg, block_s))
        _generate_weights_weight_grad_kernel[grid](
            dout, signal, dgen, n, ghw, width, spg, rpg, start, count, patch_stride,
            DOT_MODE=mode, ACC=acc, BLOCK_R=block_r, BLOCK_S=block_s, BLOCK_N=block_n, FMA=fma,
            GHW_ALIGN=alignment(ghw), ROW_ALIGN=row_align,
            num_warps=gradient_warps(block_n, block_r))
    return tuple(signal.new_empty(0) if t is None else t for t in (dsig, dgen))


@_generate_weights_backward_op.register_fake
def _generate_weights_backward_fake(dout, signal, weight, groups, start, count, signal_grad,
                                    weight_grad):
    return (torch.empty_like(signal) if signal_grad else signal.new_empty(0),
            torch.empty_like(weight) if weight_grad else signal.new_empty(0))


class GenerateWeightsFunction(torch.autograd.Function):
    """``generate_weights`` with its Triton backward. Saves the signal and the generator weight
    (both small: one vector per patch, and the parameters)."""

    @staticmethod
    def forward(ctx, signal, weight, groups, start, count):
        signal = signal.contiguous()
        weight = weight.contiguous()
        ctx.save_for_backward(signal, weight)
        ctx.generation = (groups, start, count)
        return torch.ops.hyperseg.generate_weights(signal, weight, groups, start, count, count, count)

    @staticmethod
    def backward(ctx, dout):
        signal, weight = ctx.saved_tensors
        need_signal, need_weight = ctx.needs_input_grad[:2]
        dsig, dgen = torch.ops.hyperseg.generate_weights_backward(
            dout, signal, weight, *ctx.generation, need_signal, need_weight)
        return dsig if need_signal else None, dgen if need_weight else None, None, None, None


def generate_weights(signal: torch.Tensor, weight: torch.Tensor, *, groups: int = 1, start: int = 0,
                     count: Optional[int] = None) -> torch.Tensor:
    """Triton ``hyperseg.ops.generate_weights``: rows ``start .. start + count`` of the grouped 1x1
    convolution ``weight`` (R, S / groups, 1, 1) of ``signal`` (B, S, GH, GW), as (B, GH, GW, count).

    The output has the signal's dtype (float32, float16, bfloat16 or float64); the weight may have
    another. Inside an autocast region both are cast to its dtype first, as for ``F.conv2d``.
    Differentiable in both, with Triton backward kernels (``GenerateWeightsFunction``), which
    accumulate in float32 (float64 for float64).
    """
    if signal.dim() != 4:
        raise ValueError(f"signal must have shape (B, S, GH, GW), got {tuple(signal.shape)}")
    check_dtype(signal, float64=True)
    if not weight.is_floating_point():
        raise TypeError(f"generator weight must be a floating-point tensor, got {weight.dtype}")
    if count is None:
        count = (weight.shape[0] if weight.dim() else 0) - start
    check_generator(signal, weight, 0, groups, start, count)
    if weight.shape[1] * groups != signal.shape[1]:
        raise ValueError(f"a generator of {groups} group(s) of {weight.shape[1]} channels reads "
                         f"{weight.shape[1] * groups} signal channels, the signal has {signal.shape[1]}")
    check_device(signal, weight)
    signal, weight = autocast(signal, weight)
    return GenerateWeightsFunction.apply(signal, weight, groups, start, count)


def executed_work(name: str, launch) -> Optional[dict]:
    """Multiply-accumulates a recorded launch executes, padded tiles included, and the useful ones
    (the interface of ``bench/kernel_report.py``, see bench/README.md): the forward, BLOCK_N x
    BLOCK_R x SPG per program; the signal gradient, a BLOCK_N x BLOCK_R x BLOCK_S dot (or
    multiply-add tile) per block of its group's generated rows, the first block starting at a
    multiple of ROW_ALIGN; the weight gradient, a BLOCK_R x BLOCK_S x BLOCK_N dot (or
    multiply-add tile) per patch block in the programs holding generated rows (their blocks
    likewise start at a multiple of ROW_ALIGN; the others do nothing). Useful: patches x
    generated rows x SPG, for each of the three."""
    a = launch.args
    programs = launch.grid[0] * launch.grid[1] * launch.grid[2]
    useful = a["N"] * a["count"] * a["SPG"]
    if name == "_generate_weights_kernel":
        macs = programs * a["BLOCK_N"] * a["BLOCK_R"] * a["SPG"]
        return {"macs": macs, "tensor_core_macs": 0, "useful_macs": useful, "parts": {"generation": macs}}
    start, end, rpg, spg = a["start"], a["start"] + a["count"], a["RPG"], a["SPG"]
    align = a["ROW_ALIGN"]      # (row blocks start at offsets from start that are multiples of it)
    if name == "_generate_weights_signal_grad_kernel":
        s_blocks = -(-spg // a["BLOCK_S"])
        row_blocks = 0
        for p in range(launch.grid[1]):
            g = a["G0"] + p // s_blocks
            lo, hi = max(start, g * rpg) - start, min(end, g * rpg + rpg) - start
            row_blocks += -(-(hi - lo // align * align) // a["BLOCK_R"])
        macs = launch.grid[0] * row_blocks * a["BLOCK_N"] * a["BLOCK_R"] * a["BLOCK_S"]
        tensor = macs if a["DOT_MODE"] in (0, 3) and not a["FMA"] else 0
        return {"macs": macs, "tensor_core_macs": tensor, "useful_macs": useful,
                "parts": {"signal_grad": macs}}
    if name == "_generate_weights_weight_grad_kernel":
        row_blocks = -(-(rpg + align - 1) // a["BLOCK_R"])
        active = 0
        for p in range(launch.grid[0]):
            g = p // row_blocks
            lo, hi = max(start, g * rpg) - start, min(end, g * rpg + rpg) - start
            first = lo // align * align + (p % row_blocks) * a["BLOCK_R"]
            active += max(first, lo) < min(first + a["BLOCK_R"], hi)
        macs = active * launch.grid[1] * -(-a["N"] // a["BLOCK_N"]) * a["BLOCK_N"] * a["BLOCK_R"] * a["BLOCK_S"]
        tensor = macs if a["DOT_MODE"] in (0, 3) and not a["FMA"] else 0
        return {"macs": macs, "tensor_core_macs": tensor, "useful_macs": useful,
                "parts": {"weight_grad": macs}}
    return None
