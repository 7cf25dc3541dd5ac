"""The HyperSeg model, and ``build`` / ``load``: a zoo model by name, or the model a checkpoint holds."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .backbone import make_backbone
from .checkpoint import CheckpointError, load_into, read_checkpoint
from .context_head import ContextHead, ContextHeadV01
from .decoder import (AUTOGRAD_KERNELS, FUSED, REFERENCE, Decoder,
                      records_gradients, triton_available)
from . import options
from .options import BACKENDS, MIN_SIDE, PRECISIONS
from .pretrained import load_pretrained
from .zoo import ModelConfig, get_config, with_backbone

GATHER_MODES = ("mean", "max")
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def training_kernels_proven(device: torch.device) -> bool:
    """Whether ``backend="auto"`` trains on the Triton kernels on ``device``: only on a CUDA GPU
    whose class is in ``options.TRAINING_KERNELS_FASTER_ON`` (a committed GPU run measured the
    kernels' training step faster than the reference there)."""
    if device.type != "cuda":
        return False
    name = torch.cuda.get_device_name(device)
    return any(gpu_class in name for gpu_class in options.TRAINING_KERNELS_FASTER_ON)


class HyperSeg(nn.Module):
    """HyperSeg: an EfficientNet encoder and context head that generate, for every image patch,
    the weights of a dynamic decoder.

    ``forward(images)`` maps a (B, 3, H, W) floating-point batch, normalised with
    ``config.mean`` / ``config.std``, to (B, num_classes, H, W) logits. Any H, W >= 32 works: sides
    that are not multiples of ``config.size_divisor`` (64, or 128 for the VOC model) are zero-padded
    at the bottom and right up to the next multiple, and the logits are cropped back.

    ``forward([img_1, img_2, ...])`` runs the official test-time augmentation over an image
    pyramid: each input (and, when ``tta_hflip``, its horizontal flip, merged by
    ``tta_flip_gather``) is segmented, resized to the first input's size and merged by
    ``tta_gather`` ("mean": the official running mean ``(new + acc) / 2``; "max").

    ``backend`` selects the decoder's implementation: "torch" (the pure-PyTorch reference),
    "triton" (the Triton kernels: one fused kernel per block for inference, differentiable
    kernels with torch's BatchNorm for training) or "auto" (see ``decoder_implementation``). It
    may be changed at any time.

    ``precision`` ("fp32", "fp16" or "bf16") is the inference precision: "fp16" / "bf16" run the
    forward pass under ``torch.autocast`` with that type (unless autocast is already on) and
    return float32 logits; the parameters stay float32. ``channels_last`` runs the backbone in
    channels-last memory format (see ``Backbone.set_channels_last``). Both may be changed at any
    time.
    """

    def __init__(self, config: ModelConfig, *, pretrained_backbone: bool = False,
                 backend: str = "auto"):
        super().__init__()
        config.validate()
        self.config = config
        self.backbone = make_backbone(config.backbone, config.out_feat_scale,
                                      pretrained=pretrained_backbone)
        head = self.backbone.head_channels
        if config.arch == "v0_1":
            self.context_head = ContextHeadV01(head, config.context_levels,
                                               global_pool=config.context_global_pool)
        else:
            self.context_head = ContextHead(head, config.context_levels)
        self.decoder = Decoder(config, [3] + self.backbone.feat_channels,
                               self.context_head.signal_channels)
        self.backend = backend
        self.precision = "fp32"
        self.tta_hflip = config.tta_hflip
        self.tta_gather = config.tta_gather
        self.tta_flip_gather = "max"

    # -- configuration -----------------------------------------------------------------------

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value

    @property
    def precision(self) -> str:
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        if value not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {value!r}")
        self._precision = value

    @property
    def channels_last(self) -> bool:
        return self.backbone.channels_last

    @channels_last.setter
    def channels_last(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"channels_last must be True or False, got {value!r}")
        self.backbone.set_channels_last(value)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def decoder_implementation(self, x: Tensor) -> str:
        """How the decoder runs a forward pass on ``x``: one of ``hyperseg.decoder``'s
        ``REFERENCE`` (the torch ops), ``FUSED`` (one fused Triton kernel per block) or
        ``AUTOGRAD_KERNELS`` (the differentiable Triton ops with torch's BatchNorm). The one place
        where the backend is resolved; ``forward`` asks once per pass.

        "torch": the reference. "triton": the kernels in every mode: fused in eval mode without
        autograd; in training, or when autograd records the pass, the differentiable ops. "auto":
        the fused kernels for CUDA inputs in eval mode without autograd; for training (or a pass
        autograd records) on CUDA, the differentiable kernels only on a GPU class where a
        committed GPU run measured them faster than the reference (``training_kernels_proven``),
        the cuDNN-backed reference elsewhere; the reference for CPU tensors.
        """
        if self._backend == "torch":
            return REFERENCE
        if self._backend == "triton" and not triton_available():
            raise NotImplementedError(
                "backend='triton' needs the Triton kernels of hyperseg.kernels, which could "
                "not be imported (is triton installed?); use backend='torch' or 'auto'")
        trains = self.training or records_gradients(self, [x])
        if self._backend == "triton":
            return AUTOGRAD_KERNELS if trains else FUSED
        if not (x.is_cuda and triton_available()):
            return REFERENCE
        if trains:
            return AUTOGRAD_KERNELS if training_kernels_proven(x.device) else REFERENCE
        return FUSED

    def resolve_backend(self, x: Tensor) -> str:
        """The backend a forward pass on ``x`` uses: "torch" (the reference) or "triton" (the
        kernels, fused or differentiable); see ``decoder_implementation``."""
        return "torch" if self.decoder_implementation(x) == REFERENCE else "triton"

    # -- forward -----------------------------------------------------------------------------

    def check_input(self, x) -> None:
        """Raise TypeError / ValueError if ``x`` is not a batch this model can segment."""
        if not isinstance(x, Tensor):
            raise TypeError(f"images must be a torch.Tensor (or a list of them), got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(x.shape)}")
        if x.shape[1] != 3:
            raise ValueError(f"images must have 3 channels (RGB), got {x.shape[1]} in {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor (normalised), got {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError("images is an empty batch (B == 0)")
        if x.shape[2] < MIN_SIDE or x.shape[3] < MIN_SIDE:
            raise ValueError(f"images must be at least {MIN_SIDE} x {MIN_SIDE}, got "
                             f"{x.shape[2]} x {x.shape[3]}")
        param = next(self.parameters())
        if x.device != param.device:
            raise ValueError(f"images are on {x.device} but the model is on {param.device}")
        if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"images are {x.dtype} but the model is {param.dtype}; convert one "
                            f"of them or run under torch.autocast")

    def segment(self, x: Tensor) -> Tensor:
        """Logits of one (B, 3, H, W) batch, without test-time augmentation."""
        self.check_input(x)
        if self._precision == "fp32" or torch.is_autocast_enabled(x.device.type):
            return self._segment(x)
        with torch.autocast(x.device.type, dtype=AUTOCAST_DTYPES[self._precision]):
            logits = self._segment(x)
        return logits.float()

    def _segment(self, x: Tensor) -> Tensor:
        implementation = self.decoder_implementation(x)
        h, w = x.shape[-2:]
        d = self.config.size_divisor
        pad_h, pad_w = (-h) % d, (-w) % d
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        feats, head = self.backbone(x)
        signal = self.context_head(head)
        logits = self.decoder([x] + feats, signal, implementation)
        return logits[..., :h, :w]

    def forward(self, images: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        if isinstance(images, Tensor):
            return self.segment(images)
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"images must be a torch.Tensor or a list of them, got {type(images).__name__}")
        return self.forward_pyramid(images)

    def forward_pyramid(self, images: Sequence[Tensor]) -> Tensor:
        """The official test-time augmentation over an image pyramid (see the class doc)."""
        if len(images) == 0:
            raise ValueError("the image pyramid is empty")
        if self.tta_gather not in GATHER_MODES or self.tta_flip_gather not in GATHER_MODES:
            raise ValueError(f"tta_gather and tta_flip_gather must be one of {GATHER_MODES}")
        for x in images:
            self.check_input(x)
        if len({x.shape[0] for x in images}) != 1:
            raise ValueError("all pyramid levels must have the same batch size")
        out_size = images[0].shape[-2:]
        out: Optional[Tensor] = None
        for x in images:
            y = self.segment(x)
            if self.tta_hflip:
                flipped = self.segment(torch.flip(x, [-1])).flip([-1])
                y = _gather(y, flipped, self.tta_flip_gather)
            if y.shape[-2:] != out_size:
                y = F.interpolate(y, out_size, mode="bilinear", align_corners=False)
            out = y if out is None else _gather(y, out, self.tta_gather)
        return out


def _gather(new: Tensor, acc: Tensor, mode: str) -> Tensor:
    return (new + acc) * 0.5 if mode == "mean" else torch.max(new, acc)


def build(name: str, *, num_classes: Optional[int] = None, backbone: Optional[str] = None,
          weights=None, pretrained: bool = False, weights_dir=None,
          pretrained_backbone: bool = False, backend: str = "auto", precision: str = "fp32",
          channels_last: bool = True, compile=False) -> HyperSeg:
    """Build a zoo model by name, in eval mode.

    Args:
        name: one of ``hyperseg.list_models()`` (a zoo name or an alias).
        num_classes: output classes (default: the dataset's: 19 Cityscapes, 12 CamVid, 21 VOC).
        backbone: a timm model name to use instead of the official EfficientNet: any model with
            ``features_only`` feature maps at strides 2, 4, 8, 16 and 32 (EfficientNet,
            MobileNetV3, ResNet...), under the named model's context head and decoder
            (``BackboneError`` otherwise). The model is called ``<zoo name>+<backbone>``.
        weights: path of a checkpoint to load (official ``.pth`` or our ``.safetensors``); its
            architecture must be the named model's (else ``CheckpointError``).
        pretrained: load the official release's weights (``hyperseg.list_models(pretrained=True)``
            names the models that have them), downloaded once into ``weights_dir`` (default
            ``<torch.hub.get_dir()>/checkpoints``); see ``hyperseg.pretrained``.
        pretrained_backbone: initialise the backbone with timm's ImageNet weights. This downloads
            them from the Hugging Face hub, so it needs internet access (or timm's cache).
        backend: "auto", "torch" or "triton" (see ``HyperSeg``).
        precision: "fp32", "fp16" or "bf16": the inference precision (autocast; see ``HyperSeg``).
        channels_last: run the backbone in channels-last memory format (faster on CPU; see the
            README's measurements).
        compile: ``torch.compile`` the model's forward in place (``nn.Module.compile``): True, or
            a ``torch.compile`` mode such as "reduce-overhead" (CUDA graphs on a GPU). The first
            forward pass of each input shape then compiles (tens of seconds on a CPU).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if pretrained and weights is not None:
        raise ValueError("give either weights=PATH or pretrained=True, not both")
    if not (isinstance(compile, bool) or isinstance(compile, str)):
        raise TypeError(f"compile must be True, False or a torch.compile mode, got {compile!r}")
    if pretrained and backbone is not None:
        raise ValueError(f"the official weights are for the official backbone; a model with "
                         f"backbone={backbone!r} cannot load them (use pretrained_backbone=True "
                         f"for timm's ImageNet weights)")
    config = with_backbone(get_config(name, num_classes), backbone)
    official = get_config(name)
    if pretrained and config.num_classes != official.num_classes:
        raise ValueError(f"the official {official.name} weights predict {official.num_classes} "
                         f"classes, not {config.num_classes}: loading them into a model with "
                         f"another class count is not supported")
    checkpoint = None
    if pretrained:
        checkpoint = load_pretrained(name, weights_dir)
    elif weights is not None:
        checkpoint = read_checkpoint(weights)
    model = HyperSeg(config, pretrained_backbone=pretrained_backbone and checkpoint is None,
                     backend=backend)
    if checkpoint is not None:
        load_into(model, checkpoint)
    model.precision = precision
    model.channels_last = bool(channels_last)
    if compile:
        model.compile(**({} if compile is True else {"mode": compile}))
    return model.eval()


def load(path, *, backend: str = "auto", map_location="cpu",
         channels_last: bool = True) -> HyperSeg:
    """Build the model a checkpoint describes and load its weights, in eval mode.

    Reads official checkpoints (architecture from their ``'arch'`` string, parsed, never
    evaluated) and our safetensors files. ``map_location`` is where tensors are loaded and where
    the model is placed. ``channels_last``: run the backbone in channels-last memory format (the
    inference default, as in ``hyperseg.build``).
    """
    checkpoint = read_checkpoint(path, map_location)
    if checkpoint.config is None:
        raise CheckpointError(f"{os.fspath(path)!r} does not say which architecture it holds (no "
                              f"'arch' entry); use hyperseg.build(name, weights=path)")
    model = HyperSeg(checkpoint.config, backend=backend)
    load_into(model, checkpoint)
    model.channels_last = bool(channels_last)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()


def __getattr__(name: str):
    # the BatchNorm calibration of random models moved to hyperseg.calibration
    if name in ("calibrate_batchnorm", "reference_pass"):
        import warnings
        warnings.warn(f"hyperseg.model.{name} moved to hyperseg.calibration.{name}",
                      DeprecationWarning, stacklevel=2)
        from . import calibration
        return getattr(calibration, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
