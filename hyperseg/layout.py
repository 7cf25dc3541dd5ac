"""What the patch-wise ops accept, and how a meta block's generated parameters are laid out.

One place for the shape contract shared by the reference ops (``hyperseg.ops``), the decoder's
modules (``hyperseg.decoder``) and the Triton launchers (``hyperseg.kernels``): the argument
checks, with their error messages, and the order of a block's parameters in a generator's rows.
This module depends on torch only, so every layer above can import it.

Parameter layout of the blocks, per patch, in a generator's rows from the block's first row:

* ``MetaConv``: one (Cout, Cin / groups, k, k) kernel, row-major;
* ``MetaInvertedResidual``: expand (hidden, Cin), then depthwise (hidden, k, k), then project
  (Cout, hidden), each row-major (``inverted_residual_sizes`` / ``split_inverted_residual``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

PADDING_MODES = ("zeros", "reflect", "replicate")
ACTIVATIONS = (None, "relu", "relu6")


# ------------------------------------------------------------------------------------------------
# Parameter layout
# ------------------------------------------------------------------------------------------------

def patch_conv_rows(in_channels: int, out_channels: int, groups: int = 1,
                    kernel_size: int = 1) -> int:
    """Rows of one patch-wise convolution's kernel: Cout * Cin / groups * k * k."""
    return out_channels * (in_channels // groups) * kernel_size * kernel_size


def inverted_residual_sizes(in_channels: int, hidden: int, out_channels: int,
                            kernel_size: int) -> Tuple[int, int, int]:
    """Rows of an inverted residual's expand, depthwise and project kernels, in that order."""
    return (hidden * in_channels, hidden * kernel_size * kernel_size, out_channels * hidden)


def split_inverted_residual(params: Tensor, in_channels: int, hidden: int, out_channels: int,
                            kernel_size: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(B, GH, GW, P) parameters -> expand (.., hidden, Cin), depthwise (.., hidden, k, k) and
    project (.., Cout, hidden)."""
    b, gh, gw = params.shape[:3]
    sizes = inverted_residual_sizes(in_channels, hidden, out_channels, kernel_size)
    expand, depthwise, project = params.split(sizes, dim=-1)
    k = kernel_size
    return (expand.reshape(b, gh, gw, hidden, in_channels),
            depthwise.reshape(b, gh, gw, hidden, k, k),
            project.reshape(b, gh, gw, out_channels, hidden))


# ------------------------------------------------------------------------------------------------
# Argument checks
# ------------------------------------------------------------------------------------------------

def check_grid(x: Tensor, grid: Sequence[int]) -> Tuple[int, int]:
    """The patch size (ph, pw) of a GH x GW grid on x (.., H, W); H and W must divide evenly."""
    h, w = x.shape[-2:]
    gh, gw = grid
    if gh < 1 or gw < 1 or h % gh or w % gw:
        raise ValueError(f"a {gh} x {gw} patch grid does not tile a {h} x {w} feature map: "
                         f"H % GH and W % GW must be 0")
    return h // gh, w // gw


def check_padding(padding_mode: str, halo: int, size: Sequence[int]) -> None:
    """A known padding mode; reflect padding needs a map larger than the halo."""
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if padding_mode == "reflect" and halo >= min(size):
        raise ValueError(f"reflect padding of {halo} pixel(s) needs a feature map larger than "
                         f"{halo} x {halo}, got {tuple(size)}")


def check_activation(activation: Optional[str]) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_patch_weight(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                       groups: int) -> Tuple[int, int]:
    """x (B, Cin, H, W), weight (B, GH, GW, Cout, Cin / groups, k, k) with odd square k, bias
    (B, GH, GW, Cout) or None: the arguments of a patch-wise convolution. Returns the patch size
    (ph, pw)."""
    if x.dim() != 4 or weight.dim() != 7:
        raise ValueError(f"expected x (B, Cin, H, W) and weight (B, GH, GW, Cout, Cin/groups, k, k), "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    b, cin = x.shape[:2]
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
    return check_grid(x, (gh, gw))


def check_generator(signal: Tensor, generator_weight: Tensor, signal_offset: int,
                    generator_groups: int, row_start: int, count: int) -> None:
    """The generator (R, S / groups, 1, 1) has ``count`` rows from ``row_start`` and reads signal
    channels ``signal_offset ..`` that exist."""
    if signal.dim() != 4:
        raise ValueError(f"signal must have shape (B, S, GH, GW), got {tuple(signal.shape)}")
    if generator_weight.dim() != 4 or generator_weight.shape[2:] != (1, 1):
        raise ValueError(f"generator weight must have shape (R, S / groups, 1, 1), "
                         f"got {tuple(generator_weight.shape)}")
    rows = generator_weight.shape[0]
    if generator_groups < 1 or rows % generator_groups:
        raise ValueError(f"the generator's {rows} rows do not split into {generator_groups} groups")
    width = generator_weight.shape[1] * generator_groups
    if signal_offset < 0 or signal_offset + width > signal.shape[1]:
        raise ValueError(f"the generator reads signal channels {signal_offset}..{signal_offset + width}, "
                         f"the signal has {signal.shape[1]}")
    if row_start < 0 or count < 0 or row_start + count > rows:
        raise ValueError(f"rows {row_start}..{row_start + count} exceed the generator's {rows} rows")


def check_generated(x: Tensor, signal: Tensor, out_channels: int, groups: int) -> int:
    """x (B, Cin, H, W) and a signal of the same batch whose grid tiles x; Cin and
    ``out_channels`` split into ``groups``. Returns Cin."""
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, Cin, H, W), got {tuple(x.shape)}")
    if signal.dim() != 4:
        raise ValueError(f"signal must have shape (B, S, GH, GW), got {tuple(signal.shape)}")
    if signal.shape[0] != x.shape[0]:
        raise ValueError(f"batch of signal ({signal.shape[0]}) differs from batch of x ({x.shape[0]})")
    check_grid(x, signal.shape[2:4])
    cin = x.shape[1]
    if groups < 1 or cin % groups:
        raise ValueError(f"{cin} input channels do not split into {groups} groups")
    if out_channels < 1 or out_channels % groups:
        raise ValueError(f"{out_channels} output channels do not split into {groups} groups")
    return cin


def check_inverted_residual(in_channels: int, hidden: int, out_channels: int, residual: bool) -> None:
    if hidden < 1 or out_channels < 1:
        raise ValueError(f"hidden and out_channels must be >= 1, got {hidden} and {out_channels}")
    if residual and in_channels != out_channels:
        raise ValueError(f"a residual needs Cin == Cout, got {in_channels} and {out_channels}")


def is_scale_shift(norm) -> bool:
    """Whether ``norm`` is a (scale, shift) pair of tensors (a folded BatchNorm)."""
    return isinstance(norm, (tuple, list)) and len(norm) == 2 and all(
        isinstance(t, torch.Tensor) for t in norm)
