"""Segmentation metrics from a confusion matrix: per-class IoU, mIoU, pixel accuracy.

    matrix = ConfusionMatrix(num_classes)
    matrix.update(logits.argmax(1), labels)     # labels: class ids, 255 = ignored
    matrix.all_reduce()                         # under torch.distributed: sum over the ranks
    print(matrix.miou(), matrix.pixel_accuracy())
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .distributed import all_reduce_sum

IGNORE_INDEX = 255


class ConfusionMatrix:
    """Pixel counts ``matrix[true, predicted]`` over everything passed to ``update``.

    Pixels whose label is ``ignore_index`` are not counted. A label outside ``[0, num_classes)``
    that is not ``ignore_index`` is an error (the dataset and the model disagree on the classes).
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX,
                 device: Optional[torch.device] = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, predicted: Tensor, target: Tensor) -> None:
        """Count the pixels of predicted class ids against target class ids (same shape)."""
        if predicted.shape != target.shape:
            raise ValueError(f"predictions {tuple(predicted.shape)} and labels "
                             f"{tuple(target.shape)} differ in shape")
        n = self.num_classes
        target = target.to(self.matrix.device).flatten().long()
        predicted = predicted.to(self.matrix.device).flatten().long()
        keep = target != self.ignore_index
        target, predicted = target[keep], predicted[keep]
        if target.numel() and (target.min() < 0 or target.max() >= n):
            bad = sorted(set(target[(target < 0) | (target >= n)].unique().tolist()))
            raise ValueError(f"labels contain class ids {bad[:10]} outside 0..{n - 1} (and not the "
                             f"ignore index {self.ignore_index}): the dataset has more classes "
                             f"than the {n} of the model")
        if predicted.numel() and (predicted.min() < 0 or predicted.max() >= n):
            raise ValueError(f"predictions outside 0..{n - 1}")
        self.matrix += torch.bincount(target * n + predicted, minlength=n * n).view(n, n)

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the matrix over all ranks of the process group (no-op in a single process)."""
        all_reduce_sum(self.matrix)
        return self

    def reset(self) -> None:
        self.matrix.zero_()

    @property
    def total(self) -> int:
        return int(self.matrix.sum())

    def iou(self) -> Tensor:
        """Per-class intersection over union, float64; NaN for a class that is neither in the
        labels nor in the predictions."""
        m = self.matrix.double().cpu()
        hits = m.diagonal()
        union = m.sum(0) + m.sum(1) - hits
        nan = torch.full_like(hits, float("nan"))
        return torch.where(union > 0, hits / union.clamp_min(1), nan)

    def miou(self, exclude: Sequence[int] = ()) -> float:
        """Mean IoU over the classes that occur (NaN entries skipped), optionally leaving some
        classes out (e.g. CamVid's Void); NaN when no class occurs."""
        iou = self.iou()
        keep = torch.ones_like(iou, dtype=torch.bool)
        for c in exclude:
            keep[c] = False
        values = iou[keep]
        values = values[~values.isnan()]
        return float(values.mean()) if values.numel() else float("nan")

    def pixel_accuracy(self) -> float:
        """Correctly classified labelled pixels / labelled pixels (NaN when none)."""
        total = self.total
        return float(self.matrix.diagonal().sum()) / total if total else float("nan")

    def class_accuracy(self) -> Tensor:
        """Per-class recall (correct / labelled pixels of the class); NaN for absent classes."""
        m = self.matrix.double().cpu()
        labelled = m.sum(1)
        return torch.where(labelled > 0, m.diagonal() / labelled.clamp_min(1),
                           torch.full_like(labelled, float("nan")))

    def mean_class_accuracy(self) -> float:
        acc = self.class_accuracy()
        acc = acc[~acc.isnan()]
        return float(acc.mean()) if acc.numel() else float("nan")
