"""Backbones: the official EfficientNet (timm's ``tf_efficientnet_*`` with the official static
padding) and any timm ``features_only`` model with features at strides 2..32, each followed by the
official feature reducers."""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .zoo import BACKBONE_NOMINAL_SIZE

BACKBONE_STRIDES = (2, 4, 8, 16, 32)

# The official backbone's BatchNorm settings (TensorFlow's momentum 0.99 -> PyTorch 0.01).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
DROP_CONNECT_RATE = 0.2


def tf_same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> Tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) of one side of length ``size``."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class StaticSameConv2d(nn.Conv2d):
    """A convolution with a fixed, possibly asymmetric zero padding (left, right, top, bottom).

    The official EfficientNet computes its TensorFlow-"SAME" paddings once, for the variant's
    nominal image size (240 for B1, 300 for B3), and applies them to every input. timm pads
    dynamically for the actual input size; on the official resolutions the two differ in the
    strided 5x5 depthwise convolutions, so this layer restores the official behaviour.
    """

    def __init__(self, conv: nn.Conv2d, padding: Tuple[int, int, int, int]):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0,
                         conv.dilation, conv.groups, conv.bias is not None)
        self.weight = conv.weight
        if conv.bias is not None:
            self.bias = conv.bias
        self.static_padding = tuple(int(p) for p in padding)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, self.static_padding))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", static_padding={self.static_padding}"


def _freeze_same_padding(net: nn.Module, nominal: int) -> None:
    """Replace timm's dynamic-"SAME" strided convs by the official static ones."""
    from timm.layers.conv2d_same import Conv2dSame

    def fix(parent: nn.Module, name: str, size: int) -> int:
        conv = getattr(parent, name)
        k, s, d = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
        if isinstance(conv, Conv2dSame):
            top, bottom = tf_same_padding(size, k, s, d)
            setattr(parent, name, StaticSameConv2d(conv, (top, bottom, top, bottom)))
        return math.ceil(size / s)

    size = fix(net, "conv_stem", nominal)
    for stage in net.blocks:
        for block in stage:
            size = fix(block, "conv_dw", size)


