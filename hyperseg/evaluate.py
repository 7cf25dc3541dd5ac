"""Evaluation: mIoU, per-class IoU and pixel accuracy of a model on a dataset split.

    python -m hyperseg eval --weights m.safetensors --data cityscapes:/data/cityscapes
    torchrun --nproc_per_node 4 -m hyperseg eval ...          # the split is sharded over ranks

Images are preprocessed as in the official evaluation: Cityscapes and CamVid images are resized to
the model's resolution and the logits resized back to the full-resolution labels; VOC images and
labels are padded at the bottom and right to 512 x 512 (the padding ignored).
"""
from __future__ import annotations

import json
import math
import sys
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from . import distributed
from .datasets import TransformedDataset, collate, eval_transform
from .metrics import ConfusionMatrix
from .options import DEFAULT_TTA_SCALES, TTA_MODES, default_workers  # noqa: F401 (API: TTA_MODES)
from .predict import tta_forward, tta_mode

# How each dataset's validation images are preprocessed (see eval_transform), and at what size
# (None: the model's input_size).
EVAL_PREPROCESSING: Dict[str, Tuple[str, Optional[Tuple[int, int]]]] = {
    "cityscapes": ("resize", None),
    "camvid": ("resize", None),
    "voc": ("pad", (512, 512)),
    "folder": ("native", None),
    "synthetic": ("native", None),
}


def evaluation_dataset(dataset, kind: str, config, size: Union[None, str, Tuple[int, int]] = None
                       ) -> TransformedDataset:
    """``dataset`` preprocessed for evaluation with a model of ``config``: the official
    preprocessing of its kind, at ``size`` (H, W) if given, or "native" (unchanged images)."""
    mode, default_size = EVAL_PREPROCESSING[kind]
    if size == "native":
        mode, size = "native", None
    size = size or default_size or tuple(config.input_size)
    return TransformedDataset(dataset, eval_transform(mode, size, config.mean, config.std))


def evaluate(model, data: TransformedDataset, *, batch_size: int = 1,
             device: Optional[torch.device] = None, workers: int = 0, tta: Optional[str] = None,
             tta_scales: Sequence[float] = DEFAULT_TTA_SCALES, quiet: bool = False
             ) -> ConfusionMatrix:
    """The confusion matrix of ``model`` on ``data`` (see ``evaluation_dataset``).

    Logits are resized (bilinear) to each label's size before the arg-max. ``tta``: "flip"
    (each image and its mirror image) or "ms" (the ``tta_scales`` pyramid, flipped as the model
    asks). In a process group each rank evaluates every world_size-th image and the matrices are
    summed over the ranks, so every rank returns the matrix of the whole split.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tta = tta_mode(tta)
    param = next(model.parameters())
    device = device or param.device
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed.is_active() else (0, 1)
    indices = list(range(rank, len(data), world))
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    loader = DataLoader(data, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda")
    matrix = ConfusionMatrix(model.num_classes, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(indices), unit="image", file=sys.stderr,
                                          disable=True if quiet or rank else None) as bar:
            for images, labels in loader:
                groups = [(images, labels)] if isinstance(images, Tensor) else \
                    [(x[None], y[None]) for x, y in zip(images, labels)]
                for x, y in groups:
                    x = x.to(device, param.dtype, non_blocking=True)
                    y = y.to(device, non_blocking=True)
                    logits = tta_forward(model, x, tta, tta_scales)
                    if logits.shape[-2:] != y.shape[-2:]:
                        logits = F.interpolate(logits.float(), size=tuple(y.shape[-2:]),
                                               mode="bilinear", align_corners=False)
                    matrix.update(logits.argmax(1), y)
                    bar.update(x.shape[0])
    finally:
        model.train(was_training)
    return matrix.all_reduce()


def class_names(model_config, dataset) -> List[str]:
    """Names for the model's classes: the dataset's, else the model's, else the ids."""
    n = model_config.num_classes
    for names in (tuple(getattr(dataset, "classes", ())), tuple(model_config.class_names)):
        if names:
            return [names[i] if i < len(names) else str(i) for i in range(n)]
    return [str(i) for i in range(n)]


