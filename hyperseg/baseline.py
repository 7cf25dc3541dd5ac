"""The official HyperSeg decoder, op for op, as the speed baseline of ``hyperseg benchmark`` and
``bench/profile_kernels.py``.

Each function runs the same tensor operations, in the same order and with the same tensor lifetimes,
as the official module it names (github.com/YuvalNirkin/hyperseg, ``hyperseg/models``), on this
package's parameters: the generated weights reordered by one 4-D permute + reshape, patches cut
by ``Tensor.unfold`` (v1 inverted residual), by view/permute (kernel-1 blocks) or by
``F.unfold`` / ``F.fold`` (v0.1 patch convs), one grouped ``F.conv2d`` per layer with a group per
patch, in-place ReLU / ReLU6 where the official code uses ``inplace=True`` modules, and each
intermediate dropped when the official code rebinds its variable. ``bench/official_speed.py``
times these functions against the real official modules (same weights) and bench/README.md
records the result. Benchmark code, not a model: ``hyperseg.ops`` is the reference the model and
the kernels follow, and tests/test_baseline.py checks these functions against it.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .decoder import REFERENCE, MetaInvertedResidual, coordinates


def _pad_mode(mode: str) -> str:
    return "constant" if mode == "zeros" else mode


def official_weights(generator, signal, start: int, count: int):
    """Mirrors the official ``apply_signal2weights`` (v1 blocks; v0.1's ``Conv2dMulti`` runs the
    same conv): the generator's grouped 1x1 conv over its signal slice, then the block's rows."""
    s = signal[:, generator.signal_offset:generator.signal_offset + generator.signal_channels]
    return F.conv2d(s, generator.weight, None, 1, 0, 1, generator.groups)[:, start:start + count]


def official_meta_conv(block, x, weight):
    """Mirrors the official ``HyperPatchNoPadding.forward``, then the ``BatchNorm2d`` and
    ``ReLU(inplace=True)`` of its ``make_hyper_patch_conv2d_block`` sequence."""
    b, c, h, w = x.shape
    fh, fw = weight.shape[-2:]
    ph, pw = h // fh, w // fw
    cout, groups = block.out_channels, block.groups
    weight = weight.permute(0, 2, 3, 1).reshape(b * fh * fw * cout, c // groups, 1, 1)
    x = x.view(b, c, fh, ph, fw, pw).permute(0, 2, 4, 1, 3, 5).reshape(1, -1, ph, pw)
    x = F.conv2d(x, weight, None, 1, 0, 1, b * fh * fw * groups)
    x = x.view(b, fh, fw, -1, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, h, w)
    x = block.bn(x)
    return F.relu(x, inplace=True)


def _inverted_residual_v1_conv(block, x, weight):
    """Mirrors the official v1 ``HyperPatchInvertedResidual.conv`` (without its weight
    generation): reflect padding, ``Tensor.unfold`` of the channels-last view into overlapping
    (patch + halo) windows, grouped expand, BN, ReLU6 in place, grouped depthwise, BN, ReLU6 in
    place, grouped project, BN, patches back into the image."""
    b, c, h, w = x.shape
    fh, fw = weight.shape[-2:]
    ph, pw = h // fh, w // fw
    halo = block.kernel_size // 2
    kh, kw = ph + 2 * halo, pw + 2 * halo
    n, hidden, k = b * fh * fw, block.hidden, block.kernel_size
    e, d, _ = block.sizes
    x = F.pad(x, (halo, halo, halo, halo), mode=_pad_mode(block.padding_mode))
    x = x.permute(0, 2, 3, 1).unfold(1, kh, ph).unfold(2, kw, pw).reshape(1, -1, kh, kw)
    if b == 1:
        weight = weight.permute(0, 2, 3, 1).view(-1, weight.shape[1])
    else:
        weight = weight.permute(0, 2, 3, 1).reshape(-1, weight.shape[1])
    weight1 = weight[:, :e].reshape(n * hidden, block.in_channels, 1, 1)
    x = F.conv2d(x, weight1, None, 1, 0, 1, n)
    x = block.bn1(x.view(n, -1, kh, kw)).view(1, -1, kh, kw)
    x = F.hardtanh(x, 0.0, 6.0, inplace=True)
    weight2 = weight[:, e:e + d].reshape(n * hidden, 1, k, k)
    x = F.conv2d(x, weight2, None, 1, 0, 1, n * hidden)
    x = block.bn2(x.view(n, -1, ph, pw)).view(1, -1, ph, pw)
    x = F.hardtanh(x, 0.0, 6.0, inplace=True)
    weight3 = weight[:, e + d:].reshape(n * block.out_channels, hidden, 1, 1)
    x = F.conv2d(x, weight3, None, 1, 0, 1, n)
    x = block.bn3(x.view(n, -1, ph, pw))
    return x.view(b, fh, fw, -1, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, h, w)


def official_inverted_residual_v1(block, x, weight):
    """Mirrors the official v1 ``HyperPatchInvertedResidual.forward``."""
    if block.residual:
        return x + _inverted_residual_v1_conv(block, x, weight)
    return _inverted_residual_v1_conv(block, x, weight)


def _meta_patch(x, weight, out_channels: int, groups: int, k: int, padding_mode: str):
    """Mirrors the official ``MetaPatch.forward`` with its ``MetaConv2d`` (``hyper_module``):
    pad (also by 0), ``F.unfold`` into (patch + halo) windows at stride patch, one grouped conv2d
    (a group per patch and conv group), ``F.fold`` back."""
    b, c, h, w = x.shape
    fh, fw = weight.shape[-2:]
    ph, pw = h // fh, w // fw
    halo = k // 2
    kh, kw = ph + 2 * halo, pw + 2 * halo
    weight = weight.permute(0, 2, 3, 1).reshape(-1, weight.shape[1]).contiguous()
    x = F.pad(x, (halo, halo, halo, halo), mode=_pad_mode(padding_mode))
    x = F.unfold(x, (kh, kw), stride=(ph, pw))
    x = x.transpose(1, 2).reshape(-1, c, kh, kw).contiguous()
    # MetaConv2d.forward: the patches as one image, a group per patch (and conv group)
    n = x.shape[0]
    x = x.view(1, -1, *x.shape[2:])
    weight = weight.view(weight.shape[0] * out_channels, c // groups, k, k)
    x = F.conv2d(x, weight, None, 1, 0, 1, n * groups)
    x = x.view(n, -1, *x.shape[2:])
    x = x.view(b, fh * fw, -1, ph * pw).permute(0, 2, 3, 1).reshape(b, -1, fh * fw)
    return F.fold(x, (h, w), kernel_size=(ph, pw), stride=(ph, pw))


def _inverted_residual_v01_conv(block, x, weight):
    """Mirrors the ``MetaSequential`` of the official v0.1 ``HyperPatchInvertedResidual``: three
    ``make_meta_patch_conv2d_block`` sequences (patch conv, BN, ReLU6 in place; the last without
    activation), each given its rows of the weights made contiguous."""
    hidden, k = block.hidden, block.kernel_size
    e, d, _ = block.sizes
    x = _meta_patch(x, weight[:, :e].contiguous(), hidden, 1, 1, block.padding_mode)
    x = F.hardtanh(block.bn1(x), 0.0, 6.0, inplace=True)
    x = _meta_patch(x, weight[:, e:e + d].contiguous(), hidden, hidden, k, block.padding_mode)
    x = F.hardtanh(block.bn2(x), 0.0, 6.0, inplace=True)
    x = _meta_patch(x, weight[:, e + d:].contiguous(), block.out_channels, 1, 1, block.padding_mode)
    return block.bn3(x)


def official_inverted_residual_v01(block, x, weight):
    """Mirrors the official v0.1 ``HyperPatchInvertedResidual.forward``."""
    if block.residual:
        return x + _inverted_residual_v01_conv(block, x, weight)
    return _inverted_residual_v01_conv(block, x, weight)


def official_block(block, x, weight):
    """The block of one decoder level on its input ``x`` and its generated (B, P, GH, GW)
    weights, as the official level module runs it."""
    if not isinstance(block, MetaInvertedResidual):
        return official_meta_conv(block, x, weight)
    if block.version == "v1":
        return official_inverted_residual_v1(block, x, weight)
    return official_inverted_residual_v01(block, x, weight)


def official_level(level, signal=None):
    """One ``hyperseg.decoder.DecoderLevel`` (from ``Decoder.levels``) as the official level
    module runs it: weight generation, then the block on the level's input. (v1_0_unify: each
    level runs its shared generator here; ``OfficialDecoder`` runs it once for all its levels.)"""
    signal = level.signal if signal is None else signal
    weight = official_weights(level.generator, signal, level.row_start, level.block.num_params)
    return official_block(level.block, level.input, weight)


class OfficialDecoder:
    """Mirrors the official ``MultiScaleDecoder.forward`` on ``model``'s decoder: per level, the
    backbone feature concatenated with the previous output (bilinearly resized to it), the image
    coordinates in front, then the level's weight generation and block as ``official_level``;
    the last output resized to the image. A generator shared by several levels (v1_0_unify: the
    official ``WeightLayer`` from ``unify_level`` on) runs once, at its first level, and the later
    levels take their rows of its output, as the official decoder does.

    Each level's block, generator and first row are read once, here, from ``Decoder.levels`` run
    on the smallest valid image, so that a call runs the official algorithm alone."""

    def __init__(self, model):
        side = model.config.size_divisor
        param = next(model.parameters())
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                inputs, signal = decoder_inputs(model, torch.zeros(1, 3, side, side,
                                                                   device=param.device))
                self.levels = [(lv.block, lv.generator, lv.row_start)
                               for lv in model.decoder.levels(inputs, signal, REFERENCE)]
        finally:
            model.train(training)

    def __call__(self, inputs, signal):
        p = None
        generated = {}            # v1_0_unify: a shared generator runs once, its levels slice it
        for index, (block, generator, row_start) in enumerate(self.levels):
            feat = inputs[-index - 1]
            if p is None:
                p = feat
            else:
                if p.shape[2:] != feat.shape[2:]:
                    p = F.interpolate(p, feat.shape[2:], mode="bilinear", align_corners=False)
                p = torch.cat((feat, p), dim=1)
            p = torch.cat([coordinates(p.shape[0], p.shape[2], p.shape[3], p), p], dim=1)
            if id(generator) not in generated:
                generated[id(generator)] = official_weights(generator, signal, 0,
                                                            generator.weight.shape[0])
            weight = generated[id(generator)][:, row_start:row_start + block.num_params]
            p = official_block(block, p, weight)
        if p.shape[2:] != inputs[0].shape[2:]:
            p = F.interpolate(p, inputs[0].shape[2:], mode="bilinear", align_corners=False)
        return p


def official_decoder(model, inputs, signal):
    """``OfficialDecoder(model)(inputs, signal)`` (build the ``OfficialDecoder`` once to time it)."""
    return OfficialDecoder(model)(inputs, signal)


def pad_input(model, x):
    div = model.config.size_divisor
    pad_h, pad_w = (-x.shape[2]) % div, (-x.shape[3]) % div
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def decoder_inputs(model, x):
    """The decoder's inputs (padded image and backbone features) and the context signal."""
    xp = pad_input(model, x)
    feats, head = model.backbone(xp)
    return [xp] + feats, model.context_head(head)


def official_forward(model, x, clock=None, decoder=None):
    """The whole model with the official decoder (backbone and context head: this package's);
    ``decoder``: ``OfficialDecoder(model)``, built once by the caller that times this."""
    decoder = OfficialDecoder(model) if decoder is None else decoder
    inputs, signal = decoder_inputs(model, x)
    t0 = time.perf_counter()
    out = decoder(inputs, signal)
    if clock is not None:
        clock.current["decoder"] = (time.perf_counter() - t0) * 1e3
    return out[..., :x.shape[2], :x.shape[3]]
