"""HyperSeg: patch-wise hypernetwork for real-time semantic segmentation (Nirkin et al., CVPR 2021).

    import hyperseg
    model = hyperseg.build("hyperseg-m")
    logits = model(images)          # (B, 3, H, W) -> (B, num_classes, H, W)

The public names below are imported from their modules on first use, so that importing the
package (and every ``hyperseg`` command line that needs no model, such as ``--help``) does not
pay for importing torch, timm and triton.
"""
import importlib
import types

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "BackboneError": "backbone",
    "CheckpointError": "checkpoint", "load": "model", "save": "checkpoint",
    "export_onnx": "export",
    "BACKENDS": "model", "HyperSeg": "model", "build": "model", "triton_available": "model",
    "colorize": "palettes", "palette": "palettes",
    "predict": "predict", "predict_batch": "predict",
    "VideoError": "video", "predict_video": "video",
    "ModelConfig": "zoo", "get_config": "zoo", "list_models": "zoo",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    elif not name.startswith("_"):
        # a submodule, e.g. hyperseg.ops (attribute access imported it eagerly before)
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """The package module. Importing a submodule binds it as an attribute of its package once it
    has run; ``hyperseg.predict`` is the function ``predict`` of the submodule of that name, so
    binding the submodule binds that function instead."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType) and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _Package
