"""The v1 patch-wise inverted residual meta block, fused into one launch.

Weight generation (expand, depthwise, project) from the context signal + 1x1 expand over the patch
and its halo + BN + ReLU6 + k x k depthwise + BN + ReLU6 + 1x1 project + BN (+ residual).
Reference semantics: ``hyperseg.ops.meta_inverted_residual``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (PADDING_CODES, autotuned, border_index, check_common, check_device,
                      dot_acc, dot_mode, generation_rows, generator_layout, launch_options,
                      output_like, patch_params_to_scratch, signal_block)
from ..layout import (check_generated, check_generator, check_inverted_residual,
                      inverted_residual_sizes)


@triton.jit
def _expand_to_scratch(dst_ptr, wscr, x_base, h, h_mask, s1, t1, pix, valid, W, HW,
                       CIN: tl.constexpr, DOT_MODE: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_K: tl.constexpr, ROW: tl.constexpr, INTERIOR: tl.constexpr):
    # The 1x1 expand (rows h of the patch's expand weights in ``wscr``) of one chunk of pixels
    # (image offsets ``pix``; ``valid`` ones), BN1 (s1, t1) and ReLU6, stored to the scratch at
    # ``dst_ptr`` (one row of ROW floats per hidden channel). One dot per BLOCK_K input channels.
    # INTERIOR: the pixels are runs of a patch's own columns (vector loads); else side columns,
    # gathered through the border.
    k_loc = tl.arange(0, BLOCK_K)
    y = tl.zeros((BLOCK_H, pix.shape[0]), dtype=tl.float32)
    for c0 in range(0, CIN, BLOCK_K):
        c = c0 + k_loc
        c_mask = c < CIN
        w1 = tl.load(wscr + h[:, None] * CIN + c[None, :],
                     mask=h_mask[:, None] & c_mask[None, :], other=0.0)
        if INTERIOR:
            xv = tl.load(x_base + c.to(tl.int64)[:, None] * HW + pix[None, :],  # interior: vector
                         mask=c_mask[:, None] & valid[None, :], other=0.0)
        else:
            xv = tl.load(x_base + c.to(tl.int64)[:, None] * HW + pix[None, :],
                         mask=c_mask[:, None] & valid[None, :], other=0.0)
        y = dot_acc(w1, xv, y, DOT_MODE)
    y = tl.minimum(tl.maximum(y * s1 + t1, 0.0), 6.0)
    tl.store(dst_ptr + tl.arange(0, BLOCK_H)[:, None] * ROW, y)


@triton.jit
def _expand_sides(escr, wscr, x_base, s1_ptr, t1_ptr, y0, x0, n_rows, H, W, HW,
                  CIN: tl.constexpr, HIDDEN: tl.constexpr, R: tl.constexpr, PW: tl.constexpr,
                  EDGE_CAP: tl.constexpr, PAD_MODE: tl.constexpr, DOT_MODE: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, HALO_CHUNK: tl.constexpr):
    # Step 0 of a band: expand, for every hidden channel, the halo's 2R side columns (left ones,
    # then right ones) over its n_rows rows, column-major (position side * n_rows + row), into
    # ``escr`` (a row of EDGE_CAP floats per hidden channel). Their pixels may fall outside the
    # image (``border_index``). Done before the band's hidden-chunk loop so that the gather's
    # registers are not live beside the main loop's.
    h_loc = tl.arange(0, BLOCK_H)
    e_loc = tl.arange(0, HALO_CHUNK)
    for h0 in range(0, HIDDEN, BLOCK_H):
        h = h0 + h_loc
        h_mask = h < HIDDEN
        s1 = tl.load(s1_ptr + h, mask=h_mask, other=0.0)[:, None]
        t1 = tl.load(t1_ptr + h, mask=h_mask, other=0.0)[:, None]
        for e0 in range(0, 2 * R * n_rows, HALO_CHUNK):
            e = e0 + e_loc
            side = e // n_rows
            ey, vy = border_index(y0 + e % n_rows, H, PAD_MODE)
            ex, vx = border_index(x0 + tl.where(side < R, side - R, PW + side - R), W, PAD_MODE)
            _expand_to_scratch(escr + h0 * EDGE_CAP + e[None, :], wscr, x_base, h, h_mask, s1, t1,
                               ey * W + ex, (e < 2 * R * n_rows) & vy & vx, W, HW, CIN, DOT_MODE,
                               BLOCK_H, BLOCK_K, EDGE_CAP, False)


@triton.jit
def _sides_to_tile(yscr, escr, h0, n_rows, R: tl.constexpr, PW: tl.constexpr,
                   HALO_W: tl.constexpr, INT_CAP: tl.constexpr, EDGE_CAP: tl.constexpr,
                   BLOCK_H: tl.constexpr, HALO_CHUNK: tl.constexpr):
    # Copy the side columns of hidden channels h0 .. h0 + BLOCK_H from the band's side tile
    # ``escr`` (side * n_rows + row) into the chunk's halo tile ``yscr``, whose rows are HALO_W
    # floats: the patch's PW columns first, then the R right columns, and the R left ones at the
    # row's end (column c < 0 at HALO_W + c). The depthwise then reads one tile with one load.
    h_loc = tl.arange(0, BLOCK_H)
    for e0 in range(0, 2 * R * n_rows, HALO_CHUNK):
        e = e0 + tl.arange(0, HALO_CHUNK)
        e_mask = (e < 2 * R * n_rows)[None, :]
        side = e // n_rows
        col = tl.where(side < R, HALO_W - R + side, PW + side - R)
        v = tl.load(escr + (h0 + h_loc)[:, None] * EDGE_CAP + e[None, :], mask=e_mask, other=0.0)
        tl.store(yscr + h_loc[:, None] * INT_CAP + ((e % n_rows) * HALO_W + col)[None, :], v,
                 mask=e_mask)


@triton.jit
def _depthwise_from_scratch(yscr, w_dw, h, h_mask, pr, pc, p_mask, K: tl.constexpr,
                            HALO_W: tl.constexpr, INT_CAP: tl.constexpr, BLOCK_H: tl.constexpr,
                            BLOCK_P: tl.constexpr):
    # Step 2: the k x k depthwise of the band from the chunk's halo tile; tap t of output pixel
    # (pr, pc) is halo pixel (pr + t // k, pc + t % k - R), counted from the patch's first column,
    # at row * HALO_W + col of ``yscr`` (left columns wrapped to the row's end). ``w_dw``: the
    # patch's depthwise weights.
    R: tl.constexpr = K // 2
    h_loc = tl.arange(0, BLOCK_H)
    z = tl.zeros((BLOCK_H, BLOCK_P), dtype=tl.float32)
    for t in range(K * K):
        w2 = tl.load(w_dw + h * (K * K) + t, mask=h_mask, other=0.0)
        col = pc + t % K - R
        pos = (pr + t // K) * HALO_W + tl.where(col < 0, col + HALO_W, col)
        yv = tl.load(yscr + h_loc[:, None] * INT_CAP + pos[None, :], mask=p_mask[None, :],
                     other=0.0)
        z += w2[:, None] * yv
    return z


@triton.jit
def _meta_inverted_residual_kernel(
        x_ptr, out_ptr, sig_ptr, gen_ptr, wscr_ptr, yscr_ptr,
        s1_ptr, t1_ptr, s2_ptr, t2_ptr, s3_ptr, t3_ptr,
        H, W, GH, GW, SIG_C, sig_offset, rpg, row_start,
        CIN: tl.constexpr, HIDDEN: tl.constexpr, COUT: tl.constexpr, PH: tl.constexpr,
        PW: tl.constexpr, K: tl.constexpr, PAD_MODE: tl.constexpr, RESIDUAL: tl.constexpr,
        SPG: tl.constexpr, GEN_STRIDE: tl.constexpr, DOT_MODE: tl.constexpr,
        BAND: tl.constexpr, BLOCK_W: tl.constexpr, HALO_CHUNK: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_CO: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    # One program per patch. Phase 1 generates the patch's parameters once (expand, depthwise,
    # project: one contiguous run of generator rows, coalesced) into the program's slot of a
    # float32 scratch buffer, which stays in L1/L2. Phase 2 walks the patch in bands of BAND rows.
    # Per band it first expands the halo's side columns for every hidden channel into the
    # program's side tile (gathered: they may lie beyond the border); then per chunk of BLOCK_H
    # hidden channels it
    #   1. copies the chunk's side columns into the program's halo tile (rows of HALO_W floats)
    #      and expands the patch's own columns over the band's rows plus the halo rows once
    #      (tensor-core dots over BLOCK_K input channels) beside them: each row's PW columns are
    #      contiguous image pixels from an aligned start (vector loads),
    #   2. reads each of the k*k depthwise taps back from the halo tile with one load, and
    #   3. accumulates the 1x1 project of the chunk into the band's output tile (a dot).
    # Barriers order the scratch writes and reads of the CTA's threads. Output tiles are BAND rows
    # x BLOCK_W columns, so stores of a tile row are contiguous.
    pid = tl.program_id(0)
    HW = H * W
    KK: tl.constexpr = K * K
    R: tl.constexpr = K // 2
    HALO_W: tl.constexpr = PW + (2 * R + 3) // 4 * 4   # a halo row in the chunk tile, aligned
    INT_ROWS: tl.constexpr = (((BAND + 2 * R) * PW + HALO_CHUNK - 1) // HALO_CHUNK * HALO_CHUNK
                              + PW - 1) // PW      # halo rows the expand's chunks write
    INT_CAP: tl.constexpr = INT_ROWS * HALO_W
    EDGE_CAP: tl.constexpr = (2 * R * (BAND + 2 * R) + HALO_CHUNK - 1) // HALO_CHUNK * HALO_CHUNK
    HIDDEN_P: tl.constexpr = (HIDDEN + BLOCK_H - 1) // BLOCK_H * BLOCK_H
    DW0: tl.constexpr = HIDDEN * CIN
    PR0: tl.constexpr = DW0 + HIDDEN * KK
    COUNT: tl.constexpr = PR0 + COUT * HIDDEN
    BLOCK_P: tl.constexpr = BAND * BLOCK_W
    b, gi, gj, wscr = patch_params_to_scratch(pid, wscr_ptr, COUNT, sig_ptr, SIG_C, GH, GW, gen_ptr,
                                              sig_offset, rpg, row_start, SPG, GEN_STRIDE,
                                              BLOCK_R, BLOCK_S)
    x_base = x_ptr + b.to(tl.int64) * CIN * HW
    out_base = out_ptr + b.to(tl.int64) * COUT * HW
    yscr = yscr_ptr + pid.to(tl.int64) * (BLOCK_H * INT_CAP + HIDDEN_P * EDGE_CAP)
    escr = yscr + BLOCK_H * INT_CAP

    h_loc = tl.arange(0, BLOCK_H)
    e_loc = tl.arange(0, HALO_CHUNK)
    o = tl.arange(0, BLOCK_CO)
    o_mask = o < COUT
    p = tl.arange(0, BLOCK_P)
    pr = p // BLOCK_W
    pc = p % BLOCK_W
    s3 = tl.load(s3_ptr + o, mask=o_mask, other=0.0)[:, None]
    t3 = tl.load(t3_ptr + o, mask=o_mask, other=0.0)[:, None]
    for band0 in range(0, PH, BAND):
        rows = tl.minimum(PH - band0, BAND)
        n_rows = rows + 2 * R
        y0 = gi * PH + band0 - R                # image row of the halo's first row
        p_mask = (pr < rows) & (pc < PW)
        if R > 0:
            _expand_sides(escr, wscr, x_base, s1_ptr, t1_ptr, y0, gj * PW, n_rows, H, W, HW, CIN,
                          HIDDEN, R, PW, EDGE_CAP, PAD_MODE, DOT_MODE, BLOCK_H, BLOCK_K,
                          HALO_CHUNK)
            tl.debug_barrier()
        acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=tl.float32)
        for h0 in range(0, HIDDEN, BLOCK_H):
            h = h0 + h_loc
            h_mask = h < HIDDEN
            s1 = tl.load(s1_ptr + h, mask=h_mask, other=0.0)[:, None]
            t1 = tl.load(t1_ptr + h, mask=h_mask, other=0.0)[:, None]
            # 1. copy the chunk's side columns into its halo tile; expand the patch's columns over
            # the band and its halo rows beside them, BN1, ReLU6
            if R > 0:
                _sides_to_tile(yscr, escr, h0, n_rows, R, PW, HALO_W, INT_CAP, EDGE_CAP, BLOCK_H,
                               HALO_CHUNK)
            for e0 in range(0, n_rows * PW, HALO_CHUNK):
                e = e0 + e_loc
                ey, vy = border_index(y0 + e // PW, H, PAD_MODE)
                _expand_to_scratch(yscr + ((e // PW) * HALO_W + e % PW)[None, :], wscr, x_base, h,
                                   h_mask, s1, t1, ey * W + gj * PW + e % PW,
                                   (e < n_rows * PW) & vy, W, HW, CIN, DOT_MODE, BLOCK_H, BLOCK_K,
                                   INT_CAP, True)
            tl.debug_barrier()
            # 2. depthwise k x k from the chunk's halo tile, BN2, ReLU6
            z = _depthwise_from_scratch(yscr, wscr + DW0, h, h_mask, pr, pc, p_mask, K, HALO_W,
                                        INT_CAP, BLOCK_H, BLOCK_P)
            s2 = tl.load(s2_ptr + h, mask=h_mask, other=0.0)[:, None]
            t2 = tl.load(t2_ptr + h, mask=h_mask, other=0.0)[:, None]
            z = tl.minimum(tl.maximum(z * s2 + t2, 0.0), 6.0)
            # 3. project this hidden chunk (rows of padded hidden channels have zero weights)
            w3 = tl.load(wscr + PR0 + o[:, None] * HIDDEN + h[None, :],
                         mask=o_mask[:, None] & h_mask[None, :], other=0.0)
            acc = dot_acc(w3, z.to(x_ptr.dtype.element_ty), acc, DOT_MODE)
            tl.debug_barrier()
        acc = acc * s3 + t3
        pix = (gi * PH + band0 + pr) * W + gj * PW + pc
        mask = o_mask[:, None] & p_mask[None, :]
        offs = o.to(tl.int64)[:, None] * HW + pix[None, :]
        if RESIDUAL:
            acc += tl.load(x_base + offs, mask=mask, other=0.0).to(tl.float32)  # interior: vector
        tl.store(out_base + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)  # interior: vector


def _enough_work_per_warp(configs, args):
    """16 warps only for tiles of at least 128 output pixels: on smaller ones the extra warps hold
    a few elements each and the layout conversions spill. With IEEE float32 dots (operands in
    registers) and 2,048 output accumulators or more, 16 warps only: at 4,096, 8 need so many
    registers that 8 warps fill an SM; at 2,048 (hyperseg-s-camvid's and hyperseg-l-camvid's L4)
    Triton 3.6 spilled 72 B on 8. tf32 and half-precision dots on patches 32 pixels wide: 16
    warps only (on 8, hyperseg-l-camvid's L5 took 170 registers in tf32, and 182 in fp16 and
    bf16 with Triton 3.6 (128 with 3.8): 8 warps per SM)."""
    tile = args["BAND"] * args["BLOCK_W"]
    if tile < 128:
        return [c for c in configs if c.num_warps <= 8]
    if args["DOT_MODE"] == 1 and tile * args["BLOCK_CO"] >= 2048:
        return [c for c in configs if c.num_warps >= 16]
    if args["DOT_MODE"] in (0, 3) and args["BLOCK_W"] >= 32:
        return [c for c in configs if c.num_warps >= 16]
    return configs


def _vector_tile(mode: int, warps: int) -> int:
    """Elements of an expand input tile that give each thread of ``warps`` warps one 8-byte
    vector: 2 float32 or 4 half-precision elements."""
    return (4 if mode == 0 else 2) * 32 * warps


_tuned_kernel = autotuned(_meta_inverted_residual_kernel,
                          ("CIN", "HIDDEN", "COUT", "PH", "PW", "K", "DOT_MODE", "BAND"), warps=(8, 16),
                          prune=_enough_work_per_warp)


def plan(cin: int, hidden: int, cout: int, patch: Tuple[int, int], kernel_size: int,
         dot_mode: int) -> dict:
    """Tile sizes of ``_meta_inverted_residual_kernel`` for a block: bands of whole patch rows of
    up to 256 output pixels, at most 8,192 output accumulators per program (IEEE float32 dots,
    whose operands live in registers: 128 pixels, or 256 for patches 32 wide, and at most 4,096
    accumulators); 16 hidden and 16 input channels per dot (the smallest tensor-core tile; 32
    input channels took up to 165 registers). The expand's halo pixels come in chunks of 32 or
    more: the fewest that give each thread of 8 warps an 8-byte vector of the image row it loads
    (the tile has 16 x HALO_CHUNK elements; on the 16 warps of IEEE float32 dots, 64 pixels
    spilled, so those hold one element per thread)."""
    ph, pw = patch
    block_w = triton.next_power_of_2(pw)
    block_co = max(16, triton.next_power_of_2(cout))
    ieee_target = 256 if block_w >= 32 else 128
    target = max(block_w, min(ieee_target if dot_mode == 1 else 256,
                              (4096 if dot_mode == 1 else 8192) // block_co))
    band = max(1, min(triton.next_power_of_2(ph), target // block_w))
    block_w = max(block_w, 16 // band)          # a dot needs >= 16 output pixels
    chunk = max(32, _vector_tile(dot_mode, 8) // 16)
    return dict(BAND=band, BLOCK_W=block_w, HALO_CHUNK=chunk, BLOCK_K=16, BLOCK_H=16,
                BLOCK_CO=block_co)


def scratch_sizes(cfg: dict, count: int, patch: Tuple[int, int], kernel_size: int,
                  hidden: int) -> Tuple[int, int]:
    """Per-program float32 scratch: the patch's parameters; one hidden chunk's halo tile
    (rows of ``halo_row`` floats, as many as the expand's chunks write) plus the band's side
    columns for all hidden channels (as the kernel lays them out)."""
    r = kernel_size // 2
    interior, sides = halo_capacity(cfg["BAND"], patch[1], r, cfg["HALO_CHUNK"])
    rows = -(-interior // patch[1])
    hidden_p = triton.cdiv(hidden, cfg["BLOCK_H"]) * cfg["BLOCK_H"]
    return count, cfg["BLOCK_H"] * rows * halo_row(patch[1], r) + hidden_p * sides


def halo_row(pw: int, r: int) -> int:
    """Floats per row of the kernel's halo tile: the patch's ``pw`` columns and its 2r side
    columns, padded to a multiple of 4 so that rows start 16-byte aligned when ``pw`` allows."""
    return pw + -(-2 * r // 4) * 4


def halo_capacity(band: int, pw: int, r: int, chunk: int) -> Tuple[int, int]:
    """Halo pixels of a band that the kernel expands, each part padded to whole chunks: the
    patch's own columns over band + 2r rows, and the 2r side columns."""
    pad = lambda n: -(-n // chunk) * chunk  # noqa: E731
    return pad((band + 2 * r) * pw), pad(2 * r * (band + 2 * r))


# The PyTorch custom op behind ``meta_inverted_residual``: one opaque node for torch.compile, with
# a fake implementation; it takes validated arguments only.
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
    patch = (h // gh, w // gw)
    gen, spg, stride = generator_layout(generator_weight)
    out = output_like(x, out_channels)
    mode = dot_mode(x.dtype)
    cfg = plan(cin, hidden, out_channels, patch, kernel_size, mode)
    cfg["BLOCK_S"] = signal_block(spg)
    cfg["BLOCK_R"] = generation_rows(cfg["BLOCK_S"], gen.element_size(), 16)
    count = sum(inverted_residual_sizes(cin, hidden, out_channels, kernel_size))
    n_params, n_halo = scratch_sizes(cfg, count, patch, kernel_size, hidden)
    programs = b * gh * gw
    wscr = x.new_empty((programs, n_params), dtype=torch.float32)
    yscr = x.new_empty((programs, n_halo), dtype=torch.float32)
    norms = [t.float().contiguous() for t in (scale1, shift1, scale2, shift2, scale3, shift3)]
    _tuned_kernel[(programs,)](
        x, out, signal.contiguous(), gen, wscr, yscr, *norms,
        h, w, gh, gw, signal.shape[1], signal_offset, gen.shape[0] // generator_groups, row_start,
        CIN=cin, HIDDEN=hidden, COUT=out_channels, PH=patch[0], PW=patch[1], K=kernel_size,
        PAD_MODE=PADDING_CODES[padding_mode], RESIDUAL=residual, SPG=spg, GEN_STRIDE=stride,
        DOT_MODE=mode, **launch_options(_tuned_kernel, 4), **cfg)
    return out


@_meta_inverted_residual_op.register_fake
def _meta_inverted_residual_fake(x, signal, generator_weight, hidden, out_channels, *args):
    return output_like(x, out_channels)


def meta_inverted_residual(x: torch.Tensor, signal: torch.Tensor, generator_weight: torch.Tensor, *,
                           hidden: int, out_channels: int, signal_offset: int = 0,
                           generator_groups: int = 1, row_start: int = 0, kernel_size: int = 3,
                           norm1: Tuple[torch.Tensor, torch.Tensor],
                           norm2: Tuple[torch.Tensor, torch.Tensor],
                           norm3: Tuple[torch.Tensor, torch.Tensor], residual: bool = False,
                           padding_mode: str = "reflect") -> torch.Tensor:
    """Fused v1 ``MetaInvertedResidual`` (eval mode) in one launch; the semantics of
    ``hyperseg.ops.meta_inverted_residual``. ``norm*`` are (scale, shift) pairs of folded BN.
    float32 inputs use tf32 tensor cores when ``torch.backends.cudnn.allow_tf32`` is on."""
    cin = check_generated(x, signal, out_channels, 1)
    check_inverted_residual(cin, hidden, out_channels, residual)
    check_common(x, tuple(signal.shape[2:4]), kernel_size, 1, padding_mode)
    count = sum(inverted_residual_sizes(cin, hidden, out_channels, kernel_size))
    check_generator(signal, generator_weight, signal_offset, generator_groups, row_start, count)
    for name, (n, size) in {"norm1": (norm1, hidden), "norm2": (norm2, hidden),
                            "norm3": (norm3, out_channels)}.items():
        if len(n) != 2 or any(v.shape != (size,) for v in n):
            raise ValueError(f"{name} must be a (scale, shift) pair of shape ({size},)")
    check_device(x, signal, generator_weight, *norm1, *norm2, *norm3)
    return torch.ops.hyperseg.meta_inverted_residual(
        x, signal, generator_weight, hidden, out_channels, signal_offset, generator_groups,
        row_start, kernel_size, *norm1, *norm2, *norm3, residual, padding_mode)


def executed_work(name: str, launch) -> Optional[dict]:
    """Multiply-adds one launch of ``_meta_inverted_residual_kernel`` executes, padding and
    recomputation counted (for bench/kernel_report.py): generation of every parameter once per
    patch (inputs padded to BLOCK_S), the expand over each band's halo (its patch columns and its
    side columns, each padded to HALO_CHUNK pixels; BLOCK_H hidden and BLOCK_K input channels),
    the depthwise and the project over the
    band's BLOCK_P output pixels (hidden padded to BLOCK_H, outputs to BLOCK_CO)."""
    if name != "_meta_inverted_residual_kernel":
        return None
    a = launch.args
    programs = launch.grid[0]
    pad = lambda n, m: -(-n // m) * m  # noqa: E731
    k = a["K"]
    r = k // 2
    hidden_p = pad(a["HIDDEN"], a["BLOCK_H"])
    count = sum(inverted_residual_sizes(a["CIN"], a["HIDDEN"], a["COUT"], k))
    bands = -(-a["PH"] // a["BAND"])
    halo = sum(halo_capacity(a["BAND"], a["PW"], r, a["HALO_CHUNK"]))
    block_p = a["BAND"] * a["BLOCK_W"]
    parts = {"generation": count * pad(a["SPG"], a["BLOCK_S"]),
             "expand": bands * halo * hidden_p * pad(a["CIN"], a["BLOCK_K"]),
             "depthwise": bands * block_p * hidden_p * k * k,
             "project": bands * block_p * hidden_p * a["BLOCK_CO"]}
    parts = {key: programs * value for key, value in parts.items()}
    tensor = (parts["expand"] + parts["project"]) if a["DOT_MODE"] in (0, 3) else 0
    return {"macs": sum(parts.values()), "tensor_core_macs": tensor, "parts": parts}
