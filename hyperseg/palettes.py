"""Colour palettes of the datasets, as data, and label-map colouring.

* Cityscapes: the colours of the 19 train ids of the official ``cityscapesScripts`` label table.
* CamVid: the colours of the 11 classes of the CamVid label table (Brostow et al.), plus Void
  (black) as class 11, in the order of ``zoo.CAMVID_CLASSES``.
* PASCAL VOC: the development kit's colormap, in which the bits of the class index are spread
  over the three channels, most significant first (``voc_colormap``).

``palette(config)`` picks a model's palette; a class count the dataset's palette does not cover
(custom models) falls back to the VOC colormap, which has 256 distinct colours.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

CITYSCAPES_PALETTE = np.array([
    (128, 64, 128),   # road
    (244, 35, 232),   # sidewalk
    (70, 70, 70),     # building
    (102, 102, 156),  # wall
    (190, 153, 153),  # fence
    (153, 153, 153),  # pole
    (250, 170, 30),   # traffic light
    (220, 220, 0),    # traffic sign
    (107, 142, 35),   # vegetation
    (152, 251, 152),  # terrain
    (70, 130, 180),   # sky
    (220, 20, 60),    # person
    (255, 0, 0),      # rider
    (0, 0, 142),      # car
    (0, 0, 70),       # truck
    (0, 60, 100),     # bus
    (0, 80, 100),     # train
    (0, 0, 230),      # motorcycle
    (119, 11, 32),    # bicycle
], dtype=np.uint8)

CAMVID_PALETTE = np.array([
    (128, 128, 128),  # Sky
    (128, 0, 0),      # Building
    (192, 192, 128),  # Column-Pole
    (128, 64, 128),   # Road
    (0, 0, 192),      # Sidewalk
    (128, 128, 0),    # Tree
    (192, 128, 128),  # Sign-Symbol
    (64, 64, 128),    # Fence
    (64, 0, 128),     # Car
    (64, 64, 0),      # Pedestrian
    (0, 128, 192),    # Bicyclist
    (0, 0, 0),        # Void
], dtype=np.uint8)


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colormap: (n, 3) uint8. Bit ``3 * j + c`` of the class index (c = 0 red,
    1 green, 2 blue) sets bit ``7 - j`` of channel c, so that the first classes get the most
    distinct colours (1 is (128, 0, 0), 2 is (0, 128, 0), 255 is (224, 224, 192))."""
    if n < 0:
        raise ValueError(f"the colormap size must be >= 0, got {n}")
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for index in range(n):
        value, rgb = index, [0, 0, 0]
        for j in range(8):
            for c in range(3):
                rgb[c] |= ((value >> c) & 1) << (7 - j)
            value >>= 3
        cmap[index] = rgb
    return cmap


VOC_PALETTE = voc_colormap(21)

PALETTES = {"cityscapes": CITYSCAPES_PALETTE, "camvid": CAMVID_PALETTE, "voc": VOC_PALETTE}


def palette(config_or_dataset, num_classes: int = None) -> np.ndarray:
    """The (num_classes, 3) uint8 palette of a model config (or a dataset name).

    A config's own ``palette`` (from a folder dataset's ``classes.json``) when it has one; else
    the dataset's standard colours when they cover ``num_classes`` classes; otherwise the VOC
    colormap (colours repeat after 256 classes).
    """
    if isinstance(config_or_dataset, str):
        dataset = config_or_dataset
    elif getattr(config_or_dataset, "palette", ()) and num_classes in (
            None, len(config_or_dataset.palette)):
        return np.array(config_or_dataset.palette, dtype=np.uint8)
    else:
        dataset = config_or_dataset.dataset
        if num_classes is None:
            num_classes = config_or_dataset.num_classes
    base = PALETTES.get(dataset)
    if num_classes is None:
        if base is None:
            raise ValueError(f"no palette for dataset {dataset!r}; give num_classes")
        num_classes = len(base)
    if base is not None and num_classes <= len(base):
        return base[:num_classes].copy()
    cmap = voc_colormap(256)
    return cmap[np.arange(num_classes) % 256]


def _as_numpy_labels(labels: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"a label map must have shape (H, W), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"a label map must hold integer class ids, got {labels.dtype}")
    return labels


def colorize(labels: Union[np.ndarray, torch.Tensor], colors: np.ndarray) -> np.ndarray:
    """Colour a (H, W) label map: (H, W, 3) uint8. Ids outside the palette are black."""
    labels = _as_numpy_labels(labels)
    colors = np.asarray(colors, dtype=np.uint8)
    table = np.zeros((len(colors) + 1, 3), dtype=np.uint8)
    table[:len(colors)] = colors
    out = np.empty(labels.shape + (3,), dtype=np.uint8)
    for rows in _row_bands(labels.shape[0], labels.shape[1]):
        part = labels[rows]
        out[rows] = table[np.where((part >= 0) & (part < len(colors)), part, len(colors))]
    return out


def _row_bands(height: int, width: int, pixels: int = 1 << 22):
    """Slices of rows covering about ``pixels`` pixels each: large images are coloured and
    blended band by band, in bounded memory."""
    step = max(1, pixels // max(1, width))
    return [slice(start, start + step) for start in range(0, max(height, 1), step)]


def overlay(image: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend an (H, W, 3) uint8 image with a colour map of the same size: ``(1 - alpha) * image
    + alpha * color``, as uint8."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image, color = np.asarray(image), np.asarray(color)
    if image.shape != color.shape or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image and colour map must both be (H, W, 3), got {image.shape} and "
                         f"{color.shape}")
    out = np.empty(image.shape, dtype=np.uint8)
    for rows in _row_bands(image.shape[0], image.shape[1]):
        blend = (1.0 - alpha) * image[rows].astype(np.float32) \
            + alpha * color[rows].astype(np.float32)
        out[rows] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    return out
