"""hyperseg/baseline.py, the official decoder written op for op (the benchmark's baseline), gives
the outputs of ``hyperseg.ops``' reference, block by block and for the whole decoder."""
import pytest
import torch

import hyperseg
from hyperseg import baseline
from hyperseg.calibration import calibrate_batchnorm
from hyperseg.decoder import REFERENCE, MetaConv, MetaInvertedResidual

# hyperseg-m-cityscapes (v1_0): kernel-1 MetaConv and v1 inverted residuals; hyperseg-s-cityscapes
# (v1_0_unify): a generator shared by levels; hyperseg-l-voc (v0_1): v0.1 inverted residuals.
CASES = [pytest.param("hyperseg-m-cityscapes", (64, 128), id="m-v1"),
         pytest.param("hyperseg-s-cityscapes", (64, 128), id="s-v1_0_unify"),
         pytest.param("hyperseg-l-voc", (64, 64), id="l-voc-v0_1")]


def _kind(block) -> str:
    return f"IR-{block.version}" if isinstance(block, MetaInvertedResidual) else "MetaConv"


@pytest.mark.parametrize("name,size", CASES)
def test_official_blocks_and_decoder_match_the_reference(name, size):
    torch.manual_seed(0)
    model = hyperseg.build(name, backend="torch").eval()
    x = torch.randn(1, 3, *size)
    calibrate_batchnorm(model, x)
    kinds = set()
    with torch.no_grad():
        inputs, signal = baseline.decoder_inputs(model, x)
        for level in model.decoder.levels(inputs, signal, implementation=REFERENCE):
            kinds.add(_kind(level.block))
            got = baseline.official_level(level)
            scale = max(1.0, level.output.abs().max().item())
            assert got.shape == level.output.shape
            torch.testing.assert_close(got, level.output, rtol=0, atol=1e-5 * scale,
                                       msg=lambda m: f"{name} L{level.index}: {m}")
        whole = baseline.OfficialDecoder(model)(inputs, signal)
        ref = model.decoder(inputs, signal, REFERENCE)
    torch.testing.assert_close(whole, ref, rtol=0, atol=1e-5 * max(1.0, ref.abs().max().item()))
    expected = {"MetaConv", "IR-v1"} if model.config.arch != "v0_1" else {"IR-v0_1"}
    assert expected <= kinds


def test_official_blocks_cover_every_block_type():
    blocks = [b for n in ("hyperseg-m-cityscapes", "hyperseg-l-voc")
              for b in hyperseg.build(n, backend="torch").decoder.blocks]
    assert {_kind(b) for b in blocks} == {"MetaConv", "IR-v1", "IR-v0_1"}
    assert any(isinstance(b, MetaConv) for b in blocks)
