"""Test set-up: run Triton kernels through the interpreter when no GPU is present.

``TRITON_INTERPRET`` must be set before anything imports triton; conftest.py is imported by pytest
before any test module, so setting it here is early enough.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def calibrate_batchnorm(model, x):
    """Give a randomly initialised model BatchNorm statistics that fit the input ``x``.

    With timm's initialisation and default running statistics, activations shrink layer after
    layer in eval mode and a random model's logits end up near 1e-15, which would make output
    comparisons meaningless. Here one eval-mode pass over ``x`` sets, just before each BatchNorm
    runs, its running statistics to the (biased) statistics of its actual input, variance floored
    at 1e-2. Every BatchNorm then normalises exactly what it sees, so activations on ``x`` stay of
    order one and float32 rounding is not amplified.
    """
    def set_stats(bn, args):
        t = args[0].detach().float()
        dims = [0] + list(range(2, t.dim()))
        bn.running_mean.copy_(t.mean(dims))
        bn.running_var.copy_(t.var(dims, unbiased=False).clamp_min(1e-2))

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    handles = [bn.register_forward_pre_hook(set_stats) for bn in bns]
    backend = model.backend
    model.eval()
    model.backend = "torch"
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.backend = backend
        for h in handles:
            h.remove()
    return model
