"""Segmenting images: reading, resizing, normalising, running the model, writing label maps.

    import hyperseg
    model = hyperseg.load("hyperseg-m.safetensors")
    labels = hyperseg.predict(model, "street.jpg")          # (H, W) torch.int64 class ids

``predict`` / ``predict_batch`` take images as paths, PIL images, (H, W, 3) uint8 numpy arrays or
(3, H, W) float tensors in [0, 1]. Each image is resized to the network's input size (by default
the model's official resolution, ``model.config.input_size``), normalised with the model's
dataset statistics, segmented, and the logits are resized back to the image's own size before the
arg-max, so the label map always has the size of the image given.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# ImageError and read_image live in hyperseg.images and are part of this module's API too
from .images import ImageError, read_image, to_rgb  # noqa: F401
from .options import (DEFAULT_TTA_SCALES, IMAGE_EXTENSIONS, MIN_SIDE, TTA_MODES,  # noqa: F401
                      check_size, image_path_problem, is_image_file, parse_size)
from .palettes import colorize, overlay, palette

if TYPE_CHECKING:                     # Pillow is imported when an image is read or written
    import PIL.Image

Size = Union[None, str, Tuple[int, int]]
TTA = Union[None, bool, str]
ImageLike = Union[str, "os.PathLike[str]", "PIL.Image.Image", np.ndarray, Tensor]


# ------------------------------------------------------------------------------------------------
# Images in (files are read by hyperseg.images)
# ------------------------------------------------------------------------------------------------

def to_tensor(image: ImageLike) -> Tensor:
    """Any accepted image as a (3, H, W) float32 CPU tensor in [0, 1].

    Accepted: a path (JPEG/PNG), a PIL image (any mode, converted to RGB), an (H, W, 3) uint8
    numpy array, or a (3, H, W) tensor: floating point in [0, 1], or uint8.
    """
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        image = read_image(image)
    if isinstance(image, Image.Image):
        array = np.asarray(to_rgb(image), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ImageError(f"a numpy image must be an (H, W, 3) uint8 array, got {image.shape} "
                             f"{image.dtype}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ImageError(f"a tensor image must have shape (3, H, W), got {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            return image.detach().cpu().float().div_(255)
        if not image.is_floating_point():
            raise ImageError(f"a tensor image must be floating point in [0, 1] or uint8, got "
                             f"{image.dtype}")
        return image.detach().cpu().float()
    raise TypeError(f"cannot use a {type(image).__name__} as an image; give a path, a PIL image, an "
                    f"(H, W, 3) uint8 array or a (3, H, W) tensor")


def to_uint8(image: Tensor) -> np.ndarray:
    """A (3, H, W) tensor in [0, 1] (or uint8) as an (H, W, 3) uint8 array."""
    if image.dtype == torch.uint8:
        return image.permute(1, 2, 0).numpy()
    return image.clamp(0, 1).mul_(255).round_().to(torch.uint8).permute(1, 2, 0).numpy()


def to_uint8_tensor(image: "PIL.Image.Image") -> Tensor:
    """A PIL image as a (3, H, W) uint8 tensor: a quarter of the memory of ``to_tensor``'s floats
    (``segment`` takes it as it is; large images are kept this way)."""
    return torch.from_numpy(np.asarray(to_rgb(image), dtype=np.uint8).copy()).permute(2, 0, 1)


def _as_float(image: Tensor) -> Tensor:
    return image.float().div_(255) if image.dtype == torch.uint8 else image


# ------------------------------------------------------------------------------------------------
# Sizes and preprocessing
# ------------------------------------------------------------------------------------------------

def network_size(config, size: Size, image_hw: Tuple[int, int]) -> Tuple[int, int]:
    """The size an image of ``image_hw`` is segmented at: ``size`` None or "model" -> the model's
    official resolution; "native" -> the image's own size; (H, W) -> that."""
    if isinstance(size, str) and size != "model":
        size = parse_size(size)
    if size is None or size == "model":
        return tuple(config.input_size)
    if size == "native":
        h, w = image_hw
        if h < MIN_SIDE or w < MIN_SIDE:
            raise ImageError(f"the image is {h} x {w}; segmenting at its native size needs at "
                             f"least {MIN_SIDE} x {MIN_SIDE}")
        return int(h), int(w)
    return check_size(size)


