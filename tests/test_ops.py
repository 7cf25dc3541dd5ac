"""The reference operators against independent, loop-per-patch implementations."""
import pytest
import torch
import torch.nn.functional as F

from hyperseg import ops

MODES = ["zeros", "reflect", "replicate"]


def border_pad(x, r, mode):
    return F.pad(x, (r, r, r, r), mode="constant" if mode == "zeros" else mode) if r else x


def naive_patch_conv2d(x, weight, bias, mode, groups):
    """One F.conv2d per patch on the border-padded image: the definition, literally."""
    b, _, h, w = x.shape
    _, gh, gw, cout, _, k, _ = weight.shape
    r, ph, pw = k // 2, h // gh, w // gw
    xp = border_pad(x, r, mode)
    out = torch.zeros(b, cout, h, w, dtype=x.dtype)
    for n in range(b):
        for i in range(gh):
            for j in range(gw):
                region = xp[n:n + 1, :, i * ph:i * ph + ph + 2 * r, j * pw:j * pw + pw + 2 * r]
                bias_ij = None if bias is None else bias[n, i, j]
                out[n, :, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw] = F.conv2d(
                    region, weight[n, i, j], bias_ij, groups=groups)[0]
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("grid,patch", [((1, 1), (6, 6)), ((2, 3), (4, 5)), ((3, 2), (3, 2))])
def test_patch_conv2d_matches_per_patch_conv(mode, k, groups, grid, patch):
    b, cin, cout = 2, 4, 6
    x = torch.randn(b, cin, grid[0] * patch[0], grid[1] * patch[1], dtype=torch.float64)
    weight = torch.randn(b, *grid, cout, cin // groups, k, k, dtype=torch.float64)
    bias = torch.randn(b, *grid, cout, dtype=torch.float64)
    if mode == "reflect" and k // 2 >= min(x.shape[-2:]):
        pytest.skip("reflect padding needs a larger map")
    got = ops.patch_conv2d(x, weight, bias, padding_mode=mode, groups=groups)
    want = naive_patch_conv2d(x, weight, bias, mode, groups)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k,groups", [(1, 1), (3, 1), (3, 3), (5, 1)])
def test_patch_conv2d_with_one_kernel_everywhere_is_conv2d(mode, k, groups):
    x = torch.randn(2, 6, 12, 15, dtype=torch.float64)
    kernel = torch.randn(9, 6 // groups, k, k, dtype=torch.float64)
    weight = kernel.expand(2, 3, 5, *kernel.shape)
    got = ops.patch_conv2d(x, weight, padding_mode=mode, groups=groups)
    want = F.conv2d(border_pad(x, k // 2, mode), kernel, groups=groups)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_patch_conv2d_patches_are_independent():
    """Changing one patch's kernel changes that patch's output and nothing else (1x1 kernels)."""
    x = torch.randn(1, 3, 8, 8)
    weight = torch.randn(1, 2, 2, 4, 3, 1, 1)
    before = ops.patch_conv2d(x, weight)
    weight[0, 1, 0] += 1.0
    after = ops.patch_conv2d(x, weight)
    changed = (before - after).abs().amax(dim=1)[0] > 0
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[4:, :4] = True
    assert torch.equal(changed, expected)


def test_patch_conv2d_errors():
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="does not tile"):
        ops.patch_conv2d(x, torch.randn(1, 3, 3, 2, 4, 1, 1))
    with pytest.raises(ValueError, match="odd"):
        ops.patch_conv2d(x, torch.randn(1, 2, 2, 2, 4, 2, 2))
    with pytest.raises(ValueError, match="group"):
        ops.patch_conv2d(x, torch.randn(1, 2, 2, 2, 4, 1, 1), groups=2)
    with pytest.raises(ValueError, match="bias"):
        ops.patch_conv2d(x, torch.randn(1, 2, 2, 2, 4, 1, 1), torch.randn(1, 2, 2, 3))
    with pytest.raises(ValueError, match="batch"):
        ops.patch_conv2d(x, torch.randn(2, 2, 2, 2, 4, 1, 1))
    with pytest.raises(ValueError, match="padding_mode"):
        ops.patch_conv2d(x, torch.randn(1, 2, 2, 2, 4, 3, 3), padding_mode="circular")
    with pytest.raises(ValueError, match="reflect"):
        ops.patch_conv2d(torch.randn(1, 4, 2, 2), torch.randn(1, 1, 1, 2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"\(B, Cin, H, W\)"):
        ops.patch_conv2d(torch.randn(4, 8, 8), torch.randn(1, 2, 2, 2, 4, 1, 1))


@pytest.mark.parametrize("groups", [1, 4])
def test_generate_weights_is_a_grouped_matrix_product(groups):
    signal = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    weight = torch.randn(12, 8 // groups, 1, 1, dtype=torch.float64)
    got = ops.generate_weights(signal, weight, groups=groups, start=2, count=7)
    assert got.shape == (2, 3, 5, 7)
    rows_per_group, cin = 12 // groups, 8 // groups
    for row in range(2, 9):
        g = row // rows_per_group
        want = torch.einsum("c,bchw->bhw", weight[row, :, 0, 0], signal[:, g * cin:(g + 1) * cin])
        torch.testing.assert_close(got[..., row - 2], want)


def bn_like(channels, seed):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(channels, generator=g, dtype=torch.float64) + 0.5
    shift = torch.randn(channels, generator=g, dtype=torch.float64)
    return scale, shift


def naive_inverted_residual_v1(x, expand, dw, project, bns, residual, mode):
    """Per patch: take the patch plus a one-pixel halo of the border-padded input, expand it with
    the patch's own weights, then a valid depthwise conv, then project."""
    (s1, t1), (s2, t2), (s3, t3) = bns
    b, _, h, w = x.shape
    _, gh, gw, hidden, _ = expand.shape
    cout = project.shape[3]
    ph, pw = h // gh, w // gw
    xp = border_pad(x, 1, mode)
    out = torch.zeros(b, cout, h, w, dtype=x.dtype)
    for n in range(b):
        for i in range(gh):
            for j in range(gw):
                region = xp[n:n + 1, :, i * ph:i * ph + ph + 2, j * pw:j * pw + pw + 2]
                y = F.conv2d(region, expand[n, i, j][:, :, None, None])
                y = F.relu6(y * s1[:, None, None] + t1[:, None, None])
                z = F.conv2d(y, dw[n, i, j][:, None], groups=hidden)
                z = F.relu6(z * s2[:, None, None] + t2[:, None, None])
                o = F.conv2d(z, project[n, i, j][:, :, None, None])
                out[n, :, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw] = (o * s3[:, None, None] + t3[:, None, None])[0]
    return out + x if residual else out


def naive_inverted_residual_v01(x, expand, dw, project, bns, residual, mode):
    """Three separate patch-wise convolutions over the whole map (v0.1 semantics)."""
    (s1, t1), (s2, t2), (s3, t3) = bns
    b, gh, gw, hidden, cin = expand.shape
    cout = project.shape[3]
    y = naive_patch_conv2d(x, expand.reshape(b, gh, gw, hidden, cin, 1, 1), None, mode, 1)
    y = F.relu6(y * s1[:, None, None] + t1[:, None, None])
    y = naive_patch_conv2d(y, dw.reshape(b, gh, gw, hidden, 1, 3, 3), None, mode, hidden)
    y = F.relu6(y * s2[:, None, None] + t2[:, None, None])
    y = naive_patch_conv2d(y, project.reshape(b, gh, gw, cout, hidden, 1, 1), None, mode, 1)
    y = y * s3[:, None, None] + t3[:, None, None]
    return y + x if residual else y


@pytest.mark.parametrize("version", ["v1", "v0_1"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cin,cout", [(5, 3), (4, 4)])
@pytest.mark.parametrize("grid,patch", [((1, 1), (5, 4)), ((2, 3), (3, 2)), ((3, 2), (1, 2))])
def test_patch_inverted_residual_matches_per_patch_loop(version, mode, cin, cout, grid, patch):
    if mode == "reflect" and min(grid[0] * patch[0], grid[1] * patch[1]) < 2:
        pytest.skip("reflect padding needs a larger map")
    b, hidden = 2, 7
    x = torch.randn(b, cin, grid[0] * patch[0], grid[1] * patch[1], dtype=torch.float64)
    expand = torch.randn(b, *grid, hidden, cin, dtype=torch.float64)
    dw = torch.randn(b, *grid, hidden, 3, 3, dtype=torch.float64)
    project = torch.randn(b, *grid, cout, hidden, dtype=torch.float64)
    bns = [bn_like(hidden, 1), bn_like(hidden, 2), bn_like(cout, 3)]
    residual = cin == cout
    op = ops.patch_inverted_residual if version == "v1" else ops.patch_inverted_residual_v01
    naive = naive_inverted_residual_v1 if version == "v1" else naive_inverted_residual_v01
    got = op(x, expand, dw, project, norm1=ops.affine(*bns[0]), norm2=ops.affine(*bns[1]),
             norm3=ops.affine(*bns[2]), residual=residual, padding_mode=mode)
    want = naive(x, expand, dw, project, bns, residual, mode)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_v1_and_v01_differ_only_through_the_halo():
    """With one patch covering the map the two versions agree; with several they do not."""
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    args = lambda g: (torch.randn(1, *g, 6, 3, dtype=torch.float64), torch.randn(1, *g, 6, 3, 3, dtype=torch.float64),
                      torch.randn(1, *g, 2, 6, dtype=torch.float64))
    one = args((1, 1))
    torch.testing.assert_close(ops.patch_inverted_residual(x, *one), ops.patch_inverted_residual_v01(x, *one))
    four = args((2, 2))
    assert not torch.allclose(ops.patch_inverted_residual(x, *four), ops.patch_inverted_residual_v01(x, *four))


def test_fold_batchnorm_equals_eval_batchnorm():
    bn = torch.nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(ops.affine(*ops.fold_batchnorm(bn))(x), bn(x))


def test_residual_needs_equal_channels():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="residual"):
        ops.patch_inverted_residual(x, torch.randn(1, 1, 1, 6, 3), torch.randn(1, 1, 1, 6, 3, 3),
                                    torch.randn(1, 1, 1, 2, 6), residual=True)


@pytest.mark.parametrize("chunk_rows", [1, 2, 3])
def test_inverted_residual_in_bands_of_patch_rows_is_identical(chunk_rows):
    x = torch.randn(2, 4, 15, 8, dtype=torch.float64)
    expand = torch.randn(2, 5, 2, 6, 4, dtype=torch.float64)
    dw = torch.randn(2, 5, 2, 6, 3, 3, dtype=torch.float64)
    project = torch.randn(2, 5, 2, 4, 6, dtype=torch.float64)
    norms = dict(norm1=ops.affine(*bn_like(6, 1)), norm2=ops.affine(*bn_like(6, 2)), norm3=ops.affine(*bn_like(4, 3)))
    whole = ops.patch_inverted_residual(x, expand, dw, project, residual=True, **norms)
    bands = ops.patch_inverted_residual(x, expand, dw, project, residual=True, chunk_rows=chunk_rows, **norms)
    torch.testing.assert_close(bands, whole, rtol=1e-12, atol=1e-12)


def test_meta_block_argument_errors():
    """The norm and version arguments of the whole-block references are checked."""
    x, signal = torch.randn(1, 4, 4, 4), torch.randn(1, 8, 2, 2)
    gen = torch.randn(4 * 4 * 9 + 4 * 4, 8, 1, 1)
    scale, shift = torch.ones(4), torch.zeros(4)
    with pytest.raises(ValueError, match="give both scale and shift, or neither"):
        ops.meta_patch_conv(x, signal, gen, out_channels=4, scale=scale)
    with pytest.raises(ValueError, match="give either scale and shift or norm, not both"):
        ops.meta_patch_conv(x, signal, gen, out_channels=4, scale=scale, shift=shift,
                            norm=torch.nn.BatchNorm2d(4))
    with pytest.raises(TypeError, match=r"a norm must be a callable .* got str"):
        ops.meta_inverted_residual(x, signal, gen, hidden=4, out_channels=4, norm1="batchnorm")
    with pytest.raises(ValueError, match="version must be 'v1' or 'v0_1', got 'v2'"):
        ops.meta_inverted_residual(x, signal, gen, hidden=4, out_channels=4, version="v2")
    # a callable norm and a (scale, shift) pair of the same BatchNorm give the same block
    bn = torch.nn.BatchNorm2d(4).eval()
    bn.running_mean.uniform_(-1, 1)
    by_module = ops.meta_inverted_residual(x, signal, gen, hidden=4, out_channels=4, norm1=bn)
    by_pair = ops.meta_inverted_residual(x, signal, gen, hidden=4, out_channels=4,
                                         norm1=ops.fold_batchnorm(bn))
    torch.testing.assert_close(by_module, by_pair)
