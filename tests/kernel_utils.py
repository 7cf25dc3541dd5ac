"""Shared helpers of the kernel tests: devices, tolerances, random inputs."""
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def tolerance(dtype: torch.dtype) -> float:
    """Allowed max |err| relative to max(1, max|ref|)."""
    return 1e-4 if dtype == torch.float32 else 2e-2


def assert_matches(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert got.dtype == dtype
    err = (got.float() - ref.float()).abs().max().item()
    bound = tolerance(dtype) * max(1.0, ref.float().abs().max().item())
    assert err <= bound, f"max |err| {err:.3e} > {bound:.3e}"


def randn(*shape, dtype=torch.float32, scale=1.0, contiguous=True):
    """Random normal tensor on DEVICE; non-contiguous (channels-last storage) when asked."""
    if contiguous or len(shape) != 4:
        return (torch.randn(*shape) * scale).to(DEVICE, dtype)
    b, c, h, w = shape
    t = (torch.randn(b, h, w, c) * scale).to(DEVICE, dtype).permute(0, 3, 1, 2)
    assert not t.is_contiguous()
    return t


@pytest.fixture
def small_pixel_blocks(monkeypatch):
    """Force 16-pixel blocks so that patches span several programs."""
    from hyperseg.kernels import _common
    monkeypatch.setattr(_common, "MAX_PIXEL_BLOCK", 16)


def assert_grads_match(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str = "") -> None:
    """Gradients: max |err| within 1e-4 (float32) or 5e-2 (float16 / bfloat16) of the largest
    reference gradient."""
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    scale = ref.float().abs().max().item()
    assert scale > 0, f"{name}: the reference gradient is zero, nothing is compared"
    err = (got.float() - ref.float()).abs().max().item()
    bound = (1e-4 if dtype in (torch.float32, torch.float64) else 5e-2) * scale
    assert err <= bound, f"{name}: max |err| {err:.3e} > {bound:.3e}"


@pytest.fixture
def small_channel_blocks(monkeypatch):
    """Force 16-channel tiles in the backward kernels so that channels span several blocks."""
    from hyperseg.kernels import _common
    monkeypatch.setattr(_common, "MAX_CHANNEL_BLOCK", 16)
