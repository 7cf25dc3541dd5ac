"""The reference operators of HyperSeg, in plain PyTorch.

These functions are the definition of the method's dynamic layers and the ground truth that every
Triton kernel in ``hyperseg.kernels`` is tested against. They favour clarity over speed, but avoid
per-patch Python loops so that the ``torch`` backend stays usable.

Terms used throughout:

* the *grid* is the ``GH x GW`` map of the context head's signal (the stride-32 map);
* a *patch* is one cell of that grid mapped onto a feature map of size ``H x W``: a block of
  ``ph x pw = H / GH x W / GW`` pixels. Every patch has its own weights;
* a k x k convolution reads a ``k // 2`` pixel *halo* around a patch: inside the image the halo holds
  the neighbouring patches' pixels; at the image border it is padded according to ``padding_mode``.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import (ACTIVATIONS, PADDING_MODES, check_activation,  # noqa: F401  (re-exported)
                     check_generated, check_generator,
                     check_grid, check_inverted_residual, check_padding, check_patch_weight,
                     inverted_residual_sizes, is_scale_shift, patch_conv_rows,
                     split_inverted_residual)

Norm = Optional[Callable[[Tensor], Tensor]]


def _identity(t: Tensor) -> Tensor:
    return t


def affine(scale: Tensor, shift: Tensor) -> Callable[[Tensor], Tensor]:
    """A per-channel ``y = x * scale + shift`` on (N, C, ...) tensors: an eval-mode BatchNorm."""
    def apply(t: Tensor) -> Tensor:
        view = (1, -1) + (1,) * (t.dim() - 2)
        return t * scale.view(view) + shift.view(view)
    return apply


def fold_batchnorm(bn: torch.nn.modules.batchnorm._BatchNorm) -> Tuple[Tensor, Tensor]:
    """The eval-mode BatchNorm ``bn`` as a per-channel (scale, shift) pair, in float32."""
    var = bn.running_var.float()
    mean = bn.running_mean.float()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.float()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    return scale, shift


# ------------------------------------------------------------------------------------------------
# Patch layout
# ------------------------------------------------------------------------------------------------

def pad_border(x: Tensor, halo: int, padding_mode: str = "reflect") -> Tensor:
    """Pad the image border of ``x`` (B, C, H, W) by ``halo`` pixels on every side."""
    check_padding(padding_mode, halo, x.shape[-2:])
    if halo == 0:
        return x
    mode = "constant" if padding_mode == "zeros" else padding_mode
    return F.pad(x, (halo, halo, halo, halo), mode=mode)


def split_patches(x: Tensor, grid: Tuple[int, int], halo: int = 0) -> Tensor:
    """Cut a border-padded image into overlapping patches.

    ``x`` is (B, C, GH * ph + 2 * halo, GW * pw + 2 * halo); the result is a view of shape
    (B, GH, GW, C, ph + 2 * halo, pw + 2 * halo) whose patch (i, j) also holds its halo.
    """
    gh, gw = grid
    ph = (x.shape[-2] - 2 * halo) // gh
    pw = (x.shape[-1] - 2 * halo) // gw
    windows = x.unfold(2, ph + 2 * halo, ph).unfold(3, pw + 2 * halo, pw)
    return windows.permute(0, 2, 3, 1, 4, 5)


def merge_patches(patches: Tensor) -> Tensor:
    """Inverse of ``split_patches`` without halo: (B, GH, GW, C, ph, pw) -> (B, C, GH*ph, GW*pw)."""
    b, gh, gw, c, ph, pw = patches.shape
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, c, gh * ph, gw * pw)


# ------------------------------------------------------------------------------------------------
# Weight generation
# ------------------------------------------------------------------------------------------------

def generate_weights(signal: Tensor, weight: Tensor, *, groups: int = 1, start: int = 0,
                     count: Optional[int] = None) -> Tensor:
    """Generate per-patch weights from the context signal (``signal2weights``).

    Args:
        signal: (B, S, GH, GW), the slice of the context head's signal that this generator reads.
        weight: (R, S // groups, 1, 1), a grouped 1x1 convolution without bias.
        groups: groups of that convolution.
        start, count: keep output rows ``start .. start + count`` (default: all from ``start``).
            The official generators round R up to a multiple of ``groups`` and truncate the output
            back to the parameter count of the block(s) they serve.

    Returns:
        (B, GH, GW, count): one parameter vector per patch.
    """
    rows = F.conv2d(signal, weight, groups=groups)
    stop = rows.shape[1] if count is None else start + count
    return rows[:, start:stop].permute(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------------
# Patch-wise convolutions
# ------------------------------------------------------------------------------------------------

def _depthwise_valid(patches: Tensor, weight: Tensor) -> Tensor:
    """Valid k x k convolution of every channel of every patch with its own filter:
    patches (B, GH, GW, C, ph + k - 1, pw + k - 1), weight (B, GH, GW, C, k, k) ->
    (B, GH, GW, C, ph, pw). One grouped ``F.conv2d`` with a group per (patch, channel); while
    exporting (ONNX), a sum over the k * k taps instead, whose graph does not fix the batch size
    (the group count of the convolution depends on it)."""
    b, gh, gw, c, hh, hw = patches.shape
    k = weight.shape[-1]
    ph, pw = hh - k + 1, hw - k + 1
    if torch.compiler.is_exporting():
        out = None
        for dy in range(k):
            for dx in range(k):
                term = patches[..., dy:dy + ph, dx:dx + pw] * weight[..., dy, dx, None, None]
                out = term if out is None else out + term
        return out
    n = b * gh * gw * c
    out = F.conv2d(patches.reshape(1, n, hh, hw), weight.reshape(n, 1, k, k), groups=n)
    return out.reshape(b, gh, gw, c, ph, pw)


def patch_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                 padding_mode: str = "reflect", groups: int = 1) -> Tensor:
    """Dynamic patch-wise 2D convolution (stride 1, "same" size).

    Args:
        x: (B, Cin, H, W).
        weight: (B, GH, GW, Cout, Cin // groups, k, k), one kernel per patch of a GH x GW grid,
            odd k. H % GH == 0 and W % GW == 0.
        bias: (B, GH, GW, Cout) or None.
        padding_mode: how the halo is filled at the image border: "zeros", "reflect", "replicate".
        groups: channel groups, as in ``torch.nn.functional.conv2d``.

    Returns:
        (B, Cout, H, W): every patch convolved with its own kernel; the k // 2 halo comes from
        the neighbouring patches inside the image and from ``padding_mode`` at its border.
    """
    ph, pw = check_patch_weight(x, weight, bias, groups)
    b, cin, _, _ = x.shape
    _, gh, gw, cout, cin_g, kh, kw = weight.shape
    halo = kh // 2

    patches = split_patches(pad_border(x, halo, padding_mode), (gh, gw), halo)
    if cin_g == 1 and cout == groups:
        # depthwise: every (patch, channel) pair is its own filter
        out = _depthwise_valid(patches, weight.reshape(b, gh, gw, cout, kh, kw))
        out = out.reshape(b, gh, gw, cout, ph * pw)
        if bias is not None:
            out = out + bias.unsqueeze(-1)
        return merge_patches(out.reshape(b, gh, gw, cout, ph, pw))
    patches = patches.reshape(b, gh, gw, groups, cin_g, ph + 2 * halo, pw + 2 * halo)
    kernels = weight.reshape(b, gh, gw, groups, cout // groups, cin_g, kh, kw)
    out = None
    for dy in range(kh):
        for dx in range(kw):
            window = patches[..., dy:dy + ph, dx:dx + pw].reshape(b, gh, gw, groups, cin_g, ph * pw)
            term = kernels[..., dy, dx] @ window               # (B, GH, GW, G, Cout/G, ph*pw)
            out = term if out is None else out + term
    out = out.reshape(b, gh, gw, cout, ph * pw)
    if bias is not None:
        out = out + bias.unsqueeze(-1)
    return merge_patches(out.reshape(b, gh, gw, cout, ph, pw))


def patch_inverted_residual(x: Tensor, expand: Tensor, depthwise: Tensor, project: Tensor, *,
                            norm1: Norm = None, norm2: Norm = None, norm3: Norm = None,
                            residual: bool = False, padding_mode: str = "reflect",
                            chunk_rows: Optional[int] = None) -> Tensor:
    """The v1 patch-wise inverted residual block (HyperSeg ``MetaInvertedResidual``).

    For every patch, with that patch's own weights:
    ``1x1 expand`` over the patch *and its halo* -> norm1 -> ReLU6 -> ``k x k depthwise`` (valid,
    back to the patch size) -> norm2 -> ReLU6 -> ``1x1 project`` -> norm3 (+ x when ``residual``).
    The halo pixels are the neighbours' *inputs*, expanded with the patch's own weights.

    Args:
        x: (B, Cin, H, W).
        expand: (B, GH, GW, hidden, Cin).
        depthwise: (B, GH, GW, hidden, k, k), odd k.
        project: (B, GH, GW, Cout, hidden).
        norm1, norm2, norm3: per-channel normalisations applied to (N, C, h, w) tensors laid out
            patch by patch (N = B * GH * GW; for norm1 h, w include the halo), e.g. BatchNorm
            modules or ``affine(scale, shift)``. None: identity.
        residual: add ``x`` to the result (needs Cin == Cout).
        chunk_rows: process this many rows of patches at a time, which bounds the memory of the
            expanded features. Only for norms that act per channel independently of the batch
            (eval-mode BatchNorm, ``affine``): train-mode BatchNorm needs all patches at once.
    """
    b, cin, h, w = x.shape
    _, gh, gw, hidden, _ = expand.shape
    cout = project.shape[3]
    ph, pw = check_grid(x, (gh, gw))
    if residual and cin != cout:
        raise ValueError(f"a residual needs Cin == Cout, got {cin} and {cout}")
    halo = depthwise.shape[-1] // 2
    padded = pad_border(x, halo, padding_mode)
    step = gh if not chunk_rows else max(1, chunk_rows)
    if step >= gh:
        out = _inverted_residual_rows(padded, expand, depthwise, project, norm1, norm2, norm3, halo)
    else:
        out = x.new_empty(b, cout, h, w)
        for r in range(0, gh, step):
            rows = slice(r, min(gh, r + step))
            band = padded[:, :, r * ph:rows.stop * ph + 2 * halo]
            out[:, :, r * ph:rows.stop * ph] = _inverted_residual_rows(
                band, expand[:, rows], depthwise[:, rows], project[:, rows], norm1, norm2, norm3, halo)
    return out + x if residual else out


def _inverted_residual_rows(padded: Tensor, expand: Tensor, depthwise: Tensor, project: Tensor,
                            norm1: Norm, norm2: Norm, norm3: Norm, halo: int) -> Tensor:
    """``patch_inverted_residual`` (without residual) on a border-padded band of patch rows."""
    norm1, norm2, norm3 = (n or _identity for n in (norm1, norm2, norm3))
    b, gh, gw, hidden, cin = expand.shape
    cout = project.shape[3]
    k = depthwise.shape[-1]
    ph = (padded.shape[2] - 2 * halo) // gh
    pw = (padded.shape[3] - 2 * halo) // gw
    hh, hw = ph + 2 * halo, pw + 2 * halo
    n = b * gh * gw

    patches = split_patches(padded, (gh, gw), halo)                     # (B, GH, GW, Cin, hh, hw)
    y = expand @ patches.reshape(b, gh, gw, cin, hh * hw)                # (B, GH, GW, hidden, hh*hw)
    y = F.relu6(norm1(y.reshape(n, hidden, hh, hw)))
    # every (patch, channel) pair is its own depthwise filter
    z = _depthwise_valid(y.reshape(b, gh, gw, hidden, hh, hw), depthwise)
    z = F.relu6(norm2(z.reshape(n, hidden, ph, pw)))
    out = project @ z.reshape(b, gh, gw, hidden, ph * pw)                # (B, GH, GW, Cout, ph*pw)
    out = norm3(out.reshape(n, cout, ph, pw))
    return merge_patches(out.reshape(b, gh, gw, cout, ph, pw))


def tile_patches(x: Tensor, grid: Tuple[int, int], halo: int, padding_mode: str = "reflect") -> Tensor:
    """Lay every patch of ``x`` (B, C, H, W) out with its own halo, side by side:
    (B, C, GH * (ph + 2 halo), GW * (pw + 2 halo)). Tile (i, j) holds patch (i, j) and its halo
    (the neighbours' pixels; ``padding_mode`` at the image border)."""
    patches = split_patches(pad_border(x, halo, padding_mode), grid, halo)   # (B, GH, GW, C, hh, hw)
    b, gh, gw, c, hh, hw = patches.shape
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, c, gh * hh, gw * hw)


def crop_tiles(tiles: Tensor, grid: Tuple[int, int], halo: int) -> Tensor:
    """Inverse of ``tile_patches``: drop each tile's halo, (B, C, GH * hh, GW * hw) -> (B, C, H, W)."""
    b, c, th, tw = tiles.shape
    gh, gw = grid
    hh, hw = th // gh, tw // gw
    inner = tiles.reshape(b, c, gh, hh, gw, hw)[:, :, :, halo:hh - halo, :, halo:hw - halo]
    return inner.reshape(b, c, gh * (hh - 2 * halo), gw * (hw - 2 * halo))


def inverted_residual_layers(x: Tensor, expand: Callable, depthwise: Callable, project: Callable, *,
                             grid: Tuple[int, int], kernel_size: int = 3, tiled: bool = True,
                             norm1: Norm = None, norm2: Norm = None, norm3: Norm = None,
                             residual: bool = False, padding_mode: str = "reflect") -> Tensor:
    """A patch-wise inverted residual block from its three patch-wise convolutions, given as
    functions of a feature map: ``expand(t)`` and ``project(t)`` (1x1) and
    ``depthwise(t, padding_mode)`` (k x k, depthwise), each with per-patch kernels on ``grid``.
    This is how the block trains on the Triton kernels.

    ``tiled=True``: the v1 block (``patch_inverted_residual``). The patches are laid out with
    their halos side by side (``tile_patches``), so the expand, a patch-wise 1x1 convolution over
    the tiles, applies each patch's own kernel to its halo too; a zero-padded depthwise
    convolution over the tiles equals the valid one inside each tile, whose halo is then cropped.
    ``norm1`` sees every patch with its halo, as in the reference, so train-mode BatchNorm gets the
    same batch statistics.
    ``tiled=False``: the v0.1 block (``patch_inverted_residual_v01``), every sub-layer over the
    whole map.
    """
    norm1, norm2, norm3 = (n or _identity for n in (norm1, norm2, norm3))
    halo = kernel_size // 2
    if tiled:
        check_grid(x, grid)
        y = expand(tile_patches(x, grid, halo, padding_mode))
        z = crop_tiles(depthwise(F.relu6(norm1(y)), "zeros"), grid, halo)
    else:
        z = depthwise(F.relu6(norm1(expand(x))), padding_mode)
    out = norm3(project(F.relu6(norm2(z))))
    if residual:
        if out.shape[1] != x.shape[1]:
            raise ValueError(f"a residual needs Cin == Cout, got {x.shape[1]} and {out.shape[1]}")
        out = out + x
    return out


def explicit_convs(expand: Tensor, depthwise: Tensor, project: Tensor, conv: Callable = patch_conv2d):
    """The three sub-layers of ``inverted_residual_layers`` for given per-patch weights
    (shapes as in ``patch_inverted_residual``), applied with ``conv`` (``patch_conv2d`` or its
    Triton kernel)."""
    b, gh, gw, hidden, cin = expand.shape
    cout = project.shape[3]
    k = depthwise.shape[-1]
    return (lambda t: conv(t, expand.reshape(b, gh, gw, hidden, cin, 1, 1)),
            lambda t, mode: conv(t, depthwise.reshape(b, gh, gw, hidden, 1, k, k), padding_mode=mode,
                                 groups=hidden),
            lambda t: conv(t, project.reshape(b, gh, gw, cout, hidden, 1, 1)))


def patch_inverted_residual_v01(x: Tensor, expand: Tensor, depthwise: Tensor, project: Tensor, *,
                                norm1: Norm = None, norm2: Norm = None, norm3: Norm = None,
                                residual: bool = False, padding_mode: str = "reflect") -> Tensor:
    """The v0.1 patch-wise inverted residual block (the VOC model).

    Each sub-layer is its own patch-wise convolution over the whole map, so the depthwise
    convolution's halo holds the *neighbour's* expanded features (expanded with the neighbour's
    weights). Norms act on whole (B, C, H, W) maps. Arguments as ``patch_inverted_residual``.
    """
    return inverted_residual_layers(x, *explicit_convs(expand, depthwise, project),
                                    grid=tuple(expand.shape[1:3]), kernel_size=depthwise.shape[-1],
                                    tiled=False, norm1=norm1, norm2=norm2, norm3=norm3,
                                    residual=residual, padding_mode=padding_mode)


# ------------------------------------------------------------------------------------------------
# Whole meta blocks: weights generated from the signal, then the block. The decoder's modules run
# these with their BatchNorm modules as norms (any mode); with (scale, shift) pairs of folded
# BatchNorms they are the reference semantics of the fused kernels in ``hyperseg.kernels``, which
# take the same arguments.
# ------------------------------------------------------------------------------------------------

def _activate(t: Tensor, activation: Optional[str]) -> Tensor:
    check_activation(activation)
    if activation == "relu":
        return F.relu(t)
    if activation == "relu6":
        return F.relu6(t)
    return t


NormArg = Union[Norm, Tuple[Tensor, Tensor]]


def as_norm(norm: NormArg) -> Norm:
    """A norm argument of the meta blocks as a function: a (scale, shift) pair becomes
    ``affine(scale, shift)``; a callable (a BatchNorm module) or None is kept."""
    if norm is None or callable(norm):
        return norm
    if is_scale_shift(norm):
        return affine(*norm)
    raise TypeError(f"a norm must be a callable (e.g. a BatchNorm), a (scale, shift) pair or None, "
                    f"got {type(norm).__name__}")


def generator_rows(signal: Tensor, generator_weight: Tensor, *, signal_offset: int, groups: int,
                   row_start: int, count: int) -> Tensor:
    """``generate_weights`` on ``signal[:, signal_offset:...]``: the signal slice a generator reads
    is ``generator_weight.shape[1] * groups`` channels wide."""
    check_generator(signal, generator_weight, signal_offset, groups, row_start, count)
    width = generator_weight.shape[1] * groups
    return generate_weights(signal[:, signal_offset:signal_offset + width], generator_weight,
                            groups=groups, start=row_start, count=count)


def meta_patch_conv(x: Tensor, signal: Tensor, generator_weight: Tensor, *, out_channels: int,
                    signal_offset: int = 0, generator_groups: int = 1, row_start: int = 0,
                    groups: int = 1, kernel_size: int = 1, scale: Optional[Tensor] = None,
                    shift: Optional[Tensor] = None, activation: Optional[str] = None,
                    padding_mode: str = "reflect", norm: Norm = None) -> Tensor:
    """Generate each patch's (Cout, Cin / groups, k, k) kernel from the signal, apply it with
    ``patch_conv2d``, then the norm (``* scale + shift``, or ``norm``, a function such as a
    BatchNorm module) and the activation ("relu", "relu6" or None).

    The kernel of a patch is rows ``row_start .. row_start + Cout * Cin / groups * k * k`` of the
    generator's output at that patch, in (Cout, Cin / groups, k, k) order.
    """
    cin = check_generated(x, signal, out_channels, groups)
    check_activation(activation)
    if (scale is None) != (shift is None):
        raise ValueError("give both scale and shift, or neither")
    if scale is not None and norm is not None:
        raise ValueError("give either scale and shift or norm, not both")
    count = patch_conv_rows(cin, out_channels, groups, kernel_size)
    params = generator_rows(signal, generator_weight, signal_offset=signal_offset,
                            groups=generator_groups, row_start=row_start, count=count)
    b, gh, gw = params.shape[:3]
    kernels = params.reshape(b, gh, gw, out_channels, cin // groups, kernel_size, kernel_size)
    y = patch_conv2d(x, kernels, padding_mode=padding_mode, groups=groups)
    norm = affine(scale, shift) if scale is not None else norm
    if norm is not None:
        y = norm(y)
    return _activate(y, activation)


def meta_inverted_residual(x: Tensor, signal: Tensor, generator_weight: Tensor, *, hidden: int,
                           out_channels: int, signal_offset: int = 0, generator_groups: int = 1,
                           row_start: int = 0, kernel_size: int = 3, norm1: NormArg = None,
                           norm2: NormArg = None, norm3: NormArg = None, residual: bool = False,
                           padding_mode: str = "reflect", version: str = "v1",
                           chunk_rows: Optional[int] = None) -> Tensor:
    """The ``MetaInvertedResidual`` block: weights generated from the signal (expand, depthwise,
    project, in that order from ``row_start``; see ``hyperseg.layout``), then
    ``patch_inverted_residual`` (``version="v1"``) or ``patch_inverted_residual_v01`` ("v0_1").
    ``norm1``, ``norm2``, ``norm3``: (scale, shift) pairs of folded BatchNorms, functions such as
    BatchNorm modules, or None. ``chunk_rows``: as ``patch_inverted_residual`` (v1 only)."""
    if version not in ("v1", "v0_1"):
        raise ValueError(f"version must be 'v1' or 'v0_1', got {version!r}")
    cin = check_generated(x, signal, out_channels, 1)
    check_inverted_residual(cin, hidden, out_channels, residual)
    count = sum(inverted_residual_sizes(cin, hidden, out_channels, kernel_size))
    params = generator_rows(signal, generator_weight, signal_offset=signal_offset,
                            groups=generator_groups, row_start=row_start, count=count)
    kernels = split_inverted_residual(params, cin, hidden, out_channels, kernel_size)
    norms = dict(norm1=as_norm(norm1), norm2=as_norm(norm2), norm3=as_norm(norm3))
    if version == "v0_1":
        return patch_inverted_residual_v01(x, *kernels, **norms, residual=residual,
                                           padding_mode=padding_mode)
    return patch_inverted_residual(x, *kernels, **norms, residual=residual,
                                   padding_mode=padding_mode, chunk_rows=chunk_rows)
