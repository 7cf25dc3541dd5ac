"""The v1 patch-wise inverted residual meta block, fused into one launch.

Weight generation (expand, depthwise, project) from the context signal + 1x1 expand over the patch
and its halo + BN + ReLU6 + 3x3 depthwise + BN + ReLU6 + 1x1 project + BN (+ residual). The
generated weights and the expanded features live only in registers. Reference semantics:
``hyperseg.ops.meta_inverted_residual``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (PADDING_CODES, block, border_index, check_device, dot_in_fp32, generate_rows,
                      patch_pixels, pixel_block)
from .patch_conv import _check_common, _output_like, check_generator


@triton.jit
def _meta_inverted_residual_kernel(
        x_ptr, out_ptr, sig_ptr, gen_ptr,
        s1_ptr, t1_ptr, s2_ptr, t2_ptr, s3_ptr, t3_ptr,
        H, W, GH, GW, CIN, HIDDEN, COUT,
        SIG_C, sig_offset, gen_spg, gen_rpg, row_start,
        K: tl.constexpr, PAD_MODE: tl.constexpr, RESIDUAL: tl.constexpr, DOT_FP32: tl.constexpr,
        TAPS: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_CO: tl.constexpr,
        BLOCK_P: tl.constexpr):
    # Program (patch, pixel block): axis 0 is one patch of one image, axis 1 a block of that
    # patch's pixels (row-major, so each tile row of x reads pw contiguous pixels). All channels of
    # the block are in one tile, so the patch's generated weights are computed once per program.
    #
    # The depthwise conv needs the expanded features on the patch and its halo. Instead of storing
    # them, the expand is recomputed for each of the K*K taps on the correspondingly shifted input
    # pixels, with this patch's own weights: exactly the v1 semantics (a halo pixel is the
    # neighbour's input, expanded with this patch's weights).
    pid_patch = tl.program_id(0)
    pid_p = tl.program_id(1)
    b, gi, gj, yy, xx, p_mask = patch_pixels(pid_patch, pid_p, H, W, GH, GW, BLOCK_P)
    HW = H * W
    KK: tl.constexpr = K * K
    R: tl.constexpr = K // 2
    x_base = x_ptr + b.to(tl.int64) * CIN * HW
    sig_base = sig_ptr + b.to(tl.int64) * SIG_C * GH * GW + gi * GW + gj

    c = tl.arange(0, BLOCK_CI)
    c_mask = c < CIN
    h = tl.arange(0, BLOCK_H)
    h_mask = h < HIDDEN
    o = tl.arange(0, BLOCK_CO)
    o_mask = o < COUT
    taps = tl.arange(0, TAPS)

    # Generated weights of this patch, in the order expand (HIDDEN, CIN), depthwise
    # (HIDDEN, K, K), project (COUT, HIDDEN).
    dw_start = row_start + HIDDEN * CIN
    pr_start = dw_start + HIDDEN * KK
    w1 = generate_rows(row_start + h[:, None] * CIN + c[None, :], h_mask[:, None] & c_mask[None, :],
                       sig_base, gen_ptr, sig_offset, gen_spg, gen_rpg, GH * GW)
    w2 = generate_rows(dw_start + h[:, None] * KK + taps[None, :],
                       h_mask[:, None] & (taps[None, :] < KK),
                       sig_base, gen_ptr, sig_offset, gen_spg, gen_rpg, GH * GW)
    w3 = generate_rows(pr_start + o[:, None] * HIDDEN + h[None, :], o_mask[:, None] & h_mask[None, :],
                       sig_base, gen_ptr, sig_offset, gen_spg, gen_rpg, GH * GW)

    s1 = tl.load(s1_ptr + h, mask=h_mask, other=0.0)[:, None]
    t1 = tl.load(t1_ptr + h, mask=h_mask, other=0.0)[:, None]
    s2 = tl.load(s2_ptr + h, mask=h_mask, other=0.0)[:, None]
    t2 = tl.load(t2_ptr + h, mask=h_mask, other=0.0)[:, None]
    s3 = tl.load(s3_ptr + o, mask=o_mask, other=0.0)[:, None]
    t3 = tl.load(t3_ptr + o, mask=o_mask, other=0.0)[:, None]

    z = tl.zeros((BLOCK_H, BLOCK_P), dtype=tl.float32)
    for t in range(KK):  # a loop, not unrolled: nine copies of the tile code compile for minutes
        sy, vy = border_index(yy + (t // K - R), H, PAD_MODE)
        sx, vx = border_index(xx + (t % K - R), W, PAD_MODE)
        m = c_mask[:, None] & (p_mask & vy & vx)[None, :]
        xv = tl.load(x_base + c.to(tl.int64)[:, None] * HW + (sy * W + sx)[None, :], mask=m, other=0.0)
        if DOT_FP32:
            y = tl.dot(w1, xv.to(tl.float32), input_precision="ieee")
        else:
            y = tl.dot(w1.to(xv.dtype), xv)
        y = tl.minimum(tl.maximum(y * s1 + t1, 0.0), 6.0)
        wt = tl.sum(tl.where(taps[None, :] == t, w2, 0.0), axis=1)
        z += wt[:, None] * y
    z = tl.minimum(tl.maximum(z * s2 + t2, 0.0), 6.0)
    if DOT_FP32:
        out = tl.dot(w3, z, input_precision="ieee")
    else:
        out = tl.dot(w3.to(x_ptr.dtype.element_ty), z.to(x_ptr.dtype.element_ty))
    out = out * s3 + t3
    pix = (yy * W + xx)[None, :]
    mask = o_mask[:, None] & p_mask[None, :]
    if RESIDUAL:
        out += tl.load(x_base + o.to(tl.int64)[:, None] * HW + pix, mask=mask, other=0.0).to(tl.float32)
    out_off = b.to(tl.int64) * COUT * HW + o.to(tl.int64)[:, None] * HW + pix
    tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=mask)


def executed_work(name: str, launch) -> Optional[dict]:
    """Multiply-accumulates that a recorded launch of ``_meta_inverted_residual_kernel`` executes,
    padding and recomputation included (the interface of ``bench/kernel_report.py``, see
    bench/README.md).

    Every program (one patch x one pixel block) generates all of the patch's weights in padded
    tiles, (BLOCK_H x BLOCK_CI) + (BLOCK_H x TAPS) + (BLOCK_CO x BLOCK_H), ``gen_spg`` MACs each;
    recomputes the expand dot (BLOCK_H x BLOCK_CI x BLOCK_P) for each of the K*K taps; runs K*K
    depthwise FMAs on (BLOCK_H x BLOCK_P); and one project dot (BLOCK_CO x BLOCK_H x BLOCK_P). The
    dots use tensor cores unless DOT_FP32 (fp32: IEEE FFMA).
    """
    if name != "_meta_inverted_residual_kernel":
        return None
    a = launch.args
    programs = launch.grid[0] * launch.grid[1] * launch.grid[2]
    kk = a["K"] * a["K"]
    bh, bci, bco, bp = a["BLOCK_H"], a["BLOCK_CI"], a["BLOCK_CO"], a["BLOCK_P"]
    per_program = {"generation": (bh * bci + bh * a["TAPS"] + bco * bh) * a["gen_spg"],
                   "expand": kk * bh * bci * bp, "depthwise": kk * bh * bp, "project": bco * bh * bp}
    parts = {k: programs * v for k, v in per_program.items()}
    dots = 0 if a["DOT_FP32"] else parts["expand"] + parts["project"]
    return {"macs": sum(parts.values()), "tensor_core_macs": dots, "parts": parts}


def meta_inverted_residual(x: torch.Tensor, signal: torch.Tensor, generator_weight: torch.Tensor, *,
                           hidden: int, out_channels: int, signal_offset: int = 0,
                           generator_groups: int = 1, row_start: int = 0, kernel_size: int = 3,
                           norm1: Tuple[torch.Tensor, torch.Tensor],
                           norm2: Tuple[torch.Tensor, torch.Tensor],
                           norm3: Tuple[torch.Tensor, torch.Tensor], residual: bool = False,
                           padding_mode: str = "reflect") -> torch.Tensor:
    """Fused v1 ``MetaInvertedResidual`` (eval mode) in one launch; the semantics of
    ``hyperseg.ops.meta_inverted_residual``. ``norm*`` are (scale, shift) pairs of folded BN."""
    if signal.dim() != 4:
        raise ValueError(f"signal must have shape (B, S, GH, GW), got {tuple(signal.shape)}")
    grid = tuple(signal.shape[2:4])
    _check_common(x, grid, kernel_size, 1, padding_mode)
    cin = x.shape[1]
    if hidden < 1 or out_channels < 1:
        raise ValueError(f"hidden and out_channels must be >= 1, got {hidden} and {out_channels}")
    if residual and cin != out_channels:
        raise ValueError(f"a residual needs Cin == Cout, got {cin} and {out_channels}")
    if signal.shape[0] != x.shape[0]:
        raise ValueError(f"batch of signal ({signal.shape[0]}) differs from batch of x ({x.shape[0]})")
    for name, (n, size) in {"norm1": (norm1, hidden), "norm2": (norm2, hidden),
                            "norm3": (norm3, out_channels)}.items():
        if len(n) != 2 or any(v.shape != (size,) for v in n):
            raise ValueError(f"{name} must be a (scale, shift) pair of shape ({size},)")
    count = hidden * cin + hidden * kernel_size ** 2 + out_channels * hidden
    check_generator(signal, generator_weight, signal_offset, generator_groups, row_start, count)
    check_device(x, signal, generator_weight, *norm1, *norm2, *norm3)
    return torch.ops.hyperseg.meta_inverted_residual(
        x, signal, generator_weight, hidden, out_channels, signal_offset, generator_groups,
        row_start, kernel_size, *norm1, *norm2, *norm3, residual, padding_mode)


# The PyTorch custom op behind ``meta_inverted_residual`` (see the note in patch_conv.py): one
# opaque node for torch.compile, with a fake implementation; it takes validated arguments only.
@torch.library.custom_op("hyperseg::meta_inverted_residual", mutates_args=())
def _meta_inverted_residual_op(
        x: torch.Tensor, signal: torch.Tensor, generator_weight: torch.Tensor, hidden: int,
        out_channels: int, signal_offset: int, generator_groups: int, row_start: int,
        kernel_size: int, scale1: torch.Tensor, shift1: torch.Tensor, scale2: torch.Tensor,
        shift2: torch.Tensor, scale3: torch.Tensor, shift3: torch.Tensor, residual: bool,
        padding_mode: str) -> torch.Tensor:
    x = x.contiguous()
    b, cin, h, w = x.shape
    gh, gw = signal.shape[2:4]
    ph, pw = h // gh, w // gw
    rows, spg = generator_weight.shape[:2]
    out = _output_like(x, out_channels)
    block_p = pixel_block(ph * pw)
    norms = [t.float().contiguous() for t in (scale1, shift1, scale2, shift2, scale3, shift3)]
    _meta_inverted_residual_kernel[(b * gh * gw, triton.cdiv(ph * pw, block_p))](
        x, out, signal.contiguous(), generator_weight.contiguous(), *norms,
        h, w, gh, gw, cin, hidden, out_channels,
        signal.shape[1], signal_offset, spg, rows // generator_groups, row_start,
        K=kernel_size, PAD_MODE=PADDING_CODES[padding_mode], RESIDUAL=residual,
        DOT_FP32=dot_in_fp32(x.dtype), TAPS=triton.next_power_of_2(kernel_size * kernel_size),
        BLOCK_CI=block(cin, high=1 << 20), BLOCK_H=block(hidden, high=1 << 20),
        BLOCK_CO=block(out_channels, high=1 << 20), BLOCK_P=block_p, num_warps=4)
    return out


@_meta_inverted_residual_op.register_fake
def _meta_inverted_residual_fake(x, signal, generator_weight, hidden, out_channels, *args):
    return _output_like(x, out_channels)
