"""The Triton backward of patch_conv2d against the reference's autograd."""
import pytest
import torch

from hyperseg import kernels, ops
from kernel_utils import (DEVICE, DTYPES, assert_grads_match, assert_matches, randn,  # noqa: F401
                          small_channel_blocks, small_pixel_blocks)

# (B, grid, patch, Cin, Cout, groups, k, padding mode, dtype, contiguous x): the features of the
# forward grid (patch shapes 1x1 .. 16x16 and non-square, grouped / depthwise / dense, every
# padding mode, k 1 / 3 / 5, every dtype, non-contiguous x) with fewer patches, because the
# interpreter pays for every program.
BACKWARD_CASES = [
    (1, (1, 1), (1, 1), 3, 21, 1, 1, "zeros", "fp32", True),
    (2, (2, 3), (4, 5), 21, 34, 1, 3, "reflect", "fp32", True),
    (1, (2, 2), (2, 3), 34, 82, 2, 3, "replicate", "fp32", False),
    (1, (3, 5), (3, 2), 82, 21, 1, 1, "reflect", "fp16", True),
    (1, (1, 2), (8, 16), 6, 9, 3, 5, "zeros", "bf16", True),
    (1, (1, 1), (16, 8), 21, 21, 21, 3, "reflect", "fp32", False),
    (1, (2, 2), (1, 1), 3, 6, 3, 3, "replicate", "fp32", True),
    (1, (2, 3), (5, 7), 10, 4, 2, 3, "reflect", "bf16", False),
    (2, (2, 3), (4, 4), 34, 34, 34, 3, "zeros", "fp16", True),
    (1, (2, 3), (7, 3), 5, 3, 1, 5, "replicate", "fp32", True),
    (1, (2, 2), (3, 3), 8, 8, 8, 5, "reflect", "fp32", True),
    # 1x1 on a dot (>= 16 channels and pixels), and on multiply-adds (4-pixel patches; 6 output
    # channels per group)
    (2, (2, 2), (4, 8), 34, 40, 1, 1, "zeros", "fp32", True),
    (1, (2, 3), (2, 2), 40, 12, 2, 1, "reflect", "fp16", True),
]


