"""Training losses: cross-entropy and the bootstrapped cross-entropy of the official recipes.

Both take logits (B, C, H, W) and targets (B, H, W) of class ids, where ``ignore_index`` (255)
marks pixels without a label.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .options import LOSSES

IGNORE_INDEX = 255


def _check(logits: Tensor, target: Tensor) -> None:
    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0] \
            or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"expected logits (B, C, H, W) and targets (B, H, W) of the same batch "
                         f"and size, got {tuple(logits.shape)} and {tuple(target.shape)}")


class CrossEntropy(nn.Module):
    """Mean cross-entropy over the labelled pixels of the batch (0 when there are none)."""

    def __init__(self, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check(logits, target)
        total = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index,
                                reduction="sum")
        labelled = (target != self.ignore_index).sum().clamp_min(1)
        return total / labelled


class BootstrappedCrossEntropy(nn.Module):
    """Cross-entropy over each image's hardest pixels, averaged over the images of the batch.

    For every image, the per-pixel cross-entropies (0 for ignored pixels) are ranked. If more than
    ``k`` pixels lose more than ``threshold`` (the ``k + 1``-th largest loss exceeds it), the
    image's loss is the mean over all pixels above the threshold; otherwise it is the mean of the
    ``k`` largest losses. These are the semantics of the official ``BootstrappedCrossEntropyLoss``
    (k 4096, threshold 0.3). An image of at most ``k`` pixels averages all of them (the official
    code fails there).
    """

    def __init__(self, k: int = 4096, threshold: float = 0.3, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.threshold = threshold
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check(logits, target)
        pixel_losses = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index,
                                       reduction="none").flatten(1)
        per_image = []
        for losses in pixel_losses:
            if losses.numel() <= self.k:
                per_image.append(losses.mean())
                continue
            top = torch.topk(losses, self.k + 1, sorted=True).values
            if top[self.k] > self.threshold:
                per_image.append(losses[losses > self.threshold].mean())
            else:
                per_image.append(top[:self.k].mean())
        return torch.stack(per_image).mean()


def build_loss(name: str, ignore_index: int = IGNORE_INDEX) -> nn.Module:
    """The loss called ``name``: "bootstrapped_ce" or "ce"."""
    if name == "bootstrapped_ce":
        return BootstrappedCrossEntropy(ignore_index=ignore_index)
    if name == "ce":
        return CrossEntropy(ignore_index=ignore_index)
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")
