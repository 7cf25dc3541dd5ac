"""Triton generate_weights (forward and backward) against hyperseg.ops.generate_weights."""
import importlib
import inspect
from types import SimpleNamespace

import pytest
import torch

from hyperseg import kernels, ops
from kernel_utils import (DEVICE, DTYPES, assert_grads_match, assert_matches, randn,  # noqa: F401
                          small_channel_blocks)

# (B, grid, signal channels, groups, generator rows, start, count, dtype)
CASES = [
    (1, (1, 1), 16, 1, 21, 0, 21, "fp32"),
    (2, (2, 3), 32, 4, 40, 5, 30, "fp32"),
    (3, (4, 4), 64, 32, 96, 0, 77, "fp32"),
    (2, (3, 5), 24, 8, 48, 13, 35, "fp16"),
    (1, (2, 3), 48, 16, 160, 37, 100, "bf16"),
    # the signal gradient on dots (>= 16 generated rows per group, 32 inputs): partial first and
    # last groups, 16-bit
    (2, (3, 4), 64, 2, 70, 9, 50, "fp16"),
    (1, (4, 4), 96, 3, 120, 20, 90, "bf16"),
    # odd rows per group (37), count a multiple of 8: the gradient kernels' row blocks start at
    # the group's first row rounded down to a 16-byte vector (on dots: 16 inputs per group; with
    # multiply-adds: 4), reading the neighbouring groups' rows beside the group's own
    (2, (3, 4), 64, 4, 148, 16, 112, "fp16"),
    (2, (3, 4), 64, 4, 148, 0, 148, "fp32"),
    (2, (2, 4), 16, 4, 148, 8, 136, "bf16"),
    (1, (4, 4), 16, 4, 148, 24, 96, "fp32"),
    # 13 signal inputs per group, as in most zoo generators, on dots: the signal gradient reads
    # the generator through a copy whose rows are padded to 16 values
    (2, (3, 4), 26, 2, 80, 7, 66, "fp16"),
    (1, (2, 4), 39, 3, 90, 0, 90, "fp32"),
]