class Backbone(nn.Module):
    """EfficientNet encoder returning the five stage features (strides 2..32) and the head output.

    Each stage feature whose ``out_feat_scale`` is not 1 passes through a 1x1 conv + BN reducer to
    ``round(channels * scale)`` channels, as in the official model.
    """

    def __init__(self, name: str, out_feat_scale: Sequence[float], pretrained: bool = False):
        super().__init__()
        self.body = timm.create_model(name, pretrained=pretrained, num_classes=0,
                                      drop_path_rate=DROP_CONNECT_RATE)
        _freeze_same_padding(self.body, BACKBONE_NOMINAL_SIZE[name])
        for m in self.body.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = BN_MOMENTUM
        stage_channels = [info["num_chs"] for info in self.body.feature_info]
        self.reducers, self.feat_channels = _reducers(name, stage_channels, out_feat_scale)
        self.head_channels = self.body.num_features
        self.channels_last = False

    def set_channels_last(self, enabled: bool) -> None:
        """Run the backbone in channels-last memory format (its weights are converted, its input
        converted on the way in and its outputs converted back to the contiguous format that the
        context head and the decoder's patch views expect). The results are the same up to the
        convolution algorithms' rounding."""
        self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        self.channels_last = bool(enabled)

    def forward(self, x: Tensor) -> Tuple[List[Tensor], Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        head, stages = self.body.forward_intermediates(x, indices=len(self.reducers))
        feats = [reduce(f) for reduce, f in zip(self.reducers, stages)]
        if self.channels_last:
            feats, head = [f.contiguous() for f in feats], head.contiguous()
        return feats, head


def _reducers(name: str, stage_channels: Sequence[int], out_feat_scale: Sequence[float]
              ) -> Tuple[nn.ModuleList, List[int]]:
    """One reducer per stage (identity for scale 1, else 1x1 conv + BN to ``round(channels *
    scale)`` channels) and the reduced channel counts."""
    if len(stage_channels) != len(out_feat_scale):
        raise ValueError(f"{name} has {len(stage_channels)} stages, "
                         f"got {len(out_feat_scale)} out_feat_scale entries")
    reducers, channels_out = nn.ModuleList(), []
    for channels, scale in zip(stage_channels, out_feat_scale):
        out = max(1, int(round(channels * scale)))
        if scale == 1:
            reducers.append(nn.Identity())
        else:
            reducers.append(nn.Sequential(
                nn.Conv2d(channels, out, 1, bias=False),
                nn.BatchNorm2d(out, eps=BN_EPS, momentum=BN_MOMENTUM)))
        channels_out.append(out)
    return reducers, channels_out


class BackboneError(ValueError):
    """A backbone name that timm does not know, or a model without features at strides 2..32."""


def _stage_indices(name: str, strides: Sequence[int]) -> List[int]:
    """For each stride of ``BACKBONE_STRIDES``, the index of the deepest feature at that stride."""
    indices = []
    for stride in BACKBONE_STRIDES:
        found = [i for i, s in enumerate(strides) if s == stride]
        if not found:
            raise BackboneError(
                f"backbone {name!r} has features at strides {list(strides)}; HyperSeg needs one at "
                f"each of the strides {list(BACKBONE_STRIDES)} (e.g. EfficientNet, MobileNetV3, "
                f"ResNet, RegNet families)")
        indices.append(found[-1])
    return indices


def create_features_model(name: str, pretrained: bool = False) -> nn.Module:
    """timm's ``features_only`` model ``name``, or ``BackboneError`` saying why there is none."""
    if not isinstance(name, str) or not name:
        raise BackboneError(f"a backbone must be a timm model name, got {name!r}")
    if not timm.is_model(name):
        raise BackboneError(f"unknown backbone {name!r}: timm has no model of that name "
                            f"(see timm.list_models())")
    try:
        model = timm.create_model(name, pretrained=False, features_only=True)
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError, AssertionError) as err:
        raise BackboneError(f"backbone {name!r} cannot give timm features_only feature maps: "
                            f"{err}") from None
    if pretrained:       # a download: its errors (network, cache) are the caller's to report
        model = timm.create_model(name, pretrained=True, features_only=True)
    return model


class TimmBackbone(nn.Module):
    """Any timm ``features_only`` model with features at strides 2, 4, 8, 16 and 32, as a HyperSeg
    encoder: the five stage features (reduced as in ``Backbone``) and, for the context head, the
    raw stride-32 feature. Channels come from timm's ``feature_info``."""

    def __init__(self, name: str, out_feat_scale: Sequence[float], pretrained: bool = False):
        super().__init__()
        self.body = create_features_model(name, pretrained)
        info = self.body.feature_info
        self.stage_indices = _stage_indices(name, info.reduction())
        stage_channels = [info.channels()[i] for i in self.stage_indices]
        self.reducers, self.feat_channels = _reducers(name, stage_channels, out_feat_scale)
        self.head_channels = stage_channels[-1]
        self.channels_last = False

    set_channels_last = Backbone.set_channels_last

    def forward(self, x: Tensor) -> Tuple[List[Tensor], Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.body(x)
        stages = [features[i] for i in self.stage_indices]
        feats, head = [reduce(f) for reduce, f in zip(self.reducers, stages)], stages[-1]
        if self.channels_last:
            feats, head = [f.contiguous() for f in feats], head.contiguous()
        return feats, head


def make_backbone(name: str, out_feat_scale: Sequence[float], pretrained: bool = False
                  ) -> nn.Module:
    """The official EfficientNet for the zoo's backbones, else a ``TimmBackbone``."""
    if name in BACKBONE_NOMINAL_SIZE:
        return Backbone(name, out_feat_scale, pretrained)
    return TimmBackbone(name, out_feat_scale, pretrained)
