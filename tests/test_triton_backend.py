"""The model on backend="triton" against backend="torch", and when each is used."""
import pytest
import torch
import torch.nn.functional as F

import hyperseg
from hyperseg import kernels, ops
from hyperseg.calibration import calibrate_batchnorm
from kernel_utils import DEVICE, assert_matches

SIZES = {"hyperseg-m-cityscapes": (64, 128), "hyperseg-s-cityscapes": (64, 128),
         "hyperseg-s-camvid": (64, 64), "hyperseg-l-camvid": (64, 64), "hyperseg-l-voc": (128, 128)}


# The kernels' ops the model calls, and the reference op of each one's semantics.
REFERENCE_OF = {"meta_patch_conv": "meta_patch_conv",
                "meta_inverted_residual": "meta_inverted_residual",
                "generated_patch_conv2d": "meta_patch_conv"}


def _recorded_calls(monkeypatch, implementation):
    """The names of the kernels' ops the model calls, in order; each call runs
    ``implementation(name)``."""
    calls = []
    for name in REFERENCE_OF:
        def recorder(*args, _name=name, _run=implementation(name), **kwargs):
            calls.append(_name)
            return _run(*args, **kwargs)
        monkeypatch.setattr(kernels, name, recorder)
    return calls


@pytest.fixture
def counted(monkeypatch):
    """Count calls of the kernels' ops, which run."""
    return _recorded_calls(monkeypatch, lambda name: getattr(kernels, name))


@pytest.fixture
def routed(monkeypatch):
    """Count calls of the kernels' ops, each running the reference op of its semantics instead:
    for tests of which op a pass takes, not of what it computes (the parity tests run the
    kernels), so that they need no interpreter."""
    return _recorded_calls(monkeypatch, lambda name: getattr(ops, REFERENCE_OF[name]))


def fused_launches(config):
    """The fused inference launches of a model, block by block: a kernel-1 block is one
    meta_patch_conv; a 3x3 inverted residual is one meta_inverted_residual in v1, and in v0.1
    (hyperseg-l-voc) three meta_patch_conv, one per sub-layer."""
    inverted_residual = (["meta_patch_conv"] * 3 if config.arch == "v0_1"
                         else ["meta_inverted_residual"])
    return [launch for k in config.kernel_sizes
            for launch in (["meta_patch_conv"] if k == 1 else inverted_residual)]


@pytest.mark.parametrize("name", list(SIZES))
def test_zoo_model_triton_equals_torch(name, counted):
    """Every zoo model's logits on backend "triton" (one fused launch per v1 block, three per
    v0.1 inverted residual, nothing else) equal backend "torch"'s."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, *SIZES[name], device=DEVICE)
    model = calibrate_batchnorm(hyperseg.build(name).to(DEVICE), x)
    with torch.no_grad():
        model.backend = "torch"
        ref = model(x)
        assert counted == []
        model.backend = "triton"
        got = model(x)
    assert counted == fused_launches(model.config)
    assert ref.abs().max() > 1.0          # a meaningful comparison, not of near-zero logits
    assert_matches(got, ref, torch.float32)


def test_fused_launches_per_block():
    assert fused_launches(hyperseg.get_config("hyperseg-m")) == (
        ["meta_patch_conv"] * 3 + ["meta_inverted_residual"] * 2)
    assert fused_launches(hyperseg.get_config("hyperseg-l")) == ["meta_patch_conv"] * (2 + 3 * 4)


def test_training_and_gradients_run_on_the_differentiable_kernels(routed):
    """In train mode, or when autograd records, backend "triton" runs the differentiable
    generated_patch_conv2d (one per kernel-1 block, three per inverted residual), never the fused
    inference kernels, which run in eval mode under no_grad / inference_mode. Gradients are
    compared with the reference in test_triton_training.py."""
    model = hyperseg.build("hyperseg-m", backend="triton").to(DEVICE)
    x = torch.randn(1, 3, 64, 64, device=DEVICE)
    composed = ["generated_patch_conv2d"] * (3 + 3 * 2)
    assert model.resolve_backend(x) == "triton"
    model(x)                                      # eval mode, but parameters require grad
    assert routed == composed
    routed.clear()
    model.train()
    with torch.no_grad():                         # train mode: batch statistics, no fusion
        model(torch.randn(2, 3, 64, 64, device=DEVICE))
    assert routed == composed
    routed.clear()
    model.eval()
    with torch.inference_mode():
        model(x)
    assert routed == ["meta_patch_conv"] * 3 + ["meta_inverted_residual"] * 2


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
