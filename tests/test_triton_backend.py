"""The model on backend="triton" against backend="torch", and when each is used."""
import pytest
import torch
import torch.nn.functional as F

import hyperseg
from hyperseg import kernels
from hyperseg.calibration import calibrate_batchnorm
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
    """Count calls of the kernels' ops."""
    calls = []
    for name in ("meta_patch_conv", "meta_inverted_residual", "generated_patch_conv2d"):
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


def test_training_and_gradients_run_on_the_differentiable_kernels(counted):
    """In train mode, or when autograd records, backend "triton" runs the differentiable
    generated_patch_conv2d (one per kernel-1 block, three per inverted residual), never the fused
    inference kernels. Gradients are compared with the reference in test_triton_training.py."""
    model = hyperseg.build("hyperseg-m", backend="triton").to(DEVICE)
    x = torch.randn(1, 3, 64, 64, device=DEVICE)
    composed = ["generated_patch_conv2d"] * (3 + 3 * 2)
    assert model.resolve_backend(x) == "triton"
    model(x)                                      # eval mode, but parameters require grad
    assert counted == composed
    counted.clear()
    model.train()
    with torch.no_grad():                         # train mode: batch statistics, no fusion
        model(torch.randn(2, 3, 64, 64, device=DEVICE))
    assert counted == composed
    counted.clear()
    model.eval()
    with torch.inference_mode():
        model(x)
    assert counted == ["meta_patch_conv"] * 3 + ["meta_inverted_residual"] * 2


def test_auto_backend_uses_triton_only_for_cuda_inference():
    model = hyperseg.build("hyperseg-m", backend="auto")
    with torch.no_grad():
        assert model.resolve_backend(torch.zeros(1, 3, 64, 64)) == "torch"
    if torch.cuda.is_available():
        x = torch.zeros(1, 3, 64, 64, device="cuda")
        model.cuda()
        with torch.no_grad():
            assert model.resolve_backend(x) == "triton"
        assert model.resolve_backend(x) == "torch"        # autograd records: the reference
        model.train()
        with torch.no_grad():
            assert model.resolve_backend(x) == "torch"


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
