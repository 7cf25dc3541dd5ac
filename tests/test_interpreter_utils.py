"""interpreter_utils: the tests' faster Triton interpreter computes bit for bit what the plain one
does (outputs, gradients, int32 arithmetic that wraps)."""
import os

import pytest
import torch

import interpreter_utils
from hyperseg import kernels
from kernel_utils import randn

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the Triton interpreter is not in use (a GPU is)")


def test_the_tests_run_on_the_faster_interpreter():
    if os.environ.get("HYPERSEG_PLAIN_INTERPRETER") == "1":
        pytest.skip("HYPERSEG_PLAIN_INTERPRETER=1")
    from triton.runtime import interpreter
    assert interpreter_utils.installed()
    assert interpreter.interpreter_builder.options.sanitize_overflow is False
    assert interpreter._patch_lang.__name__ == "patch_once_per_launch"


def test_plain_interpreter_is_restored_and_reinstalled(monkeypatch):
    from triton.runtime import interpreter
    was_installed = interpreter_utils.installed()
    with interpreter_utils.plain():
        assert not interpreter_utils.installed()
        assert interpreter._patch_lang.__name__ == "_patch_lang"
        assert interpreter.interpreter_builder.options.sanitize_overflow is True
        monkeypatch.setenv("HYPERSEG_PLAIN_INTERPRETER", "1")
        assert interpreter_utils.install() is False             # the switch keeps it plain
        assert interpreter._patch_lang.__name__ == "_patch_lang"
        monkeypatch.delenv("HYPERSEG_PLAIN_INTERPRETER")
    assert interpreter_utils.installed() == was_installed


def _runs():
    """Outputs and gradients of every kind of kernel, on small inputs (3x3 borders, helpers called
    per program, weights generated in the kernel, the generator's backward kernels)."""
    torch.manual_seed(0)
    results = []
    x = randn(1, 6, 8, 12).requires_grad_()
    weight = randn(1, 2, 3, 5, 6, 3, 3).requires_grad_()
    bias = randn(1, 2, 3, 5).requires_grad_()
    out = kernels.patch_conv2d(x, weight, bias, padding_mode="reflect")
    results += [out, *torch.autograd.grad(out, (x, weight, bias), randn(*out.shape))]
    signal = randn(1, 16, 2, 2).requires_grad_()
    generator = randn(112, 4, 1, 1).requires_grad_()
    x4 = randn(1, 4, 8, 8).requires_grad_()
    out = kernels.generated_patch_conv2d(x4, signal, generator, out_channels=6,
                                         generator_groups=4, row_start=2, groups=2, kernel_size=3,
                                         padding_mode="replicate")
    results += [out, *torch.autograd.grad(out, (x4, signal, generator), randn(*out.shape))]
    with torch.no_grad():
        results.append(kernels.meta_patch_conv(
            x4, signal, generator, out_channels=6, generator_groups=4, row_start=2, groups=2,
            kernel_size=3, scale=randn(6), shift=randn(6), activation="relu6",
            padding_mode="zeros"))
        norms = [(randn(8), randn(8)), (randn(8), randn(8)), (randn(4), randn(4))]
        results.append(kernels.meta_inverted_residual(
            x4, signal, randn(140, 8, 1, 1), hidden=8, out_channels=4, generator_groups=2,
            row_start=4, kernel_size=3, norm1=norms[0], norm2=norms[1], norm3=norms[2],
            residual=True, padding_mode="reflect"))
    return [r.detach() for r in results]


def test_kernels_compute_what_the_plain_interpreter_computes():
    fast = _runs()
    with interpreter_utils.plain():
        plain = _runs()
    assert len(fast) == len(plain) == 10
    for i, (f, p) in enumerate(zip(fast, plain)):
        assert f.shape == p.shape and torch.equal(f, p), i
        assert f.abs().max() > 0, i


def _int32_products():
    import triton
    import triton.language as tl

    @triton.jit
    def products(a_ptr, out_ptr, n, SCALE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        a = tl.load(a_ptr + offs, mask=offs < n)
        tl.store(out_ptr + offs, a * SCALE + a, mask=offs < n)

    a = torch.tensor([1, 2**20, 2**30, -(2**30), 123456789], dtype=torch.int32)
    out = torch.empty_like(a)
    products[(1,)](a, out, a.numel(), SCALE=4096, BLOCK=8)
    return out


def test_int32_arithmetic_wraps_as_before():
    fast = _int32_products()
    with interpreter_utils.plain():
        plain = _int32_products()
    wrapped = [(v * 4097 + 2**31) % 2**32 - 2**31 for v in (1, 2**20, 2**30, -(2**30), 123456789)]
    assert fast.tolist() == plain.tolist() == wrapped
