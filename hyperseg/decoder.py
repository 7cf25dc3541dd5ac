"""The dynamic decoder: meta blocks whose weights are generated per patch from the signal.

Each decoder level concatenates two coordinate channels, the backbone feature of its stride and
the upsampled output of the previous level, then runs one meta block. A block's weights come from
a ``WeightGenerator`` (the official ``signal2weights``): a grouped 1x1 convolution over a slice of
the context signal, evaluated just before the block consumes its weights.

How the signal is divided between generators follows the official implementation exactly, for
each of its three architecture versions (see ``plan_generators``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .layout import inverted_residual_sizes, patch_conv_rows, split_inverted_residual
from .zoo import ModelConfig

try:  # imported once; without Triton the reference implementation still runs
    from . import kernels
except ImportError:  # pragma: no cover - depends on the installation
    kernels = None


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _group_equal_sizes(sizes: Sequence[int]) -> List[Tuple[int, List[int]]]:
    """(size, member indices) for every distinct size: ascending size, then stably by the
    group's total (size * members) descending."""
    members: dict = {}
    for index, size in enumerate(sizes):
        members.setdefault(size, []).append(index)
    groups = sorted(members.items())
    groups.sort(key=lambda item: item[0] * len(item[1]), reverse=True)
    return groups


def divide_signal(total: int, sizes: Sequence[int], unit: int) -> List[int]:
    """Split ``total`` signal channels between consumers of the given parameter ``sizes``.

    The official rule (``divide_feature``): shares are multiples of ``unit``, roughly in
    proportion to the sizes; consumers of equal size get equal shares; every consumer gets at least
    one unit; groups are served largest first and the last group takes what is left.
    """
    if total % unit:
        raise ValueError(f"signal channels ({total}) must be a multiple of {unit}")
    units = total // unit
    groups = _group_equal_sizes(sizes)
    per_unit = units / sum(sizes)
    given = [float(len(members)) for _, members in groups]
    left = units - sum(given)
    for g, (size, members) in enumerate(groups):
        n = len(members)
        if g == len(groups) - 1:
            given[g] += left
            break
        extra = max(size * n * per_unit, n) // n * n - n
        extra = min(extra, left)
        given[g] += extra
        left -= extra
        if left == 0:
            break
    shares = [0] * len(sizes)
    for (_, members), units_of_group in zip(groups, given):
        for index in members:
            shares[index] = int(units_of_group // len(members)) * unit
    return shares


def divide_signal_v01(total: int, sizes: Sequence[int], unit: int) -> List[int]:
    """The v0.1 variant of ``divide_signal`` (the official ``divide_feature_legacy``): no minimum
    of one unit per consumer, and the last group takes the remainder."""
    if total % unit:
        raise ValueError(f"signal channels ({total}) must be a multiple of {unit}")
    units = total // unit
    groups = _group_equal_sizes(sizes)
    per_unit = units / sum(sizes)
    left = units
    given = []
    for g, (size, members) in enumerate(groups):
        n = len(members)
        if g < len(groups) - 1:
            share = max(size * n * per_unit, 1) // n * n
            given.append(share)
            left -= share
        else:
            given.append(left)
    shares = [0] * len(sizes)
    for (_, members), units_of_group in zip(groups, given):
        for index in members:
            shares[index] = int(units_of_group // len(members)) * unit
    return shares


@dataclass(frozen=True)
class GeneratorSpec:
    """One weight generator: which signal channels it reads and which levels it serves."""
    signal_offset: int
    signal_channels: int
    groups: int
    num_params: int           # output rows used (the blocks' parameter total)
    rows: int                 # output rows of its convolution (num_params rounded up to groups)
    levels: Tuple[int, ...]


def plan_generators(config: ModelConfig, signal_channels: int,
                    block_params: Sequence[int]) -> List[GeneratorSpec]:
    """The weight generators of a model, reproducing the official signal split.

    * v1_0: one generator per block. Shares follow ``divide_signal`` with a unit of
      ``max(weight_groups)``; every generator reads its share from signal channel 0 on (the
      official code restarts the signal index at each level).
    * v1_0_unify: one generator per level before ``unify_level - 1``, then one shared generator
      for all remaining levels; shares are consecutive slices of the signal.
    * v0_1: one generator per level (the context head's multi-output convolution); shares follow
      ``divide_signal_v01`` over the rounded-up row counts, consecutive slices.
    """
    wg = config.weight_groups
    wg_list = list(wg) if isinstance(wg, (tuple, list)) else None

    def groups_of(i: int) -> int:
        return wg_list[i] if wg_list is not None else wg

    if config.arch == "v0_1":
        unit_groups = wg_list if wg_list is not None else [wg]
        unit = max(8, max(unit_groups))
        level_sets = [(level,) for level in range(len(block_params))]
        param_groups = [block_params[level] for level in range(len(block_params))]
        rows = [round_up(p, groups_of(i)) for i, p in enumerate(param_groups)]
        shares = divide_signal_v01(signal_channels, rows, unit)
        consecutive = True
    else:
        unit = max(wg_list) if wg_list is not None else wg
        if config.arch == "v1_0_unify":
            first = config.unify_level - 1
            level_sets = [(level,) for level in range(first)]
            level_sets.append(tuple(range(first, len(block_params))))
            consecutive = True
        else:
            level_sets = [(level,) for level in range(len(block_params))]
            consecutive = False
        param_groups = [sum(block_params[level] for level in levels) for levels in level_sets]
        rows = [round_up(p, groups_of(i)) for i, p in enumerate(param_groups)]
        shares = divide_signal(signal_channels, param_groups, unit)

    specs, offset = [], 0
    for i, (levels, params, share, nrows) in enumerate(zip(level_sets, param_groups, shares, rows)):
        if share <= 0:
            raise ValueError(f"weight generator {i} receives no signal channels")
        if share % groups_of(i):
            raise ValueError(f"weight generator {i}: {share} signal channels do not split into "
                             f"{groups_of(i)} groups")
        specs.append(GeneratorSpec(offset if consecutive else 0, share, groups_of(i), params,
                                   nrows, levels))
        offset += share
    return specs


class WeightGenerator(nn.Module):
    """Maps a slice of the signal to per-patch weights: a grouped 1x1 convolution (no bias)."""

    def __init__(self, spec: GeneratorSpec):
        super().__init__()
        self.signal_offset = spec.signal_offset
        self.signal_channels = spec.signal_channels
        self.groups = spec.groups
        self.num_params = spec.num_params
        self.weight = nn.Parameter(torch.empty(spec.rows, spec.signal_channels // spec.groups, 1, 1))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))   # as nn.Conv2d

    def signal_slice(self, signal: Tensor) -> Tensor:
        return signal[:, self.signal_offset:self.signal_offset + self.signal_channels]

    def forward(self, signal: Tensor, start: int = 0, count: int = None) -> Tensor:
        """Rows ``start .. start + count`` of the generated weights, as (B, GH, GW, count)."""
        return ops.generate_weights(self.signal_slice(signal), self.weight, groups=self.groups,
                                    start=start, count=count)

    def extra_repr(self) -> str:
        return (f"signal[{self.signal_offset}:{self.signal_offset + self.signal_channels}] -> "
                f"{self.num_params} params, groups={self.groups}")


# The implementations of a meta block, chosen once per forward pass by ``HyperSeg`` and passed down:
REFERENCE = "reference"                # hyperseg.ops, in plain PyTorch (any mode, autograd)
FUSED = "fused"                        # one fused Triton launch per block: eval mode, no autograd
AUTOGRAD_KERNELS = "autograd-kernels"  # differentiable Triton ops + torch's BatchNorm: training
IMPLEMENTATIONS = (REFERENCE, FUSED, AUTOGRAD_KERNELS)


def triton_available() -> bool:
    """True when the Triton kernels of ``hyperseg.kernels`` could be imported."""
    return kernels is not None


class MetaBlock(nn.Module):
    """A decoder block whose weights come, per patch, from rows ``row_start ..`` of a
    ``WeightGenerator``. ``forward(x, signal, generator, row_start, implementation)`` runs the
    block with one of ``IMPLEMENTATIONS``, looked up in the block's table of methods."""

    num_params: int
    # implementation -> the method that runs it
    METHODS = {REFERENCE: "reference", FUSED: "fused", AUTOGRAD_KERNELS: "autograd_kernels"}

    def forward(self, x: Tensor, signal: Tensor, generator: "WeightGenerator", row_start: int,
                implementation: str = REFERENCE) -> Tensor:
        if implementation not in self.METHODS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        if implementation != REFERENCE and kernels is None:
            raise NotImplementedError(f"the {implementation!r} implementation needs the Triton kernels "
                                      f"of hyperseg.kernels, which could not be imported")
        return getattr(self, self.METHODS[implementation])(x, signal, generator, row_start)

    def reference(self, x, signal, generator, row_start) -> Tensor:
        raise NotImplementedError

    def fused(self, x, signal, generator, row_start) -> Tensor:
        raise NotImplementedError

    def autograd_kernels(self, x, signal, generator, row_start) -> Tensor:
        raise NotImplementedError


def _source(generator: "WeightGenerator", row_start: int) -> dict:
    """The generator arguments shared by ``hyperseg.ops.meta_*`` and the kernels."""
    return dict(signal_offset=generator.signal_offset, generator_groups=generator.groups,
                row_start=row_start)


class MetaConv(MetaBlock):
    """Kernel-1 meta block: patch-wise 1x1 convolution -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 1):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels} -> {out_channels} do not split into {groups} groups")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self.num_params = patch_conv_rows(in_channels, out_channels, groups)
        self.bn = nn.BatchNorm2d(out_channels)

    def kernels(self, params: Tensor) -> Tensor:
        """(B, GH, GW, P) generated parameters -> (B, GH, GW, Cout, Cin / groups, 1, 1) kernels."""
        b, gh, gw, _ = params.shape
        return params.reshape(b, gh, gw, self.out_channels, self.in_channels // self.groups, 1, 1)

    def reference(self, x, signal, generator, row_start) -> Tensor:
        return ops.meta_patch_conv(x, signal, generator.weight, out_channels=self.out_channels,
                                   groups=self.groups, norm=self.bn, activation="relu",
                                   **_source(generator, row_start))

    def autograd_kernels(self, x, signal, generator, row_start) -> Tensor:
        """Kernels generated from the signal by the differentiable Triton op (recomputed in the
        backward), then torch's BatchNorm, whose batch statistics need the whole output."""
        y = kernels.generated_patch_conv2d(x, signal, generator.weight,
                                           out_channels=self.out_channels, groups=self.groups,
                                           **_source(generator, row_start))
        return F.relu(self.bn(y))

    def fused(self, x, signal, generator, row_start) -> Tensor:
        """One launch: weights generated in the kernel, BatchNorm folded, ReLU."""
        scale, shift = ops.fold_batchnorm(self.bn)
        return kernels.meta_patch_conv(x, signal, generator.weight, out_channels=self.out_channels,
                                       groups=self.groups, kernel_size=1, scale=scale, shift=shift,
                                       activation="relu", **_source(generator, row_start))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, groups={self.groups}"


class MetaInvertedResidual(MetaBlock):
    """Kernel-3 meta block: patch-wise inverted residual.

    1x1 expand (x ``expand_ratio``) -> BN -> ReLU6 -> 3x3 depthwise -> BN -> ReLU6 -> 1x1 project
    -> BN, plus the input when in == out channels. ``version="v1"``: the expand runs on each patch
    and its halo with the patch's own weights (``ops.patch_inverted_residual``); ``"v0_1"``: every
    sub-layer is a separate patch-wise convolution (``ops.patch_inverted_residual_v01``).
    Parameters per patch: expand (hidden x in), depthwise (hidden x k x k), project (out x hidden),
    laid out as ``hyperseg.layout.inverted_residual_sizes`` says.
    """

    # Eval-mode v1 blocks on the reference expand this many values at most at a time (rows of
    # patches are processed in bands), which bounds the block's extra memory; None: no bands.
    expanded_budget = 1 << 22

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: float = 2,
                 kernel_size: int = 3, version: str = "v1", padding_mode: str = "reflect"):
        super().__init__()
        if version not in ("v1", "v0_1"):
            raise ValueError(f"version must be 'v1' or 'v0_1', got {version!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.hidden = int(round(in_channels * expand_ratio))
        self.kernel_size = kernel_size
        self.version = version
        self.padding_mode = padding_mode
        self.residual = in_channels == out_channels
        self.bn1 = nn.BatchNorm2d(self.hidden)
        self.bn2 = nn.BatchNorm2d(self.hidden)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.sizes = inverted_residual_sizes(in_channels, self.hidden, out_channels, kernel_size)
        self.num_params = sum(self.sizes)

    def kernels(self, params: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(B, GH, GW, P) generated parameters -> expand (.., hidden, in), depthwise
        (.., hidden, k, k), project (.., out, hidden)."""
        return split_inverted_residual(params, self.in_channels, self.hidden, self.out_channels,
                                       self.kernel_size)

    def _shape(self) -> dict:
        return dict(hidden=self.hidden, out_channels=self.out_channels,
                    kernel_size=self.kernel_size, residual=self.residual,
                    padding_mode=self.padding_mode)

    def _chunk_rows(self, x: Tensor, signal: Tensor):
        """Rows of patches per band of the eval-mode v1 reference (None: all at once).
        Train-mode BatchNorm needs every patch at once; an exported graph must not depend on the
        batch size, which sets the band height."""
        if (self.version != "v1" or self.training or self.expanded_budget is None
                or torch.compiler.is_exporting()):
            return None
        b, _, gh, gw = signal.shape
        halo = self.kernel_size // 2
        row = b * gw * self.hidden * (x.shape[2] // gh + 2 * halo) * (x.shape[3] // gw + 2 * halo)
        return max(1, self.expanded_budget // row)

    def reference(self, x, signal, generator, row_start) -> Tensor:
        return ops.meta_inverted_residual(
            x, signal, generator.weight, norm1=self.bn1, norm2=self.bn2, norm3=self.bn3,
            version=self.version, chunk_rows=self._chunk_rows(x, signal),
            **self._shape(), **_source(generator, row_start))

    def autograd_kernels(self, x, signal, generator, row_start) -> Tensor:
        """One differentiable Triton op ``generated_patch_conv2d`` per sub-layer (kernels
        recomputed in the backward) and torch's BatchNorm, composed by
        ``ops.inverted_residual_layers`` (v1: over the patches laid out with their halos)."""
        expand_rows, depthwise_rows, _ = self.sizes

        def conv(t, rows, out_channels, groups=1, kernel_size=1, padding_mode="reflect"):
            return kernels.generated_patch_conv2d(
                t, signal, generator.weight, out_channels=out_channels, groups=groups,
                kernel_size=kernel_size, padding_mode=padding_mode,
                **_source(generator, row_start + rows))

        return ops.inverted_residual_layers(
            x, lambda t: conv(t, 0, self.hidden),
            lambda t, mode: conv(t, expand_rows, self.hidden, self.hidden, self.kernel_size, mode),
            lambda t: conv(t, expand_rows + depthwise_rows, self.out_channels),
            grid=tuple(signal.shape[2:4]), kernel_size=self.kernel_size, tiled=self.version == "v1",
            norm1=self.bn1, norm2=self.bn2, norm3=self.bn3, residual=self.residual,
            padding_mode=self.padding_mode)

    def fused(self, x, signal, generator, row_start) -> Tensor:
        """v1: one fused launch (weights generated in the kernel, BatchNorms folded). v0_1: one
        fused ``meta_patch_conv`` launch per sub-layer (the depthwise halo needs the neighbours'
        expanded features, so the expand must be complete before it)."""
        norms = [ops.fold_batchnorm(bn) for bn in (self.bn1, self.bn2, self.bn3)]
        if self.version == "v1":
            return kernels.meta_inverted_residual(
                x, signal, generator.weight, norm1=norms[0], norm2=norms[1], norm3=norms[2],
                **self._shape(), **_source(generator, row_start))
        expand_rows, depthwise_rows, _ = self.sizes
        y = kernels.meta_patch_conv(
            x, signal, generator.weight, out_channels=self.hidden, scale=norms[0][0],
            shift=norms[0][1], activation="relu6", **_source(generator, row_start))
        y = kernels.meta_patch_conv(
            y, signal, generator.weight, out_channels=self.hidden, groups=self.hidden,
            kernel_size=self.kernel_size, scale=norms[1][0], shift=norms[1][1], activation="relu6",
            padding_mode=self.padding_mode, **_source(generator, row_start + expand_rows))
        y = kernels.meta_patch_conv(
            y, signal, generator.weight, out_channels=self.out_channels, scale=norms[2][0],
            shift=norms[2][1], **_source(generator, row_start + expand_rows + depthwise_rows))
        return y + x if self.residual else y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, hidden={self.hidden}, "
                f"kernel_size={self.kernel_size}, version={self.version}")


def records_gradients(module: nn.Module, inputs: Sequence[Tensor]) -> bool:
    """Whether autograd records a forward pass of ``module`` on ``inputs`` now."""
    return torch.is_grad_enabled() and (any(t.requires_grad for t in inputs)
                                        or any(p.requires_grad for p in module.parameters()))


def coordinates(batch: int, height: int, width: int, like: Tensor) -> Tensor:
    """The two coordinate channels of a level: x then y, each ``linspace(-1, 1)``."""
    xs = torch.linspace(-1, 1, width, device=like.device, dtype=torch.float32)
    ys = torch.linspace(-1, 1, height, device=like.device, dtype=torch.float32)
    grid = torch.stack((xs.expand(height, width), ys[:, None].expand(height, width)))
    return grid.to(like.dtype).expand(batch, 2, height, width)


class Decoder(nn.Module):
    """The multi-scale dynamic decoder (the paper's primary network).

    ``inputs`` to ``forward`` are the image and the five backbone features, finest first; level 0
    consumes the coarsest (stride 32). The last level outputs the class logits, upsampled to the
    image size.
    """

    def __init__(self, config: ModelConfig, feat_channels: Sequence[int], signal_channels: int):
        super().__init__()
        feats = list(feat_channels)[::-1]                     # coarsest first
        if config.levels > len(feats):
            raise ValueError(f"{config.levels} decoder levels need {config.levels} inputs, "
                             f"have {len(feats)}")
        version = "v0_1" if config.arch == "v0_1" else "v1"
        self.blocks = nn.ModuleList()
        previous = 0
        for level, kernel in enumerate(config.kernel_sizes):
            in_channels = feats[level] + previous + 2
            if level == config.levels - 1:
                out_channels = config.num_classes
            elif config.level_channels is None:
                out_channels = feats[level]
            else:
                out_channels = config.level_channels[level]
            if kernel == 1:
                block = MetaConv(in_channels, out_channels, groups=config.decoder_groups)
            else:
                block = MetaInvertedResidual(in_channels, out_channels, config.expand_ratio,
                                             kernel_size=kernel, version=version)
            self.blocks.append(block)
            previous = out_channels

        specs = plan_generators(config, signal_channels, [b.num_params for b in self.blocks])
        self.generators = nn.ModuleList(WeightGenerator(spec) for spec in specs)
        # For each level: (generator index, first row of its parameters in that generator).
        self.sources: List[Tuple[int, int]] = []
        for index, spec in enumerate(specs):
            start = 0
            for level in spec.levels:
                self.sources.append((index, start))
                start += self.blocks[level].num_params

    def block_weights(self, level: int, signal: Tensor) -> Tensor:
        """The generated (B, GH, GW, P) parameters of the block of ``level``."""
        index, start = self.sources[level]
        return self.generators[index](signal, start, self.blocks[level].num_params)

    def level_input(self, level: int, inputs: Sequence[Tensor], previous: Optional[Tensor]) -> Tensor:
        """The input of ``level``'s block: the coordinates, the backbone feature of its stride and
        the previous level's output upsampled to it."""
        feat = inputs[-level - 1]
        if previous is None:
            p = feat
        else:
            if previous.shape[-2:] != feat.shape[-2:]:
                previous = F.interpolate(previous, feat.shape[-2:], mode="bilinear",
                                         align_corners=False)
            p = torch.cat((feat, previous), dim=1)
        return torch.cat((coordinates(p.shape[0], p.shape[2], p.shape[3], p), p), dim=1)

    def run_level(self, level: int, x: Tensor, signal: Tensor, implementation: str) -> Tensor:
        """The block of ``level`` on its input ``x``, with ``implementation``."""
        index, start = self.sources[level]
        return self.blocks[level](x, signal, self.generators[index], start, implementation)

    def levels(self, inputs: Sequence[Tensor], signal: Tensor,
               implementation: str = REFERENCE) -> Iterator["DecoderLevel"]:
        """Run the decoder level by level with ``implementation``, yielding each level's block,
        generator, input and output (a ``DecoderLevel``, which can run its block again with
        another implementation). ``forward`` computes the same outputs without keeping them."""
        previous = None
        for level, block in enumerate(self.blocks):
            x = self.level_input(level, inputs, previous)
            previous = self.run_level(level, x, signal, implementation)
            index, start = self.sources[level]
            yield DecoderLevel(level, block, self.generators[index], start, x, signal, previous)

    def forward(self, inputs: Sequence[Tensor], signal: Tensor,
                implementation: str = REFERENCE) -> Tensor:
        """Logits at the size of ``inputs[0]`` (the image), from the backbone features
        ``inputs[1:]`` and the context signal; every block runs with ``implementation`` (one of
        ``IMPLEMENTATIONS``, chosen by ``HyperSeg.decoder_implementation``)."""
        p = None
        for level in range(len(self.blocks)):
            p = self.run_level(level, self.level_input(level, inputs, p), signal, implementation)
        if p.shape[-2:] != inputs[0].shape[-2:]:
            p = F.interpolate(p, inputs[0].shape[-2:], mode="bilinear", align_corners=False)
        return p


@dataclass
class DecoderLevel:
    """One decoder level as ``Decoder.levels`` ran it."""
    index: int
    block: MetaBlock
    generator: WeightGenerator
    row_start: int
    input: Tensor
    signal: Tensor
    output: Tensor

    def run(self, implementation: str = REFERENCE) -> Tensor:
        """The block again on this level's input, with ``implementation``."""
        return self.block(self.input, self.signal, self.generator, self.row_start, implementation)
