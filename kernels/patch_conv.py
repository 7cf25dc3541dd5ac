"""Patch-wise dynamic convolution with given per-patch kernels, differentiable through Triton
backward kernels. Reference semantics: ``hyperseg.ops.patch_conv2d``.

In order: the forward kernel and its launcher, the backward kernels and their launcher, the custom
ops (with fake implementations), the autograd Function, the public ``patch_conv2d``, and the
executed-work model used by ``bench/kernel_report.py``. Its training counterpart with generated
kernels is ``generated_patch_conv2d`` (generated_patch_conv.py); the fused inference block is
``meta_patch_conv`` (meta_patch_conv.py).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (PADDING_CODES, accumulator, alignment, autocast, block, border_index,
                      channel_block, check_common, check_device, depthwise3_vectors, dot_acc, mac,
                      dot_mode, mirror_slots, mirror_source, output_like, patch_pixels, pixel_block,
                      shift_vectors, tap_source, tap_vector, vector_pixels)
from ..layout import check_patch_weight


@triton.jit
def _depthwise_taps(rows, w_taps, co, co_mask, yy, xx, p_mask, H, W, K: tl.constexpr,
                    PAD_MODE: tl.constexpr, ACC: tl.constexpr, BLOCK_CO: tl.constexpr,
                    BLOCK_P: tl.constexpr):
    # The k x k depthwise taps of a (BLOCK_CO x BLOCK_P) tile, one load of the tile per tap with
    # its pixels mapped through the border (``rows``: the channels' planes; ``w_taps``: the
    # patch's (channels, k, k) kernel).
    KK: tl.constexpr = K * K
    acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=ACC)
    for t in range(KK):
        src, valid = tap_source(yy, xx, t, H, W, K, PAD_MODE)
        xv = tl.load(  # interior: vector of PW when K == 1
            rows + src[None, :], mask=co_mask[:, None] & (p_mask & valid)[None, :],
            other=0.0).to(ACC)
        wt = tl.load(w_taps + co * KK + t, mask=co_mask, other=0.0).to(ACC)
        acc += wt[:, None] * xv
    return acc


@triton.jit
def _patch_conv_kernel(
        x_ptr, out_ptr, w_ptr, bias_ptr,
        H, W, GH, GW, CIN, COUT, CIN_G, COUT_G, CI_DOT, W_ROW,
        K: tl.constexpr, PAD_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
        DEPTHWISE: tl.constexpr, DOT_MODE: tl.constexpr, ACC: tl.constexpr,
        BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr, FMA: tl.constexpr,
        TAIL: tl.constexpr, PW: tl.constexpr, VEC: tl.constexpr, W_ALIGN: tl.constexpr):
    # Program (patch, channel block, pixel block): axis 0 is one patch of one image, axis 1 a
    # block of output channels within one group (depthwise: a block of channels), axis 2 a block
    # of the patch's pixels in row-major order, so a tile row of x is pw contiguous pixels.
    # Dense: input channels 0 .. CI_DOT in blocks of BLOCK_CI (dots); with TAIL the rest, fewer
    # than 16, one rank-1 multiply-add each (a dot would pad them to 16). VEC > 1 (3 x 3
    # depthwise, PW and BLOCK_P multiples of VEC): patches away from the left and right borders
    # take their taps from aligned vectors of VEC pixels shifted in registers. W_ROW: the
    # elements from one output channel's kernel to the next (CIN_G * K * K, or more where the
    # generator pads the rows; W_ALIGN: a power of two dividing it), so a dense 1x1 tile row of
    # kernel values is BLOCK_CI contiguous values from an aligned offset.
    pid_patch = tl.program_id(0)
    pid_co = tl.program_id(1)
    pid_p = tl.program_id(2)
    W = GW * PW                             # (the image's width: a multiple of PW)
    b, gi, gj, yy, xx, p_mask = patch_pixels(pid_patch, pid_p, H, GH, GW, PW, BLOCK_P)
    HW = H * W
    KK: tl.constexpr = K * K
    x_base = x_ptr + b.to(tl.int64) * CIN * HW
    # the kernels: (B, GH, GW, COUT, CIN_G, K, K), COUT rows W_ROW apart, each row contiguous
    W_ROW = W_ROW // W_ALIGN * W_ALIGN
    w_base = w_ptr + pid_patch.to(tl.int64) * COUT * W_ROW

    if DEPTHWISE:
        co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
        co_mask = co < COUT
        rows = x_base + co.to(tl.int64)[:, None] * HW
        if VEC > 1:
            if (gj > 0) & (gj < GW - 1):
                vy, vx, v_mask = vector_pixels(pid_p * BLOCK_P, gi, gj, H // GH, PW, VEC, BLOCK_P)
                acc = tl.reshape(depthwise3_vectors(rows[:, :, None], w_base, co, co_mask, vy, vx,
                                                    v_mask, H, W, PAD_MODE, VEC, BLOCK_CO,
                                                    BLOCK_P, ACC), (BLOCK_CO, BLOCK_P))
            else:
                acc = _depthwise_taps(rows, w_base, co, co_mask, yy, xx, p_mask, H, W, K,
                                      PAD_MODE, ACC, BLOCK_CO, BLOCK_P)
        else:
            acc = _depthwise_taps(rows, w_base, co, co_mask, yy, xx, p_mask, H, W, K, PAD_MODE,
                                  ACC, BLOCK_CO, BLOCK_P)
    else:
        n_co_blocks = tl.cdiv(COUT_G, BLOCK_CO)
        g = pid_co // n_co_blocks
        co_local = (pid_co % n_co_blocks) * BLOCK_CO + tl.arange(0, BLOCK_CO)
        co_mask = co_local < COUT_G
        co = g * COUT_G + co_local
        acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=ACC)
        for ci0 in range(0, CI_DOT, BLOCK_CI):
            ci_local = ci0 + tl.arange(0, BLOCK_CI)
            ci_mask = ci_local < CI_DOT
            ci = g * CIN_G + ci_local
            w_mask = co_mask[:, None] & ci_mask[None, :]
            for t in range(KK):
                src, valid = tap_source(yy, xx, t, H, W, K, PAD_MODE)
                m = ci_mask[:, None] & (p_mask & valid)[None, :]
                xv = tl.load(  # interior: vector of PW when K == 1
                    x_base + ci.to(tl.int64)[:, None] * HW + src[None, :],
                    mask=m, other=0.0)
                # index of (co, ci, t) in the (COUT, CIN_G, K, K) kernel of this patch
                widx = co[:, None] * W_ROW + ci_local[None, :] * KK + t
                if FMA:
                    # the last block reads on to the (aligned) row's end, so that its mask is
                    # constant over aligned vectors; what lies past CIN_G (the padding) is zeroed
                    # in registers, so no value there reaches the sum, whatever it holds
                    wv = tl.load(  # interior: vector of W_ALIGN
                        w_base + widx, mask=co_mask[:, None] & (ci_local < W_ROW)[None, :],
                        other=0.0)
                    wv = tl.where(ci_mask[None, :], wv, 0.0)
                else:
                    wv = tl.load(  # interior: vector of W_ALIGN when K == 1
                        w_base + widx, mask=w_mask, other=0.0)
                acc = mac(wv, xv, acc, DOT_MODE, FMA)
        if TAIL:
            for ci_t in range(CI_DOT, CIN_G):
                x_row = x_base + (g * CIN_G + ci_t).to(tl.int64) * HW
                for t in range(KK):
                    src, valid = tap_source(yy, xx, t, H, W, K, PAD_MODE)
                    xv = tl.load(  # interior: vector of PW when K == 1
                        x_row + src, mask=p_mask & valid, other=0.0)
                    wv = tl.load(w_base + co * W_ROW + ci_t * KK + t, mask=co_mask, other=0.0)
                    acc += wv.to(ACC)[:, None] * xv.to(ACC)[None, :]

    if HAS_BIAS:
        bias = tl.load(bias_ptr + pid_patch.to(tl.int64) * COUT + co, mask=co_mask, other=0.0)
        acc += bias.to(ACC)[:, None]
    out_off = b.to(tl.int64) * COUT * HW + co.to(tl.int64)[:, None] * HW + (yy * W + xx)[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty),  # interior: vector of PW
             mask=co_mask[:, None] & p_mask[None, :])


def uses_fma(depthwise: bool, kernel_size: int, cin_g: int, cout_g: int, block_p: int) -> bool:
    """Whether a dense 1x1 convolution runs on multiply-adds (``mac`` with FMA) rather than a
    tl.dot: when its patches have fewer than 16 pixels or its groups fewer than 16 input or
    output channels, a dot would pad that dimension to 16 and execute the padding (2x or more)."""
    return not depthwise and kernel_size == 1 and min(block_p, cin_g, cout_g) < 16


def fma_channel_blocks(cin_g: int, cout_g: int, block_p: int, limit: int = 4096):
    """(BLOCK_CI, BLOCK_CO) of a multiply-add tile: blocks that cover small channel counts
    exactly, their (channels x channels x pixels) product within ``limit`` values (4,096: 32 per
    thread at 4 warps)."""
    block_ci = min(channel_block(cin_g, 16), triton.next_power_of_2(cin_g))
    block_co = min(channel_block(cout_g, 64), triton.next_power_of_2(cout_g))
    while block_ci * block_co * block_p > limit and max(block_ci, block_co) > 1:
        if block_ci >= block_co:
            block_ci //= 2
        else:
            block_co //= 2
    return block_ci, block_co


def dense_dot_warps(depthwise: bool, fma: bool, block_co: int, block_ci: int, block_p: int) -> int:
    """Warps of a dense convolution program on dots: two where each of its tiles (channels x
    pixels of the input and of the output or its gradient, output x input channels of the
    kernels) holds at most 256 values, so that a thread still moves 4 of them (8 bytes in 16-bit;
    four warps would give it 2, 4 bytes; compiled for sm_90, the 16 x 16 x 16 tiles took the same
    registers on two warps), else four. Depthwise and multiply-add tiles keep their own rule
    (multiply-add tiles on two warps held up to 1.5x the registers)."""
    if depthwise or fma or max(block_ci * block_p, block_co * block_ci, block_co * block_p) > 256:
        return 4
    return 2


def dot_channels(n: int, block: int) -> Tuple[int, int]:
    """(channels in dots, channels per dot) for a reduction over ``n`` channels in tl.dot
    blocks of up to ``block``: above 16 channels, the largest multiple of 16 goes into dots, in
    the largest power-of-two block up to ``block`` that divides it, and the rest (fewer than 16,
    which a dot would pad to 16: 22 channels cost 32) into rank-1 multiply-adds (the kernels'
    TAIL). At most 16 channels: one covering dot, as before."""
    if n <= 16 or n % 16 == 0:
        return n, block
    dots = n // 16 * 16
    while dots % block:
        block //= 2
    return dots, block


def kernel_rows(weight: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(kernels, row stride): ``weight`` (B, GH, GW, Cout, Cin / groups, k, k) as the kernels
    read it, and the elements from one output channel's kernel to the next. A weight whose rows
    are padded (the layout ``padded_row`` gives, which ``generated_patch_conv2d`` generates) is
    read in place; any other layout is copied to a contiguous one (row stride Cin / groups x k x k)."""
    cin_g, k = weight.shape[4:6]
    row = weight.stride(3)
    if row > cin_g * k * k and weight.stride() == padded_strides(weight.shape, row):
        return weight, row
    return weight.contiguous(), cin_g * k * k


