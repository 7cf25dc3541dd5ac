"""The name correspondence with the official implementation's state dict."""
import pytest

import hyperseg
from hyperseg.official import official_names

# Official state-dict sizes without the cached decoder.coord* buffers.
OFFICIAL_KEYS = {"hyperseg-m": 598, "hyperseg-s": 597, "hyperseg-l": 702}
SAMPLES = {
    "hyperseg-m": {
        "backbone.body.conv_stem.weight": "backbone._conv_stem.weight",
        "backbone.body.blocks.0.0.conv_pw.weight": "backbone._blocks.0._project_conv.weight",
        "backbone.body.blocks.1.0.conv_pw.weight": "backbone._blocks.2._expand_conv.weight",
        "backbone.body.blocks.6.1.bn3.running_var": "backbone._blocks.22._bn2.running_var",
        "backbone.body.bn2.weight": "backbone._bn1.weight",
        "backbone.reducers.4.1.bias": "backbone._feat_fc_4.1.bias",
        "context_head.reduce.0.weight": "weight_mapper.in_conv.0.weight",
        "context_head.up.0.1.running_mean": "weight_mapper.up_blocks.0.1.running_mean",
        "decoder.generators.0.weight": "decoder.level_0.0.0.signal2weights.weight",
        "decoder.generators.3.weight": "decoder.level_3.0.signal2weights.weight",
        "decoder.blocks.1.bn.weight": "decoder.level_1.0.1.weight",
        "decoder.blocks.4.bn2.bias": "decoder.level_4.0.bn2.bias",
    },
    "hyperseg-s": {
        "decoder.generators.3.weight": "decoder.weight_blocks.3.signal2weights.weight",
        "decoder.blocks.0.bn.weight": "decoder.level_blocks.0.0.1.weight",
        "decoder.blocks.4.bn3.weight": "decoder.level_blocks.4.0.bn3.weight",
    },
    "hyperseg-l": {
        "context_head.down.1.0.weight": "weight_mapper.down_1.0.weight",
        "context_head.fuse.0.1.weight": "weight_mapper.flat_0.1.weight",
        "decoder.generators.5.weight": "weight_mapper.out_conv.conv_5.weight",
        "decoder.blocks.2.bn1.weight": "decoder.level_2.0.conv.0.1.weight",
        "decoder.blocks.5.bn3.running_var": "decoder.level_5.0.conv.2.1.running_var",
    },
}


@pytest.mark.parametrize("name", list(OFFICIAL_KEYS))
def test_official_names_are_a_bijection_with_known_members(name):
    model = hyperseg.build(name)
    names = official_names(model)
    assert len(names) == len(model.state_dict()) == OFFICIAL_KEYS[name]
    assert len(set(names.values())) == len(names)
    for ours, theirs in SAMPLES[name].items():
        assert names[ours] == theirs
