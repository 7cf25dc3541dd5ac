"""The fused meta block: per-patch weight generation + patch-wise convolution + folded BatchNorm
+ activation, in one launch. Inference only; ``generated_patch_conv2d`` (patch_conv.py) is the
differentiable counterpart. Reference semantics: ``hyperseg.ops.meta_patch_conv``.

Two kernels, chosen by the patch size:

* ``_meta_conv_many_patches_kernel`` — small patches (up to 16 pixels: the 1x1 to 4x4 patches of
  the first levels), 1x1 convolution, one group: a program generates the weights of a block of
  patches as one tensor-core GEMM over the generator's rows (M), the signal's inputs (K) and the
  patches (N), then applies them pixel by pixel. Nothing is generated twice.
* ``_meta_conv_patch_kernel`` — any other case (dense or depthwise, any k): one program per patch
  generates the patch's kernel once into a per-program scratch slot (L1/L2-resident), then walks
  the patch in bands of rows: a tensor-core dot per (output block, input block, tap) for dense
  convolutions, a multiply-add per tap for depthwise ones (3x3 ones away from the left and right
  borders from aligned 8-byte vectors shifted in registers, ``depthwise3_vectors`` in _common.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (ACTIVATION_CODES, PADDING_CODES, activate, alignment, autotuned,
                      border_index, check_device, check_generated_op, depthwise3_vectors,
                      dot_acc, dot_mode, generation_rows, generator_layout, launch_options, output_like,
                      patch_params_to_scratch, signal_block, tap_vector)
from ..layout import check_activation, patch_conv_rows


@triton.jit
def _meta_conv_many_patches_kernel(
        x_ptr, out_ptr, sig_ptr, gen_ptr, scale_ptr, shift_ptr,
        GH, GW, SIG_C, sig_offset, rpg, row_start,
        CIN: tl.constexpr, COUT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        SPG: tl.constexpr, GEN_STRIDE: tl.constexpr, GEN_DOT: tl.constexpr,
        HAS_AFFINE: tl.constexpr, ACT: tl.constexpr, DOT_MODE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_PH: tl.constexpr, BLOCK_PW: tl.constexpr,
        TILE_W: tl.constexpr, GW_ALIGN: tl.constexpr):
    # Program (tile of BLOCK_N patches, block of BLOCK_O output channels); 1x1 convolution, one
    # group, small patches (PH x PW <= 16 pixels). A tile is BLOCK_N // TILE_W grid rows x TILE_W
    # grid columns of one image, TILE_W a power of two dividing GW: with PW a power of two, a
    # pixel row of a tile row is TILE_W * PW contiguous pixels from an aligned start, so the loads
    # of x and the stores of out are vectors (other widths pad each patch row to BLOCK_PW), and
    # the tile's signal reads are TILE_W-long runs. For each block of BLOCK_C
    # input channels the weights W[o, c, n] of the tile's BLOCK_O x BLOCK_C generator rows are
    # generated once for all its patches: one dot (rows x signal inputs) @ (signal inputs x
    # patches) per generator group the rows span (rows of other groups masked to zero), or, when
    # a dot would pad a group's inputs by more than 1.5x, multiply-adds over 4 inputs at a time
    # (the generator rows' zero columns pad SPG to GEN_STRIDE). Then each pixel row
    # r of the patches gets out[o, r, (n, col)] += sum_c W[o, c, n] x[c, r, (n, col)].
    TILE_H: tl.constexpr = BLOCK_N // TILE_W
    GW = GW // GW_ALIGN * GW_ALIGN                        # (the launcher's GW_ALIGN divides GW)
    W = GW * PW
    HW = GH * PH * W
    GHW = GH * GW
    col_tiles = GW // TILE_W
    tiles = tl.cdiv(GH, TILE_H) * col_tiles
    t = tl.program_id(0)
    b = (t // tiles).to(tl.int64)
    gi0 = (t % tiles) // col_tiles * TILE_H
    gj0 = (t % col_tiles) * TILE_W
    n = tl.arange(0, BLOCK_N)            # patch (gi0 + n // TILE_W, gj0 + n % TILE_W) of the tile
    n_mask = gi0 + n // TILE_W < GH
    sig_off = b * SIG_C * GHW + (gi0 + n // TILE_W) * GW + gj0 + n % TILE_W
    m = tl.arange(0, BLOCK_N * BLOCK_PW)                  # pixel (n, col) of one patch row
    m_row = gi0 + m // (TILE_W * BLOCK_PW)                # its grid row
    if PW == BLOCK_PW:                                    # a tile row's pixels are contiguous
        m_mask = m_row < GH
        m_off = m_row * (PH * W) + gj0 * PW + m % (TILE_W * PW)
    else:
        m_mask = (m_row < GH) & (m % BLOCK_PW < PW)
        m_off = (m_row * (PH * W) + (gj0 + (m // BLOCK_PW) % TILE_W) * PW + m % BLOCK_PW)
    o0 = tl.program_id(1) * BLOCK_O
    o = o0 + tl.arange(0, BLOCK_O)
    o_mask = o < COUT
    o_last = tl.minimum(o0 + BLOCK_O, COUT) - 1
    r = tl.arange(0, BLOCK_PH)
    x_img = x_ptr + b * CIN * HW
    acc = tl.zeros((BLOCK_O, BLOCK_PH, BLOCK_N * BLOCK_PW), dtype=tl.float32)
    for c0 in range(0, CIN, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < CIN
        rows = tl.reshape(row_start + o[:, None] * CIN + c[None, :], (BLOCK_O * BLOCK_C,))
        r_mask = tl.reshape(o_mask[:, None] & c_mask[None, :], (BLOCK_O * BLOCK_C,))
        grp = rows // rpg
        first = (row_start + o0 * CIN + c0) // rpg
        last = (row_start + o_last * CIN + tl.minimum(c0 + BLOCK_C, CIN) - 1) // rpg
        wgt = tl.zeros((BLOCK_O * BLOCK_C, BLOCK_N), dtype=tl.float32)
        for g in range(first, last + 1):
            g_mask = r_mask & (grp == g)
            if GEN_DOT:
                for s0 in range(0, SPG, BLOCK_S):
                    s = s0 + tl.arange(0, BLOCK_S)
                    s_mask = s < SPG
                    gv = tl.load(  # interior: vector of GEN_STRIDE
                        gen_ptr + rows.to(tl.int64)[:, None] * GEN_STRIDE + s[None, :],
                        mask=g_mask[:, None] & (s < GEN_STRIDE)[None, :], other=0.0)
                    chan = (sig_offset + g * SPG + s).to(tl.int64)
                    sv = tl.load(sig_ptr + sig_off[None, :] + chan[:, None] * GHW,
                                 mask=s_mask[:, None] & n_mask[None, :], other=0.0)
                    wgt = dot_acc(gv, sv, wgt, DOT_MODE)
            else:
                for s0 in range(0, SPG, 4):     # 4 inputs at a time: a vector of each row
                    s = s0 + tl.arange(0, 4)
                    gv = tl.load(  # interior: vector of GEN_STRIDE
                        gen_ptr + rows.to(tl.int64)[:, None] * GEN_STRIDE + s[None, :],
                        mask=g_mask[:, None] & (s < GEN_STRIDE)[None, :], other=0.0)
                    chan = (sig_offset + g * SPG + s).to(tl.int64)
                    sv = tl.load(sig_ptr + sig_off[None, :] + chan[:, None] * GHW,
                                 mask=(s < SPG)[:, None] & n_mask[None, :], other=0.0)
                    wgt += tl.sum(gv.to(tl.float32)[:, :, None] * sv.to(tl.float32)[None, :, :],
                                  axis=1)
        # W[o, c, n] repeated for the pixels (n, col) of a patch row
        w3 = tl.reshape(tl.broadcast_to(tl.reshape(wgt, (BLOCK_O, BLOCK_C, BLOCK_N, 1)),
                                        (BLOCK_O, BLOCK_C, BLOCK_N, BLOCK_PW)),
                        (BLOCK_O, BLOCK_C, BLOCK_N * BLOCK_PW))
        x_rows = x_img + c.to(tl.int64)[:, None] * HW + m_off[None, :]
        for pr in tl.static_range(PH):
            xv = tl.load(x_rows + pr * W,  # interior: vector
                         mask=c_mask[:, None] & m_mask[None, :], other=0.0).to(tl.float32)
            pixel = tl.sum(w3 * xv[None, :, :], axis=1)
            acc += tl.where(r[None, :, None] == pr, pixel[:, None, :], 0.0)
    if HAS_AFFINE:
        acc = (acc * tl.load(scale_ptr + o, mask=o_mask, other=0.0)[:, None, None]
               + tl.load(shift_ptr + o, mask=o_mask, other=0.0)[:, None, None])
    acc = activate(acc, ACT)
    offs = (b * COUT * HW + o.to(tl.int64)[:, None, None] * HW + r[None, :, None] * W
            + m_off[None, None, :])
    mask = o_mask[:, None, None] & (r < PH)[None, :, None] & m_mask[None, None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)  # interior: vector


@triton.jit
def _depthwise_taps(rows, wscr, co, co_mask, yy, xx, p_mask, H, W, K: tl.constexpr,
                    PAD_MODE: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr):
    # The k x k depthwise taps of a tile (pixels ``yy``, ``xx``) of channels ``co`` (image rows
    # ``rows``), each tap's pixels mapped through the border; ``wscr``: the patch's kernel.
    KK: tl.constexpr = K * K
    R: tl.constexpr = K // 2
    acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=tl.float32)
    for t in range(KK):
        sy, vy = border_index(yy + (t // K - R), H, PAD_MODE)
        if t % K == R:      # unshifted columns: in the image, contiguous, aligned
            xv = tl.load(rows + (sy * W + xx)[None, :],  # interior: vector
                         mask=co_mask[:, None] & (p_mask & vy)[None, :], other=0.0)
        else:
            sx, vx = border_index(xx + (t % K - R), W, PAD_MODE)
            xv = tl.load(rows + (sy * W + sx)[None, :],
                         mask=co_mask[:, None] & (p_mask & vy & vx)[None, :], other=0.0)
        wt = tl.load(wscr + co * KK + t, mask=co_mask, other=0.0)
        acc += wt[:, None] * xv.to(tl.float32)
    return acc


@triton.jit
def _meta_conv_patch_kernel(
        x_ptr, out_ptr, sig_ptr, gen_ptr, wscr_ptr, scale_ptr, shift_ptr,
        H, W, GH, GW, SIG_C, sig_offset, rpg, row_start,
        CIN: tl.constexpr, COUT: tl.constexpr, GROUPS: tl.constexpr, PH: tl.constexpr,
        PW: tl.constexpr, K: tl.constexpr, PAD_MODE: tl.constexpr, DEPTHWISE: tl.constexpr,
        HAS_AFFINE: tl.constexpr, ACT: tl.constexpr, SPG: tl.constexpr,
        GEN_STRIDE: tl.constexpr, DOT_MODE: tl.constexpr, BAND: tl.constexpr,
        BLOCK_W: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, VEC: tl.constexpr):
    # One program per patch: phase 1 writes the patch's (COUT, CIN / GROUPS, K, K) kernel to the
    # program's scratch slot (generated once, coalesced generator rows); phase 2 walks the patch
    # in bands of BAND rows x BLOCK_W columns (a tile row is contiguous in x and out) and, per
    # block of BLOCK_CO output channels, accumulates one dot per (input block, tap) (dense) or a
    # per-channel multiply-add per tap (depthwise) with the taps' pixels mapped through the border.
    # VEC > 1 (3 x 3 depthwise, PW a multiple of VEC): patches away from the left and right
    # borders take their taps from aligned vectors of VEC pixels (``depthwise3_vectors`` in _common.py).
    W = GW * PW                                           # (so the compiler sees PW divide it)
    HW = H * W
    KK: tl.constexpr = K * K
    R: tl.constexpr = K // 2
    CIN_G: tl.constexpr = CIN // GROUPS
    COUT_G: tl.constexpr = COUT // GROUPS
    COUNT: tl.constexpr = COUT * CIN_G * KK
    BLOCK_P: tl.constexpr = BAND * BLOCK_W
    b, gi, gj, wscr = patch_params_to_scratch(tl.program_id(0), wscr_ptr, COUNT, sig_ptr, SIG_C, GH,
                                              GW, gen_ptr, sig_offset, rpg, row_start, SPG,
                                              GEN_STRIDE, BLOCK_R, BLOCK_S)
    x_base = x_ptr + b.to(tl.int64) * CIN * HW
    out_base = out_ptr + b.to(tl.int64) * COUT * HW

    p = tl.arange(0, BLOCK_P)
    pr = p // BLOCK_W
    pc = p % BLOCK_W
    xx = gj * PW + pc
    for band0 in range(0, PH, BAND):
        yy = gi * PH + band0 + pr
        p_mask = (pr < PH - band0) & (pc < PW)
        pix = yy * W + xx
        if DEPTHWISE:
            for c0 in range(0, COUT, BLOCK_CO):
                co = c0 + tl.arange(0, BLOCK_CO)
                co_mask = co < COUT
                rows = x_base + co.to(tl.int64)[:, None] * HW
                if VEC > 1:
                    if (gj > 0) & (gj < GW - 1):
                        q = tl.arange(0, BLOCK_P // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]
                        acc = tl.reshape(depthwise3_vectors(
                            rows[:, :, None], wscr, co, co_mask, gi * PH + band0 + q // BLOCK_W,
                            gj * PW + q % BLOCK_W, (q // BLOCK_W < PH - band0) & (q % BLOCK_W < PW),
                            H, W, PAD_MODE, VEC, BLOCK_CO, BLOCK_P, tl.float32),
                            (BLOCK_CO, BLOCK_P))
                    else:
                        acc = _depthwise_taps(rows, wscr, co, co_mask, yy, xx, p_mask, H, W, K,
                                              PAD_MODE, BLOCK_CO, BLOCK_P)
                else:
                    acc = _depthwise_taps(rows, wscr, co, co_mask, yy, xx, p_mask, H, W, K,
                                          PAD_MODE, BLOCK_CO, BLOCK_P)
                _store_epilogue(acc, out_base, co, co_mask, pix, p_mask, scale_ptr, shift_ptr,
                                HW, HAS_AFFINE, ACT)
        else:
            for g in range(GROUPS):
                for co0 in range(0, COUT_G, BLOCK_CO):
                    co_l = co0 + tl.arange(0, BLOCK_CO)
                    co_mask = co_l < COUT_G
                    acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=tl.float32)
                    for ci0 in range(0, CIN_G, BLOCK_K):
                        ci_l = ci0 + tl.arange(0, BLOCK_K)
                        ci_mask = ci_l < CIN_G
                        x_rows = x_base + (g * CIN_G + ci_l).to(tl.int64)[:, None] * HW
                        for t in range(KK):
                            sy, vy = border_index(yy + (t // K - R), H, PAD_MODE)
                            if t % K == R:  # unshifted columns: in the image, aligned
                                xv = tl.load(x_rows + (sy * W + xx)[None, :],  # interior: vector
                                             mask=ci_mask[:, None] & (p_mask & vy)[None, :],
                                             other=0.0)
                            else:
                                sx, vx = border_index(xx + (t % K - R), W, PAD_MODE)
                                xv = tl.load(x_rows + (sy * W + sx)[None, :],
                                             mask=ci_mask[:, None] & (p_mask & vy & vx)[None, :],
                                             other=0.0)
                            widx = ((g * COUT_G + co_l)[:, None] * CIN_G + ci_l[None, :]) * KK + t
                            wv = tl.load(wscr + widx, mask=co_mask[:, None] & ci_mask[None, :],
                                         other=0.0)
                            acc = dot_acc(wv, xv, acc, DOT_MODE)
                    _store_epilogue(acc, out_base, g * COUT_G + co_l, co_mask, pix, p_mask,
                                    scale_ptr, shift_ptr, HW, HAS_AFFINE, ACT)


@triton.jit
def _store_epilogue(acc, out_base, co, co_mask, pix, p_mask, scale_ptr, shift_ptr, HW,
                    HAS_AFFINE: tl.constexpr, ACT: tl.constexpr):
    """Folded BatchNorm (``* scale + shift``), activation and the store of one output tile."""
    if HAS_AFFINE:
        acc = (acc * tl.load(scale_ptr + co, mask=co_mask, other=0.0)[:, None]
               + tl.load(shift_ptr + co, mask=co_mask, other=0.0)[:, None])
    acc = activate(acc, ACT)
    tl.store(out_base + co.to(tl.int64)[:, None] * HW + pix[None, :],  # interior: vector
             acc.to(out_base.dtype.element_ty), mask=co_mask[:, None] & p_mask[None, :])


def _many_patches_warps(configs, args):
    """Warps of the many-patches kernel, by the tile of generated weights (BLOCK_O x BLOCK_C
    rows x BLOCK_N patches). IEEE float32 dots hold their operands in registers: 8 warps for
    tiles of 4,096 (on 4, hyperseg-m's L0 took 166 registers, 12 warps per SM), 4 below that (on
    8, Triton 3.6 spilled 16 B at hyperseg-l-voc's L2). Generation on tensor cores otherwise: 4
    or 8, the faster, but 4 alone below 512 weights (one per thread on 8 warps; there Triton 3.6
    kept a value in local memory, 8 B of stack, at hyperseg-l-voc's L2). Generation by
    multiply-adds: 4 warps (on 8, Triton 3.6 did the same at hyperseg-l-camvid's L0 and
    hyperseg-l-voc's L1 in half precision). On what is left, no zoo block spills with Triton 3.6
    or 3.8, and each keeps at least 16 warps per SM."""
    weights = args["BLOCK_O"] * args["BLOCK_C"] * args["BLOCK_N"]
    if args["DOT_MODE"] == 1:
        return [c for c in configs if (c.num_warps >= 8) == (weights >= 4096)]
    if args["GEN_DOT"] and weights >= 512:
        return configs
    return [c for c in configs if c.num_warps == 4]


_tuned_many_kernel = autotuned(_meta_conv_many_patches_kernel,
                               ("CIN", "COUT", "PH", "PW", "SPG", "DOT_MODE", "BLOCK_O"),
                               prune=_many_patches_warps)


def _patch_kernel_configs(configs, args):
    """IEEE float32 dots hold their operands in registers: 8 warps, so that 4 do not fill an SM.
    tf32 dots of the dense convolution: no software pipelining (1 stage). Hopper's tf32 tensor
    cores read both operands K-major from shared memory, so a pipelined (asynchronous) copy of an
    image tile, contiguous along the pixels, moves one 4-byte element per thread; unpipelined,
    the tile is loaded as 16-byte vectors and transposed on its way to shared memory (on 8 warps:
    with 4, ptxas spilled 8 B in one block). The loops are short (a few input-channel blocks per
    tap), so there is little to pipeline. Vector depthwise taps hold three vectors of each tile
    row beside the accumulator: 8 warps for tiles of 4,096 elements (4 took 184 registers at
    hyperseg-l-voc's L4 in float32, 8 warps per SM)."""
    single = args["DOT_MODE"] == 3 and not args["DEPTHWISE"]
    wide_vectors = args["VEC"] > 1 and args["BLOCK_CO"] * args["BAND"] * args["BLOCK_W"] >= 4096
    if args["DOT_MODE"] == 1 or single or wide_vectors:
        configs = [c for c in configs if c.num_warps >= 8]
    return [c for c in configs if (c.num_stages == 1) == single]


_tuned_patch_kernel = autotuned(_meta_conv_patch_kernel,
                                ("CIN", "COUT", "GROUPS", "PH", "PW", "K", "DOT_MODE", "BAND"),
                                prune=_patch_kernel_configs, stages=(1, 3))


def _least_padding(n: int, sizes) -> int:
    """The size among ``sizes`` whose multiple pads ``n`` least (the largest on ties)."""
    return min((-(-n // s) * s, -s, s) for s in sizes)[2]


def many_patches_plan(cin: int, cout: int, rpg: int, spg: int, patch, gw: int) -> dict:
    """Tiles of ``_meta_conv_many_patches_kernel``: BLOCK_O output channels whose rows
    (BLOCK_O x Cin) fit in one generator group where the group is at least that large (so a tile
    spans at most two groups, and exactly one when a group holds a multiple of BLOCK_O outputs'
    rows; one output otherwise), input channels in blocks of 16-64 (16 with multiply-adds),
    signal inputs in blocks of 16 / 32 when generated on tensor cores (GEN_DOT: when that pads
    them by at most 1.5x; multiply-adds over 4 inputs at a time otherwise), and tiles of 64 1x1
    patches (32 with multiply-adds), 32 patches of up to 4 pixels or 16 larger ones, which bounds the registers of the
    (outputs, pixel rows, pixels) accumulator. A tile is TILE_W grid columns (the largest power
    of two up to BLOCK_N that divides the grid's width ``gw``) by BLOCK_N / TILE_W grid rows;
    GW_ALIGN (the largest power of two up to 16 dividing ``gw``) tells the kernel how aligned
    the rows of the image are."""
    block_o = 1
    if rpg % cin == 0:
        while block_o * 2 <= 8 and (rpg // cin) % (block_o * 2) == 0:
            block_o *= 2
    pixels = patch[0] * patch[1]
    block_s = _least_padding(spg, (16, 32))
    gen_dot = -(-spg // block_s) * block_s <= 1.5 * spg
    block_n = (64 if gen_dot else 32) if pixels == 1 else (32 if pixels <= 4 else 16)
    return dict(BLOCK_N=block_n, BLOCK_O=block_o,
                BLOCK_C=_least_padding(cin, (16, 32, 64) if gen_dot else (16,)), BLOCK_S=block_s,
                BLOCK_PH=triton.next_power_of_2(patch[0]),
                BLOCK_PW=triton.next_power_of_2(patch[1]), GEN_DOT=gen_dot,
                TILE_W=min(block_n, gw & -gw), GW_ALIGN=alignment(gw))


MANY_PATCHES_MAX_PIXELS = 16


def patch_plan(cin: int, cout: int, groups: int, patch, depthwise: bool) -> dict:
    """Tiles of ``_meta_conv_patch_kernel``: bands of whole patch rows of about 128 pixels (at
    least 16 for the dots), up to 64 output channels (depthwise: 8-32 channels) per tile, input
    channels 16 at a time."""
    ph, pw = patch
    block_w = triton.next_power_of_2(pw)
    band = max(1, min(triton.next_power_of_2(ph), max(1, 128 // block_w)))
    block_w = max(block_w, 16 // band)
    if depthwise:                       # no dot: channel blocks of 8-32, whichever pads least
        block_co = _least_padding(cout, (8, 16, 32))
    else:
        block_co = min(64, max(16, triton.next_power_of_2(cout // groups)))
    return dict(BAND=band, BLOCK_W=block_w, BLOCK_CO=block_co, BLOCK_K=16)


def depthwise_vector(dtype: torch.dtype, kernel_size: int, pw: int) -> int:
    """Pixels per aligned vector of the 3 x 3 depthwise kernel's interior taps: 8 bytes (2
    float32 or 4 half-precision pixels) where the patch width is a multiple of it; 1 (the
    per-tap path) otherwise and for other kernel sizes."""
    return tap_vector(dtype, kernel_size, pw, narrower=False)


@torch.library.custom_op("hyperseg::meta_patch_conv", mutates_args=())
def _meta_patch_conv_op(x: torch.Tensor, signal: torch.Tensor, generator_weight: torch.Tensor,
                        out_channels: int, signal_offset: int, generator_groups: int,
                        row_start: int, groups: int, kernel_size: int,
                        scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                        activation: Optional[str], padding_mode: str) -> torch.Tensor:
    x = x.contiguous()
    signal = signal.contiguous()
    b, cin, h, w = x.shape
    gh, gw = signal.shape[2:4]
    patch = (h // gh, w // gw)
    gen, spg, stride = generator_layout(generator_weight)
    rpg = gen.shape[0] // generator_groups
    out = output_like(x, out_channels)
    affine = scale is not None
    scale = scale.float().contiguous() if affine else gen        # gen: a placeholder, not read
    shift = shift.float().contiguous() if affine else gen
    common = dict(SPG=spg, GEN_STRIDE=stride, HAS_AFFINE=affine,
                  ACT=ACTIVATION_CODES[activation], DOT_MODE=dot_mode(x.dtype))
    if patch[0] * patch[1] <= MANY_PATCHES_MAX_PIXELS and kernel_size == 1 and groups == 1:
        cfg = many_patches_plan(cin, out_channels, rpg, spg, patch, gw)
        tiles = b * triton.cdiv(gh, cfg["BLOCK_N"] // cfg["TILE_W"]) * (gw // cfg["TILE_W"])
        grid = (tiles, triton.cdiv(out_channels, cfg["BLOCK_O"]))
        _tuned_many_kernel[grid](
            x, out, signal, gen, scale, shift, gh, gw, signal.shape[1], signal_offset, rpg,
            row_start, CIN=cin, COUT=out_channels, PH=patch[0], PW=patch[1],
            **launch_options(_tuned_many_kernel, 4), **common, **cfg)
        return out
    depthwise = groups == cin == out_channels
    cfg = patch_plan(cin, out_channels, groups, patch, depthwise)
    cfg["VEC"] = depthwise_vector(x.dtype, kernel_size, patch[1]) if depthwise else 1
    cfg["BLOCK_R"] = generation_rows(signal_block(spg), gen.element_size(), 8)
    count = patch_conv_rows(cin, out_channels, groups, kernel_size)
    wscr = x.new_empty((b * gh * gw, count), dtype=torch.float32)
    _tuned_patch_kernel[(b * gh * gw,)](
        x, out, signal, gen, wscr, scale, shift, h, w, gh, gw, signal.shape[1], signal_offset,
        rpg, row_start, CIN=cin, COUT=out_channels, GROUPS=groups, PH=patch[0], PW=patch[1],
        K=kernel_size, PAD_MODE=PADDING_CODES[padding_mode], DEPTHWISE=depthwise,
        BLOCK_S=signal_block(spg), **launch_options(_tuned_patch_kernel, 4), **common, **cfg)
    return out


@_meta_patch_conv_op.register_fake
def _meta_patch_conv_fake(x, signal, generator_weight, out_channels, *args):
    return output_like(x, out_channels)


def meta_patch_conv(x: torch.Tensor, signal: torch.Tensor, generator_weight: torch.Tensor, *,
                    out_channels: int, signal_offset: int = 0, generator_groups: int = 1,
                    row_start: int = 0, groups: int = 1, kernel_size: int = 1,
                    scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                    activation: Optional[str] = None, padding_mode: str = "reflect") -> torch.Tensor:
    """Fused meta block in one launch: per-patch weight generation + patch-wise convolution +
    ``* scale + shift`` + activation. Semantics of ``hyperseg.ops.meta_patch_conv``. Inference
    only (no backward); ``generated_patch_conv2d`` is the differentiable counterpart. float32
    inputs use tf32 tensor cores when ``torch.backends.cudnn.allow_tf32`` is on."""
    check_generated_op(x, signal, generator_weight, out_channels=out_channels,
                       signal_offset=signal_offset, generator_groups=generator_groups,
                       row_start=row_start, groups=groups, kernel_size=kernel_size,
                       padding_mode=padding_mode)
    check_activation(activation)
    if (scale is None) != (shift is None):
        raise ValueError("give both scale and shift, or neither")
    check_device(x, signal, generator_weight, scale, shift)
    return torch.ops.hyperseg.meta_patch_conv(
        x, signal, generator_weight, out_channels, signal_offset, generator_groups, row_start,
        groups, kernel_size, scale, shift, activation, padding_mode)


def _pad(n: int, m: int) -> int:
    return -(-n // m) * m


def executed_work(name: str, launch) -> Optional[dict]:
    """Multiply-adds one launch executes, padding and recomputation counted (for
    bench/kernel_report.py). ``launch.args`` maps the kernel's argument names (constexprs
    included) to their values; ``launch.grid`` is the launch grid."""
    a = launch.args
    if name == "_meta_conv_many_patches_kernel":
        return _many_patches_work(a, launch.grid)
    if name != "_meta_conv_patch_kernel":
        return None
    programs = launch.grid[0]
    k2 = a["K"] * a["K"]
    cin_g, cout_g = a["CIN"] // a["GROUPS"], a["COUT"] // a["GROUPS"]
    count = a["COUT"] * cin_g * k2
    block_p = a["BAND"] * a["BLOCK_W"]
    bands = -(-a["PH"] // a["BAND"])
    gen = programs * count * _pad(a["SPG"], a["BLOCK_S"])
    if a["DEPTHWISE"]:
        conv = programs * bands * block_p * _pad(a["COUT"], a["BLOCK_CO"]) * k2
        tensor = 0
    else:
        conv = (programs * bands * block_p * a["GROUPS"] * _pad(cout_g, a["BLOCK_CO"])
                * _pad(cin_g, a["BLOCK_K"]) * k2)
        tensor = conv if a["DOT_MODE"] in (0, 3) else 0
    return {"macs": gen + conv, "tensor_core_macs": tensor,
            "parts": {"generation": gen, "conv": conv}}


def _many_patches_work(a: dict, grid) -> dict:
    """``_meta_conv_many_patches_kernel``: per (patch block, output block), for each input block
    and generator group its rows span, the generation of BLOCK_O x BLOCK_C rows for BLOCK_N
    patches (SPG padded to BLOCK_S on tensor cores, to a multiple of 4 as multiply-adds), and
    BLOCK_O x BLOCK_C x BLOCK_N multiply-adds per pixel of a patch applying them."""
    cin, cout, rpg, start = a["CIN"], a["COUT"], a["rpg"], a["row_start"]
    bo, bc, bn = a["BLOCK_O"], a["BLOCK_C"], a["BLOCK_N"]
    spg = _pad(a["SPG"], a["BLOCK_S"] if a["GEN_DOT"] else 4)
    gen = conv = 0
    for o0 in range(0, cout, bo):
        o_last = min(o0 + bo, cout) - 1
        for c0 in range(0, cin, bc):
            first = (start + o0 * cin + c0) // rpg
            last = (start + o_last * cin + min(c0 + bc, cin) - 1) // rpg
            gen += (last - first + 1) * bo * bc * spg * bn
            conv += bo * bc * bn * a["PH"] * a["BLOCK_PW"]
    blocks = grid[0]
    tensor = gen if a["GEN_DOT"] and a["DOT_MODE"] in (0, 3) else 0
    return {"macs": blocks * (gen + conv), "tensor_core_macs": blocks * tensor,
            "parts": {"generation": blocks * gen, "conv": blocks * conv}}
