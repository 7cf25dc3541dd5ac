"""The official HyperSeg decoder algorithm, written out as the speed baseline.

The official implementation generates a full weight map with each generator's grouped 1x1 conv,
cuts the feature map into patches (view/permute, ``Tensor.unfold`` or ``F.unfold``/``F.fold``) and
runs one grouped ``F.conv2d`` per layer with one group per patch. These functions redo that on
our modules' parameters, so that ``bench/profile_kernels.py`` and ``hyperseg benchmark`` can time
the official algorithm beside ours on the same weights and inputs. Benchmark code, not a model:
``hyperseg.ops`` is the reference the tests compare the kernels with.
"""
from __future__ import annotations

import time

import torch.nn.functional as F


def official_weights(generator, signal, start: int, count: int):
    """The generator's grouped 1x1 conv over its signal slice, as a full (B, P, GH, GW) map."""
    s = signal[:, generator.signal_offset:generator.signal_offset + generator.signal_channels]
    full = F.conv2d(s, generator.weight, groups=generator.groups)
    return full[:, start:start + count]


def _per_patch(params):
    """(B, P, GH, GW) -> (B * GH * GW, P), patch-major as the grouped convs need."""
    b, p, gh, gw = params.shape
    return params.permute(0, 2, 3, 1).reshape(b * gh * gw, p)


def _merge(y, b: int, gh: int, gw: int, c: int, ph: int, pw: int):
    """(1, B * GH * GW * C, ph, pw) patches -> (B, C, GH * ph, GW * pw) image."""
    return y.view(b, gh, gw, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, gh * ph, gw * pw)


def _pad_mode(mode: str) -> str:
    return "constant" if mode == "zeros" else mode


