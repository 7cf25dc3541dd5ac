"""Golden outputs of the official implementation, and the boundary cases they cannot see.

Every other model-level test compares this project with itself (triton with torch, a saved model
with its reload). These compare it with the *official* code: ``tests/golden/<model>.json`` holds
logits the official implementation computed (``tests/golden/generate_golden.py``, run locally on
a clone of github.com/YuvalNirkin/hyperseg; its numbers are committed, never its code) for weights
and an input given by a formula (``tests/golden_weights.py``), in float64.

A logit matches when it is within ``rtol`` times the spread (standard deviation) of the golden
logits: 1e-5 in float64, 1e-4 in float32. Measured (torch 2.14, CPU): float64 agrees to 1e-14 of
the spread, float32 to 2e-6 .. 1.1e-5 (hyperseg-l-voc). Swapping the decoder's x/y coordinate
channels moves the sampled logits by 0.96 .. 1.75 spreads.
"""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hyperseg
from hyperseg.checkpoint import CheckpointError, load_official_state_dict, official_state_dict
from hyperseg.losses import BootstrappedCrossEntropy
from hyperseg.ops import affine, fold_batchnorm

import golden_weights

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")
MODELS = ["hyperseg-m-cityscapes", "hyperseg-s-cityscapes", "hyperseg-s-camvid",
          "hyperseg-l-camvid", "hyperseg-l-voc"]
RTOL = {torch.float64: 1e-5, torch.float32: 1e-4}


def read_golden(name):
    with open(os.path.join(GOLDEN_DIR, f"{name}.json")) as f:
        return json.load(f)


def golden_model(name, dtype):
    """Our zoo model with the formula weights, loaded through the official-layout loader."""
    model = hyperseg.build(name, backend="torch").double()     # float64 first: exact weights
    official = official_state_dict(model)
    load_official_state_dict(model, golden_weights.golden_state_dict(official.items()))
    return model.to(dtype).eval()


def compare(record, logits, rtol):
    """Per statistic, the largest deviation from the golden record in units of its spread."""
    positions = np.asarray(record["positions"])
    ours = golden_weights.summary(logits, positions)
    assert ours["shape"] == record["shape"]
    spread = record["std"]
    deviations = {key: float(np.max(np.abs(np.asarray(ours[key]) - np.asarray(record[key]))) / spread)
                  for key in ("values", "class_mean", "class_std", "mean", "std", "min", "max")}
    worst = max(deviations, key=deviations.get)
    assert deviations[worst] <= rtol, (
        f"{record['model']}: {worst} deviates from the official outputs by "
        f"{deviations[worst]:.3g} of the logits' spread (tolerance {rtol:g}); all: {deviations}")
    return deviations


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", MODELS)
def test_logits_match_the_official_implementation(name, dtype):
    record = read_golden(name)
    model = golden_model(name, dtype)
    x = golden_weights.golden_input(*record["input"][:1], *record["input"][2:]).to(dtype)
    with torch.no_grad():
        logits = model(x)
    compare(record, logits, RTOL[dtype])


def test_golden_records_are_not_degenerate():
    """The formula weights give every model logits that differ between classes and positions,
    so a wrong channel order or a dropped term cannot hide in a constant."""
    for name in MODELS:
        record = read_golden(name)
        values = np.asarray(record["values"])
        assert len(values) >= 200 and record["std"] > 1e-3
        assert np.std(record["class_mean"]) > 1e-3 * record["std"]
        assert len(np.unique(np.round(values / record["std"], 3))) > 0.9 * len(values)


def test_swapped_coordinate_channels_fail_the_golden_comparison(monkeypatch):
    """The check the issue asked for, kept: the golden comparison catches a decoder that feeds
    (y, x) where the official code feeds (x, y). The swap is injected where the decoder makes its
    coordinate grid."""
    from hyperseg import decoder

    name = "hyperseg-m-cityscapes"
    record = read_golden(name)
    model = golden_model(name, torch.float64)
    x = golden_weights.golden_input(*record["input"][:1], *record["input"][2:]).double()
    original = decoder.coordinates

    def swapped(*args, **kwargs):
        return original(*args, **kwargs).flip(1)

    monkeypatch.setattr(decoder, "coordinates", swapped)
    with torch.no_grad():
        logits = model(x)
    with pytest.raises(AssertionError, match="deviates from the official outputs"):
        compare(record, logits, RTOL[torch.float64])


# -- boundaries the golden outputs do not reach -----------------------------------------------

def test_official_loader_rejects_a_state_dict_without_num_batches_tracked():
    """Official checkpoints carry every BatchNorm's ``num_batches_tracked``; one without them is
    not an official checkpoint of this architecture, and the loader must say so."""
    model = hyperseg.build("hyperseg-s-camvid", backend="torch")
    state = official_state_dict(model)
    dropped = next(k for k in state if k.endswith("num_batches_tracked"))
    del state[dropped]
    with pytest.raises(CheckpointError, match="missing 1 tensor.*num_batches_tracked"):
        load_official_state_dict(model, state)


def _tied_losses(values):
    """Two-class logits, one image, whose per-pixel cross-entropies are ``values`` exactly as
    computed (equal values give bit-equal losses), and those losses."""
    logits = torch.tensor([[v, 0.0] for v in values], dtype=torch.float32).T[None, :, :, None]
    target = torch.ones(1, len(values), 1, dtype=torch.long)
    losses = F.cross_entropy(logits, target, reduction="none").flatten()
    return logits, target, losses


def test_bootstrapped_loss_at_exactly_the_threshold_takes_the_k_largest():
    """The official rule is strict: the image uses the pixels above the threshold only when the
    (k+1)-th largest loss *exceeds* it. Here the (k+1)-th largest equals it (a tie with the k-th),
    so the loss is the mean of the k largest, not of those above the threshold."""
    logits, target, losses = _tied_losses([5.0, 1.0, 1.0, 0.5])
    threshold = float(losses[1])                      # the tied value, exactly
    loss = BootstrappedCrossEntropy(k=2, threshold=threshold)(logits, target)
    top = torch.topk(losses, 2).values
    torch.testing.assert_close(loss, top.mean(), rtol=0, atol=0)
    assert not torch.equal(loss, losses[losses > threshold].mean())


def test_bootstrapped_loss_above_the_threshold_excludes_pixels_equal_to_it():
    logits, target, losses = _tied_losses([5.0, 2.0, 1.0, 1.0, 0.5])
    threshold = float(losses[2])
    loss = BootstrappedCrossEntropy(k=1, threshold=threshold)(logits, target)
    torch.testing.assert_close(loss, losses[:2].mean(), rtol=0, atol=0)


def test_folded_batchnorm_keeps_eps_where_the_variance_is_small():
    """The kernels fold BatchNorm into a scale and shift; with running variances of the order of
    eps, leaving eps out would change the output by a large factor."""
    bn = torch.nn.BatchNorm2d(6, eps=1e-3).eval()
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([1e-4, 5e-4, 1e-3, 2e-3, 1e-2, 1.0]))
        bn.running_mean.uniform_(-1, 1)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 6, 5, 7)
    torch.testing.assert_close(affine(*fold_batchnorm(bn))(x), bn(x), rtol=1e-5, atol=1e-5)
