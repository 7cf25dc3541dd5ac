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

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

PADDING_MODES = ("zeros", "reflect", "replicate")

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
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if halo == 0:
        return x
    if padding_mode == "reflect" and (halo >= x.shape[-2] or halo >= x.shape[-1]):
        raise ValueError(f"reflect padding of {halo} pixel(s) needs a feature map larger than "
                         f"{halo} x {halo}, got {tuple(x.shape[-2:])}")
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


def check_grid(x: Tensor, grid: Tuple[int, int]) -> Tuple[int, int]:
    """The patch size of ``x`` on ``grid``; ValueError if the grid does not tile the map."""
    h, w = x.shape[-2:]
    gh, gw = grid
    if gh < 1 or gw < 1 or h % gh or w % gw:
        raise ValueError(f"a {gh} x {gw} patch grid does not tile a {h} x {w} feature map: "
                         f"H % GH and W % GW must be 0")
    return h // gh, w // gw


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
    if x.dim() != 4 or weight.dim() != 7:
        raise ValueError(f"expected x (B, Cin, H, W) and weight (B, GH, GW, Cout, Cin/groups, k, k), "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    b, cin, _, _ = x.shape
    wb, gh, gw, cout, cin_g, kh, kw = weight.shape
    if wb != b:
        raise ValueError(f"batch of weight ({wb}) differs from batch of x ({b})")
    if kh != kw or kh % 2 == 0:
        raise ValueError(f"kernel must be square with an odd size, got {kh} x {kw}")
    if groups < 1 or cin % groups or cout % groups or cin // groups != cin_g:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit {cin} input channels "
                         f"in {groups} group(s)")
    if bias is not None and tuple(bias.shape) != (b, gh, gw, cout):
        raise ValueError(f"bias must have shape {(b, gh, gw, cout)}, got {tuple(bias.shape)}")
    ph, pw = check_grid(x, (gh, gw))
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
# Whole meta blocks in eval mode (BatchNorm folded into per-channel scale and shift): the reference
# semantics of the fused kernels in ``hyperseg.kernels``, which take the same arguments.
# ------------------------------------------------------------------------------------------------

ACTIVATIONS = (None, "relu", "relu6")


def _activate(t: Tensor, activation: Optional[str]) -> Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "relu":
        return F.relu(t)
    if activation == "relu6":
        return F.relu6(t)
    return t


def generator_rows(signal: Tensor, generator_weight: Tensor, *, signal_offset: int, groups: int,
                   row_start: int, count: int) -> Tensor:
    """``generate_weights`` on ``signal[:, signal_offset:...]``: the signal slice a generator reads
    is ``generator_weight.shape[1] * groups`` channels wide."""
    width = generator_weight.shape[1] * groups
    if signal_offset < 0 or signal_offset + width > signal.shape[1]:
        raise ValueError(f"the generator reads signal channels {signal_offset}..{signal_offset + width}, "
                         f"the signal has {signal.shape[1]}")
    if row_start < 0 or row_start + count > generator_weight.shape[0]:
        raise ValueError(f"rows {row_start}..{row_start + count} exceed the generator's "
                         f"{generator_weight.shape[0]} rows")
    return generate_weights(signal[:, signal_offset:signal_offset + width], generator_weight,
                            groups=groups, start=row_start, count=count)


def meta_patch_conv(x: Tensor, signal: Tensor, generator_weight: Tensor, *, out_channels: int,
                    signal_offset: int = 0, generator_groups: int = 1, row_start: int = 0,
                    groups: int = 1, kernel_size: int = 1, scale: Optional[Tensor] = None,
                    shift: Optional[Tensor] = None, activation: Optional[str] = None,
                    padding_mode: str = "reflect") -> Tensor:
    """Generate each patch's (Cout, Cin / groups, k, k) kernel from the signal, apply it with
    ``patch_conv2d``, then ``* scale + shift`` and the activation ("relu", "relu6" or None).

    The kernel of a patch is rows ``row_start .. row_start + Cout * Cin / groups * k * k`` of the
    generator's output at that patch, in (Cout, Cin / groups, k, k) order.
    """
    b, cin = x.shape[:2]
    if cin % groups:
        raise ValueError(f"{cin} input channels do not split into {groups} groups")
    count = out_channels * (cin // groups) * kernel_size * kernel_size
    params = generator_rows(signal, generator_weight, signal_offset=signal_offset,
                            groups=generator_groups, row_start=row_start, count=count)
    gh, gw = params.shape[1:3]
    kernels = params.reshape(b, gh, gw, out_channels, cin // groups, kernel_size, kernel_size)
    y = patch_conv2d(x, kernels, padding_mode=padding_mode, groups=groups)
    if scale is not None:
        y = affine(scale, shift)(y)
    return _activate(y, activation)


def meta_inverted_residual(x: Tensor, signal: Tensor, generator_weight: Tensor, *, hidden: int,
                           out_channels: int, signal_offset: int = 0, generator_groups: int = 1,
                           row_start: int = 0, kernel_size: int = 3,
                           norm1: Tuple[Tensor, Tensor], norm2: Tuple[Tensor, Tensor],
                           norm3: Tuple[Tensor, Tensor], residual: bool = False,
                           padding_mode: str = "reflect") -> Tensor:
    """The v1 ``MetaInvertedResidual`` in eval mode: weights generated from the signal (expand,
    depthwise, project, in that order from ``row_start``), then ``patch_inverted_residual`` with
    the (scale, shift) pairs ``norm1``, ``norm2``, ``norm3``."""
    b, cin = x.shape[:2]
    sizes = (hidden * cin, hidden * kernel_size * kernel_size, out_channels * hidden)
    params = generator_rows(signal, generator_weight, signal_offset=signal_offset,
                            groups=generator_groups, row_start=row_start, count=sum(sizes))
    gh, gw = params.shape[1:3]
    expand, depthwise, project = params.split(sizes, dim=-1)
    return patch_inverted_residual(
        x, expand.reshape(b, gh, gw, hidden, cin),
        depthwise.reshape(b, gh, gw, hidden, kernel_size, kernel_size),
        project.reshape(b, gh, gw, out_channels, hidden),
        norm1=affine(*norm1), norm2=affine(*norm2), norm3=affine(*norm3),
        residual=residual, padding_mode=padding_mode)