def _leaves(b, grid, width, groups, rows, dtype):
    signal = randn(b, width, *grid, dtype=dtype).requires_grad_()
    weight = randn(rows, width // groups, 1, 1, scale=(groups / width) ** 0.5).requires_grad_()
    return signal, weight


@pytest.mark.parametrize("b,grid,width,groups,rows,start,count,dtype", CASES)
def test_generate_weights_matches_reference(b, grid, width, groups, rows, start, count, dtype):
    dtype = DTYPES[dtype]
    signal, weight = _leaves(b, grid, width, groups, rows, dtype)
    got = kernels.generate_weights(signal, weight, groups=groups, start=start, count=count)
    ref_signal = signal.detach().float().requires_grad_()
    ref_weight = weight.detach().clone().requires_grad_()
    ref = ops.generate_weights(ref_signal, ref_weight, groups=groups, start=start, count=count)
    assert got.shape == (b, *grid, count)
    assert_matches(got, ref, dtype)
    dout = randn(*got.shape, dtype=dtype)
    dsig, dgen = torch.autograd.grad(got, (signal, weight), dout)
    rsig, rgen = torch.autograd.grad(ref, (ref_signal, ref_weight), dout.float())
    assert dsig.dtype == dtype and dgen.dtype == torch.float32
    assert_grads_match(dsig, rsig, dtype, "signal")
    assert_grads_match(dgen, rgen, dtype, "generator weight")
    # rows outside start .. start + count were not generated: zero gradient
    assert dgen[:start].abs().sum() == 0 and dgen[start + count:].abs().sum() == 0


@pytest.mark.parametrize("width,groups,rows,start,count,dtype", [
    (64, 2, 70, 3, 60, "fp32"),
    # 29 rows per group, count a multiple of 8: the row blocks of groups 1-3 start 5, 2 and 7
    # rows before the group (fp16: 8-row alignment), and group 1 spans 3 blocks of 16; an odd
    # start shifts them
    (64, 4, 116, 8, 104, "fp16"), (16, 4, 116, 8, 104, "bf16"), (64, 4, 116, 8, 104, "fp32"),
    (64, 4, 116, 5, 104, "fp16"), (16, 4, 116, 11, 104, "fp32")])
def test_generate_weights_several_blocks(small_channel_blocks, width, groups, rows, start, count,
                                         dtype):
    dtype = DTYPES[dtype]
    signal, weight = _leaves(2, (3, 4), width, groups, rows, dtype)
    got = kernels.generate_weights(signal, weight, groups=groups, start=start, count=count)
    ref_signal = signal.detach().float().requires_grad_()
    ref_weight = weight.detach().clone().requires_grad_()
    ref = ops.generate_weights(ref_signal, ref_weight, groups=groups, start=start, count=count)
    assert_matches(got, ref, dtype)
    dout = randn(*got.shape, dtype=dtype)
    for name, g, r in zip(("signal", "weight"), torch.autograd.grad(got, (signal, weight), dout),
                          torch.autograd.grad(ref, (ref_signal, ref_weight), dout.float())):
        assert_grads_match(g, r, dtype, name)


# (signal channels, grid, groups, generator rows, start, count): the second has odd rows per
# group (7) and an even count, so its float64 row blocks start at even offsets
@pytest.mark.parametrize("width,grid,groups,rows,start,count", [
    (8, (1, 2), 2, 12, 2, 9), (9, (2, 2), 3, 21, 3, 16)])
def test_generate_weights_gradcheck_float64(width, grid, groups, rows, start, count):
    signal = randn(2, width, *grid, dtype=torch.float64).requires_grad_()
    weight = randn(rows, width // groups, 1, 1, dtype=torch.float64).requires_grad_()

    def generate(signal, weight):
        return kernels.generate_weights(signal, weight, groups=groups, start=start, count=count)

    assert torch.autograd.gradcheck(generate, (signal, weight), fast_mode=True)


@pytest.mark.parametrize("width,dtype", [(64, "fp16"), (16, "fp32")])
def test_a_nan_gradient_stays_in_its_rows(width, dtype):
    """The gradient kernels read the rows of neighbouring groups beside a group's own (aligned
    vectors) and discard them by selection: a NaN in one generated row's gradient reaches that
    row's generator gradient and its own group's signal gradient, nothing else, as in the
    reference."""
    dtype = DTYPES[dtype]
    groups, rows, start, count = 4, 148, 16, 112                # 37 rows per group
    signal, weight = _leaves(2, (2, 4), width, groups, rows, dtype)
    got = kernels.generate_weights(signal, weight, groups=groups, start=start, count=count)
    dout = randn(*got.shape, dtype=dtype)
    bad = 74 - start                    # row 74: the first of group 2, beside group 1's last
    dout[..., bad] = float("nan")
    dsig, dgen = torch.autograd.grad(got, (signal, weight), dout)
    spg = width // groups
    nan_channels = dsig.isnan().any(dim=(0, 2, 3)).nonzero().flatten().tolist()
    assert nan_channels == list(range(2 * spg, 3 * spg))
    assert dgen.isnan().any(dim=(1, 2, 3)).nonzero().flatten().tolist() == [74]
    ref_signal = signal.detach().float().requires_grad_()
    ref_weight = weight.detach().clone().requires_grad_()
    ref = ops.generate_weights(ref_signal, ref_weight, groups=groups, start=start, count=count)
    rsig, rgen = torch.autograd.grad(ref, (ref_signal, ref_weight), dout.float())
    keep = torch.ones(width, dtype=torch.bool)
    keep[2 * spg:3 * spg] = False
    assert_grads_match(dsig[:, keep], rsig[:, keep], dtype, "signal")
    assert_grads_match(dgen[torch.arange(rows) != 74], rgen[torch.arange(rows) != 74], dtype,
                       "generator weight")


GRADIENT_KERNELS = ("_generate_weights_signal_grad_kernel", "_generate_weights_weight_grad_kernel")


def _record_launches(monkeypatch, module, running=None):
    """Wrap the two gradient kernels of ``module`` so that each launch is appended, as
    (args by name, 3-D grid, kernel name), to the list returned (and its name to ``running``)."""
    launches = []

    def recorded(kernel):
        name = kernel.fn.__name__

        class Recorded:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    params = {k: v for k, v in kwargs.items() if k != "num_warps"}
                    bound = inspect.signature(kernel.fn).bind(*args, **params).arguments
                    grid3 = tuple(grid) + (1,) * (3 - len(grid))
                    launches.append(SimpleNamespace(args=bound, grid=grid3, name=name))
                    if running is not None:
                        running.append(name)
                    return kernel[grid](*args, **kwargs)
                return launch
        return Recorded()

    for name in GRADIENT_KERNELS:
        monkeypatch.setattr(module, name, recorded(getattr(module, name)))
    return launches


@pytest.mark.parametrize("width,groups,rows,start,count,dtype", [
    (64, 4, 116, 8, 104, "fp16"), (16, 4, 116, 8, 104, "fp32"), (64, 4, 116, 5, 104, "bf16"),
    (64, 2, 70, 9, 50, "fp16"), (32, 4, 40, 5, 30, "fp32")])
def test_backward_executed_work_counts_what_runs(monkeypatch, small_channel_blocks, width, groups,
                                                 rows, start, count, dtype):
    """``executed_work`` of the two gradient kernels (what the report's redundancy check reads)
    against the products their launches actually form, counted in the interpreter: every tile
    product (a dot or a multiply-add tile) of (M x K) by (K x N) adds M K N. 16-row blocks, so
    that a group's rows span several, as on a GPU."""
    from hyperseg.kernels import _common
    # (the module: the package's attribute of that name is the op)
    module = importlib.import_module("hyperseg.kernels.generate_weights")
    if not _common.interpreting():
        pytest.skip("counts the products in the Triton interpreter")
    counted, running = {}, []
    real_mac = module.mac

    def counting_mac(a, b, acc, *args):
        counted[running[-1]] = counted.get(running[-1], 0) + a.shape[0] * a.shape[1] * b.shape[1]
        return real_mac(a, b, acc, *args)

    monkeypatch.setattr(module, "mac", counting_mac)
    launches = _record_launches(monkeypatch, module, running)
    dtype = DTYPES[dtype]
    signal, weight = _leaves(2, (3, 4), width, groups, rows, dtype)
    got = kernels.generate_weights(signal, weight, groups=groups, start=start, count=count)
    torch.autograd.grad(got, (signal, weight), torch.ones_like(got))
    assert sorted(l.name for l in launches) == sorted(GRADIENT_KERNELS)
    for launch in launches:
        assert counted[launch.name] > 0
        executed = module.executed_work(launch.name, launch)["macs"]
        assert executed == counted[launch.name], launch.name


@pytest.mark.parametrize("dtype,start,count,stride,row_align", [
    ("fp16", 16, 126, 128, 8), ("bf16", 3, 90, 96, 8), ("fp32", 16, 126, 128, 4),
    ("fp16", 16, 126, 126, 2)])
def test_generate_weights_backward_reads_a_padded_patch_stride(monkeypatch, small_channel_blocks,
                                                               dtype, start, count, stride,
                                                               row_align):
    """The backward op takes each patch's count values' gradient at the start of a longer row
    (``generated_patch_conv2d`` pads it to 16 bytes): count 126 = 2 x 63 is 4-byte aligned in
    16-bit, 128 lets both kernels read 16-byte vectors. The padding (NaN here) is read beside
    the last group's rows and never reaches a gradient."""
    module = importlib.import_module("hyperseg.kernels.generate_weights")
    launches = _record_launches(monkeypatch, module)
    dtype = DTYPES[dtype]
    groups, rows = 4, 148                                        # 37 rows per group
    signal, weight = _leaves(2, (2, 4), 64, groups, rows, dtype)
    dout = randn(2, 2, 4, count, dtype=dtype)
    padded = torch.full((2, 2, 4, stride), float("nan"), dtype=dtype, device=DEVICE)
    padded[..., :count] = dout
    dsig, dgen = torch.ops.hyperseg.generate_weights_backward(
        padded, signal.detach(), weight.detach(), groups, start, count, True, True)
    assert [l.args["ROW_ALIGN"] for l in launches] == [row_align, row_align]
    assert all(l.args["patch_stride"] == stride for l in launches)
    ref_signal = signal.detach().float().requires_grad_()
    ref_weight = weight.detach().clone().requires_grad_()
    ref = ops.generate_weights(ref_signal, ref_weight, groups=groups, start=start, count=count)
    rsig, rgen = torch.autograd.grad(ref, (ref_signal, ref_weight), dout.float())
    assert not dsig.isnan().any() and not dgen.isnan().any()
    assert_grads_match(dsig, rsig, dtype, "signal")
    assert_grads_match(dgen, rgen, dtype, "generator weight")


@pytest.mark.parametrize("width,groups,dtype,stride", [
    (26, 2, "fp16", 16), (26, 2, "fp32", 16), (24, 2, "fp16", 16), (24, 2, "fp32", 12),
    (18, 2, "bf16", 16), (10, 2, "fp16", 5), (16, 2, "fp16", 8)])
def test_signal_gradient_reads_the_generator_through_padded_rows(monkeypatch, width, groups,
                                                                 dtype, stride):
    """The signal gradient's dots read each generator row (width / groups values: 13, 12, 9)
    from a copy padded by zeros to a multiple of 16 bytes (the weight itself where its rows
    already are one), so that its tiles are aligned vectors; the multiply-adds (5 and 8 inputs)
    read the rows where they lie, value by value. The generator here has the signal's dtype, as
    under autocast. The gradients equal the reference's."""
    module = importlib.import_module("hyperseg.kernels.generate_weights")
    launches = _record_launches(monkeypatch, module)
    dtype = DTYPES[dtype]
    rows = 40 * groups
    signal, weight = _leaves(2, (3, 4), width, groups, rows, dtype)
    weight = weight.detach().to(dtype).requires_grad_()
    got = kernels.generate_weights(signal, weight, groups=groups, start=3, count=rows - 5)
    dout = randn(*got.shape, dtype=dtype)
    dsig, dgen = torch.autograd.grad(got, (signal, weight), dout)
    (launch,) = [l for l in launches if l.name == "_generate_weights_signal_grad_kernel"]
    assert launch.args["gen_stride"] == stride
    dots = not launch.args["FMA"]
    assert dots == (width // groups > 8)
    assert launch.args["GEN_ALIGN"] == (min(stride & -stride, 16 // weight.element_size()) if dots
                                        else 1)
    assert launch.args["gen_ptr"].shape == (rows, stride)
    if stride != width // groups:
        assert launch.args["gen_ptr"][:, width // groups:].abs().sum() == 0
    ref_signal = signal.detach().float().requires_grad_()
    ref_weight = weight.detach().float().requires_grad_()
    ref = ops.generate_weights(ref_signal, ref_weight, groups=groups, start=3, count=rows - 5)
    rsig, rgen = torch.autograd.grad(ref, (ref_signal, ref_weight), dout.float())
    assert_grads_match(dsig, rsig, dtype, "signal")
    assert_grads_match(dgen, rgen, dtype, "generator weight")


def test_padded_rows_pads_to_16_bytes_and_copies_only_when_needed():
    from hyperseg.kernels.generate_weights import padded_rows
    weight = torch.arange(26.0).reshape(2, 13)
    padded, stride = padded_rows(weight)
    assert stride == 16 and padded.shape == (2, 16) and padded.is_contiguous()
    assert torch.equal(padded[:, :13], weight) and padded[:, 13:].abs().sum() == 0
    assert padded_rows(weight.half())[1] == 16 and padded_rows(weight[:, :12].contiguous())[1] == 12
    aligned = torch.zeros(3, 8, dtype=torch.bfloat16)
    assert padded_rows(aligned)[0] is aligned
    assert padded_rows(torch.zeros(3, 3, dtype=torch.float64))[1] == 4


def test_gradient_stride_rounds_up_to_16_bytes():
    from hyperseg.kernels.generate_weights import gradient_stride
    assert [gradient_stride(n, 2) for n in (882, 126, 90, 128, 1)] == [888, 128, 96, 128, 8]
    assert [gradient_stride(n, 4) for n in (882, 126, 54, 180)] == [884, 128, 56, 180]
    assert gradient_stride(7, 8) == 8


def test_generate_weights_backward_is_deterministic():
    signal, weight = _leaves(2, (2, 3), 32, 4, 40, torch.float32)
    dout = torch.randn(2, 2, 3, 40, device=DEVICE)
    first = torch.autograd.grad(kernels.generate_weights(signal, weight, groups=4), (signal, weight), dout)
    second = torch.autograd.grad(kernels.generate_weights(signal, weight, groups=4), (signal, weight), dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_generate_weights_errors():
    signal, weight = randn(1, 16, 2, 2), randn(12, 4, 1, 1)
    with pytest.raises(ValueError, match="signal must have shape"):
        kernels.generate_weights(signal[0], weight, groups=4)
    with pytest.raises(ValueError, match="generator weight must have shape"):
        kernels.generate_weights(signal, weight[..., 0], groups=4)
    with pytest.raises(ValueError, match="groups"):
        kernels.generate_weights(signal, weight, groups=5)
    with pytest.raises(ValueError, match="signal has 16"):
        kernels.generate_weights(signal, weight, groups=2)
    with pytest.raises(ValueError, match="exceed"):
        kernels.generate_weights(signal, weight, groups=4, start=4, count=10)
    with pytest.raises(TypeError, match="int64"):
        kernels.generate_weights(signal.long(), weight, groups=4)
    with pytest.raises(TypeError, match="floating-point"):
        kernels.generate_weights(signal, weight.long(), groups=4)
    with pytest.raises(ValueError, match="device"):
        kernels.generate_weights(signal, torch.empty(12, 4, 1, 1, device="meta"), groups=4)


def test_alignment_of_row_lengths_and_offsets():
    """``alignment``: the largest power of two up to 16 dividing n, which the kernels round their
    runtime sizes down to (so 0, divisible by anything, is 16, and an odd n is 1)."""
    from hyperseg.kernels._common import alignment
    assert [alignment(n) for n in (0, 1, 2, 6, 12, 24, 48, 64, 1054, 5248)] == \
        [16, 1, 2, 2, 4, 8, 16, 16, 2, 16]
    for n in range(0, 200):
        a = alignment(n)
        assert n % a == 0 and a in (1, 2, 4, 8, 16) and (a == 16 or n % (2 * a))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_generate_weights_op_pads_rows(dtype):
    """The op behind ``generated_patch_conv2d``: rows of ``row`` generated values stored every
    ``row_stride`` columns, as the reference's values in place, zeros between the runs."""
    dtype = DTYPES[dtype]
    signal, weight = _leaves(2, (2, 3), 24, 3, 90, dtype)
    row, stride, start, count = 18, 24, 4, 72                   # 4 runs of 18 (groups of 30 rows)
    got = torch.ops.hyperseg.generate_weights(signal.detach(), weight.detach().to(dtype), 3, start,
                                              count, row, stride)
    ref = ops.generate_weights(signal.detach().float(), weight.detach(), groups=3, start=start,
                               count=count)
    assert got.shape == (2, 2, 3, count // row * stride)
    runs = got.view(2, 2, 3, count // row, stride)
    assert_matches(runs[..., :row].reshape(2, 2, 3, count), ref, dtype)
    assert runs[..., row:].abs().sum() == 0
    # unpadded (row_stride == row): the plain layout
    plain = torch.ops.hyperseg.generate_weights(signal.detach(), weight.detach().to(dtype), 3,
                                                start, count, count, count)
    assert plain.shape == (2, 2, 3, count)
    assert_matches(plain, ref, dtype)
    # the fake implementation (torch.compile) gives the padded shape; schema, fake and dispatch
    args = (signal.detach(), weight.detach().to(dtype), 3, start, count, row, stride)
    meta = torch.ops.hyperseg.generate_weights(*(a.to("meta") if torch.is_tensor(a) else a
                                                 for a in args))
    assert meta.shape == got.shape and meta.dtype == got.dtype
    torch.library.opcheck(torch.ops.hyperseg.generate_weights.default, args)


def test_generation_tiles_on_a_gpu(monkeypatch):
    """The forward's tiles on a GPU: 32 patches whenever there are more than 16, also where 16
    would pad fewer (656 = 41 x 16, a 16-patch bf16 tile spills 4 bytes with Triton 3.6)."""
    from hyperseg.kernels import _common
    from hyperseg.kernels.generate_weights import generation_tiles
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    assert generation_tiles(656, 1536) == (32, 64)
    assert generation_tiles(8192, 48) == (32, 64)
    assert generation_tiles(12, 40) == (16, 64)
    assert generation_tiles(17, 16) == (32, 16)
    assert _common.tight_block(656, 32) == 16          # what the tight rule would have taken
