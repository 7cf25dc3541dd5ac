"""BatchNorm statistics for randomly initialised models, so that their outputs can be compared.

Used by the benchmark (``hyperseg benchmark``, ``bench/``) and the tests, which run models
without trained weights.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .decoder import MetaInvertedResidual
from .model import HyperSeg


def calibrate_batchnorm(model: HyperSeg, x: Tensor) -> HyperSeg:
    """Give a (randomly initialised) model BatchNorm statistics that fit the input ``x``.

    With timm's initialisation and default running statistics, activations shrink layer after
    layer in eval mode and a random model's logits end up near 1e-15, which makes output
    comparisons meaningless (and denormals slow the CPU). One eval-mode pass over ``x`` sets, just
    before each BatchNorm runs, its running statistics to the (biased) statistics of its actual
    input, variance floored at 1e-2. Every BatchNorm then normalises what it sees, so activations
    on ``x`` stay of order one. Used by the tests and the benchmark. Such a random network is
    still sensitive: float32 rounding differences can grow to 1e-3 of its logits at small sizes,
    and on other inputs than ``x`` its activations can explode.
    """
    def set_stats(bn, args):
        t = args[0].detach().float()
        dims = [0] + list(range(2, t.dim()))
        bn.running_mean.copy_(t.mean(dims))
        bn.running_var.copy_(t.var(dims, unbiased=False).clamp_min(1e-2))

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return reference_pass(model, x, [bn.register_forward_pre_hook(set_stats) for bn in bns])


def reference_pass(model: HyperSeg, x: Tensor, handles=()) -> HyperSeg:
    """One eval-mode, no-grad forward of ``x`` on the torch reference, over all patches at once
    (no bands of patch rows), for hooks that inspect it; ``handles`` (hook handles) are removed
    and the model's backend restored afterwards. Returns the model, in eval mode."""
    banded = [m for m in model.modules() if isinstance(m, MetaInvertedResidual)]
    for block in banded:
        block.expanded_budget = None
    backend = model.backend
    model.eval()
    model.backend = "torch"
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.backend = backend
        for handle in handles:
            handle.remove()
        for block in banded:
            del block.expanded_budget
    return model
