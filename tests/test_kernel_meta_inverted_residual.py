"""Triton meta_inverted_residual (fused v1 block) against the reference op."""
import pytest
import torch

from hyperseg import kernels, ops
from kernel_utils import DEVICE, DTYPES, assert_matches, randn

# (B, grid, patch, Cin, hidden, Cout, generator groups, padding mode, dtype, contiguous x)
CASES = [
    (1, (1, 1), (4, 4), 3, 6, 21, 1, "reflect", "fp32", True),
    (2, (2, 3), (3, 5), 21, 42, 12, 4, "reflect", "fp32", False),
    (3, (4, 4), (2, 2), 34, 68, 19, 4, "zeros", "fp32", True),
    (1, (3, 5), (2, 3), 24, 48, 16, 16, "replicate", "fp32", True),
    (2, (2, 3), (16, 16), 10, 20, 10, 8, "reflect", "bf16", True),
    (1, (2, 3), (5, 4), 12, 24, 12, 2, "zeros", "fp16", False),
    (2, (4, 4), (1, 1), 6, 12, 5, 3, "replicate", "fp32", True),
    (1, (1, 1), (16, 8), 21, 42, 21, 8, "reflect", "bf16", True),
    # bands of 16 rows of a 20-row patch (the last band partial), a hidden size that is not a
    # multiple of the 16-channel chunks, Cout > 16
    pytest.param(1, (2, 1), (20, 16), 9, 18, 17, 2, "reflect", "fp32", True, id="bands"),
    pytest.param(1, (2, 2), (20, 16), 6, 12, 6, 3, "zeros", "fp16", True, id="bands-zeros-fp16"),
]


def make_block(b, grid, cin, hidden, cout, ggroups, offset=4, start=6):
    count = hidden * cin + hidden * 9 + cout * hidden
    rows = -(-(start + count + 5) // ggroups) * ggroups
    width = 8 * ggroups
    gen = randn(rows, width // ggroups, 1, 1, scale=(ggroups / width) ** 0.5)
    signal = randn(b, offset + width + 3, *grid)
    norms = [(torch.rand(c, device=DEVICE) + 0.5, randn(c)) for c in (hidden, hidden, cout)]
    kw = dict(hidden=hidden, out_channels=cout, signal_offset=offset, generator_groups=ggroups,
              row_start=start, norm1=norms[0], norm2=norms[1], norm3=norms[2], residual=cin == cout)
    return signal, gen, kw


@pytest.mark.parametrize("b,grid,patch,cin,hidden,cout,ggroups,mode,dtype,contiguous", CASES)
def test_meta_inverted_residual_matches_reference(b, grid, patch, cin, hidden, cout, ggroups, mode, dtype,
                                                  contiguous):
    dtype = DTYPES[dtype]
    x = randn(b, cin, grid[0] * patch[0], grid[1] * patch[1], dtype=dtype, contiguous=contiguous)
    signal, gen, kw = make_block(b, grid, cin, hidden, cout, ggroups)
    signal = signal.to(dtype)
    got = kernels.meta_inverted_residual(x, signal, gen, padding_mode=mode, **kw)
    ref = ops.meta_inverted_residual(x.float(), signal.float(), gen, padding_mode=mode, **kw)
    assert_matches(got, ref, dtype)


def test_meta_inverted_residual_with_residual():
    x = randn(2, 8, 12, 15)
    signal, gen, kw = make_block(2, (2, 3), 8, 16, 8, 2)
    assert_matches(kernels.meta_inverted_residual(x, signal, gen, **kw),
                   ops.meta_inverted_residual(x, signal, gen, **kw), torch.float32)


def test_the_halo_uses_this_patchs_weights():
    """Changing patch (0, 0)'s generated weights changes only patch (0, 0)'s output."""
    x = randn(1, 4, 8, 8)
    signal, gen, kw = make_block(1, (2, 2), 4, 8, 3, 1)
    before = kernels.meta_inverted_residual(x, signal, gen, **kw)
    signal[0, :, 0, 0] += 1.0
    after = kernels.meta_inverted_residual(x, signal, gen, **kw)
    changed = (before - after).abs().amax(dim=1)[0] > 0
    expected = torch.zeros(8, 8, dtype=torch.bool, device=DEVICE)
    expected[:4, :4] = True
    assert torch.equal(changed, expected)


def test_meta_inverted_residual_errors():
    x = randn(1, 4, 8, 8)
    signal, gen, kw = make_block(1, (2, 2), 4, 8, 3, 1)
    with pytest.raises(ValueError, match="residual"):
        kernels.meta_inverted_residual(x, signal, gen, **{**kw, "residual": True})
    with pytest.raises(ValueError, match="norm2"):
        kernels.meta_inverted_residual(x, signal, gen, **{**kw, "norm2": kw["norm3"]})
    with pytest.raises(ValueError, match="rows"):
        kernels.meta_inverted_residual(x, signal, gen, **{**kw, "row_start": gen.shape[0]})
    with pytest.raises(ValueError, match="hidden"):
        kernels.meta_inverted_residual(x, signal, gen, **{**kw, "hidden": 0})
    with pytest.raises(ValueError, match="tile"):
        kernels.meta_inverted_residual(randn(1, 4, 8, 9), signal, gen, **kw)
    with pytest.raises(ValueError, match="signal must have shape"):
        kernels.meta_inverted_residual(x, signal[0], gen, **kw)
    with pytest.raises(TypeError):
        kernels.meta_inverted_residual(x.double(), signal, gen, **kw)
