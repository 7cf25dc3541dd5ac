"""HyperSeg over other timm backbones (``build(..., backbone=)``): three families, forward and one
training step each, save / load round trips, the fine-tuning loader, and clear errors. Random
weights only: nothing is downloaded."""
import pytest
import timm
import torch

import hyperseg
from hyperseg.backbone import BackboneError, TimmBackbone
from hyperseg.checkpoint import Checkpoint, CheckpointError, load_matching, read_checkpoint
from hyperseg.zoo import get_config
from checkpoint_utils import write_official

# One small model of each family.
FAMILIES = ("efficientnet_b0", "mobilenetv3_small_050", "resnet18")


@pytest.mark.parametrize("backbone", FAMILIES)
def test_a_timm_backbone_trains_and_round_trips(backbone, tmp_path):
    torch.manual_seed(0)
    model = hyperseg.build("hyperseg-m", backbone=backbone, num_classes=3, backend="torch")
    assert isinstance(model.backbone, TimmBackbone)
    assert model.config.name == f"hyperseg-m-cityscapes+{backbone}"
    # the reducers follow timm's feature_info, scaled as the zoo model's
    channels = timm.create_model(backbone, features_only=True).feature_info.channels()
    scales = get_config("hyperseg-m").out_feat_scale
    assert model.backbone.feat_channels == [round(c * s) for c, s in zip(channels, scales)]
    assert model.backbone.head_channels == channels[-1]

    model.train()
    images = torch.randn(2, 3, 64, 96)
    labels = torch.randint(0, 3, (2, 64, 96))
    logits = model(images)
    assert logits.shape == (2, 3, 64, 96)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.nn.functional.cross_entropy(logits, labels).backward()
    optimizer.step()
    for part in ("backbone.body.", "backbone.reducers.", "context_head.", "decoder."):
        assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters()
                   if n.startswith(part)), f"no parameter of {part} was trained"

    model.eval()
    hyperseg.save(model, tmp_path / "m.safetensors")
    again = hyperseg.load(tmp_path / "m.safetensors", backend="torch")
    assert again.config == model.config and isinstance(again.backbone, TimmBackbone)
    with torch.no_grad():
        assert torch.equal(again(images[:1]), model(images[:1]))


def test_the_zoo_models_keep_their_official_backbone():
    model = hyperseg.build("hyperseg-m", backbone="tf_efficientnet_b1", backend="torch")
    assert model.config == get_config("hyperseg-m")
    assert type(model.backbone).__name__ == "Backbone"
    assert sum(p.numel() for p in model.parameters()) == 10_311_214


def test_backbones_that_cannot_serve_are_refused():
    with pytest.raises(BackboneError, match="unknown backbone 'resnet_9000': timm has no model"):
        hyperseg.build("hyperseg-m", backbone="resnet_9000")
    with pytest.raises(BackboneError, match=r"features at strides \[4, 8, 16, 32\]; HyperSeg "
                                            r"needs one at each of the strides \[2, 4, 8, 16, 32\]"):
        hyperseg.build("hyperseg-m", backbone="convnext_atto")
    with pytest.raises(ValueError, match="backbone must be a timm model name"):
        hyperseg.build("hyperseg-m", backbone="")


def test_fine_tuning_keeps_every_tensor_whose_shape_matches(tmp_path):
    torch.manual_seed(0)
    source = hyperseg.build("hyperseg-m", backend="torch")
    write_official(tmp_path / "official.pth", source)
    checkpoint = read_checkpoint(tmp_path / "official.pth")
    target = hyperseg.build("hyperseg-m", num_classes=5, backend="torch")
    result = load_matching(target, checkpoint)
    ours, theirs = target.state_dict(), source.state_dict()
    differing = sorted(k for k in ours if ours[k].shape != theirs[k].shape)
    assert differing and sorted(result.reinitialised) == differing
    assert any(k.startswith("decoder.blocks.4.") for k in differing)      # the classifier
    for key in ours:
        if key not in differing:
            assert torch.equal(ours[key], theirs[key]), key
    assert len(result.unused) == len(differing)

    custom = hyperseg.build("hyperseg-m", backbone="mobilenetv3_small_050", backend="torch")
    with pytest.raises(CheckpointError, match="official checkpoint can only start a model with "
                                              "the official EfficientNet backbone"):
        load_matching(custom, checkpoint)
    foreign = Checkpoint({"backbone.body.conv_stem.weight": torch.zeros(2, 2)}, "hyperseg", None,
                         {})
    with pytest.raises(CheckpointError, match="shares no tensor"):
        load_matching(target, foreign)


def test_a_model_timm_cannot_cut_into_features_is_refused(monkeypatch):
    def no_features(name, **kwargs):
        raise RuntimeError(f"features_only not implemented for {name}")

    monkeypatch.setattr(timm, "create_model", no_features)
    with pytest.raises(BackboneError, match="backbone 'resnet18' cannot give timm features_only "
                                            "feature maps: features_only not implemented"):
        hyperseg.build("hyperseg-m", backbone="resnet18")