def resize(image: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bilinear resize of a (C, H, W) or (B, C, H, W) tensor (antialiased when shrinking)."""
    batched = image.dim() == 4
    x = image if batched else image[None]
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return x if batched else x[0]


def normalize(images: Tensor, config) -> Tensor:
    """``(images - mean) / std`` with the model's dataset statistics; images in [0, 1]."""
    mean = torch.tensor(config.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def pyramid(images: Tensor, scales: Sequence[float]) -> List[Tensor]:
    """Test-time augmentation inputs: ``images`` first (its size is the output size), then the
    other scales. Every level keeps sides >= 32."""
    levels = [images]
    h, w = images.shape[-2:]
    for s in scales:
        if s <= 0:
            raise ValueError(f"TTA scales must be positive, got {s}")
        size = (max(MIN_SIDE, round(h * s)), max(MIN_SIDE, round(w * s)))
        if abs(s - 1.0) > 1e-9 and size != (h, w):
            levels.append(F.interpolate(images, size=size, mode="bilinear", align_corners=False,
                                        antialias=True))
    return levels


def tta_mode(tta: TTA) -> Optional[str]:
    """A ``tta`` argument as None, "flip" or "ms" (True is "ms", False None)."""
    if tta is None or tta is False:
        return None
    if tta is True:
        return "ms"
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, True or None, got {tta!r}")
    return tta


def tta_forward(model, images: Tensor, tta: TTA, tta_scales: Sequence[float] = DEFAULT_TTA_SCALES
                ) -> Tensor:
    """The logits of a normalised batch under test-time augmentation ``tta``, for ``predict``
    and ``evaluate`` alike: None, the batch as it is; "flip", the batch and its mirror image,
    merged as the model merges flips (``tta_flip_gather``); "ms", the ``tta_scales`` pyramid
    (``pyramid``), each level also flipped when the model's ``tta_hflip`` says so (all zoo
    models do, as the official evaluation)."""
    tta = tta_mode(tta)
    if tta is None:
        return model(images)
    module = _model_of(model)
    hflip = module.tta_hflip
    module.tta_hflip = True if tta == "flip" else hflip
    try:
        return model([images] if tta == "flip" else pyramid(images, tta_scales))
    finally:
        module.tta_hflip = hflip


# ------------------------------------------------------------------------------------------------
# Prediction
# ------------------------------------------------------------------------------------------------

def _model_of(model):
    """The HyperSeg module behind ``model`` (also a torch.compile'd one)."""
    return getattr(model, "_orig_mod", model)


def segment(model, images: Sequence[Tensor], *, size: Size = None, batch_size: int = 4,
            tta: TTA = None, tta_scales: Sequence[float] = DEFAULT_TTA_SCALES) -> List[Tensor]:
    """Label maps of (3, H, W) float tensors in [0, 1] (see ``predict_batch``): consecutive images
    of equal network input size are batched, ``batch_size`` at most per forward pass."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tta = tta_mode(tta)
    config = _model_of(model).config
    targets = [network_size(config, size, tuple(image.shape[-2:])) for image in images]
    results: List[Tensor] = []
    start = 0
    while start < len(images):
        stop = start + 1
        while stop < len(images) and stop - start < batch_size and targets[stop] == targets[start]:
            stop += 1
        results += _segment_batch(model, config, images[start:stop], targets[start], tta,
                                  tta_scales)
        start = stop
    return results


def predict_batch(model, images: Iterable[ImageLike], *, size: Size = None,
                  batch_size: int = 4, tta: TTA = None,
                  tta_scales: Sequence[float] = DEFAULT_TTA_SCALES) -> List[Tensor]:
    """Segment several images; returns one (H, W) ``torch.int64`` CPU label map per image, each of
    its image's own size.

    Args:
        model: a ``HyperSeg`` (or a ``torch.compile``'d one); it runs on its own device and dtype,
            in eval mode, under ``torch.inference_mode``.
        images: paths, PIL images, (H, W, 3) uint8 arrays or (3, H, W) tensors in [0, 1]. All are
            read before the first forward pass: segment a long list in chunks.
        size: network input size: None (the model's official ``config.input_size``), "native"
            (each image's own size, at least 32 x 32), (H, W) or "HxW".
        batch_size: images per forward pass (consecutive images of equal network size).
        tta: test-time augmentation (see ``tta_forward``): None (none), "flip" (each image and
            its mirror image) or "ms" (a pyramid of ``tta_scales``, each level also flipped when
            the model's ``tta_hflip`` asks for it, merged by ``HyperSeg.forward_pyramid``); True
            means "ms".
    """
    return segment(model, [to_tensor(image) for image in images], size=size,
                   batch_size=batch_size, tta=tta, tta_scales=tta_scales)


def predict(model, image: ImageLike, *, size: Size = None, tta: TTA = None,
            tta_scales: Sequence[float] = DEFAULT_TTA_SCALES) -> Tensor:
    """Segment one image: its (H, W) label map of class ids, a ``torch.int64`` CPU tensor of the
    image's own size (``.numpy().astype(numpy.uint8)`` gives a uint8 array when there are at most
    256 classes). Arguments as ``predict_batch``."""
    return predict_batch(model, [image], size=size, tta=tta, tta_scales=tta_scales)[0]


def _segment_batch(model, config, images: Sequence[Tensor], target: Tuple[int, int], tta,
                   tta_scales: Sequence[float]) -> List[Tensor]:
    """Label maps of images segmented at one network input size ``target``."""
    batch = prepare_batch(model, images, target)
    return label_batch(model, batch, [tuple(image.shape[-2:]) for image in images], tta,
                       tta_scales)


def prepare_batch(model, images: Sequence[Tensor], target: Tuple[int, int]) -> Tensor:
    """The network input of (3, H, W) [0, 1] images: each resized to ``target``, stacked,
    normalised with the model's statistics, on the model's device and in its dtype."""
    module = _model_of(model)
    param = next(module.parameters())
    batch = torch.stack([resize(_as_float(image), target) for image in images])
    return normalize(batch.to(param.device), module.config).to(param.dtype)


def label_batch(model, batch: Tensor, sizes: Sequence[Tuple[int, int]], tta: TTA = None,
                tta_scales: Sequence[float] = DEFAULT_TTA_SCALES) -> List[Tensor]:
    """The label maps of a prepared batch (``prepare_batch``): the model's logits (in eval mode,
    under ``torch.inference_mode``, with test-time augmentation ``tta``) resized back to each
    image's (H, W) in ``sizes``, arg-maxed, as int64 CPU tensors."""
    module = _model_of(model)
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            logits = tta_forward(model, batch, tta, tta_scales)
            out = []
            for size, scores in zip(sizes, logits):
                # logits back to the image's size: plain bilinear, as the official evaluation
                out.append(upsampled_argmax(scores.float(), tuple(size)))
    finally:
        module.train(was_training)
    return out


# Above this many upsampled logits (classes x H x W), ``upsampled_argmax`` works in row bands.
BANDED_LOGITS = 1 << 25


def upsampled_argmax(scores: Tensor, size: Tuple[int, int], limit: int = BANDED_LOGITS) -> Tensor:
    """The (H, W) int64 CPU arg-max of (C, h, w) logits resized bilinearly (align_corners False)
    to ``size``. When C x H x W exceeds ``limit`` the rows are upsampled and reduced band by band
    (torch's bilinear is separable: along W by ``F.interpolate``, then along H here), so memory
    stays at about ``limit`` floats whatever the image size."""
    classes, h, w = scores.shape
    height, width = size
    if (h, w) == (height, width):
        return scores.argmax(0).cpu()
    if classes * height * width <= limit:
        return F.interpolate(scores[None], size=size, mode="bilinear",
                             align_corners=False).argmax(1)[0].cpu()
    rows = F.interpolate(scores[None], size=(h, width), mode="bilinear", align_corners=False)[0]
    source = ((torch.arange(height, dtype=torch.float64) + 0.5) * (h / height) - 0.5).clamp_(min=0)
    low = source.floor().long().clamp_(max=h - 1)
    high = (low + 1).clamp_(max=h - 1)
    weight = (source - low).float().to(rows.device)
    labels = torch.empty(size, dtype=torch.int64)
    band = max(1, limit // (classes * width))
    for start in range(0, height, band):
        stop = min(height, start + band)
        top, bottom = rows[:, low[start:stop]], rows[:, high[start:stop]]
        lam = weight[start:stop].view(1, -1, 1)
        labels[start:stop] = ((1 - lam) * top + lam * bottom).argmax(0).cpu()
    return labels


# ------------------------------------------------------------------------------------------------
# Images out
# ------------------------------------------------------------------------------------------------

def label_image(labels: Union[Tensor, np.ndarray]) -> "PIL.Image.Image":
    """A label map as a PIL image of its class ids: 8-bit grayscale ("L"), or 16-bit ("I;16")
    when an id exceeds 255."""
    from PIL import Image

    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"a label map must have shape (H, W), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 65535):
        raise ValueError("class ids must be in [0, 65535] to be written as a PNG")
    if labels.size == 0 or labels.max() <= 255:
        return Image.fromarray(labels.astype(np.uint8))            # mode "L"
    return Image.fromarray(labels.astype(np.uint16))           # mode "I;16"


def save_prediction(labels: Tensor, image: Tensor, colors: np.ndarray, out_dir: str, stem: str,
                    alpha: float = 0.5) -> List[str]:
    """Write ``<stem>_labels.png`` (class ids), ``<stem>_color.png`` (palette colours) and
    ``<stem>_overlay.png`` (the image blended with the colours) into ``out_dir`` (created if
    needed). ``image`` is the (3, H, W) [0, 1] image the labels belong to. Returns the paths."""
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    color = colorize(labels, colors)
    paths = [os.path.join(out_dir, f"{stem}_{kind}.png") for kind in ("labels", "color", "overlay")]
    label_image(labels).save(paths[0])
    Image.fromarray(color).save(paths[1])
    Image.fromarray(overlay(to_uint8(image), color, alpha)).save(paths[2])
    return paths


def model_palette(model) -> np.ndarray:
    """The palette of a model's dataset and class count (see ``hyperseg.palettes.palette``)."""
    return palette(_model_of(model).config)
