"""The model zoo: names, configurations, exact parameter counts, forward shapes."""
import dataclasses

import pytest
import torch

import hyperseg
from hyperseg.zoo import ModelConfig, get_config

# Measured by running the official implementation with each configuration (shared/HYPERSEG.md).
OFFICIAL_PARAMS = {
    "hyperseg-m-cityscapes": 10_311_214,
    "hyperseg-s-cityscapes": 10_041_398,
    "hyperseg-s-camvid": 9_949_064,
    "hyperseg-l-camvid": 9_969_104,
    "hyperseg-l-voc": 39_680_458,
}
DEFAULT_CLASSES = {"hyperseg-m-cityscapes": 19, "hyperseg-s-cityscapes": 19, "hyperseg-s-camvid": 12,
                   "hyperseg-l-camvid": 12, "hyperseg-l-voc": 21}


def test_list_models_names_and_aliases():
    names = hyperseg.list_models()
    assert names[:5] == list(OFFICIAL_PARAMS)
    assert set(names[5:]) == {"hyperseg-m", "hyperseg-s", "hyperseg-l"}
    assert hyperseg.list_models(include_aliases=False) == list(OFFICIAL_PARAMS)


@pytest.mark.parametrize("alias,name", [("hyperseg-m", "hyperseg-m-cityscapes"),
                                        ("hyperseg-s", "hyperseg-s-cityscapes"),
                                        ("hyperseg-l", "hyperseg-l-voc")])
def test_aliases_resolve(alias, name):
    assert get_config(alias) == get_config(name)


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        hyperseg.build("hyperseg-xl")
    message = str(err.value)
    assert "hyperseg-xl" in message
    for name in hyperseg.list_models():
        assert name in message


def test_model_name_must_be_a_string():
    with pytest.raises(TypeError):
        hyperseg.build(3)


@pytest.mark.parametrize("bad", [0, -2])
def test_num_classes_below_one(bad):
    with pytest.raises(ValueError, match="num_classes"):
        hyperseg.build("hyperseg-m", num_classes=bad)


@pytest.mark.parametrize("bad", ["5", 2.0, True])
def test_num_classes_must_be_int(bad):
    with pytest.raises(TypeError, match="num_classes"):
        hyperseg.build("hyperseg-m", num_classes=bad)


@pytest.mark.parametrize("name", list(OFFICIAL_PARAMS))
def test_exact_official_parameter_count_and_forward(name):
    model = hyperseg.build(name)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]
    assert model.num_classes == DEFAULT_CLASSES[name]
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, DEFAULT_CLASSES[name], 64, 96)
    assert torch.isfinite(y).all()


def test_custom_class_count_and_batch():
    model = hyperseg.build("hyperseg-s-camvid", num_classes=5, backend="torch")
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 128))
    assert y.shape == (2, 5, 64, 128)
    assert model.config.class_names == ()
    assert get_config("hyperseg-s-camvid").class_names[0] == "Sky"


def test_config_round_trips_through_a_dict():
    for name in hyperseg.list_models(False):
        config = get_config(name)
        assert ModelConfig.from_dict(config.to_dict()) == config


def test_config_rejects_unknown_fields_and_bad_values():
    data = get_config("hyperseg-m").to_dict()
    with pytest.raises(ValueError, match="unknown model config fields"):
        ModelConfig.from_dict({**data, "bogus": 1})
    with pytest.raises(ValueError, match="architecture"):
        ModelConfig.from_dict({**data, "arch": "v2"})
    with pytest.raises(ValueError, match="kernel_sizes"):
        ModelConfig.from_dict({**data, "kernel_sizes": [1, 1, 1, 3, 5]})
    # any timm name is a backbone now (hyperseg.backbone checks it when the model is built)
    assert ModelConfig.from_dict({**data, "backbone": "resnet50"}).backbone == "resnet50"
    for bad in ("", 50):
        with pytest.raises(ValueError, match="backbone must be a timm model name"):
            ModelConfig.from_dict({**data, "backbone": bad})
    with pytest.raises(ValueError, match="unify_level"):
        hyperseg.HyperSeg(dataclasses.replace(get_config("hyperseg-m"), arch="v1_0_unify"))


def test_size_divisor_follows_context_levels():
    assert get_config("hyperseg-m").size_divisor == 64
    assert get_config("hyperseg-l").size_divisor == 128
