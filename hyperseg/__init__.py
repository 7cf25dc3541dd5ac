"""HyperSeg: patch-wise hypernetwork for real-time semantic segmentation (Nirkin et al., CVPR 2021).

    import hyperseg
    model = hyperseg.build("hyperseg-m")
    logits = model(images)          # (B, 3, H, W) -> (B, num_classes, H, W)
"""
from .checkpoint import CheckpointError, load, save
from .export import export_onnx
from .model import BACKENDS, HyperSeg, build, triton_available
from .palettes import colorize, palette
from .predict import predict, predict_batch
from .zoo import ModelConfig, get_config, list_models

__version__ = "0.1.0"

__all__ = ["BACKENDS", "CheckpointError", "HyperSeg", "ModelConfig", "build", "colorize",
           "export_onnx", "get_config", "list_models", "load", "palette", "predict",
           "predict_batch", "save", "triton_available", "__version__"]
