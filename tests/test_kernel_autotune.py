"""On a GPU the fused kernels are autotuned over warps per program; under the interpreter they are
launched with a fixed configuration."""
import triton

from hyperseg.kernels import _common


def _kernel():
    @triton.jit
    def copy(x_ptr, y_ptr, N: triton.language.constexpr):
        i = triton.language.arange(0, N)
        triton.language.store(y_ptr + i, triton.language.load(x_ptr + i))
    return copy


def test_autotuned_on_a_gpu(monkeypatch):
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    tuned = _common.autotuned(_kernel(), ("N",), warps=(8, 16))
    assert isinstance(tuned, triton.runtime.Autotuner)
    assert [c.num_warps for c in tuned.configs] == [8, 16]
    assert tuned.keys == ["N"]
    assert _common.launch_options(tuned, 4) == {}          # the configuration chooses


def test_fixed_launch_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(_common, "interpreting", lambda: True)
    kernel = _kernel()
    assert _common.autotuned(kernel, ("N",)) is kernel
    assert _common.launch_options(kernel, 4) == {"num_warps": 4}


def _warps_left(prune, configs, **args):
    return sorted({c.num_warps for c in prune(configs, args)})


def test_many_patches_warps_by_generation_and_tile():
    """The configurations the many-patches kernel's autotuner may time (what the kernel report
    compiles): IEEE dots 8 warps only for 4,096 generated weights, else 4; tensor-core generation
    4 or 8 from 512 weights, 4 below; multiply-add generation 4."""
    from hyperseg.kernels.meta_patch_conv import _many_patches_warps
    configs = [triton.Config({}, num_warps=w) for w in (4, 8)]
    tile = dict(BLOCK_O=2, BLOCK_C=32, BLOCK_N=64)                       # 4,096 weights
    small = dict(BLOCK_O=1, BLOCK_C=16, BLOCK_N=16)                      # 256
    assert _warps_left(_many_patches_warps, configs, DOT_MODE=1, GEN_DOT=True, **tile) == [8]
    assert _warps_left(_many_patches_warps, configs, DOT_MODE=1, GEN_DOT=True,
                       BLOCK_O=1, BLOCK_C=32, BLOCK_N=64) == [4]
    assert _warps_left(_many_patches_warps, configs, DOT_MODE=1, GEN_DOT=False, **small) == [4]
    for mode in (0, 3):
        assert _warps_left(_many_patches_warps, configs, DOT_MODE=mode, GEN_DOT=True, **tile) == [4, 8]
        assert _warps_left(_many_patches_warps, configs, DOT_MODE=mode, GEN_DOT=True,
                           BLOCK_O=1, BLOCK_C=32, BLOCK_N=16) == [4, 8]      # 512
        assert _warps_left(_many_patches_warps, configs, DOT_MODE=mode, GEN_DOT=True, **small) == [4]
        assert _warps_left(_many_patches_warps, configs, DOT_MODE=mode, GEN_DOT=False, **tile) == [4]


def test_inverted_residual_warps_by_tile_and_dots():
    from hyperseg.kernels.meta_inverted_residual import _enough_work_per_warp
    configs = [triton.Config({}, num_warps=w) for w in (8, 16)]
    for mode in (0, 1, 3):                                      # tiles under 128 pixels: 8 warps
        assert _warps_left(_enough_work_per_warp, configs, BAND=4, BLOCK_W=16, BLOCK_CO=64,
                           DOT_MODE=mode) == [8]
    assert _warps_left(_enough_work_per_warp, configs, BAND=8, BLOCK_W=16, BLOCK_CO=16,
                       DOT_MODE=1) == [16]                      # IEEE, 2,048 accumulators
    assert _warps_left(_enough_work_per_warp, configs, BAND=8, BLOCK_W=16, BLOCK_CO=8,
                       DOT_MODE=1) == [8, 16]
    for mode in (0, 3):
        assert _warps_left(_enough_work_per_warp, configs, BAND=8, BLOCK_W=16, BLOCK_CO=16,
                           DOT_MODE=mode) == [8, 16]
        assert _warps_left(_enough_work_per_warp, configs, BAND=8, BLOCK_W=32, BLOCK_CO=16,
                           DOT_MODE=mode) == [16]               # patches 32 pixels wide
