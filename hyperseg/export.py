"""ONNX export of the torch backend.

    import hyperseg
    model = hyperseg.load("hyperseg-m.safetensors")
    hyperseg.export_onnx(model, "hyperseg-m.onnx")                 # 1 x 3 x 512 x 1024
    hyperseg.export_onnx(model, "small.onnx", size=(256, 512), batch_size=2)

The graph is the pure-PyTorch reference decoder (``backend="torch"``): the Triton kernels are
GPU code that ONNX cannot represent, so the export always runs the torch backend (the model's own
``backend`` setting is restored afterwards). The exported graph has the model's dtype and fixed
height and width (and batch size, unless ``dynamic_batch``): ``images`` (B, 3, H, W), normalised
with ``model.config.mean`` / ``std``, and ``logits`` (B, num_classes, H, W).

The graph is captured with ``torch.export`` (``torch.onnx.export(..., dynamo=True)``). The older
TorchScript exporter (``dynamo=False``) cannot export the patch-wise ops: it has no ONNX
translation for ``Tensor.unfold`` when the unfolded sizes are not constants of the traced graph
("ONNX export of operator Unfold, input size not accessible"). The dynamo exporter needs the
``onnx`` and ``onnxscript`` packages (``pip install "hyperseg[onnx]"``).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import os
from typing import Optional, Tuple

import torch

from .model import MIN_SIDE, HyperSeg

DEFAULT_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def check_exporter() -> dict:
    """Raise if the dynamo exporter is unavailable; the extra keyword arguments to pass it."""
    params = inspect.signature(torch.onnx.export).parameters
    if "dynamo" not in params:
        raise RuntimeError(f"ONNX export needs torch >= 2.5 (the dynamo exporter); this is torch "
                           f"{torch.__version__}")
    missing = []
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"ONNX export needs the {' and '.join(missing)} package(s): "
                          f"pip install onnx onnxscript (or pip install \"hyperseg[onnx]\")")
    # one self-contained file (the weights are far below protobuf's 2 GB limit)
    return {"external_data": False} if "external_data" in params else {}


def export_onnx(model: HyperSeg, path, *, size: Optional[Tuple[int, int]] = None,
                batch_size: int = 1, dynamic_batch: bool = False, opset: Optional[int] = None,
                verbose: bool = False) -> str:
    """Export ``model`` (its torch backend, in eval mode) to an ONNX file; returns the path.

    Args:
        model: a ``HyperSeg`` model, on any device; the example input is made there.
        path: the ``.onnx`` file to write (a single file: the weights are embedded).
        size: the (H, W) input size of the graph; default ``model.config.input_size``. Any
            H, W >= 32 (the graph pads to the model's size divisor and crops, as the model does).
        batch_size: the batch size of the graph (of the example input, with ``dynamic_batch``).
        dynamic_batch: a graph for any batch size (its first input dimension is symbolic);
            height and width stay static.
        opset: the ONNX opset version (default 18).
        verbose: print the exporter's progress.
    """
    if not isinstance(model, HyperSeg):
        raise TypeError(f"export_onnx expects a HyperSeg model, got {type(model).__name__}")
    h, w = tuple(size) if size is not None else tuple(model.config.input_size)
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ValueError(f"the input size must be at least {MIN_SIDE} x {MIN_SIDE}, got {h} x {w}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    extra = check_exporter()
    path = os.fspath(path)
    param = next(model.parameters())
    example = torch.zeros(batch_size, 3, h, w, device=param.device, dtype=param.dtype)
    backend, training, channels_last = model.backend, model.training, model.channels_last
    model.backend = "torch"
    model.channels_last = False         # the graph's tensors are plain contiguous ones
    model.eval()
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    try:
        with quiet, torch.no_grad():
            if dynamic_batch:
                extra["dynamic_shapes"] = {"images": {0: torch.export.Dim("batch", min=1)}}
            torch.onnx.export(
                model, (example,), path, dynamo=True, **extra,
                opset_version=opset or DEFAULT_OPSET, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], verbose=verbose)
    finally:
        model.backend = backend
        model.channels_last = channels_last
        model.train(training)
    return path