def _inputs(b, grid, patch, cin, cout, groups, k, dtype, contiguous=True, bias=True):
    x = randn(b, cin, grid[0] * patch[0], grid[1] * patch[1], dtype=dtype, contiguous=contiguous)
    weight = randn(b, *grid, cout, cin // groups, k, k, dtype=dtype, scale=0.3)
    leaves = [x.requires_grad_(), weight.requires_grad_()]
    if bias:
        leaves.append(randn(b, *grid, cout, dtype=dtype).requires_grad_())
    return leaves


@pytest.mark.parametrize("b,grid,patch,cin,cout,groups,k,mode,dtype,contiguous", BACKWARD_CASES)
def test_patch_conv2d_backward_matches_reference(b, grid, patch, cin, cout, groups, k, mode, dtype,
                                                 contiguous):
    dtype = DTYPES[dtype]
    x, weight, bias = _inputs(b, grid, patch, cin, cout, groups, k, dtype, contiguous)
    dout = randn(b, cout, *x.shape[2:], dtype=dtype)
    got = torch.autograd.grad(kernels.patch_conv2d(x, weight, bias, padding_mode=mode, groups=groups),
                              (x, weight, bias), dout)
    # the reference in float32 on the same (rounded) values
    leaves = [t.detach().float().requires_grad_() for t in (x, weight, bias)]
    ref = torch.autograd.grad(ops.patch_conv2d(*leaves, padding_mode=mode, groups=groups),
                              leaves, dout.float())
    for name, g, r in zip(("x", "weight", "bias"), got, ref):
        assert g.dtype == dtype, name
        assert_grads_match(g, r, dtype, name)


def test_patch_conv2d_backward_several_pixel_and_channel_blocks(small_pixel_blocks, small_channel_blocks):
    # k x k dense, depthwise, 1x1 on a dot, 1x1 on multiply-adds (5 and 10 channels per group)
    for groups, k, mode in ((2, 3, "reflect"), (20, 3, "replicate"), (1, 1, "zeros"), (4, 1, "reflect")):
        x, weight, bias = _inputs(1, (1, 2), (5, 6), 20, 40 if groups != 20 else 20, groups, k,
                                  torch.float32)
        dout = torch.randn(1, weight.shape[3], 5, 12, device=DEVICE)
        got = torch.autograd.grad(kernels.patch_conv2d(x, weight, bias, padding_mode=mode, groups=groups),
                                  (x, weight, bias), dout)
        ref = torch.autograd.grad(ops.patch_conv2d(x, weight, bias, padding_mode=mode, groups=groups),
                                  (x, weight, bias), dout)
        for name, g, r in zip(("x", "weight", "bias"), got, ref):
            assert_grads_match(g, r, torch.float32, f"{name} (groups {groups}, k {k}, {mode})")


def test_patch_conv2d_backward_computes_only_the_gradients_asked_for():
    x, weight, bias = _inputs(1, (2, 2), (3, 3), 4, 6, 1, 3, torch.float32)
    out = kernels.patch_conv2d(x, weight.detach(), padding_mode="replicate")
    (dx,) = torch.autograd.grad(out, (x,), torch.ones_like(out))
    ref = torch.autograd.grad(ops.patch_conv2d(x, weight.detach(), padding_mode="replicate"), (x,),
                              torch.ones_like(out))[0]
    assert_grads_match(dx, ref, torch.float32, "x")
    out = kernels.patch_conv2d(x.detach(), weight, bias)
    dw, db = torch.autograd.grad(out, (weight, bias), torch.ones_like(out))
    assert dw.shape == weight.shape and db.shape == bias.shape
    assert torch.allclose(db, torch.full_like(db, 9.0))      # every patch has 3 x 3 pixels


@pytest.mark.parametrize("groups,k,mode,patch", [(2, 3, "reflect", (2, 3)), (4, 3, "replicate", (1, 2)),
                                                 (1, 5, "zeros", (3, 2))])
def test_patch_conv2d_gradcheck_float64(groups, k, mode, patch):
    leaves = _inputs(1, (1, 2), patch, 4, 4, groups, k, torch.float64)

    def conv(x, weight, bias):
        return kernels.patch_conv2d(x, weight, bias, padding_mode=mode, groups=groups)

    assert torch.autograd.gradcheck(conv, leaves, fast_mode=True)


def test_patch_conv2d_backward_is_deterministic():
    x, weight, bias = _inputs(1, (1, 2), (4, 4), 6, 6, 1, 3, torch.float32)
    dout = torch.randn(1, 6, 4, 8, device=DEVICE)
    first = torch.autograd.grad(kernels.patch_conv2d(x, weight, bias), (x, weight, bias), dout)
    second = torch.autograd.grad(kernels.patch_conv2d(x, weight, bias), (x, weight, bias), dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients_accumulate_in_float32(dtype):
    """Summing 4096 ones stalls at 2048 in float16 (256 in bfloat16); the kernels accumulate in
    float32, so the kernel and bias gradients of a 64 x 64 patch are exactly 4096."""
    x = torch.ones(1, 1, 64, 64, device=DEVICE, dtype=dtype)
    weight = torch.ones(1, 1, 1, 1, 1, 1, 1, device=DEVICE, dtype=dtype, requires_grad=True)
    bias = torch.zeros(1, 1, 1, 1, device=DEVICE, dtype=dtype, requires_grad=True)
    out = kernels.patch_conv2d(x, weight, bias)
    dw, db = torch.autograd.grad(out, (weight, bias), torch.ones_like(out))
    assert dw.item() == 4096 and db.item() == 4096


def test_patch_conv2d_takes_float64_only_unfused():
    x = randn(1, 4, 8, 8, dtype=torch.float64)
    w = randn(1, 2, 2, 3, 4, 1, 1, dtype=torch.float64)
    assert kernels.patch_conv2d(x, w).dtype == torch.float64
    with pytest.raises(TypeError, match="float64"):
        kernels.meta_patch_conv(x, randn(1, 16, 2, 2, dtype=torch.float64), randn(12, 16, 1, 1),
                                out_channels=3)
    with pytest.raises(TypeError, match="floating-point"):
        kernels.patch_conv2d(x, w.long())


# (B, grid, patch, Cin, Cout, groups, k, padding mode, generator groups, signal offset, row start)
GENERATED_CASES = [
    (2, (2, 3), (2, 2), 12, 8, 1, 1, "reflect", 4, 3, 5),
    (1, (2, 2), (3, 4), 6, 6, 6, 3, "reflect", 2, 0, 0),
    (1, (1, 2), (4, 3), 4, 5, 1, 3, "replicate", 1, 8, 2),
]


@pytest.mark.parametrize("b,grid,patch,cin,cout,groups,k,mode,ggroups,offset,start", GENERATED_CASES)
def test_generated_patch_conv2d_matches_reference(b, grid, patch, cin, cout, groups, k, mode, ggroups,
                                                  offset, start):
    """The training op: forward as ops.meta_patch_conv (no affine), gradients of x, the whole
    signal and the generator weight as the reference's autograd."""
    x = randn(b, cin, grid[0] * patch[0], grid[1] * patch[1]).requires_grad_()
    signal = randn(b, offset + 16 + 3, *grid).requires_grad_()
    rows = -(-(start + cout * cin // groups * k * k + 2) // ggroups) * ggroups
    gen = randn(rows, 16 // ggroups, 1, 1, scale=(ggroups / 16) ** 0.5).requires_grad_()
    kw = dict(out_channels=cout, signal_offset=offset, generator_groups=ggroups, row_start=start,
              groups=groups, kernel_size=k, padding_mode=mode)
    got = kernels.generated_patch_conv2d(x, signal, gen, **kw)
    ref = ops.meta_patch_conv(x, signal, gen, **kw)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    dout = torch.randn_like(ref)
    for name, g, r in zip(("x", "signal", "generator"), torch.autograd.grad(got, (x, signal, gen), dout),
                          torch.autograd.grad(ref, (x, signal, gen), dout)):
        assert_grads_match(g, r, torch.float32, name)


# (B, grid, patch, Cin, Cout, groups, generator groups, signal offset, row start, dtype): dense
# 1x1 whose kernel rows (Cin / groups) are not a multiple of 16 bytes, so the generator
# pads them (18 -> 20 in float32, 22 -> 24 and 18 -> 24 in 16-bit) and the convolution reads them
# in place; with a channel tail in both reductions (22 = 16 + 6; 17 output channels = 16 + 1)
PADDED_CASES = [
    (2, (2, 2), (4, 4), 36, 32, 2, 2, 3, 5, "fp32"),
    (1, (1, 2), (4, 8), 22, 17, 1, 1, 0, 0, "fp32"),
    (1, (2, 1), (4, 4), 22, 16, 1, 3, 1, 2, "bf16"),
    (1, (1, 2), (4, 4), 18, 16, 1, 2, 0, 3, "fp16"),
    # on multiply-adds, whose last input-channel block reads on into the padding: 1- and
    # 2-pixel patches (hyperseg-m's L0 / L1), and 4-pixel ones; 17 and 16 output channels per group
    (2, (3, 2), (1, 1), 18, 20, 1, 2, 2, 1, "fp16"),
    (1, (2, 2), (1, 2), 42, 34, 2, 1, 0, 3, "fp32"),
    (1, (2, 2), (2, 2), 44, 32, 2, 3, 1, 0, "bf16"),
]


@pytest.mark.parametrize("b,grid,patch,cin,cout,groups,ggroups,offset,start,dtype", PADDED_CASES)
def test_generated_patch_conv2d_on_padded_rows(b, grid, patch, cin, cout, groups, ggroups, offset,
                                               start, dtype):
    from hyperseg.kernels.generated_patch_conv import GeneratedPatchConv2dFunction
    from hyperseg.kernels.patch_conv import padded_row
    dtype = DTYPES[dtype]
    x = randn(b, cin, grid[0] * patch[0], grid[1] * patch[1], dtype=dtype).requires_grad_()
    signal = randn(b, offset + 18 + 2, *grid, dtype=dtype).requires_grad_()
    rows = -(-(start + cout * cin // groups + 3) // ggroups) * ggroups
    gen = randn(rows, 18 // ggroups, 1, 1, scale=(ggroups / 18) ** 0.5,
                dtype=dtype).requires_grad_()
    kw = dict(out_channels=cout, signal_offset=offset, generator_groups=ggroups, row_start=start,
              groups=groups, kernel_size=1)
    # the kernels are generated padded
    cin_g = cin // groups
    stride = padded_row(x.element_size(), cin_g, cout // groups, 1)
    assert stride > cin_g and stride * x.element_size() % 16 == 0
    kernels_ = GeneratedPatchConv2dFunction._kernels(
        x, signal[:, offset:offset + 18], gen, cout, ggroups, start, groups, 1)
    assert kernels_.shape == (b, *grid, cout, cin_g, 1, 1) and kernels_.stride(3) == stride
    got = kernels.generated_patch_conv2d(x, signal, gen, **kw)
    refs = [t.detach().float().requires_grad_() for t in (x, signal, gen)]
    ref = ops.meta_patch_conv(*refs, **kw)
    assert_matches(got, ref, dtype)
    dout = randn(*ref.shape, dtype=dtype)
    for name, g, r in zip(("x", "signal", "generator"),
                          torch.autograd.grad(got, (x, signal, gen), dout),
                          torch.autograd.grad(ref, refs, dout.float())):
        assert_grads_match(g, r, dtype, name)


def test_padded_row():
    """Rows are padded to 16 bytes only where the convolution reads them as vectors: dense 1x1
    with at least 16 input and output channels per group (on dots, or multiply-adds over tiny
    patches)."""
    from hyperseg.kernels.patch_conv import padded_row
    assert padded_row(4, 82, 64, 1) == 84
    assert padded_row(2, 82, 64, 1) == 88                  # (hyperseg-m L0: 1-pixel patches)
    assert padded_row(2, 94, 32, 1) == 96
    assert padded_row(8, 21, 16, 1) == 22
    assert padded_row(2, 82, 8, 1) == 82                   # 8 output channels per group
    assert padded_row(2, 48, 16, 1) == 48                  # aligned already
    assert padded_row(2, 82, 64, 3) == 82 * 9              # k x k: rows strided by the taps
    assert padded_row(2, 1, 1, 1) == 1                     # depthwise
    assert padded_row(2, 6, 32, 1) == 6                    # fewer than 16 input channels


# the input gradient's dot reads the NaN padding into accumulator rows it never stores: numpy
# (the interpreter's matmul) warns about them
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("grid", [(2, 2), (4, 4)], ids=["dots", "multiply-adds"])
def test_patch_conv2d_reads_padded_kernel_rows_in_place(grid):
    """``kernel_rows``: kernels whose rows are padded (generated_patch_conv2d's layout) are read
    in place, and the padding never reaches a result (NaN there changes nothing: the
    multiply-adds of 4-pixel patches read it, and zero it in registers); other layouts are
    copied. The kernel gradient comes back contiguous."""
    from hyperseg.kernels.patch_conv import kernel_rows, padded_strides
    b, cin, cout = 1, 22, 18
    x = randn(b, cin, 8, 8).requires_grad_()
    buf = torch.full((b, *grid, cout, 24), float("nan"), device=x.device)
    w = randn(b, *grid, cout, cin, 1, 1)
    buf[..., :cin] = w.flatten(4)
    padded = buf.as_strided(w.shape, padded_strides(w.shape, 24))
    assert kernel_rows(padded)[0] is padded and kernel_rows(padded)[1] == 24
    assert kernel_rows(w)[1] == cin
    swapped = w.transpose(1, 2)                   # not the padded layout: copied
    assert kernel_rows(swapped)[0].is_contiguous() and kernel_rows(swapped)[1] == cin
    out = torch.ops.hyperseg.patch_conv2d(x, padded, None, "reflect", 1)
    torch.testing.assert_close(out, torch.ops.hyperseg.patch_conv2d(x, w, None, "reflect", 1))
    assert not out.isnan().any()
    dout = randn(*out.shape)
    dx, dw, _ = torch.ops.hyperseg.patch_conv2d_backward(dout, x, padded, True, True, False,
                                                         "reflect", 1)
    rx, rw, _ = torch.ops.hyperseg.patch_conv2d_backward(dout, x, w, True, True, False,
                                                         "reflect", 1)
    assert not dx.isnan().any() and dw.is_contiguous()
    torch.testing.assert_close(dx, rx)
    torch.testing.assert_close(dw, rw)
    torch.library.opcheck(torch.ops.hyperseg.patch_conv2d_backward.default,
                          (dout, x.detach(), padded, True, True, False, "reflect", 1))


@pytest.mark.parametrize("grid,patch,cin,cout,groups,k,dtype,stride", [
    ((1, 4), (4, 8), 6, 6, 6, 3, "fp16", 56),     # depthwise 3 x 3 (vector taps inside): 54 values
    ((2, 2), (3, 3), 5, 5, 5, 5, "fp32", 128),    # depthwise 5 x 5: 125
    ((2, 2), (4, 4), 22, 7, 1, 1, "bf16", 160),   # dense 1 x 1 with a tail (22 = 16 + 6): 154
    ((2, 2), (2, 2), 10, 6, 2, 3, "fp32", 277),   # dense 3 x 3: 270, any stride
])
def test_patch_conv2d_backward_writes_a_padded_patch_stride(grid, patch, cin, cout, groups, k,
                                                            dtype, stride):
    """With ``patch_stride`` (what generated_patch_conv2d asks for, so that the generator's
    gradient reads each patch's values as aligned vectors) the kernel gradient comes back as
    (B, GH, GW, patch_stride), each patch's values first, zeros after them: the contiguous
    gradient's, bitwise (same kernels, same order), from every store path of the weight-gradient
    kernel."""
    dtype = DTYPES[dtype]
    x, weight = _inputs(2, grid, patch, cin, cout, groups, k, dtype, bias=False)
    x, weight = x.detach(), weight.detach()
    dout = randn(2, cout, *x.shape[2:], dtype=dtype)
    op = torch.ops.hyperseg.patch_conv2d_backward
    dx, dw, db = op(dout, x, weight, True, True, True, "reflect", groups)
    px, pw, pb = op(dout, x, weight, True, True, True, "reflect", groups, stride)
    count = cout * (cin // groups) * k * k
    assert pw.shape == (2, *grid, stride) and pw.dtype == dw.dtype and pw.is_contiguous()
    assert torch.equal(pw[..., :count], dw.flatten(3))
    assert pw[..., count:].abs().sum() == 0
    assert torch.equal(px, dx) and torch.equal(pb, db)
    fake = op(*(t.to("meta") for t in (dout, x, weight)), False, True, False, "reflect", groups,
              stride)[1]
    assert fake.shape == pw.shape and fake.dtype == pw.dtype
    message = f"patch stride of {count - 1} cannot hold a patch's {count}"
    with pytest.raises(ValueError, match=message):
        op(dout, x, weight, False, True, False, "reflect", groups, count - 1)
    if k == 5:
        torch.library.opcheck(op.default, (dout, x, weight, False, True, False, "reflect", groups,
                                           stride))


def test_generated_patch_conv2d_gradcheck_float64():
    x = randn(1, 4, 4, 6, dtype=torch.float64).requires_grad_()
    signal = randn(1, 10, 2, 2, dtype=torch.float64).requires_grad_()
    gen = randn(40, 4, 1, 1, dtype=torch.float64).requires_grad_()

    def conv(x, signal, gen):
        return kernels.generated_patch_conv2d(x, signal, gen, out_channels=4, signal_offset=2,
                                              generator_groups=2, row_start=3, groups=4, kernel_size=3)

    assert torch.autograd.gradcheck(conv, (x, signal, gen), fast_mode=True)


def test_generated_patch_conv2d_errors():
    x, signal, gen = randn(1, 4, 8, 8), randn(1, 16, 2, 2), randn(12, 4, 1, 1)
    ok = dict(out_channels=3, generator_groups=4)
    assert kernels.generated_patch_conv2d(x, signal, gen, **ok).shape == (1, 3, 8, 8)
    with pytest.raises(TypeError, match="int64"):
        kernels.generated_patch_conv2d(x, signal.long(), gen, **ok)
    with pytest.raises(TypeError, match="int32"):
        kernels.generated_patch_conv2d(x.int(), signal, gen, **ok)
    with pytest.raises(ValueError, match="batch"):
        kernels.generated_patch_conv2d(randn(2, 4, 8, 8), signal, gen, **ok)
    with pytest.raises(ValueError, match="rows"):
        kernels.generated_patch_conv2d(x, signal, gen, **{**ok, "row_start": 2})
    with pytest.raises(ValueError, match="tile"):
        kernels.generated_patch_conv2d(randn(1, 4, 9, 8), signal, gen, **ok)


def test_dot_channels_split_a_reduction_into_dots_and_a_tail():
    from hyperseg.kernels.patch_conv import dot_channels
    # (channels, largest block) -> (channels in dots, block): the rest is the multiply-add tail
    assert dot_channels(22, 32) == (16, 16)
    assert dot_channels(52, 32) == (48, 16)
    assert dot_channels(68, 16) == (64, 16)
    assert dot_channels(64, 64) == (64, 64)      # a multiple of 16: no tail
    assert dot_channels(12, 16) == (12, 16)      # at most 16: one covering dot
    assert dot_channels(40, 64) == (32, 32)


@pytest.mark.parametrize("groups,k,dtype", [(1, 1, "fp32"), (2, 1, "bf16"), (2, 3, "fp32")])
def test_patch_conv2d_dots_and_channel_tail(small_pixel_blocks, small_channel_blocks, groups, k, dtype):
    # 50 input channels (25 per group): 48 in three 16-channel dots and a 2-channel tail (groups 2:
    # 16 + 9); 38 output channels: the 1x1 input gradient reduces over them, 32 + 6 (19: 16 + 3).
    # 3x3 (forward and weight-gradient tails over the taps) on fewer pixels: the interpreter's
    # dense 3x3 input gradient is slow.
    dtype = DTYPES[dtype]
    grid, patch = ((2, 2), (4, 8)) if k == 1 else ((1, 2), (4, 4))
    x, weight, bias = _inputs(1, grid, patch, 50, 38, groups, k, dtype)
    out = kernels.patch_conv2d(x, weight, bias, padding_mode="reflect", groups=groups)
    leaves = [t.detach().float().requires_grad_() for t in (x, weight, bias)]
    ref = ops.patch_conv2d(*leaves, padding_mode="reflect", groups=groups)
    assert_grads_match(out.float(), ref, dtype, "output")
    dout = randn(*out.shape, dtype=dtype)
    got = torch.autograd.grad(out, (x, weight, bias), dout)
    want = torch.autograd.grad(ref, leaves, dout.float())
    for name, g, r in zip(("x", "weight", "bias"), got, want):
        assert_grads_match(g, r, dtype, f"{name} (groups {groups}, k {k})")


@pytest.mark.parametrize("b,grid,patch,channels,mode,dtype,small", [
    (2, (3, 4), (4, 10), 20, "zeros", "fp32", False),     # 10-pixel rows (the v1 halo layout)
    (1, (3, 3), (5, 4), 18, "reflect", "fp32", True),     # 16-pixel blocks across patch rows, 2
                                                          # channel blocks
    (2, (2, 3), (4, 8), 12, "replicate", "fp16", False),  # vectors of 4
    (1, (4, 3), (3, 6), 6, "zeros", "bf16", True),        # 16-bit on vectors of 2; 2 patch rows inside
    (1, (3, 5), (2, 2), 17, "reflect", "fp16", False),    # one vector per patch row
])
def test_patch_conv2d_depthwise_vector_taps(b, grid, patch, channels, mode, dtype, small, monkeypatch):
    """3x3 depthwise patch_conv2d with patches an even number of pixels wide: the patches away
    from the left and right borders take their taps from aligned vectors shifted in registers in
    the forward, the input gradient (whose kernels come from the patch or, on its edge rows and
    columns, from a neighbour's) and the kernel gradient; the border columns the per-tap path.
    Every output and gradient against the reference's autograd."""
    from hyperseg.kernels import _common, patch_conv
    if small:       # several pixel blocks per patch and channel blocks per image
        monkeypatch.setattr(_common, "MAX_PIXEL_BLOCK", 16)
        monkeypatch.setattr(_common, "MAX_CHANNEL_BLOCK", 16)
    dtype = DTYPES[dtype]
    assert patch_conv.tap_vector(dtype, 3, patch[1], 16) > 1 and grid[1] >= 3
    x, weight, bias = _inputs(b, grid, patch, channels, channels, channels, 3, dtype)
    out = kernels.patch_conv2d(x, weight, bias, padding_mode=mode, groups=channels)
    leaves = [t.detach().float().requires_grad_() for t in (x, weight, bias)]
    ref = ops.patch_conv2d(*leaves, padding_mode=mode, groups=channels)
    assert_grads_match(out.float(), ref, dtype, "output")
    dout = randn(*out.shape, dtype=dtype)
    got = torch.autograd.grad(out, (x, weight, bias), dout)
    want = torch.autograd.grad(ref, leaves, dout.float())
    for name, g, r in zip(("x", "weight", "bias"), got, want):
        assert_grads_match(g, r, dtype, name)


def test_tap_vector_sizes():
    """Vectors of up to 8 bytes for 3x3 depthwise taps, the most the patch width and the pixel
    block allow (2 pixels at the least); 1 (the per-tap path) for odd widths, other kernel
    sizes and float64. The meta convolution's inference kernel takes only exact 8-byte ones."""
    from hyperseg.kernels._common import tap_vector
    assert tap_vector(torch.float32, 3, 10, 64) == 2 and tap_vector(torch.float16, 3, 8, 64) == 4
    assert tap_vector(torch.bfloat16, 3, 10, 64) == 2 and tap_vector(torch.float16, 3, 4, 2) == 2
    assert tap_vector(torch.float32, 3, 9, 64) == 1 and tap_vector(torch.float32, 5, 8, 64) == 1
    assert tap_vector(torch.float64, 3, 8, 64) == 1
    assert tap_vector(torch.float16, 3, 10, narrower=False) == 1
