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