def summarize(matrix: ConfusionMatrix, names: Sequence[str], void_class: Optional[int] = None
              ) -> dict:
    """The metrics as plain values (NaN -> None), for printing and JSON."""
    def value(x: float):
        return None if math.isnan(x) else x

    summary = {
        "miou": value(matrix.miou()),
        "pixel_accuracy": value(matrix.pixel_accuracy()),
        "mean_class_accuracy": value(matrix.mean_class_accuracy()),
        "per_class_iou": {name: value(float(iou)) for name, iou in zip(names, matrix.iou())},
        "labelled_pixels": matrix.total,
        "confusion_matrix": matrix.matrix.cpu().tolist(),
    }
    if void_class is not None and void_class < matrix.num_classes:
        summary["miou_without_void"] = value(matrix.miou(exclude=[void_class]))
    return summary


def format_table(summary: dict) -> str:
    """Per-class IoU, then mIoU and accuracies, in percent."""
    def pct(x) -> str:
        return "    n/a" if x is None else f"{100 * x:7.2f}"

    width = max([len("mIoU without Void")] + [len(n) for n in summary["per_class_iou"]])
    lines = [f"{'class':{width}s}  IoU (%)", "-" * (width + 9)]
    lines += [f"{name:{width}s}  {pct(iou)}" for name, iou in summary["per_class_iou"].items()]
    lines.append("-" * (width + 9))
    lines.append(f"{'mIoU':{width}s}  {pct(summary['miou'])}")
    if "miou_without_void" in summary:
        lines.append(f"{'mIoU without Void':{width}s}  {pct(summary['miou_without_void'])}")
    lines.append(f"{'pixel accuracy':{width}s}  {pct(summary['pixel_accuracy'])}")
    lines.append(f"{'mean class acc.':{width}s}  {pct(summary['mean_class_accuracy'])}")
    return "\n".join(lines)


def evaluate_split(model, dataset, kind: str, *, size: Union[None, str, Tuple[int, int]] = None,
                   batch_size: int = 1, device: Optional[torch.device] = None,
                   workers: Optional[int] = None, world_size: int = 1, tta: Optional[str] = None,
                   tta_scales: Sequence[float] = DEFAULT_TTA_SCALES, quiet: bool = False) -> dict:
    """The metrics (``summarize``) of ``model`` on a split ``dataset`` of kind ``kind``,
    preprocessed as the official evaluation does (``evaluation_dataset``, at ``size`` if given);
    ``workers`` None: ``default_workers`` of ``world_size`` processes. Raises ValueError when
    the labels have more classes than the model predicts."""
    if dataset.num_classes > model.num_classes:
        raise ValueError(f"the {kind} labels have {dataset.num_classes} classes but "
                         f"{model.config.name} predicts {model.num_classes}")
    data = evaluation_dataset(dataset, kind, model.config, size)
    if workers is None:
        workers = default_workers(world_size)
    matrix = evaluate(model, data, batch_size=batch_size, device=device, workers=workers,
                      tta=tta, tta_scales=tta_scales, quiet=quiet)
    return summarize(matrix, class_names(model.config, dataset),
                     getattr(dataset, "void_class", None))


def report_results(model, dataset, summary: dict, *, data: str, split: str,
                   tta: Optional[str] = None, weights: Optional[str] = None,
                   json_path: Optional[str] = None) -> None:
    """Print the results of ``evaluate_split`` as ``hyperseg eval`` does (a title line and
    ``format_table``), and write them with the run's description to ``json_path`` if given."""
    extra = f", tta {tta}" if tta else ""
    print(f"{model.config.name} on {data} ({split}, {len(dataset)} images{extra})")
    print(format_table(summary))
    if json_path:
        report = {"model": model.config.name, "weights": weights, "data": data, "split": split,
                  "images": len(dataset), "tta": tta, **summary}
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
