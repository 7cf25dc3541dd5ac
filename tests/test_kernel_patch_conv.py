"""Triton patch_conv2d and meta_patch_conv against the reference ops."""
import pytest
import torch
import torch.nn.functional as F

from hyperseg import kernels, ops
from kernel_utils import DEVICE, DTYPES, assert_matches, randn, small_pixel_blocks  # noqa: F401

# (B, grid, patch, Cin, Cout, groups, k, padding mode, dtype, contiguous x)
PATCH_CONV_CASES = [
    (1, (1, 1), (1, 1), 3, 21, 1, 1, "zeros", "fp32", True),
    (2, (2, 3), (4, 5), 21, 34, 1, 3, "reflect", "fp32", True),
    (3, (4, 4), (2, 3), 34, 82, 2, 3, "replicate", "fp32", False),
    (1, (3, 5), (3, 2), 82, 21, 1, 1, "reflect", "fp16", True),
    (2, (2, 3), (16, 16), 6, 9, 3, 5, "zeros", "bf16", True),
    (1, (1, 1), (16, 8), 21, 21, 21, 3, "reflect", "fp32", False),
    (2, (4, 4), (1, 1), 3, 6, 3, 3, "replicate", "fp32", True),
    (3, (3, 5), (5, 7), 10, 4, 2, 3, "reflect", "bf16", False),
    (2, (2, 3), (4, 4), 34, 34, 34, 3, "zeros", "fp16", True),
    (1, (2, 3), (7, 3), 5, 3, 1, 5, "replicate", "fp32", True),
    # 1x1 on a dot (>= 16 channels and pixels), and on multiply-adds (4-pixel patches; 6 output
    # channels per group)
    (2, (2, 2), (4, 8), 34, 40, 1, 1, "zeros", "fp32", True),
    (1, (2, 3), (2, 2), 40, 12, 2, 1, "reflect", "fp16", True),
]


