"""The decoder's structure: the official signal split, generator shapes, meta blocks."""
import pytest
import torch

import hyperseg
from hyperseg.decoder import MetaConv, MetaInvertedResidual, divide_signal, divide_signal_v01

# (signal offset, signal channels, groups, generator weight shape) of every weight generator,
# read off the official implementation built with each configuration.
OFFICIAL_GENERATORS = {
    "hyperseg-m-cityscapes": [(0, 416, 32, (5248, 13)), (0, 224, 16, (3008, 14)), (0, 128, 8, (704, 16)),
                              (0, 192, 16, (2352, 12)), (0, 320, 4, (4216, 80))],
    "hyperseg-s-cityscapes": [(0, 576, 32, (4160, 18)), (576, 128, 16, (992, 8)), (704, 64, 8, (208, 8)),
                              (768, 512, 16, (3680, 32))],
    "hyperseg-s-camvid": [(0, 448, 64, (5248, 7)), (0, 256, 32, (3008, 8)), (0, 256, 32, (704, 8)),
                          (0, 192, 16, (2352, 12)), (0, 128, 8, (1896, 16))],
    "hyperseg-l-camvid": [(0, 384, 64, (5248, 6)), (0, 192, 32, (3008, 6)), (0, 256, 32, (704, 8)),
                          (0, 192, 16, (2352, 12)), (0, 128, 8, (2072, 16)), (0, 128, 8, (1768, 16))],
    "hyperseg-l-voc": [(0, 592, 16, (9408, 37)), (592, 272, 16, (4496, 17)), (864, 416, 16, (6624, 26)),
                       (1280, 96, 16, (1728, 6)), (1376, 48, 16, (992, 3)), (1424, 112, 16, (912, 7))],
}


@pytest.mark.parametrize("name", list(OFFICIAL_GENERATORS))
def test_generators_reproduce_the_official_signal_split(name):
    model = hyperseg.build(name)
    got = [(g.signal_offset, g.signal_channels, g.groups, tuple(g.weight.shape[:2]))
           for g in model.decoder.generators]
    assert got == OFFICIAL_GENERATORS[name]


def test_unified_generator_serves_the_last_levels():
    decoder = hyperseg.build("hyperseg-s").decoder
    assert decoder.sources == [(0, 0), (1, 0), (2, 0), (3, 0), (3, decoder.blocks[3].num_params)]
    assert decoder.generators[3].num_params == decoder.blocks[3].num_params + decoder.blocks[4].num_params


def test_divide_signal_properties():
    shares = divide_signal(1280, [100, 100, 50, 3000], 32)
    assert all(s % 32 == 0 and s > 0 for s in shares)
    assert shares[0] == shares[1]
    assert sum(shares) <= 1280
    assert shares[3] == max(shares)
    with pytest.raises(ValueError, match="multiple"):
        divide_signal(100, [1, 2], 32)
    with pytest.raises(ValueError, match="multiple"):
        divide_signal_v01(100, [1, 2], 32)


def test_block_structure_of_hyperseg_m():
    blocks = hyperseg.build("hyperseg-m").decoder.blocks
    assert [type(b) for b in blocks] == [MetaConv] * 3 + [MetaInvertedResidual] * 2
    # level inputs: 2 coordinates + backbone feature + previous level's output
    assert [b.in_channels for b in blocks] == [82, 94, 44, 24, 34]
    assert [b.out_channels for b in blocks] == [64, 32, 16, 16, 19]
    assert blocks[3].hidden == 48 and blocks[3].num_params == 24 * 48 + 48 * 9 + 48 * 16


def test_voc_blocks_use_v01_semantics():
    blocks = hyperseg.build("hyperseg-l").decoder.blocks
    assert [getattr(b, "version", None) for b in blocks] == [None, None] + ["v0_1"] * 4
    assert [b.out_channels for b in blocks] == [96, 34, 12, 8, 6, 21]


def test_block_weights_come_from_the_generator_rows():
    decoder = hyperseg.build("hyperseg-s").decoder
    signal = torch.randn(1, 1280, 2, 3)
    full = decoder.generators[3](signal)
    n3 = decoder.blocks[3].num_params
    torch.testing.assert_close(decoder.block_weights(4, signal), full[..., n3:n3 + decoder.blocks[4].num_params])


def test_a_block_refuses_an_unknown_implementation():
    from hyperseg.decoder import GeneratorSpec, WeightGenerator
    block = MetaConv(4, 4)
    generator = WeightGenerator(GeneratorSpec(0, 8, 1, block.num_params, block.num_params, (0,)))
    with pytest.raises(ValueError, match=r"implementation must be one of .* got 'cudnn'"):
        block(torch.randn(1, 4, 4, 4), torch.randn(1, 8, 2, 2), generator, 0, "cudnn")
