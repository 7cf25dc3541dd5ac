"""Context heads: they turn the backbone's stride-32 head output into the decoder's signal.

The signal is a (B, S, GH, GW) map over the stride-32 grid: one S-vector per image patch, from
which the decoder's weight generators compute that patch's weights.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def _conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _global_context(x: Tensor) -> Tensor:
    """Replace every position of ``x`` by the map's spatial mean."""
    if x.shape[-2:] == (1, 1):
        return x
    return F.adaptive_avg_pool2d(x, 1).expand_as(x)


class ContextHead(nn.Module):
    """The v1 context head: a nested U-Net over the stride-32 map (HyperSeg v1.0).

    A 1x1 conv halves the channels; ``levels - 1`` 2x2/stride-2 convs go down; the coarsest map is
    replaced by its global mean; on the way up each level concatenates the skip feature, applies a
    1x1 conv and upsamples x2 (nearest). The signal is the first-level feature concatenated with
    the upstream result: S = ``channels``.
    """

    def __init__(self, channels: int, levels: int = 2):
        super().__init__()
        if channels % 2:
            raise ValueError(f"the context head needs an even channel count, got {channels}")
        half = channels // 2
        self.levels = levels
        self.signal_channels = channels
        self.reduce = _conv_bn(channels, half)
        self.down = nn.ModuleList(_conv_bn(half, half, 2, 2) for _ in range(levels - 1))
        self.up = nn.ModuleList(_conv_bn(channels, half) for _ in range(levels - 1))

    def forward(self, x: Tensor) -> Tensor:
        skips = [self.reduce(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = _global_context(skips[-1])
        for level in reversed(range(self.levels - 1)):
            y = self.up[level](torch.cat((skips.pop(), y), dim=1))
            y = F.interpolate(y, scale_factor=2.0, mode="nearest")
        return torch.cat((skips.pop(), y), dim=1)


class ContextHeadV01(nn.Module):
    """The v0.1 context head (the VOC model).

    ``levels - 1`` 2x2/stride-2 convs keep the channel count; the coarsest map is optionally
    replaced by its global mean; going up, each level upsamples x2 (nearest), concatenates the
    skip feature and fuses with a 1x1 conv + BN (+ ReLU except at the first level). The signal is
    the fused first-level map: S = ``channels``.
    """

    def __init__(self, channels: int, levels: int = 3, global_pool: bool = True):
        super().__init__()
        self.levels = levels
        self.global_pool = global_pool
        self.signal_channels = channels
        self.down = nn.ModuleList(_conv_bn(channels, channels, 2, 2) for _ in range(levels - 1))
        self.fuse = nn.ModuleList(_conv_bn(2 * channels, channels, relu=level > 0)
                                  for level in range(levels - 1))

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for down in self.down:
            feats.append(down(feats[-1]))
        if self.global_pool and self.levels > 1:
            feats[-1] = _global_context(feats[-1])
        for level in reversed(range(self.levels - 1)):
            up = F.interpolate(feats.pop(), scale_factor=2.0, mode="nearest")
            feats[-1] = self.fuse[level](torch.cat((feats[-1], up), dim=1))
        return feats[0]
