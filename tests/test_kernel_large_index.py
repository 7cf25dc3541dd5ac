"""64-bit indexing: kernels on tensors of more than 2**31 elements (issue 17).

On a GPU with enough memory each op runs on an input of more than 2**31 elements, whose last
patch row lies beyond every 32-bit offset, and the output there is compared with the reference
computed on a crop (the last patch rows only: the reference would need several times the memory
of the whole tensor). Patches are independent but for the halo of 3x3 taps, so the crop holds
one more patch row above the compared one, whose halo then comes from real pixels as in the
whole image. Without such a GPU the same comparison runs on a small image, so the test's logic
is exercised everywhere; the large case is skipped only where it cannot fit.
"""
import pytest
import torch

from hyperseg import kernels, ops
from kernel_utils import DEVICE, assert_matches

LARGE = DEVICE == "cuda" and torch.cuda.get_device_properties(0).total_memory >= 60 * 2 ** 30
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
# (channels, H, W, patch side): C*H*W > 2**31 on a large GPU, a small image elsewhere
GEOMETRY = {
    "patch_conv2d": (32, 8192, 8256, 64) if LARGE else (4, 32, 48, 8),
    "meta_patch_conv": (82, 5120, 5120, 64) if LARGE else (6, 16, 32, 8),
    "meta_inverted_residual": (34, 8192, 8192, 128) if LARGE else (5, 32, 32, 8),
}


def _randn(*shape, scale=1.0):
    """Random values made on the device in chunks of rows, in DTYPE (no float32 copy of a large
    tensor)."""
    out = torch.empty(shape, device=DEVICE, dtype=DTYPE)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for chunk in out.view(-1, shape[-1]).split(4096):
        chunk.copy_(torch.randn(chunk.shape, device=DEVICE, generator=g) * scale)
    return out


def _check_elements(c, h, w):
    if LARGE:
        assert c * h * w > 2 ** 31


def _compare_last_row(got, ref_crop, ph):
    assert_matches(got[..., -ph:, :], ref_crop[..., -ph:, :].to(got.dtype), DTYPE)


def test_patch_conv2d_beyond_2_31_elements():
    c, h, w, p = GEOMETRY["patch_conv2d"]
    _check_elements(c, h, w)
    x = _randn(1, c, h, w)
    weight = _randn(1, h // p, w // p, c, c, 1, 1, scale=c ** -0.5)
    with torch.no_grad():
        got = kernels.patch_conv2d(x, weight)
        ref = ops.patch_conv2d(x[..., -p:, :].float(), weight[:, -1:].float())
    _compare_last_row(got, ref, p)


def test_meta_patch_conv_beyond_2_31_elements():
    c, h, w, p = GEOMETRY["meta_patch_conv"]
    _check_elements(c, h, w)
    cout, s = 16, 32
    x = _randn(1, c, h, w)
    signal = _randn(1, s, h // p, w // p)
    gen = _randn(cout * c, s // 4, 1, 1, scale=(c * s / 4) ** -0.5)
    kw = dict(out_channels=cout, generator_groups=4, activation="relu")
    with torch.no_grad():
        got = kernels.meta_patch_conv(x, signal, gen, **kw)
        ref = ops.meta_patch_conv(x[..., -p:, :].float(), signal[..., -1:, :].float(), gen.float(), **kw)
    _compare_last_row(got, ref, p)


def test_meta_inverted_residual_beyond_2_31_elements():
    c, h, w, p = GEOMETRY["meta_inverted_residual"]
    _check_elements(c, h, w)
    hidden, cout, s = 2 * c, 8, 32
    rows = hidden * c + hidden * 9 + cout * hidden
    x = _randn(1, c, h, w)
    signal = _randn(1, s, h // p, w // p)
    gen = _randn(rows, s // 4, 1, 1, scale=(s / 4) ** -0.5 / 4)
    norms = [(torch.full((n,), 0.5, device=DEVICE), torch.zeros(n, device=DEVICE))
             for n in (hidden, hidden, cout)]
    kw = dict(hidden=hidden, out_channels=cout, generator_groups=4, norm1=norms[0], norm2=norms[1],
              norm3=norms[2])
    with torch.no_grad():
        got = kernels.meta_inverted_residual(x, signal, gen, **kw)
        # two patch rows: the compared (last) row's top halo is real pixels, as in the whole image
        ref = ops.meta_inverted_residual(x[..., -2 * p:, :].float(), signal[..., -2:, :].float(),
                                         gen.float(), **kw)
    _compare_last_row(got, ref, p)


@pytest.mark.skipif(not LARGE, reason="needs a GPU with >= 60 GiB (the large case)")
def test_the_large_cases_are_large():
    for c, h, w, _ in GEOMETRY.values():
        assert c * h * w > 2 ** 31
