"""The fast inference path: build(..., precision=, channels_last=, compile=)."""
import copy

import pytest
import torch

import hyperseg
from hyperseg.calibration import calibrate_batchnorm

SIZE = (64, 64)


@pytest.fixture(scope="module")
def model_and_input():
    torch.manual_seed(0)
    model = hyperseg.build("hyperseg-m", backend="torch", channels_last=False)
    x = torch.randn(1, 3, *SIZE)
    return calibrate_batchnorm(model, x), x


def relative_error(got, ref):
    return ((got - ref).abs().max() / ref.abs().max()).item()


def test_channels_last_backbone_computes_the_same_function(model_and_input):
    """channels_last changes only the backbone's memory format. Compared in float64, its features
    and head agree with the contiguous backbone's to rounding, and come out in the contiguous
    format that the decoder's patch views need. (In float32 a random, calibrated model amplifies
    the different summation orders of the convolutions far more, up to the order of its logits
    at this size, as for any change of convolution algorithm.)"""
    model, x = model_and_input
    backbone, x = copy.deepcopy(model.backbone).double(), x.double()
    with torch.inference_mode():
        feats, head = backbone(x)
        backbone.set_channels_last(True)
        assert backbone.body.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
        feats_cl, head_cl = backbone(x)
    for got, ref in zip(feats_cl + [head_cl], feats + [head]):
        assert got.is_contiguous() and relative_error(got, ref) < 1e-8
    backbone.set_channels_last(False)
    assert backbone.body.conv_stem.weight.is_contiguous()


def test_the_model_runs_its_backbone_in_channels_last(model_and_input):
    model, x = model_and_input
    seen = []
    hook = model.backbone.body.conv_stem.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        with torch.inference_mode():
            model(x)
            model.channels_last = True
            logits = model(x)
    finally:
        model.channels_last = False
        hook.remove()
    assert seen == [False, True] and logits.shape == (1, 19, *SIZE)


def test_reduced_precision_runs_under_autocast_and_returns_float32(model_and_input):
    """The layers compute in bfloat16 (the first convolution's output, within bfloat16 rounding of
    float32's), the logits come back as float32. The random model's logits themselves are too
    ill-conditioned to compare across precisions."""
    model, x = model_and_input
    seen = []
    hook = model.backbone.body.conv_stem.register_forward_hook(
        lambda module, args, out: seen.append(out))
    try:
        with torch.inference_mode():
            model(x)
            model.precision = "bf16"
            logits = model(x)
    finally:
        model.precision = "fp32"
        hook.remove()
    ref, low = seen
    assert ref.dtype == torch.float32 and low.dtype == torch.bfloat16
    assert 0 < relative_error(low.float(), ref) < 2e-2
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_build_defaults_and_options():
    model = hyperseg.build("hyperseg-m", backend="torch")
    assert model.precision == "fp32" and model.channels_last
    model = hyperseg.build("hyperseg-m", backend="torch", precision="bf16", channels_last=False,
                           compile=True)
    assert model.precision == "bf16" and not model.channels_last
    assert model._compiled_call_impl is not None           # compiled lazily, at the first call


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'fp16', 'bf16'\)"):
        hyperseg.build("hyperseg-m", precision="half")
    with pytest.raises(TypeError, match="compile must be True, False or a torch.compile mode"):
        hyperseg.build("hyperseg-m", compile=3)
    model = hyperseg.build("hyperseg-m", backend="torch")
    with pytest.raises(TypeError, match="channels_last must be True or False"):
        model.channels_last = "yes"
    with pytest.raises(ValueError, match="precision must be one of"):
        model.precision = "int8"