def padded_strides(shape, row: int) -> Tuple[int, ...]:
    """Strides of per-patch kernels of ``shape`` (B, GH, GW, Cout, Cin / groups, k, k) whose
    output channels' rows start ``row`` elements apart (the padded layout)."""
    _, gh, gw, cout, _, k, _ = shape
    return (gh * gw * cout * row, gw * cout * row, cout * row, row, k * k, k, 1)


def padded_row(element_size: int, cin_g: int, cout_g: int, kernel_size: int) -> int:
    """The row stride at which to generate the kernels of a patch-wise convolution (kernels of
    ``element_size`` bytes): a dense 1x1 convolution with at least 16 input and 16 output
    channels per group reads each output channel's kernel row as vectors along the input
    channels (on dots, or on multiply-adds for patches of fewer than 16 pixels, whose per-patch
    kernels are most of what they read), which needs rows that start 16-byte aligned, so its
    rows are padded to a multiple of 16 bytes (82 channels in 16-bit: 88, +7%). Otherwise (k x k,
    depthwise, narrow groups, whose weight tiles hold about one value per thread) Cin / groups x
    k x k."""
    row = cin_g * kernel_size * kernel_size
    if kernel_size != 1 or min(cin_g, cout_g) < 16:
        return row
    per_vector = max(1, 16 // element_size)
    return -(-row // per_vector) * per_vector


def _launch(x, out, weight, bias, groups, padding_mode):
    b, cin, h, w = x.shape
    weight, w_row = kernel_rows(weight)
    cout = out.shape[1]
    _, gh, gw, _, cin_g, kernel_size, _ = weight.shape
    ph, pw = h // gh, w // gw
    cout_g = cout // groups
    depthwise = cin_g == 1 and cout_g == 1
    block_p = pixel_block(ph * pw, low=1 if depthwise or kernel_size == 1 else 16)
    # a GPU tile holds at most 2048 (depthwise: elementwise taps; 1024 for 16-bit inputs, whose
    # conversions need more registers) or 64 x BLOCK_P (dense: a dot per input-channel block)
    # accumulators: 16 or 32 per thread at 4 warps, no spills
    accumulators = 2048 if x.element_size() >= 4 else 1024
    block_co = (channel_block(cout, max(16, accumulators // block_p)) if depthwise
                else channel_block(cout_g, 64))
    block_ci = channel_block(cin_g, 32)
    fma = uses_fma(depthwise, kernel_size, cin_g, cout_g, block_p)
    ci_dot = cin_g
    if fma:         # 16-bit inputs: half the tile (their conversions made ptxas spill 8-32 B)
        block_ci, block_co = fma_channel_blocks(cin_g, cout_g, block_p,
                                                4096 if x.element_size() >= 4 else 2048)
    elif not depthwise:
        ci_dot, block_ci = dot_channels(cin_g, block_ci)
    n_co = triton.cdiv(cout, block_co) if depthwise else groups * triton.cdiv(cout_g, block_co)
    grid = (b * gh * gw, n_co, triton.cdiv(ph * pw, block_p))
    # the vector taps hold three shifted tiles per tap row: on 8 warps (with 4, 100-200
    # registers, and 16-bit inputs spilled 144 B at hyperseg-m's 10-pixel rows)
    vec = tap_vector(x.dtype, kernel_size, pw, block_p) if depthwise else 1
    _patch_conv_kernel[grid](
        x, out, weight, bias if bias is not None else x, h, w, gh, gw, cin, cout, cin_g, cout_g,
        ci_dot, w_row, K=kernel_size, PAD_MODE=PADDING_CODES[padding_mode],
        HAS_BIAS=bias is not None,
        DEPTHWISE=depthwise, DOT_MODE=dot_mode(x.dtype), ACC=accumulator(x.dtype),
        BLOCK_CO=block_co, BLOCK_CI=block_ci, BLOCK_P=block_p, FMA=fma, TAIL=ci_dot < cin_g,
        PW=pw, VEC=vec, W_ALIGN=alignment(w_row),
        num_warps=8 if vec > 1 else dense_dot_warps(depthwise, fma, block_co, block_ci, block_p),
        # tf32 tensor cores read both dot operands K-major from shared memory: a pipelined
        # (asynchronous) copy of an image tile, contiguous along the pixels, moves 4 bytes per
        # thread; unpipelined, it is loaded as vectors and transposed on its way there
        num_stages=1 if dot_mode(x.dtype) == 3 and not depthwise and not fma else 3)
    return out


# ------------------------------------------------------------------------------------------------
# Backward: the gradients of x, of the per-patch kernels and of the per-patch bias
# ------------------------------------------------------------------------------------------------

@triton.jit
def _input_grad_1x1(acc, pid_patch, g, ci, ci_local, ci_mask, pix, q_mask, w_ptr, dout_base, HW,
                    COUT, CIN_G, COUT_G, CO_DOT, W_ROW, DEPTHWISE: tl.constexpr,
                    DOT_MODE: tl.constexpr, ACC: tl.constexpr, BLOCK_CO: tl.constexpr,
                    FMA: tl.constexpr, TAIL: tl.constexpr):
    # A 1x1 convolution reads each input pixel only at the same output pixel, with its own
    # patch's kernel: no halo, no neighbours, no border cases (straight-line code, which keeps
    # the accumulator in registers). Output channels 0 .. CO_DOT go through dots; with TAIL the
    # rest (fewer than 16) through rank-1 multiply-adds. A kernel row is read up to W_ROW (its
    # padded length; aligned): the values past CIN_G only reach accumulator rows not stored.
    w_base = w_ptr + pid_patch.to(tl.int64) * COUT * W_ROW
    w_mask = ci_local < W_ROW
    if DEPTHWISE:
        wv = tl.load(w_base + ci, mask=ci_mask, other=0.0)
        gv = tl.load(  # interior: vector of PW
            dout_base + ci.to(tl.int64)[:, None] * HW + pix[None, :],
            mask=ci_mask[:, None] & q_mask[None, :], other=0.0)
        acc += wv.to(ACC)[:, None] * gv.to(ACC)
    else:
        for co0 in range(0, CO_DOT, BLOCK_CO):
            co_local = co0 + tl.arange(0, BLOCK_CO)
            co_mask = co_local < CO_DOT
            co = g * COUT_G + co_local
            wt = tl.load(  # interior: vector of W_ALIGN
                w_base + co[None, :] * W_ROW + ci_local[:, None],
                mask=w_mask[:, None] & co_mask[None, :], other=0.0)
            gv = tl.load(  # interior: vector of PW
                dout_base + co.to(tl.int64)[:, None] * HW + pix[None, :],
                mask=co_mask[:, None] & q_mask[None, :], other=0.0)
            acc = mac(wt, gv, acc, DOT_MODE, FMA)
        if TAIL:
            for co_t in range(CO_DOT, COUT_G):
                co1 = g * COUT_G + co_t
                wt = tl.load(w_base + co1 * W_ROW + ci_local, mask=w_mask, other=0.0)
                gv = tl.load(  # interior: vector of PW
                    dout_base + co1.to(tl.int64) * HW + pix, mask=q_mask,
                    other=0.0)
                acc += wt.to(ACC)[:, None] * gv.to(ACC)[None, :]
    return acc


@triton.jit
def _input_grad_tap(acc, t, vy, vx, ok, vy_lo, vy_hi, vx_lo, vx_hi, b, g, ci, ci_local, ci_mask,
                    w_ptr, dout_base, H, W, GH, GW, PH, PW, COUT, CIN_G, COUT_G, W_ROW,
                    K: tl.constexpr,
                    DEPTHWISE: tl.constexpr, DOT_MODE: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_CO: tl.constexpr):
    # Tap t of the input gradient: add to ``acc`` (input channels x pixels) the contribution of
    # the output pixels p = v - d_t that read the block's pixels (virtual indices vy, vx; ``ok``:
    # valid ones, bounding box vy_lo..vy_hi x vx_lo..vx_hi) through tap t.
    R: tl.constexpr = K // 2
    KK: tl.constexpr = K * K
    HW = H * W
    py = vy - (t // K - R)
    px = vx - (t % K - R)
    pm = ok & (py >= 0) & (py < H) & (px >= 0) & (px < W)
    py = tl.minimum(tl.maximum(py, 0), H - 1)
    px = tl.minimum(tl.maximum(px, 0), W - 1)
    pix = py * W + px
    if DEPTHWISE:
        # one weight per (channel, pixel): gather it from p's patch
        w_off = ((b * GH + py // PH) * GW + px // PW).to(tl.int64) * COUT * KK
        m2 = ci_mask[:, None] & pm[None, :]
        wv = tl.load(w_ptr + w_off[None, :] + (ci * KK + t)[:, None], mask=m2, other=0.0)
        gv = tl.load(dout_base + ci.to(tl.int64)[:, None] * HW + pix[None, :], mask=m2, other=0.0)
        acc += wv.to(ACC) * gv.to(ACC)
    else:
        # the pixels whose p lies in one patch (nr, nc) share its kernel: one dot
        # W[nr, nc, :, :, t]^T @ dout per such patch (its own patch inside, up to a few
        # neighbours at patch edges) and output-channel block
        pr = py // PH
        pc = px // PW
        r_lo = tl.maximum(vy_lo - (t // K - R), 0) // PH
        r_hi = tl.minimum(vy_hi - (t // K - R), H - 1) // PH
        c_lo = tl.maximum(vx_lo - (t % K - R), 0) // PW
        c_hi = tl.minimum(vx_hi - (t % K - R), W - 1) // PW
        for nr in range(r_lo, r_hi + 1):
            for nc in range(c_lo, c_hi + 1):
                nm = pm & (pr == nr) & (pc == nc)
                w_base = w_ptr + ((b * GH + nr) * GW + nc).to(tl.int64) * COUT * W_ROW
                for co0 in range(0, COUT_G, BLOCK_CO):
                    co_local = co0 + tl.arange(0, BLOCK_CO)
                    co_mask = co_local < COUT_G
                    co = g * COUT_G + co_local
                    wt = tl.load(w_base + co[None, :] * W_ROW + ci_local[:, None] * KK + t,
                                 mask=ci_mask[:, None] & co_mask[None, :], other=0.0)
                    gv = tl.load(dout_base + co.to(tl.int64)[:, None] * HW + pix[None, :],
                                 mask=co_mask[:, None] & nm[None, :], other=0.0)
                    acc = dot_acc(wt, gv, acc, DOT_MODE)
    return acc


@triton.jit
def _neighbour_taps(own, t: tl.constexpr, dy: tl.constexpr, dx: tl.constexpr, row_out, row_ok,
                    col_out, ci_mask, GW, PATCH, ACC: tl.constexpr):
    # The weight of tap t = (dy + 1, dx + 1) for a (groups, VEC) tile of pixels q as read from
    # the output pixels p = q - (dy, dx): the patch's own (``own``: its kernel at the block's
    # channels), the neighbour's above / below where p leaves the patch's rows (``row_out``;
    # ``row_ok``: that neighbour exists), beside it where p leaves its columns (``col_out``), or
    # the diagonal one. Four per-channel loads and selects, not a per-pixel gather.
    w = tl.load(own + t, mask=ci_mask, other=0.0).to(ACC)[:, None, None]
    if dy != 0:
        w_row = tl.load(own - dy * GW * PATCH + t, mask=ci_mask & row_ok, other=0.0)
        w = tl.where(row_out[None, :, :], w_row.to(ACC)[:, None, None], w)
    if dx != 0:
        w_col = tl.load(own - dx * PATCH + t, mask=ci_mask, other=0.0).to(ACC)[:, None, None]
        if dy != 0:
            w_diag = tl.load(own - (dy * GW + dx) * PATCH + t, mask=ci_mask & row_ok, other=0.0)
            w_col = tl.where(row_out[None, :, :], w_diag.to(ACC)[:, None, None], w_col)
        w = tl.where(col_out[None, :, :], w_col, w)
    return w


@triton.jit
def _input_grad_depthwise3_vectors(w_ptr, dout_base, b, gi, gj, p0, ci, ci_mask, H, W, GH, GW,
                                   COUT, PW: tl.constexpr, VEC: tl.constexpr,
                                   BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr,
                                   ACC: tl.constexpr):
    # The direct part (border mirror images aside) of the 3 x 3 depthwise input gradient of the
    # pixel block at p0 of a patch away from the image's left and right borders:
    # dx[c, q] = sum over taps t = (dy + 1, dx + 1) of w[patch(p), c, t] * dout[c, p] for
    # p = q - (dy, dx) in the image. Per tap row, the gradient's aligned vectors at the block's
    # pixels and beside them (in the image: the patch is not at the left or right border),
    # shifted in registers; the weights from ``_neighbour_taps``.
    GROUPS: tl.constexpr = BLOCK_P // VEC
    PH = H // GH
    HW = H * W
    PATCH = COUT * 9
    qy, qx, q_mask = vector_pixels(p0, gi, gj, PH, PW, VEC, BLOCK_P)
    col = qx - gj * PW
    rows = dout_base + ci.to(tl.int64)[:, None, None] * HW
    own = w_ptr + ((b * GH + gi) * GW + gj).to(tl.int64) * PATCH + ci * 9
    acc = tl.zeros((BLOCK_CI, GROUPS, VEC), dtype=ACC)
    for ky in tl.static_range(3):
        py = qy - (ky - 1)
        at = rows + (tl.minimum(tl.maximum(py, 0), H - 1) * W + qx)[None, :, :]
        mask = ci_mask[:, None, None] & (q_mask & (py >= 0) & (py < H))[None, :, :]
        row_out = (py < gi * PH) | (py >= gi * PH + PH)
        row_ok = (gi - (ky - 1) >= 0) & (gi - (ky - 1) < GH)
        cur = tl.load(at, mask=mask, other=0.0).to(ACC)  # interior: vector of PW
        acc += _neighbour_taps(own, ky * 3 + 1, ky - 1, 0, row_out, row_ok, col < 0, ci_mask, GW,
                               PATCH, ACC) * cur
        # tap (ky, 2): p one column to the left of q; tap (ky, 0): one to the right
        prev = tl.load(at - VEC, mask=mask, other=0.0).to(ACC)  # interior: vector of PW
        left, _ = shift_vectors(prev, cur, cur, VEC, BLOCK_CI, GROUPS)
        acc += _neighbour_taps(own, ky * 3 + 2, ky - 1, 1, row_out, row_ok, col == 0, ci_mask, GW,
                               PATCH, ACC) * left
        nxt = tl.load(at + VEC, mask=mask, other=0.0).to(ACC)  # interior: vector of PW
        _, right = shift_vectors(cur, cur, nxt, VEC, BLOCK_CI, GROUPS)
        acc += _neighbour_taps(own, ky * 3, ky - 1, -1, row_out, row_ok, col == PW - 1, ci_mask,
                               GW, PATCH, ACC) * right
    return acc


@triton.jit
def _patch_conv_input_grad_kernel(
        dout_ptr, w_ptr, dx_ptr,
        H, W, GH, GW, CIN, COUT, CIN_G, COUT_G, CO_DOT, W_ROW,
        K: tl.constexpr, PAD_MODE: tl.constexpr, SLOTS: tl.constexpr, DEPTHWISE: tl.constexpr,
        DOT_MODE: tl.constexpr, ACC: tl.constexpr,
        BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, FMA: tl.constexpr,
        TAIL: tl.constexpr, PW: tl.constexpr, VEC: tl.constexpr, W_ALIGN: tl.constexpr):
    # Program (patch, input-channel block, pixel block), the forward's layout with input and
    # output channels swapped: the gradient of a block of input pixels q of one patch, gathered
    # from every output pixel that read them (a gather, not a scatter: no atomics, deterministic).
    # Output pixel p reads q through tap t when border_index(p + d_t) == q, i.e. p = v - d_t for a
    # virtual index v of q (``mirror_source``: q itself, or its mirror images beyond the border).
    # p may lie in a neighbouring patch, whose kernel then applies. VEC > 1 (3 x 3 depthwise):
    # in patches away from the left and right borders, q itself (slot 0) from aligned vectors.
    # W_ROW (W_ALIGN): the kernels' row stride, as in the forward.
    pid_patch = tl.program_id(0)
    pid_ci = tl.program_id(1)
    pid_p = tl.program_id(2)
    W = GW * PW                             # (the image's width: a multiple of PW)
    b, gi, gj, qy, qx, q_mask = patch_pixels(pid_patch, pid_p, H, GH, GW, PW, BLOCK_P)
    HW = H * W
    KK: tl.constexpr = K * K
    R: tl.constexpr = K // 2
    PH = H // GH
    W_ROW = W_ROW // W_ALIGN * W_ALIGN
    dout_base = dout_ptr + b.to(tl.int64) * COUT * HW
    if DEPTHWISE:
        g = 0
        ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
        ci_local = ci
        ci_mask = ci < CIN
    else:
        n_ci_blocks = tl.cdiv(CIN_G, BLOCK_CI)
        g = pid_ci // n_ci_blocks
        ci_local = (pid_ci % n_ci_blocks) * BLOCK_CI + tl.arange(0, BLOCK_CI)
        ci_mask = ci_local < CIN_G
        ci = g * CIN_G + ci_local
    acc = tl.zeros((BLOCK_CI, BLOCK_P), dtype=ACC)
    if K == 1:
        acc = _input_grad_1x1(acc, pid_patch, g, ci, ci_local, ci_mask, qy * W + qx, q_mask, w_ptr,
                              dout_base, HW, COUT, CIN_G, COUT_G, CO_DOT, W_ROW, DEPTHWISE,
                              DOT_MODE, ACC, BLOCK_CO, FMA, TAIL)
    else:
        # the block's bounding box; mirror images exist only for pixels within R of the border
        y_first = gi * PH + (pid_p * BLOCK_P) // PW
        y_last = tl.minimum(gi * PH + PH - 1, gi * PH + (pid_p * BLOCK_P + BLOCK_P - 1) // PW)
        near_y = (y_first <= R) | (y_last >= H - 1 - R)
        near_x = (gj * PW <= R) | (gj * PW + PW - 1 >= W - 1 - R)
        s_first = 0
        if VEC > 1:
            s_first = 1 - near_x.to(tl.int32)
            if s_first == 1:
                acc += tl.reshape(_input_grad_depthwise3_vectors(
                    w_ptr, dout_base, b, gi, gj, pid_p * BLOCK_P, ci, ci_mask, H, W, GH, GW, COUT,
                    PW, VEC, BLOCK_CI, BLOCK_P, ACC), (BLOCK_CI, BLOCK_P))
        for s in range(s_first, SLOTS * SLOTS):
            vy, vx, ok = qy, qx, q_mask
            vy_lo, vy_hi, vx_lo, vx_hi = y_first, y_last, gj * PW, gj * PW + PW - 1
            if s > 0:
                if ((s // SLOTS == 0) | near_y) & ((s % SLOTS == 0) | near_x):
                    vy, in_y = mirror_source(qy, s // SLOTS, H, PAD_MODE, R)
                    vx, in_x = mirror_source(qx, s % SLOTS, W, PAD_MODE, R)
                    ok = q_mask & in_y & in_x
                    # bounding box of the valid virtual indices (empty: no mirror image in this block)
                    vy_lo = tl.min(tl.where(ok, vy, H + R), axis=0)
                    vy_hi = tl.max(tl.where(ok, vy, -R - 1), axis=0)
                    vx_lo = tl.min(tl.where(ok, vx, W + R), axis=0)
                    vx_hi = tl.max(tl.where(ok, vx, -R - 1), axis=0)
                else:
                    vy_lo = vy_hi + 1
            if vy_lo <= vy_hi:
                for t in range(KK):
                    acc = _input_grad_tap(acc, t, vy, vx, ok, vy_lo, vy_hi, vx_lo, vx_hi, b, g, ci,
                                          ci_local, ci_mask, w_ptr, dout_base, H, W, GH, GW, PH, PW,
                                          COUT, CIN_G, COUT_G, W_ROW, K, DEPTHWISE, DOT_MODE, ACC,
                                          BLOCK_CO)
    dx_off = b.to(tl.int64) * CIN * HW + ci.to(tl.int64)[:, None] * HW + (qy * W + qx)[None, :]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty),  # interior: vector of PW
             mask=ci_mask[:, None] & q_mask[None, :])


@triton.jit
def _patch_conv_weight_grad_kernel(
        x_ptr, dout_ptr, dw_ptr, db_ptr,
        H, W, GH, GW, CIN, COUT, CIN_G, COUT_G, CI_DOT, DW_PATCH,
        K: tl.constexpr, PAD_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, DEPTHWISE: tl.constexpr,
        DOT_MODE: tl.constexpr, ACC: tl.constexpr,
        BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr, FMA: tl.constexpr,
        TAIL: tl.constexpr, PW: tl.constexpr, VEC: tl.constexpr):
    # Program (patch, channel block): a block of one patch's kernel, tap by tap,
    # dW[co, ci, t] = sum over the patch's pixels p of dout[co, p] * x[ci, border_index(p + d_t)],
    # accumulated pixel block by pixel block in a fixed order (deterministic). Tiles hold runs of
    # pw contiguous pixels. The programs of the first input-channel block also sum dout over the
    # patch: the bias gradient. Input channels 0 .. CI_DOT come in BLOCK_CI blocks (dots); with
    # TAIL, one more block per output-channel block takes the rest (fewer than 16) one channel at
    # a time, each a sum over pixels of dout times that channel's row. VEC > 1 (3 x 3
    # depthwise): patches away from the left and right borders take x from aligned vectors.
    # A patch's kernel gradient, COUT x CIN_G x K*K values, starts DW_PATCH values after the
    # previous patch's (more than that where the generator's gradient reads it as vectors); the
    # stores compute that address where they use it (a pointer computed here and kept through
    # the pixel loop made Triton 3.6 spill 24 B in the fp32 3 x 3 depthwise vector taps).
    pid_patch = tl.program_id(0)
    pid_c = tl.program_id(1)
    W = GW * PW                             # (the image's width: a multiple of PW)
    HW = H * W
    b = pid_patch // (GH * GW)
    x_base = x_ptr + b.to(tl.int64) * CIN * HW
    dout_base = dout_ptr + b.to(tl.int64) * COUT * HW
    if DEPTHWISE:
        co = pid_c * BLOCK_CO + tl.arange(0, BLOCK_CO)
        co_mask = co < COUT
        g = 0
        ci = co
        ci_local = co
        ci_mask = co_mask
        first_ci_block = True
    else:
        n_co_blocks = tl.cdiv(COUT_G, BLOCK_CO)
        n_ci_blocks = tl.cdiv(CI_DOT, BLOCK_CI) + (1 if TAIL else 0)
        g = pid_c // (n_co_blocks * n_ci_blocks)
        rest = pid_c % (n_co_blocks * n_ci_blocks)
        co_local = (rest // n_ci_blocks) * BLOCK_CO + tl.arange(0, BLOCK_CO)
        ci_local = (rest % n_ci_blocks) * BLOCK_CI + tl.arange(0, BLOCK_CI)
        co_mask = co_local < COUT_G
        ci_mask = ci_local < CI_DOT
        co = g * COUT_G + co_local
        ci = g * CIN_G + ci_local
        first_ci_block = rest % n_ci_blocks == 0
    if TAIL:
        tail_block = rest % n_ci_blocks == n_ci_blocks - 1
    else:
        tail_block = False
    if tail_block:
        _weight_grad_tail(pid_patch, g, co, co_mask, x_base, dout_base, dw_ptr, DW_PATCH, H, W,
                          GH, GW, CIN_G, CI_DOT, K, PAD_MODE, ACC, BLOCK_CO, BLOCK_P, PW)
    elif VEC > 1:
        if (pid_patch % GW > 0) & (pid_patch % GW < GW - 1):
            _weight_grad_depthwise3_vectors(pid_patch, co, co_mask, x_base, dout_base, dw_ptr,
                                            DW_PATCH, db_ptr, H, W, GH, GW, COUT, PAD_MODE,
                                            HAS_BIAS, ACC, BLOCK_CO, BLOCK_P, PW, VEC)
        else:
            _weight_grad_block(pid_patch, co, co_mask, ci, ci_mask, ci_local, first_ci_block,
                               x_base, dout_base, dw_ptr, DW_PATCH, db_ptr, H, W, GH, GW, COUT,
                               CIN_G, K, PAD_MODE, HAS_BIAS, DEPTHWISE, DOT_MODE, ACC, BLOCK_CO,
                               BLOCK_CI, BLOCK_P, FMA, PW)
    else:
        _weight_grad_block(pid_patch, co, co_mask, ci, ci_mask, ci_local, first_ci_block, x_base,
                           dout_base, dw_ptr, DW_PATCH, db_ptr, H, W, GH, GW, COUT, CIN_G, K,
                           PAD_MODE, HAS_BIAS, DEPTHWISE, DOT_MODE, ACC, BLOCK_CO, BLOCK_CI,
                           BLOCK_P, FMA, PW)


@triton.jit
def _tap_pixels(pid_patch, p0, t, H, W, GH, GW, K: tl.constexpr, PAD_MODE: tl.constexpr,
                BLOCK_P: tl.constexpr, PW: tl.constexpr):
    """The pixel block starting at p0 of a patch: its pixels' offsets in a channel plane and
    their mask, and the offsets of the pixels tap t reads for them (borders resolved by PAD_MODE)
    with the mask of those that exist."""
    _, _, _, yy, xx, p_mask = patch_pixels(pid_patch, p0 // BLOCK_P, H, GH, GW, PW, BLOCK_P)
    src, valid = tap_source(yy, xx, t, H, W, K, PAD_MODE)
    return yy * W + xx, p_mask, src, p_mask & valid


@triton.jit
def _weight_grad_block(pid_patch, co, co_mask, ci, ci_mask, ci_local, first_ci_block, x_base,
                       dout_base, dw_ptr, DW_PATCH, db_ptr, H, W, GH, GW, COUT, CIN_G,
                       K: tl.constexpr, PAD_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                       DEPTHWISE: tl.constexpr, DOT_MODE: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr,
                       FMA: tl.constexpr, PW: tl.constexpr):
    # One (output-channel block x input-channel block) tile of a patch's kernel gradient (and
    # with the first input-channel block, the bias gradient), tap by tap, pixel block by pixel
    # block; the patch's kernel gradient starts at dw_ptr + pid_patch x DW_PATCH.
    HW = H * W
    KK: tl.constexpr = K * K
    n_pix = (H // GH) * (W // GW)
    bias_sum = tl.zeros((BLOCK_CO,), dtype=ACC)
    for t in range(KK):
        if DEPTHWISE:
            acc = tl.zeros((BLOCK_CO,), dtype=ACC)
        else:
            acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=ACC)
        for p0 in range(0, n_pix, BLOCK_P):
            pix, p_mask, src, s_mask = _tap_pixels(pid_patch, p0, t, H, W, GH, GW, K, PAD_MODE,
                                                   BLOCK_P, PW)
            gv = tl.load(  # interior: vector of PW
                dout_base + co.to(tl.int64)[:, None] * HW + pix[None, :],
                mask=co_mask[:, None] & p_mask[None, :], other=0.0)
            xv = tl.load(  # interior: vector of PW when K == 1
                x_base + ci.to(tl.int64)[:, None] * HW + src[None, :],
                mask=ci_mask[:, None] & s_mask[None, :], other=0.0)
            if DEPTHWISE:
                acc += tl.sum(gv.to(ACC) * xv.to(ACC), axis=1)
            else:
                acc = mac(gv, tl.trans(xv), acc, DOT_MODE, FMA)
            if HAS_BIAS:
                if t == 0:
                    bias_sum += tl.sum(gv.to(ACC), axis=1)
        if DEPTHWISE:
            tl.store(dw_ptr + pid_patch.to(tl.int64) * DW_PATCH + co * KK + t,
                     acc.to(dw_ptr.dtype.element_ty), mask=co_mask)
        else:
            w_off = (pid_patch.to(tl.int64) * DW_PATCH
                     + (co[:, None] * CIN_G + ci_local[None, :]) * KK + t)
            tl.store(dw_ptr + w_off, acc.to(dw_ptr.dtype.element_ty),
                     mask=co_mask[:, None] & ci_mask[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + pid_patch.to(tl.int64) * COUT + co, bias_sum.to(db_ptr.dtype.element_ty),
                 mask=co_mask & first_ci_block)


@triton.jit
def _weight_grad_depthwise3_vectors(pid_patch, co, co_mask, x_base, dout_base, dw_ptr, DW_PATCH,
                                    db_ptr, H, W, GH, GW, COUT, PAD_MODE: tl.constexpr,
                                    HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                                    BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr,
                                    PW: tl.constexpr, VEC: tl.constexpr):
    # The 3 x 3 depthwise kernel gradient (and the bias gradient) of a patch away from the
    # image's left and right borders, pixel block by pixel block: the block's output gradient is
    # loaded once for all nine taps; per tap row, x's aligned vectors at the block's pixels and
    # beside them, shifted in registers. Each tap's sum over the block goes to column t of a
    # (BLOCK_CO, 16) accumulator, stored as each channel's 9 contiguous taps.
    GROUPS: tl.constexpr = BLOCK_P // VEC
    PH = H // GH
    HW = H * W
    gj = pid_patch % GW
    gi = (pid_patch // GW) % GH
    taps = tl.arange(0, 16)
    acc = tl.zeros((BLOCK_CO, 16), dtype=ACC)
    bias_sum = tl.zeros((BLOCK_CO,), dtype=ACC)
    x_rows = x_base + co.to(tl.int64)[:, None, None] * HW
    for p0 in range(0, PH * PW, BLOCK_P):
        yy, xx, p_mask = vector_pixels(p0, gi, gj, PH, PW, VEC, BLOCK_P)
        gv = tl.load(  # interior: vector of PW
            dout_base + co.to(tl.int64)[:, None, None] * HW + (yy * W + xx)[None, :, :],
            mask=co_mask[:, None, None] & p_mask[None, :, :], other=0.0).to(ACC)
        if HAS_BIAS:
            bias_sum += tl.sum(tl.sum(gv, axis=2), axis=1)
        for ky in tl.static_range(3):
            sy, vy = border_index(yy + (ky - 1), H, PAD_MODE)
            at = x_rows + (sy * W + xx)[None, :, :]
            mask = co_mask[:, None, None] & (p_mask & vy)[None, :, :]
            cur = tl.load(at, mask=mask, other=0.0).to(ACC)  # interior: vector of PW
            acc += tl.where(taps[None, :] == ky * 3 + 1,
                            tl.sum(tl.sum(gv * cur, axis=2), axis=1)[:, None], 0.0)
            prev = tl.load(at - VEC, mask=mask, other=0.0).to(ACC)  # interior: vector of PW
            left, _ = shift_vectors(prev, cur, cur, VEC, BLOCK_CO, GROUPS)
            acc += tl.where(taps[None, :] == ky * 3,
                            tl.sum(tl.sum(gv * left, axis=2), axis=1)[:, None], 0.0)
            nxt = tl.load(at + VEC, mask=mask, other=0.0).to(ACC)  # interior: vector of PW
            _, right = shift_vectors(cur, cur, nxt, VEC, BLOCK_CO, GROUPS)
            acc += tl.where(taps[None, :] == ky * 3 + 2,
                            tl.sum(tl.sum(gv * right, axis=2), axis=1)[:, None], 0.0)
    w_off = pid_patch.to(tl.int64) * DW_PATCH + co[:, None] * 9 + taps[None, :]
    tl.store(dw_ptr + w_off, acc.to(dw_ptr.dtype.element_ty),
             mask=co_mask[:, None] & (taps < 9)[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + pid_patch.to(tl.int64) * COUT + co, bias_sum.to(db_ptr.dtype.element_ty),
                 mask=co_mask)


@triton.jit
def _weight_grad_tail(pid_patch, g, co, co_mask, x_base, dout_base, dw_ptr, DW_PATCH, H, W, GH, GW,
                      CIN_G, CI_DOT, K: tl.constexpr, PAD_MODE: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, PW: tl.constexpr):
    # dW[co, ci, t] for the tail input channels CI_DOT .. CIN_G, one channel and tap at a time:
    # a (BLOCK_CO x BLOCK_P) product of dout and the channel's pixel row, summed over pixels.
    HW = H * W
    KK: tl.constexpr = K * K
    n_pix = (H // GH) * (W // GW)
    for ci_t in range(CI_DOT, CIN_G):
        x_row = x_base + (g * CIN_G + ci_t).to(tl.int64) * HW
        for t in range(KK):
            acc = tl.zeros((BLOCK_CO,), dtype=ACC)
            for p0 in range(0, n_pix, BLOCK_P):
                pix, p_mask, src, s_mask = _tap_pixels(pid_patch, p0, t, H, W, GH, GW, K, PAD_MODE,
                                                       BLOCK_P, PW)
                gv = tl.load(  # interior: vector of PW
                    dout_base + co.to(tl.int64)[:, None] * HW + pix[None, :],
                    mask=co_mask[:, None] & p_mask[None, :], other=0.0)
                xv = tl.load(  # interior: vector of PW when K == 1
                    x_row + src, mask=s_mask, other=0.0)
                acc += tl.sum(gv.to(ACC) * xv.to(ACC)[None, :], axis=1)
            w_off = pid_patch.to(tl.int64) * DW_PATCH + (co * CIN_G + ci_t) * KK + t
            tl.store(dw_ptr + w_off, acc.to(dw_ptr.dtype.element_ty), mask=co_mask)


def _input_grad_warps(depthwise: bool, x, vec: int, fma: bool, block_co: int, block_ci: int,
                      block_p: int) -> int:
    """8 warps for the depthwise input gradient of 16-bit inputs (with 4, ptxas spilled 8 B of
    its mirror-slot gather at reflect borders) and for its vector taps (``vec`` > 1; with 4, 168
    registers in float32); dense tiles as ``dense_dot_warps`` says."""
    if depthwise and (x.element_size() < 4 or vec > 1):
        return 8
    return dense_dot_warps(depthwise, fma, block_co, block_ci, block_p)


def _launch_backward(dout, x, weight, *, dx, dw, db, groups, padding_mode):
    """Fill ``dx`` (if not None) and ``dw`` / ``db`` (if not None, contiguous) from ``dout``. ``dw``
    is shaped like the kernels, or (B, GH, GW, S): each patch's kernel gradient in the first of
    its S values."""
    b, cin, h, w = x.shape
    weight, w_row = kernel_rows(weight)
    _, gh, gw, cout, cin_g, k, _ = weight.shape
    ph, pw = h // gh, w // gw
    cout_g = cout // groups
    depthwise = cin_g == 1 and cout_g == 1
    common = dict(K=k, PAD_MODE=PADDING_CODES[padding_mode], DEPTHWISE=depthwise,
                  DOT_MODE=dot_mode(x.dtype), ACC=accumulator(x.dtype))
    block_p = pixel_block(ph * pw, low=1 if depthwise or k == 1 else 16)
    fma = uses_fma(depthwise, k, cin_g, cout_g, block_p)
    vec = tap_vector(x.dtype, k, pw, block_p) if depthwise else 1
    if dx is not None:
        # depthwise gathers a weight and a gradient per (channel, pixel) and tap: 16 channels;
        # dense holds a (BLOCK_CI x BLOCK_P) accumulator and a (BLOCK_CO x BLOCK_P) operand: 32.
        # 1x1 (straight-line code) takes the blocks that pad least; k x k keeps covering blocks
        # (smaller tiles in its gather over neighbours and border mirrors make ptxas spill)
        tight = k == 1
        block_ci = channel_block(cin if depthwise else cin_g, 16 if depthwise else 32, tight=tight)
        block_co = channel_block(cout_g, 32 if block_p > 16 else 16, tight=tight)
        co_dot = cout_g
        if fma:
            block_ci, block_co = fma_channel_blocks(cin_g, cout_g, block_p)
        elif k == 1 and not depthwise:      # the reduction runs over output channels
            co_dot, block_co = dot_channels(cout_g, block_co)
        n_ci = triton.cdiv(cin, block_ci) if depthwise else groups * triton.cdiv(cin_g, block_ci)
        _patch_conv_input_grad_kernel[(b * gh * gw, n_ci, triton.cdiv(ph * pw, block_p))](
            dout, weight, dx, h, w, gh, gw, cin, cout, cin_g, cout_g, co_dot, w_row,
            SLOTS=mirror_slots(padding_mode, k // 2), BLOCK_CI=block_ci, BLOCK_CO=block_co,
            BLOCK_P=block_p, FMA=fma, TAIL=co_dot < cout_g, PW=pw, VEC=vec,
            # (multiply-adds on unpadded rows: not rounded; with 32-value rows rounded to 16,
            # ptxas spilled 36 B of hyperseg-l-voc's 32 -> 6 in fp16)
            W_ALIGN=alignment(w_row) if w_row > cin_g * k * k or not fma else 1,
            num_warps=_input_grad_warps(depthwise, x, vec, fma, block_co, block_ci, block_p),
            **common)
    if dw is not None:
        # the vector taps: 16 channels (with 32 at 8 warps, ptxas spilled a predicate, 8 B, in
        # 16-bit at hyperseg-l-voc's 16- and 32-pixel rows)
        block_co = channel_block(cout if depthwise else cout_g, 16 if vec > 1 else 32)
        block_ci = channel_block(cin_g, 32)
        ci_dot = cin_g
        if fma:
            block_ci, block_co = fma_channel_blocks(cin_g, cout_g, block_p)
        elif not depthwise:
            ci_dot, block_ci = dot_channels(cin_g, block_ci)
        tail = ci_dot < cin_g
        n_c = (triton.cdiv(cout, block_co) if depthwise
               else groups * triton.cdiv(cout_g, block_co) * (triton.cdiv(ci_dot, block_ci) + tail))
        _patch_conv_weight_grad_kernel[(b * gh * gw, n_c)](
            x, dout, dw, db if db is not None else dw, h, w, gh, gw, cin, cout, cin_g, cout_g,
            ci_dot, dw.stride(2), HAS_BIAS=db is not None, BLOCK_CO=block_co, BLOCK_CI=block_ci,
            BLOCK_P=block_p, FMA=fma, TAIL=tail, PW=pw, VEC=vec,
            # the vector taps of 16 x 64 tiles on 8 warps (4 held 80-96 registers, and spilled a
            # predicate in 16-bit at 8-pixel rows); 16 x 16 tiles on 4 (8 spilled 24 B in bf16)
            num_warps=(8 if vec > 1 and block_co * block_p >= 1024
                       else dense_dot_warps(depthwise, fma, block_co, block_ci, block_p)),
            # with the tail's per-channel loop, a pipelined (3-stage) dense loop spilled 8-24 B
            num_stages=1 if tail else 3, **common)


# ------------------------------------------------------------------------------------------------
# PyTorch custom ops. The public functions validate their arguments and call these (through the
# autograd Functions), so that torch.compile sees each launch as one opaque op
# (hyperseg::patch_conv2d, hyperseg::meta_patch_conv, ...) whose fake implementation gives the
# output's shape, dtype and device without running a kernel: no graph break. The ops take
# validated arguments only.
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("hyperseg::patch_conv2d", mutates_args=())
def _patch_conv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     padding_mode: str, groups: int) -> torch.Tensor:
    x = x.contiguous()
    out = output_like(x, weight.shape[3])
    return _launch(x, out, weight, None if bias is None else bias.contiguous(), groups,
                   padding_mode)


@_patch_conv2d_op.register_fake
def _patch_conv2d_fake(x, weight, bias, padding_mode, groups):
    return output_like(x, weight.shape[3])


def _weight_grad_like(weight: torch.Tensor, patch_stride: int) -> torch.Tensor:
    """The kernel gradient ``patch_conv2d_backward`` returns: contiguous, shaped like ``weight``
    (patch_stride 0), or (B, GH, GW, patch_stride) with each patch's kernel gradient in the first
    Cout x Cin / groups x k x k of its values, zeros after them."""
    if patch_stride == 0:
        return weight.new_empty(weight.shape)
    values = math.prod(weight.shape[3:])
    if patch_stride < values:
        raise ValueError(f"a patch stride of {patch_stride} cannot hold a patch's {values} "
                         "kernel values")
    dw = weight.new_empty(*weight.shape[:3], patch_stride)
    dw[..., values:].zero_()            # (the kernel writes the rest)
    return dw


@torch.library.custom_op("hyperseg::patch_conv2d_backward", mutates_args=())
def _patch_conv2d_backward_op(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                              input_grad: bool, weight_grad: bool, bias_grad: bool,
                              padding_mode: str, groups: int, patch_stride: int = 0
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); a gradient not asked for is an empty tensor. dbias is float32 (or
    float64) and is accumulated in the kernel that computes dweight. dweight: see
    ``_weight_grad_like`` (a ``patch_stride`` that rounds each patch's values up to a 16-byte
    multiple lets the generator's gradient read them as aligned vectors)."""
    dout = dout.contiguous()
    dx = torch.empty_like(x) if input_grad else None
    dw = _weight_grad_like(weight, patch_stride) if weight_grad else None
    db = (x.new_empty(weight.shape[:4], dtype=torch.promote_types(x.dtype, torch.float32))
          if bias_grad else None)
    _launch_backward(dout, x, weight, dx=dx, dw=dw, db=db, groups=groups, padding_mode=padding_mode)
    return tuple(x.new_empty(0) if t is None else t for t in (dx, dw, db))


@_patch_conv2d_backward_op.register_fake
def _patch_conv2d_backward_fake(dout, x, weight, input_grad, weight_grad, bias_grad, padding_mode,
                                groups, patch_stride=0):
    return (torch.empty_like(x) if input_grad else x.new_empty(0),
            _weight_grad_like(weight, patch_stride) if weight_grad else x.new_empty(0),
            x.new_empty(weight.shape[:4], dtype=torch.promote_types(x.dtype, torch.float32))
            if bias_grad else x.new_empty(0))


class PatchConv2dFunction(torch.autograd.Function):
    """``patch_conv2d`` with its Triton backward: the forward saves x and the per-patch kernels
    (the only tensors the gradients need); the backward launches the input-gradient and the
    kernel/bias-gradient kernels, each only when its gradient is needed. Both kernels gather
    (no atomics), so gradients are bitwise reproducible."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding_mode, groups):
        x = x.contiguous()
        weight = weight.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.padding_mode = padding_mode
        ctx.groups = groups
        return torch.ops.hyperseg.patch_conv2d(x, weight, bias, padding_mode, groups)

    @staticmethod
    def backward(ctx, dout):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        dx, dw, db = torch.ops.hyperseg.patch_conv2d_backward(
            dout, x, weight, need_x, need_w or need_b, need_b, ctx.padding_mode, ctx.groups)
        return (dx if need_x else None, dw if need_w else None,
                db.to(ctx.bias_dtype) if need_b else None, None, None)


def patch_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                 padding_mode: str = "reflect", groups: int = 1) -> torch.Tensor:
    """Triton patch-wise dynamic convolution; the semantics of ``hyperseg.ops.patch_conv2d``.

    x (B, Cin, H, W); weight (B, GH, GW, Cout, Cin // groups, k, k) with k in {1, 3, 5};
    bias (B, GH, GW, Cout) or None. Non-contiguous inputs are copied to contiguous ones.
    float32, float16, bfloat16 or float64 (for gradcheck); the output has x's dtype (the weights
    may have another). Inside an autocast region the inputs are cast to its dtype first, as for
    ``F.conv2d``. Differentiable in x, weight and bias, with Triton backward kernels
    (``PatchConv2dFunction``), which accumulate in float32 (float64 for float64).
    """
    if weight.dim() != 7:
        raise ValueError(f"weight must have shape (B, GH, GW, Cout, Cin/groups, k, k), got {tuple(weight.shape)}")
    check_common(x, weight.shape[1:3], weight.shape[-2], groups, padding_mode, float64=True)
    check_patch_weight(x, weight, bias, groups)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    check_device(x, weight, bias)
    x, weight, bias = autocast(x, weight, bias)
    return PatchConv2dFunction.apply(x, weight, bias, padding_mode, groups)


def _input_grad_neighbours(a, block_p: int, pixel_blocks: int) -> int:
    """Sum over a patch's pixel blocks and the taps of the neighbouring patches whose kernels the
    dense input-gradient program visits (one dot each): the patches the tap's source pixels
    fall in (clipping at the image border ignored: an upper bound)."""
    ph, pw = a["H"] // a["GH"], a["W"] // a["GW"]
    k, r = a["K"], a["K"] // 2
    visits = 0
    for block in range(pixel_blocks):
        y_first = (block * block_p) // pw
        y_last = min(ph - 1, (block * block_p + block_p - 1) // pw)
        for t in range(k * k):
            dy, dx = t // k - r, t % k - r
            rows = (y_last - dy) // ph - (y_first - dy) // ph + 1
            cols = (pw - 1 - dx) // pw - (0 - dx) // pw + 1
            visits += rows * cols
    return visits


def executed_work(name: str, launch) -> Optional[dict]:
    """Multiply-adds a recorded launch executes, padded tiles included, and the useful ones (the
    interface of ``bench/kernel_report.py``). Forward: dense, a BLOCK_CO x BLOCK_CI x BLOCK_P dot
    per input-channel block and tap; depthwise, K*K multiply-adds on the (BLOCK_CO x BLOCK_P)
    tile. Input gradient: per tap, a BLOCK_CI x BLOCK_CO x BLOCK_P dot per output-channel block and
    neighbouring patch visited (the image-border mirror slots left out); depthwise BLOCK_CI x
    BLOCK_P. Weight gradient: per tap and pixel block, a BLOCK_CO x BLOCK_CI x BLOCK_P dot
    (depthwise BLOCK_CO x BLOCK_P). The dots cover the reduction's first CI_DOT (input gradient:
    CO_DOT) channels; the tail channels past them add one (BLOCK_CO or BLOCK_CI) x BLOCK_P
    multiply-add tile per channel and tap, on CUDA cores. Useful, for all three:
    B x H x W x COUT x CIN_G x K*K."""
    a = launch.args
    programs = launch.grid[0] * launch.grid[1] * launch.grid[2]
    kk = a["K"] * a["K"]
    useful = launch.grid[0] // (a["GH"] * a["GW"]) * a["H"] * a["W"] * a["COUT"] * a["CIN_G"] * kk
    tensor_cores = a["DOT_MODE"] in (0, 3) and not a["DEPTHWISE"] and not a.get("FMA")
    tail = 0
    if name == "_patch_conv_kernel":
        if a["DEPTHWISE"]:
            conv = kk * a["BLOCK_CO"] * a["BLOCK_P"]
        else:
            conv = triton.cdiv(a["CI_DOT"], a["BLOCK_CI"]) * kk * a["BLOCK_CO"] * a["BLOCK_CI"] * a["BLOCK_P"]
            tail = programs * (a["CIN_G"] - a["CI_DOT"]) * kk * a["BLOCK_CO"] * a["BLOCK_P"]
        macs, part = programs * conv, "conv"
    elif name == "_patch_conv_input_grad_kernel":
        if a["DEPTHWISE"]:
            macs = programs * kk * a["BLOCK_CI"] * a["BLOCK_P"]
        else:
            visits = _input_grad_neighbours(a, a["BLOCK_P"], launch.grid[2])
            macs = (launch.grid[0] * launch.grid[1] * visits * triton.cdiv(a["CO_DOT"], a["BLOCK_CO"])
                    * a["BLOCK_CI"] * a["BLOCK_CO"] * a["BLOCK_P"])
            tail = programs * (a["COUT_G"] - a["CO_DOT"]) * a["BLOCK_CI"] * a["BLOCK_P"]   # 1x1 only
        part = "input_grad"
    elif name == "_patch_conv_weight_grad_kernel":
        pixel_blocks = triton.cdiv((a["H"] // a["GH"]) * (a["W"] // a["GW"]), a["BLOCK_P"])
        tile = a["BLOCK_CO"] * a["BLOCK_P"] * (1 if a["DEPTHWISE"] else a["BLOCK_CI"])
        if a["TAIL"]:       # one program per output-channel block takes the tail channels
            tail_programs = launch.grid[0] * launch.grid[1] // (triton.cdiv(a["CI_DOT"], a["BLOCK_CI"]) + 1)
            tail = tail_programs * (a["CIN_G"] - a["CI_DOT"]) * kk * pixel_blocks * a["BLOCK_CO"] * a["BLOCK_P"]
            programs -= tail_programs
        macs, part = programs * kk * pixel_blocks * tile, "weight_grad"
    else:
        return None
    return {"macs": macs + tail, "tensor_core_macs": macs if tensor_cores else 0, "useful_macs": useful,
            "parts": {part: macs, "tail": tail} if tail else {part: macs}}