@pytest.mark.parametrize("b,grid,patch,cin,cout,groups,k,mode,dtype,contiguous", PATCH_CONV_CASES)
def test_patch_conv2d_matches_reference(b, grid, patch, cin, cout, groups, k, mode, dtype, contiguous):
    dtype = DTYPES[dtype]
    x = randn(b, cin, grid[0] * patch[0], grid[1] * patch[1], dtype=dtype, contiguous=contiguous)
    weight = randn(b, *grid, cout, cin // groups, k, k, dtype=dtype, scale=0.3)
    bias = randn(b, *grid, cout, dtype=dtype)
    got = kernels.patch_conv2d(x, weight, bias, padding_mode=mode, groups=groups)
    ref = ops.patch_conv2d(x.float(), weight.float(), bias.float(), padding_mode=mode, groups=groups)
    assert_matches(got, ref, dtype)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate"])
@pytest.mark.parametrize("k,groups", [(1, 1), (3, 1), (3, 4), (5, 2)])
def test_patch_conv2d_with_one_kernel_everywhere_is_conv2d(mode, k, groups):
    x = randn(2, 4, 12, 10)
    kernel = randn(6 if groups != 4 else 4, 4 // groups, k, k, scale=0.3)
    weight = kernel.expand(2, 3, 2, *kernel.shape)
    got = kernels.patch_conv2d(x, weight, padding_mode=mode, groups=groups)
    padded = F.pad(x, (k // 2,) * 4, mode="constant" if mode == "zeros" else mode)
    assert_matches(got, F.conv2d(padded, kernel, groups=groups), torch.float32)


def test_patch_conv2d_several_pixel_blocks_per_patch(small_pixel_blocks):
    x = randn(2, 5, 14, 18)
    weight = randn(2, 2, 3, 7, 5, 3, 3, scale=0.3)
    assert_matches(kernels.patch_conv2d(x, weight), ops.patch_conv2d(x, weight), torch.float32)


# (B, grid, patch, Cin, Cout, groups, k, generator groups, signal offset, row start, act, dtype, contiguous)
META_CONV_CASES = [
    (1, (1, 1), (1, 1), 82, 64, 1, 1, 32, 0, 0, "relu", "fp32", True),
    (2, (2, 3), (2, 2), 34, 21, 1, 1, 4, 8, 5, "relu6", "fp32", False),
    (3, (4, 4), (1, 2), 21, 3, 1, 1, 1, 3, 0, None, "fp32", True),
    (2, (3, 5), (4, 3), 12, 12, 12, 3, 2, 4, 7, "relu6", "fp32", True),
    (1, (2, 3), (3, 3), 21, 34, 1, 1, 16, 0, 0, "relu", "bf16", True),
    (2, (2, 3), (5, 2), 6, 6, 6, 3, 4, 0, 3, "relu6", "fp16", False),
    (1, (2, 2), (4, 4), 8, 6, 2, 3, 2, 0, 0, "relu", "fp32", True),
    # 1x1 patches on the pixel kernel: several pixel blocks that cross images, output tiles whose
    # generator rows span two groups (rows per group 42 = 2 x Cin, shifted by row_start)
    pytest.param(2, (6, 8), (1, 1), 21, 10, 1, 1, 5, 2, 7, "relu", "fp32", True, id="pixel-groups-span"),
    pytest.param(2, (6, 8), (1, 1), 21, 10, 1, 1, 2, 2, 7, "relu", "fp32", True, id="pixel-dot-groups-span"),
    pytest.param(3, (5, 7), (1, 1), 40, 12, 1, 1, 4, 0, 0, None, "fp16", False, id="pixel-fp16"),
    # small patches (up to 8 pixels) on the same kernel, generation as outer products or a dot
    pytest.param(2, (3, 5), (2, 4), 13, 20, 1, 1, 4, 0, 3, "relu", "fp32", False, id="2x4-outer"),
    pytest.param(1, (4, 6), (2, 2), 30, 17, 1, 1, 2, 1, 0, "relu6", "bf16", True, id="2x2-dot"),
    # bands of patch rows: 12 rows in bands of 8 (the last one partial), dense and depthwise
    pytest.param(1, (2, 1), (12, 16), 18, 20, 1, 1, 2, 0, 0, "relu", "fp32", True, id="bands-dense"),
    pytest.param(2, (1, 2), (12, 16), 20, 20, 20, 3, 4, 0, 5, "relu6", "bf16", True, id="bands-depthwise"),
]


def generator_for(rows, signal_width, groups, dtype=torch.float32):
    rows = -(-rows // groups) * groups
    return randn(rows, signal_width // groups, 1, 1, dtype=dtype, scale=(groups / signal_width) ** 0.5)


@pytest.mark.parametrize("b,grid,patch,cin,cout,groups,k,ggroups,offset,start,act,dtype,contiguous",
                         META_CONV_CASES)
def test_meta_patch_conv_matches_reference(b, grid, patch, cin, cout, groups, k, ggroups, offset, start,
                                           act, dtype, contiguous):
    dtype = DTYPES[dtype]
    x = randn(b, cin, grid[0] * patch[0], grid[1] * patch[1], dtype=dtype, contiguous=contiguous)
    width = 32 if ggroups != 1 else 16
    signal = randn(b, offset + width + 4, *grid, dtype=dtype)
    count = cout * cin // groups * k * k
    gen = generator_for(start + count + 3, width, ggroups)
    scale, shift = torch.rand(cout, device=DEVICE) + 0.5, randn(cout)
    kw = dict(out_channels=cout, signal_offset=offset, generator_groups=ggroups, row_start=start,
              groups=groups, kernel_size=k, scale=scale, shift=shift, activation=act)
    got = kernels.meta_patch_conv(x, signal, gen, **kw)
    ref = ops.meta_patch_conv(x.float(), signal.float(), gen, **kw)
    assert_matches(got, ref, dtype)


def test_meta_patch_conv_without_affine():
    x = randn(2, 9, 12, 10)
    signal = randn(2, 24, 2, 2)
    gen = generator_for(9 * 7, 24, 3)
    kw = dict(out_channels=7, generator_groups=3)
    assert_matches(kernels.meta_patch_conv(x, signal, gen, **kw), ops.meta_patch_conv(x, signal, gen, **kw),
                   torch.float32)


def test_patch_conv2d_errors():
    x = randn(1, 4, 8, 8)
    w = randn(1, 2, 2, 3, 4, 3, 3)
    with pytest.raises(ValueError, match="tile"):
        kernels.patch_conv2d(x, randn(1, 3, 3, 3, 4, 1, 1))
    with pytest.raises(ValueError, match="kernel size"):
        kernels.patch_conv2d(x, randn(1, 2, 2, 3, 4, 2, 2))
    with pytest.raises(ValueError, match="groups"):
        kernels.patch_conv2d(x, w, groups=3)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.patch_conv2d(x, w, groups=2)
    with pytest.raises(ValueError, match="bias"):
        kernels.patch_conv2d(x, w, randn(1, 2, 2, 4))
    with pytest.raises(ValueError, match="batch"):
        kernels.patch_conv2d(randn(2, 4, 8, 8), w)
    with pytest.raises(ValueError, match="padding_mode"):
        kernels.patch_conv2d(x, w, padding_mode="circular")
    with pytest.raises(ValueError, match="reflect"):
        kernels.patch_conv2d(randn(1, 4, 2, 2), randn(1, 1, 1, 3, 4, 5, 5))
    with pytest.raises(ValueError, match=r"\(B, Cin, H, W\)"):
        kernels.patch_conv2d(randn(4, 8, 8), w)
    with pytest.raises(ValueError, match="weight must have shape"):
        kernels.patch_conv2d(x, randn(1, 2, 2, 3, 4, 3))
    with pytest.raises(TypeError, match="int"):
        kernels.patch_conv2d(x.int(), w)


def test_kernels_refuse_cpu_tensors_without_the_interpreter(monkeypatch):
    from hyperseg.kernels import _common
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.patch_conv2d(torch.randn(1, 4, 8, 8), torch.randn(1, 2, 2, 3, 4, 1, 1))


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.6", True), ("3.5.1", "2.5.0rc1", True), ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.4.6", False), ("3.8.0+git1", "2.5.2", False), ("3.10.0", "3.0.0", False),
    ("3.6rc1", "2.4rc2", True), ("3.7rc1", "2.4.1", False), ("3.6.0", "2.3rc1", False)])
def test_interpreter_versions_that_cannot_run_the_kernels(triton_version, numpy_version, refused):
    from hyperseg.kernels import _common
    problem = _common.interpreter_problem(triton_version, numpy_version)
    assert (problem is not None) == refused
    if refused:
        assert triton_version in problem and numpy_version in problem and "triton>=3.7" in problem


def test_kernels_refuse_cpu_tensors_on_an_interpreter_that_would_fail(monkeypatch):
    """Triton 3.6's interpreter with NumPy 2.4 fails inside a kernel with a TypeError about
    one-element arrays; the launch check names the versions and the fix instead."""
    from hyperseg.kernels import _common
    real = _common.interpreter_problem
    monkeypatch.setattr(_common, "interpreter_problem", lambda: real("3.6.0", "2.4.6"))
    with pytest.raises(RuntimeError, match="Triton 3.6.0 interpreter"):
        kernels.patch_conv2d(torch.randn(1, 4, 8, 8), torch.randn(1, 2, 2, 3, 4, 1, 1))


def test_kernels_refuse_mixed_devices():
    x = randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="device"):
        kernels.patch_conv2d(x, torch.empty(1, 2, 2, 3, 4, 1, 1, device="meta"))


def test_meta_patch_conv_errors():
    x = randn(1, 4, 8, 8)
    signal = randn(1, 16, 2, 2)
    gen = generator_for(12, 16, 4)
    ok = dict(out_channels=3, generator_groups=4)
    with pytest.raises(ValueError, match="rows"):
        kernels.meta_patch_conv(x, signal, gen, **{**ok, "row_start": 2})
    with pytest.raises(ValueError, match="signal channels"):
        kernels.meta_patch_conv(x, signal, gen, **{**ok, "signal_offset": 4})
    with pytest.raises(ValueError, match="groups"):
        kernels.meta_patch_conv(x, signal, gen, out_channels=3, generator_groups=5)
    with pytest.raises(ValueError, match="activation"):
        kernels.meta_patch_conv(x, signal, gen, **ok, activation="gelu")
    with pytest.raises(ValueError, match="scale and shift"):
        kernels.meta_patch_conv(x, signal, gen, **ok, scale=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="batch"):
        kernels.meta_patch_conv(randn(2, 4, 8, 8), signal, gen, **ok)
    with pytest.raises(ValueError, match="signal must have shape"):
        kernels.meta_patch_conv(x, signal[0], gen, **ok)
    with pytest.raises(ValueError, match="generator weight"):
        kernels.meta_patch_conv(x, signal, gen[..., 0, 0], **ok)
    with pytest.raises(ValueError, match="tile"):
        kernels.meta_patch_conv(randn(1, 4, 9, 8), signal, gen, **ok)


@pytest.mark.parametrize("width", [48, 192], ids=["outer-products", "dot"])
def test_meta_patch_conv_many_patches_tiles_span_groups(width):
    """1x1 patches with generator groups smaller than one output channel's rows (a tile spans
    several groups) and more outputs than one output block; generation with 3 signal inputs per
    group (outer products) and with 12 (a dot)."""
    x = randn(2, 24, 3, 5)
    signal = randn(2, width, 3, 5)
    gen = generator_for(24 * 20, width, 16)                 # 30 rows per group, Cin = 24
    kw = dict(out_channels=20, generator_groups=16)
    assert_matches(kernels.meta_patch_conv(x, signal, gen, **kw), ops.meta_patch_conv(x, signal, gen, **kw),
                   torch.float32)


@pytest.mark.parametrize("grid,patch,dtype", [
    ((5, 6), (1, 1), "fp32"),       # 6 columns: tiles of 2 columns x 32 rows, the last 5 rows used
    ((3, 12), (2, 2), "fp16"),      # tiles of 4 columns x 8 rows, 3 tile columns per grid row
    ((4, 7), (2, 3), "bf16"),       # odd grid width (1-column tiles); patch rows of 3, padded to 4
    ((2, 16), (4, 4), "fp32"),      # 16 columns: one tile per grid row
])
def test_meta_patch_conv_many_patches_tiles_of_grid_rows(grid, patch, dtype):
    """The many-patches kernel's tiles are whole runs of grid columns (the largest power of two
    dividing the grid's width) over several grid rows, the last tile of an image cut by its
    bottom; every patch is covered once, in every image of the batch."""
    import importlib
    mpc = importlib.import_module("hyperseg.kernels.meta_patch_conv")
    cfg = mpc.many_patches_plan(21, 8, 21 * 8, 4, patch, grid[1])
    assert grid[1] % cfg["TILE_W"] == 0 and cfg["BLOCK_N"] % cfg["TILE_W"] == 0
    assert cfg["TILE_W"] == min(cfg["BLOCK_N"], grid[1] & -grid[1])
    dtype = DTYPES[dtype]
    x = randn(3, 21, grid[0] * patch[0], grid[1] * patch[1], dtype=dtype)
    signal = randn(3, 12, *grid, dtype=dtype)
    gen = generator_for(21 * 8, 12, 3, dtype)
    kw = dict(out_channels=8, generator_groups=3, activation="relu")
    assert_matches(kernels.meta_patch_conv(x, signal, gen, **kw),
                   ops.meta_patch_conv(x.float(), signal.float(), gen.float(), **kw), dtype)


@pytest.mark.parametrize("grid,patch,channels,mode,dtype", [
    ((3, 4), (4, 4), 20, "reflect", "fp32"),      # vectors of 2; 20 channels: a partial block
    ((3, 5), (4, 2), 9, "zeros", "fp32"),         # patch 2 wide in tiles 4 wide (masked pairs)
    ((2, 3), (6, 8), 12, "replicate", "bf16"),    # vectors of 4, zeros beyond the top / bottom
    ((3, 3), (12, 16), 16, "zeros", "fp16"),      # bands of 8 rows, the last partial
    ((4, 6), (8, 4), 6, "reflect", "fp16"),       # one vector per patch row
])
def test_meta_patch_conv_depthwise_vector_taps(grid, patch, channels, mode, dtype):
    """3x3 depthwise meta convolution with patches a multiple of 8 bytes wide: the patches away
    from the left and right borders take their taps from aligned vectors shifted in registers,
    the border columns of patches through the padding; every patch against the reference."""
    import importlib
    mpc = importlib.import_module("hyperseg.kernels.meta_patch_conv")
    dtype = DTYPES[dtype]
    assert mpc.depthwise_vector(dtype, 3, patch[1]) > 1 and grid[1] >= 3
    x = randn(2, channels, grid[0] * patch[0], grid[1] * patch[1], dtype=dtype)
    signal = randn(2, 20, *grid, dtype=dtype)
    gen = generator_for(channels * 9 + 2, 16, 2, dtype)
    kw = dict(out_channels=channels, signal_offset=3, generator_groups=2, row_start=1,
              groups=channels, kernel_size=3, activation="relu6", padding_mode=mode)
    assert_matches(kernels.meta_patch_conv(x, signal, gen, **kw),
                   ops.meta_patch_conv(x.float(), signal.float(), gen.float(), **kw), dtype)


def test_depthwise_vector_sizes():
    """8-byte vectors for float32 / half precision 3x3 depthwise taps; the per-tap path for other
    kernel sizes, patch widths that are not a multiple of the vector, and float64."""
    import importlib
    vec = importlib.import_module("hyperseg.kernels.meta_patch_conv").depthwise_vector
    assert vec(torch.float32, 3, 8) == 2 and vec(torch.float16, 3, 4) == 4
    assert vec(torch.bfloat16, 3, 16) == 4
    assert vec(torch.float32, 3, 3) == 1 and vec(torch.float16, 3, 6) == 1
    assert vec(torch.float32, 5, 8) == 1 and vec(torch.float64, 3, 8) == 1


def test_generation_rows_give_each_thread_an_8_byte_vector():
    """Tiles of the per-patch generation: 64 generator rows, or enough rows that BLOCK_S inputs
    give every thread of the kernel's largest configuration 8 bytes of the generator."""
    from hyperseg.kernels._common import generation_rows
    assert generation_rows(16, 4, 8) == 64                  # 1,024 float32 on 256 threads
    assert generation_rows(4, 2, 16) == 512                 # 2,048 halves on 512 threads
    assert generation_rows(4, 4, 8) == 128 and generation_rows(8, 2, 8) == 128
    for block_s, size, warps in ((4, 2, 8), (32, 2, 16), (8, 4, 4), (16, 8, 8)):
        rows = generation_rows(block_s, size, warps)
        assert rows >= 64 and rows * block_s * size >= 8 * 32 * warps