def official_meta_conv(block, x, params):
    """Kernel-1 block: non-overlapping patches by view/permute stacked in channels, one grouped
    conv2d (a group per patch and conv group), back to the image, BN, ReLU."""
    b, cin, h, w = x.shape
    _, _, gh, gw = params.shape
    ph, pw, n = h // gh, w // gw, b * gh * gw
    cout, g = block.out_channels, block.groups
    patches = x.reshape(b, cin, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(1, n * cin, ph, pw)
    weight = _per_patch(params).reshape(n * cout, cin // g, 1, 1)
    y = F.conv2d(patches, weight, groups=n * g)
    return F.relu(block.bn(_merge(y, b, gh, gw, cout, ph, pw)))


def official_inverted_residual_v1(block, x, params):
    """v1 inverted residual: border padding, overlapping (ph+2h) x (pw+2h) patches by
    Tensor.unfold, grouped expand on the patches with their halo, BN, ReLU6, grouped depthwise
    (valid), BN, ReLU6, grouped project, BN, patches back into the image (+ input)."""
    b, cin, h, w = x.shape
    _, _, gh, gw = params.shape
    ph, pw, n = h // gh, w // gw, b * gh * gw
    k, hidden, cout = block.kernel_size, block.hidden, block.out_channels
    halo = k // 2
    hh, hw = ph + 2 * halo, pw + 2 * halo
    e, d, _ = block.sizes
    vec = _per_patch(params)
    w_expand = vec[:, :e].reshape(n * hidden, cin, 1, 1)
    w_depthwise = vec[:, e:e + d].reshape(n * hidden, 1, k, k)
    w_project = vec[:, e + d:].reshape(n * cout, hidden, 1, 1)
    xp = F.pad(x, (halo, halo, halo, halo), mode=_pad_mode(block.padding_mode)) if halo else x
    patches = xp.unfold(2, hh, ph).unfold(3, hw, pw)                   # (B, C, GH, GW, hh, hw)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(1, n * cin, hh, hw)
    y = F.conv2d(patches, w_expand, groups=n)
    y = F.relu6(block.bn1(y.view(n, hidden, hh, hw)))
    y = F.conv2d(y.view(1, n * hidden, hh, hw), w_depthwise, groups=n * hidden)
    y = F.relu6(block.bn2(y.view(n, hidden, ph, pw)))
    y = F.conv2d(y.view(1, n * hidden, ph, pw), w_project, groups=n)
    y = block.bn3(y.view(n, cout, ph, pw))
    y = _merge(y, b, gh, gw, cout, ph, pw)
    return y + x if block.residual else y


def _official_patch_conv(x, weight, grid, cout: int, groups: int, k: int, padding_mode: str):
    """One patch-wise conv as the official MetaPatchConv2d: pad, F.unfold into (patch + halo)
    windows at stride patch, grouped conv2d (a group per patch and conv group), F.fold back."""
    b, cin, h, w = x.shape
    gh, gw = grid
    ph, pw, n = h // gh, w // gw, b * gh * gw
    halo = k // 2
    hh, hw = ph + 2 * halo, pw + 2 * halo
    if halo:
        x = F.pad(x, (halo, halo, halo, halo), mode=_pad_mode(padding_mode))
    cols = F.unfold(x, (hh, hw), stride=(ph, pw))                        # (B, C * hh * hw, L)
    cols = cols.view(b, cin, hh, hw, gh * gw).permute(0, 4, 1, 2, 3).reshape(1, n * cin, hh, hw)
    y = F.conv2d(cols, weight.reshape(n * cout, cin // groups, k, k), groups=n * groups)
    y = y.view(b, gh * gw, cout * ph * pw).permute(0, 2, 1)
    return F.fold(y, (h, w), (ph, pw), stride=(ph, pw))


def official_inverted_residual_v01(block, x, params):
    """v0.1 inverted residual: three separate patch-wise convs with BN / ReLU6 between."""
    grid = tuple(params.shape[-2:])
    k, hidden, cout = block.kernel_size, block.hidden, block.out_channels
    e, d, _ = block.sizes
    vec = _per_patch(params)
    y = _official_patch_conv(x, vec[:, :e], grid, hidden, 1, 1, block.padding_mode)
    y = F.relu6(block.bn1(y))
    y = _official_patch_conv(y, vec[:, e:e + d], grid, hidden, hidden, k, block.padding_mode)
    y = F.relu6(block.bn2(y))
    y = block.bn3(_official_patch_conv(y, vec[:, e + d:], grid, cout, 1, 1, block.padding_mode))
    return y + x if block.residual else y


def official_block(block, x, params):
    if not hasattr(block, "hidden"):
        return official_meta_conv(block, x, params)
    if block.version == "v1":
        return official_inverted_residual_v1(block, x, params)
    return official_inverted_residual_v01(block, x, params)


def official_decoder(model, inputs, signal):
    d = model.decoder
    p = None
    for level, block in enumerate(d.blocks):
        x = d.level_input(level, inputs, p)
        index, start = d.sources[level]
        p = official_block(block, x, official_weights(d.generators[index], signal, start,
                                                      block.num_params))
    if p.shape[-2:] != inputs[0].shape[-2:]:
        p = F.interpolate(p, inputs[0].shape[-2:], mode="bilinear", align_corners=False)
    return p


def pad_input(model, x):
    div = model.config.size_divisor
    pad_h, pad_w = (-x.shape[2]) % div, (-x.shape[3]) % div
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def decoder_inputs(model, x):
    """The decoder's inputs (padded image and backbone features) and the context signal."""
    xp = pad_input(model, x)
    feats, head = model.backbone(xp)
    return [xp] + feats, model.context_head(head)


def official_forward(model, x, clock=None):
    """The whole model with the official-algorithm decoder (backbone and context head shared)."""
    inputs, signal = decoder_inputs(model, x)
    t0 = time.perf_counter()
    out = official_decoder(model, inputs, signal)
    if clock is not None:
        clock.current["decoder"] = (time.perf_counter() - t0) * 1e3
    return out[..., :x.shape[2], :x.shape[3]]
