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


def calibrate_batchnorm(model, *inputs):
    """Give a randomly initialised model data-dependent BatchNorm statistics.

    With timm's initialisation and default running statistics, activations shrink layer after
    layer in eval mode and a random model's logits end up near 1e-15, which would make output
    comparisons meaningless. One train-mode pass with cumulative averaging sets every BN's running
    statistics to those of ``inputs``, so eval-mode activations stay of order one.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for x in inputs:
            model(x)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    return model.eval()
