"""Patch-wise convolution with kernels generated from the signal, differentiable: the op the meta
blocks train on. Reference semantics: ``hyperseg.ops.meta_patch_conv`` without norm and
activation.

It launches no kernel of its own: the forward and backward passes compose the custom ops of
``patch_conv`` (``hyperseg::patch_conv2d``, ``hyperseg::patch_conv2d_backward``) and
``generate_weights`` (``hyperseg::generate_weights``, ``hyperseg::generate_weights_backward``),
which importing those modules registers. The per-patch kernels pass between them in one layout:
generated with each output channel's row padded to a multiple of 16 bytes where the convolution
reads rows as vectors (dense 1x1 on dots: 82 input channels are 84 values apart in float32, 88
in 16-bit), the padding zeros, never read into a result. Their gradient passes with each patch's
values padded to a multiple of 16 bytes instead (``generate_weights.gradient_stride``), the
padding zeros too, never read into a result: the generator's gradient kernels read each patch's
values as aligned vectors then, whatever their count (98 channels' 3 x 3 depthwise kernels, 882
values, are 1,764 bytes in 16-bit: 4-byte aligned unpadded).
"""
from __future__ import annotations

import torch

from . import patch_conv as _patch_conv_ops  # noqa: F401  (registers its custom ops)
from ..layout import patch_conv_rows
from .generate_weights import gradient_stride  # (importing it registers its custom ops)
from ._common import autocast, check_device, check_dtype, check_generated_op


class GeneratedPatchConv2dFunction(torch.autograd.Function):
    """``generated_patch_conv2d`` on the signal slice its generator reads: saves x, the signal
    slice and the generator weight; recomputes the per-patch kernels in the backward."""

    @staticmethod
    def _kernels(x, signal, weight, out_channels, generator_groups, row_start, groups, kernel_size):
        """The per-patch kernels, (B, GH, GW, Cout, Cin / groups, k, k), generated with each
        output channel's row padded where the convolution reads rows as aligned vectors
        (``patch_conv.padded_row``; the padding holds zeros, which never reach a result)."""
        b, cin = x.shape[:2]
        gh, gw = signal.shape[2:4]
        cin_g, cout_g = cin // groups, out_channels // groups
        row = cin_g * kernel_size * kernel_size
        stride = _patch_conv_ops.padded_row(signal.element_size(), cin_g, cout_g, kernel_size)
        count = patch_conv_rows(cin, out_channels, groups, kernel_size)
        params = torch.ops.hyperseg.generate_weights(signal, weight, generator_groups, row_start,
                                                     count, row, stride)
        shape = (b, gh, gw, out_channels, cin_g, kernel_size, kernel_size)
        return params.as_strided(shape, _patch_conv_ops.padded_strides(shape, stride))

    @staticmethod
    def forward(ctx, x, signal, weight, out_channels, generator_groups, row_start, groups,
                kernel_size, padding_mode):
        x, signal, weight = x.contiguous(), signal.contiguous(), weight.contiguous()
        ctx.save_for_backward(x, signal, weight)
        ctx.config = (out_channels, generator_groups, row_start, groups, kernel_size, padding_mode)
        kernels = GeneratedPatchConv2dFunction._kernels(x, signal, weight, *ctx.config[:5])
        return torch.ops.hyperseg.patch_conv2d(x, kernels, None, padding_mode, groups)

    @staticmethod
    def backward(ctx, dout):
        x, signal, weight = ctx.saved_tensors
        out_channels, generator_groups, row_start, groups, kernel_size, padding_mode = ctx.config
        need_x, need_signal, need_weight = ctx.needs_input_grad[:3]
        kernels = GeneratedPatchConv2dFunction._kernels(x, signal, weight, *ctx.config[:5])
        need_kernels = need_signal or need_weight
        count = patch_conv_rows(x.shape[1], out_channels, groups, kernel_size)
        stride = gradient_stride(count, kernels.element_size())
        # dparams: (B, GH, GW, stride), each patch's count values first, then zeros
        dx, dparams, _ = torch.ops.hyperseg.patch_conv2d_backward(
            dout, x, kernels, need_x, need_kernels, False, padding_mode, groups, stride)
        del kernels              # regenerated for this backward only: freed before the generator's
        dsignal = dweight = None
        if need_kernels:
            dsignal, dweight = torch.ops.hyperseg.generate_weights_backward(
                dparams, signal, weight, generator_groups, row_start, count, need_signal,
                need_weight)
        return (dx if need_x else None, dsignal if need_signal else None,
                dweight if need_weight else None, None, None, None, None, None, None)


def generated_patch_conv2d(x: torch.Tensor, signal: torch.Tensor, generator_weight: torch.Tensor, *,
                           out_channels: int, signal_offset: int = 0, generator_groups: int = 1,
                           row_start: int = 0, groups: int = 1, kernel_size: int = 1,
                           padding_mode: str = "reflect") -> torch.Tensor:
    """Patch-wise convolution with kernels generated from the signal, differentiable in x, the
    signal and the generator weight: the training op of the meta blocks. Semantics of
    ``hyperseg.ops.meta_patch_conv`` without scale, shift and activation (BatchNorm in train mode
    needs the batch statistics of the convolution's output).

    The per-patch kernels are generated (``generate_weights``) for the forward pass and dropped;
    the backward pass generates them again rather than keeping them alive between the passes, then
    runs the ``patch_conv2d`` backward kernels and the generator's backward kernels.
    """
    check_generated_op(x, signal, generator_weight, out_channels=out_channels,
                       signal_offset=signal_offset, generator_groups=generator_groups,
                       row_start=row_start, groups=groups, kernel_size=kernel_size,
                       padding_mode=padding_mode, float64=True)
    check_dtype(signal, float64=True)
    check_device(x, signal, generator_weight)
    width = generator_weight.shape[1] * generator_groups
    x, signal, generator_weight = autocast(x, signal[:, signal_offset:signal_offset + width],
                                           generator_weight)
    return GeneratedPatchConv2dFunction.apply(x, signal, generator_weight, out_channels,
                                              generator_groups, row_start, groups, kernel_size,
                                              padding_mode)
