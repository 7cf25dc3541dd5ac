"""The model on backend="triton" against backend="torch", and when each is used."""
import pytest
import torch
import torch.nn.functional as F

import hyperseg
from hyperseg import kernels
from conftest import calibrate_batchnorm
from kernel_utils import DEVICE, assert_matches

SIZES = {"hyperseg-m-cityscapes": (64, 128), "hyperseg-s-cityscapes": (64, 128),
         "hyperseg-s-camvid": (64, 64), "hyperseg-l-camvid": (64, 64), "hyperseg-l-voc": (128, 128)}


@pytest.mark.parametrize("name", list(SIZES))
def test_zoo_model_triton_equals_torch(name):
    torch.manual_seed(0)
    x = torch.randn(1, 3, *SIZES[name], device=DEVICE)
    model = calibrate_batchnorm(hyperseg.build(name).to(DEVICE), x)
    with torch.no_grad():
        model.backend = "torch"
        ref = model(x)
        model.backend = "triton"
        got = model(x)
    assert ref.abs().max() > 1.0          # a meaningful comparison, not of near-zero logits
    assert_matches(got, ref, torch.float32)


@pytest.fixture
def counted(monkeypatch):
    """Count launches of the fused kernels."""
    calls = []
    for name in ("meta_patch_conv", "meta_inverted_residual"):
        original = getattr(kernels, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)
        monkeypatch.setattr(kernels, name, wrapper)
    return calls


def test_triton_backend_launches_one_kernel_per_v1_block(counted):
    model = hyperseg.build("hyperseg-m", backend="triton").to(DEVICE)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64, device=DEVICE))
    assert counted == ["meta_patch_conv"] * 3 + ["meta_inverted_residual"] * 2


def test_v01_blocks_run_three_fused_launches(counted):
    model = hyperseg.build("hyperseg-l", backend="triton").to(DEVICE)
    with torch.no_grad():
        model(torch.randn(1, 3, 128, 128, device=DEVICE))
    assert counted == ["meta_patch_conv"] * (2 + 3 * 4)


def test_gradients_and_training_use_the_reference(counted):
    """The kernels have no backward: with autograd recording, or in train mode, the reference
    runs, so gradients are those of the reference."""
    model = hyperseg.build("hyperseg-s-camvid", backend="triton").to(DEVICE)
    x = torch.randn(1, 3, 64, 64, device=DEVICE)
    assert model.resolve_backend(x) == "torch"            # grad mode on, parameters require grad
    loss = model(x).square().mean()
    loss.backward()
    assert counted == []
    grad = model.decoder.generators[0].weight.grad.clone()
    model.zero_grad()
    model.backend = "torch"
    model(x).square().mean().backward()
    torch.testing.assert_close(model.decoder.generators[0].weight.grad, grad)
    model.backend = "triton"
    with torch.no_grad():
        assert model.resolve_backend(x) == "triton"
        model.train()
        assert model.resolve_backend(x) == "torch"
        model.eval()
    with torch.inference_mode():
        assert model.resolve_backend(x) == "triton"


def test_auto_backend_uses_triton_only_for_cuda_tensors():
    model = hyperseg.build("hyperseg-m", backend="auto")
    with torch.no_grad():
        assert model.resolve_backend(torch.zeros(1, 3, 64, 64)) == "torch"


def test_triton_backend_with_padding_and_pyramid_input():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 50, 60, device=DEVICE)
    # calibrated on the zero-padded input the model actually sees; a random model is only well
    # conditioned on its calibration input, so no flip here (the flip itself is backend-agnostic)
    model = calibrate_batchnorm(hyperseg.build("hyperseg-s-camvid").to(DEVICE), F.pad(x, (0, 4, 0, 14)))
    model.tta_hflip = False
    with torch.no_grad():
        model.backend = "torch"
        ref = model([x])
        model.backend = "triton"
        got = model([x])
    assert got.shape == (1, 12, 50, 60)
    assert ref.abs().max() > 1.0
    assert_matches(got, ref, torch.float32)
