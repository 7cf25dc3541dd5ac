"""float32 inputs of every kernel (fused inference and training) follow
torch.backends.cudnn.allow_tf32, as PyTorch's convolutions do: tf32 tensor cores when it is on,
exact IEEE float32 when it is off."""
import importlib

import pytest
import torch

from hyperseg import kernels, ops
from hyperseg.kernels import _common
from kernel_utils import DEVICE, assert_grads_match, assert_matches, randn

meta_patch_conv_module = importlib.import_module("hyperseg.kernels.meta_patch_conv")
meta_inverted_residual_module = importlib.import_module("hyperseg.kernels.meta_inverted_residual")
patch_conv_module = importlib.import_module("hyperseg.kernels.patch_conv")
generate_weights_module = importlib.import_module("hyperseg.kernels.generate_weights")


@pytest.mark.parametrize("allow", [True, False])
def test_dot_mode_follows_allow_tf32_on_a_gpu(monkeypatch, allow):
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    torch.backends.cudnn.allow_tf32 = allow
    assert _common.dot_mode(torch.float32) == (3 if allow else 1)
    assert _common.dot_mode(torch.float16) == 0
    assert _common.dot_mode(torch.bfloat16) == 0
    assert _common.dot_mode(torch.float64) == 2


def test_the_interpreter_always_computes_dots_in_float32(monkeypatch):
    monkeypatch.setattr(_common, "interpreting", lambda: True)
    torch.backends.cudnn.allow_tf32 = True
    assert _common.dot_mode(torch.float32) == 1
    assert _common.dot_mode(torch.bfloat16) == 1
    assert _common.dot_mode(torch.float64) == 2


def _blocks():
    """A kernel-1 block on the pixel kernel, a dense one on the patch kernel, and a v1 inverted
    residual: one launch of every fused kernel."""
    x1, x2 = randn(1, 20, 4, 6), randn(2, 20, 8, 12)
    signal = randn(2, 32, 4, 6)
    gen = randn(20 * 24 + 24 * 9 + 12 * 24, 8, 1, 1, scale=0.35)
    norms = [(torch.rand(c, device=DEVICE) + 0.5, randn(c)) for c in (24, 24, 12)]
    conv = dict(out_channels=12, generator_groups=4, activation="relu")
    block = dict(hidden=24, out_channels=12, generator_groups=4, norm1=norms[0], norm2=norms[1],
                 norm3=norms[2])
    yield "meta_patch_conv", (x1, signal[:1], gen), conv
    yield "meta_patch_conv", (x2, signal, gen), conv
    yield "meta_inverted_residual", (x2, signal, gen), block


@pytest.mark.parametrize("allow", [True, False])
def test_fused_kernels_with_tf32_and_ieee_dots(allow, monkeypatch):
    """Every fused kernel runs with each float32 dot mode. The interpreter computes tf32 dots
    exactly, so there both match the reference to float32 precision; on a GPU tf32 rounds the
    operands to 10 mantissa bits (about 1e-3 relative)."""
    torch.backends.cudnn.allow_tf32 = allow
    if DEVICE == "cpu":      # the interpreter always picks IEEE: force the tf32 path's code
        mode = 3 if allow else 1
        for module in (meta_patch_conv_module, meta_inverted_residual_module):
            monkeypatch.setattr(module, "dot_mode", lambda dtype, _m=mode: _m)
    for name, args, kw in _blocks():
        got = getattr(kernels, name)(*args, **kw)
        ref = getattr(ops, name)(*args, **kw)
        if allow and DEVICE == "cuda":
            err = (got - ref).abs().max().item()
            assert err <= 5e-3 * max(1.0, ref.abs().max().item()), err
        else:
            assert_matches(got, ref, torch.float32)


def _force_dot_mode(monkeypatch, allow, modules):
    """In the interpreter (which always picks IEEE), make ``modules`` launch the tf32 code path."""
    if DEVICE == "cpu":
        mode = 3 if allow else 1
        for module in modules:
            monkeypatch.setattr(module, "dot_mode", lambda dtype, _m=mode: _m)


@pytest.mark.parametrize("allow", [True, False])
def test_training_kernels_with_tf32_and_ieee_dots(allow, monkeypatch):
    """The training ops (weight generation, patch-wise convolution, and their backward kernels)
    follow the same policy: dense 1x1 and 3x3 convolutions, forward and every gradient."""
    torch.backends.cudnn.allow_tf32 = allow
    _force_dot_mode(monkeypatch, allow, (patch_conv_module, generate_weights_module))
    rtol = 5e-3 if allow and DEVICE == "cuda" else None
    for cin, cout, k in ((20, 24, 1), (16, 18, 3)):
        x = randn(2, cin, 8, 12).requires_grad_()
        weight = randn(2, 2, 3, cout, cin, k, k, scale=0.3).requires_grad_()
        bias = randn(2, 2, 3, cout).requires_grad_()
        dout = randn(2, cout, 8, 12)
        got = torch.autograd.grad(kernels.patch_conv2d(x, weight, bias, padding_mode="reflect"),
                                  (x, weight, bias), dout)
        ref = torch.autograd.grad(ops.patch_conv2d(x, weight, bias, padding_mode="reflect"),
                                  (x, weight, bias), dout)
        for name, g, r in zip(("x", "weight", "bias"), got, ref):
            if rtol is not None:
                err = (g - r).abs().max().item()
                assert err <= rtol * max(1.0, r.abs().max().item()), (name, err)
            else:
                assert_grads_match(g, r, torch.float32, name)
