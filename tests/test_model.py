"""The HyperSeg module: input checks, padding, test-time augmentation, backends, training."""
import copy

import pytest
import torch
import torch.nn.functional as F

import hyperseg
from hyperseg.backbone import StaticSameConv2d

from hyperseg.calibration import calibrate_batchnorm


# A random model is well conditioned on the input its BatchNorm statistics were calibrated on.
CALIBRATION = torch.randn(3, 3, 64, 128, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = hyperseg.build("hyperseg-s-camvid", backend="torch")
    return calibrate_batchnorm(model, CALIBRATION)


@pytest.mark.parametrize("shape,match", [((3, 64, 64), "shape"), ((1, 1, 3, 64, 64), "shape"),
                                         ((1, 4, 64, 64), "3 channels"), ((0, 3, 64, 64), "empty"),
                                         ((1, 3, 16, 64), "at least"), ((1, 3, 64, 31), "at least")])
def test_bad_shapes_are_rejected(model, shape, match):
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(shape))


def test_integer_images_are_rejected(model):
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_dtype_mismatch_is_rejected(model):
    with pytest.raises(TypeError, match="float64"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.float64))


def test_device_mismatch_is_rejected(model):
    with pytest.raises(ValueError, match="meta"):
        model(torch.empty(1, 3, 64, 64, device="meta"))


def test_non_tensor_input_is_rejected(model):
    with pytest.raises(TypeError):
        model("image.png")
    with pytest.raises(TypeError):
        model([torch.zeros(1, 3, 64, 64), "x"])


def test_sides_that_are_not_multiples_are_padded_and_cropped(model):
    x = torch.randn(1, 3, 70, 100)
    with torch.no_grad():
        y = model(x)
        padded = model(F.pad(x, (0, 128 - 100, 0, 128 - 70)))
    assert y.shape == (1, 12, 70, 100)
    torch.testing.assert_close(y, padded[..., :70, :100])


def test_smallest_input(model):
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 33)).shape == (1, 12, 32, 33)


def test_batch_items_are_independent(model):
    double = copy.deepcopy(model).double()     # float64: no float32 rounding differences
    x = CALIBRATION.double()
    with torch.no_grad():
        together = double(x)
        alone = torch.cat([double(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-9, atol=1e-9)


def test_pyramid_with_flip_follows_the_official_rules(model):
    x = CALIBRATION[:1]
    small = F.interpolate(x, scale_factor=0.5, mode="bilinear")   # 32 x 64
    with torch.no_grad():
        plain = model(x)
        flipped = model(x.flip(-1)).flip(-1)
        small_plain = model(small)
        small_flipped = model(small.flip(-1)).flip(-1)
        model.tta_hflip = True
        one = model([x])
        two = model([x, small])
        model.tta_gather = "max"
        two_max = model([x, small])
        model.tta_hflip, model.tta_gather = False, "mean"
        no_flip = model([x])
        model.tta_hflip = True
    torch.testing.assert_close(one, torch.max(plain, flipped))
    torch.testing.assert_close(no_flip, plain)
    up = F.interpolate(torch.max(small_plain, small_flipped), (64, 128), mode="bilinear", align_corners=False)
    torch.testing.assert_close(two, (up + torch.max(plain, flipped)) * 0.5)
    torch.testing.assert_close(two_max, torch.max(up, torch.max(plain, flipped)))
    assert plain.abs().max() > 0.1
    assert (plain - flipped).abs().max() > 0.01


def test_pyramid_errors(model):
    with pytest.raises(ValueError, match="empty"):
        model([])
    with pytest.raises(ValueError, match="batch size"):
        model([torch.randn(1, 3, 64, 64), torch.randn(2, 3, 64, 64)])
    model.tta_gather = "median"
    try:
        with pytest.raises(ValueError, match="tta_gather"):
            model([torch.randn(1, 3, 64, 64)])
    finally:
        model.tta_gather = "mean"


def test_backend_switch(model):
    assert hyperseg.build("hyperseg-m").backend == "auto"
    model.backend = "triton"
    assert model.backend == "triton"
    model.backend = "torch"
    with pytest.raises(ValueError, match="backend"):
        model.backend = "cuda"
    with pytest.raises(ValueError, match="backend"):
        hyperseg.build("hyperseg-m", backend="numpy")
    model.backend = "auto"
    assert model.resolve_backend(torch.zeros(1)) == "torch"    # CPU tensors use the reference
    model.backend = "torch"


def test_weights_argument_is_not_silently_ignored(tmp_path):
    with pytest.raises(FileNotFoundError):
        hyperseg.build("hyperseg-m", weights=tmp_path / "model.pth")


def test_training_mode_forward_and_backward():
    model = hyperseg.build("hyperseg-m", backend="torch").train()
    x = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 19, (2, 64, 64))
    before = model.decoder.blocks[4].bn1.running_mean.clone()
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.decoder.generators[0].weight.grad.abs().sum() > 0
    assert model.backbone.body.conv_stem.weight.grad.abs().sum() > 0
    assert not torch.equal(before, model.decoder.blocks[4].bn1.running_mean)


def test_backbone_uses_the_official_static_same_padding():
    """The official EfficientNet pads for its nominal image size (240 for B1, 300 for B3)."""
    b1 = hyperseg.build("hyperseg-m").backbone.body
    assert b1.conv_stem.static_padding == (0, 1, 0, 1)
    assert b1.blocks[2][0].conv_dw.static_padding == (1, 2, 1, 2)     # 5x5 stride 2 at 60
    assert b1.blocks[5][0].conv_dw.static_padding == (2, 2, 2, 2)     # 5x5 stride 2 at 15
    b3 = hyperseg.build("hyperseg-l").backbone.body
    assert b3.blocks[2][0].conv_dw.static_padding == (2, 2, 2, 2)     # 5x5 stride 2 at 75
    strided = [m for m in b1.modules() if isinstance(m, StaticSameConv2d)]
    assert len(strided) == 5
    x = torch.randn(1, 32, 16, 16)
    conv = b1.blocks[5][0].conv_dw
    x = torch.randn(1, conv.in_channels, 16, 16)
    torch.testing.assert_close(conv(x), F.conv2d(F.pad(x, (2, 2, 2, 2)), conv.weight, stride=2,
                                                 groups=conv.groups))
