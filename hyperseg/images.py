"""Reading image files: JPEG/PNG to an upright RGB PIL image, and the upright size of a file.

The lowest layer of the image pipeline (numpy and Pillow, no torch): ``hyperseg.predict`` builds
its tensors on it and ``hyperseg.datasets`` reads its samples with it.
"""
from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Tuple

import numpy as np

from .options import image_path_problem

if TYPE_CHECKING:                     # Pillow is imported when an image is read
    import PIL.Image

# EXIF orientations (tag 0x0112) that turn the picture by 90 or 270 degrees: height and width swap.
EXIF_ORIENTATION = 0x0112
TURNED_ORIENTATIONS = (5, 6, 7, 8)


class ImageError(ValueError):
    """An image that cannot be read or used."""


def read_image(path) -> "PIL.Image.Image":
    """Read a JPEG or PNG file as an RGB PIL image, turned upright by its EXIF orientation.

    Raises ``ImageError`` (with the reason) for a missing file, another extension, or a file that
    is not a readable image.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = os.fspath(path)
    problem = image_path_problem(path)
    if problem:
        raise ImageError(problem)
    try:
        with warnings.catch_warnings():
            # images up to Pillow's hard limit (about 179 megapixels) are read, in bounded memory
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image)
                image.load()
                return to_rgb(image)
    except Image.DecompressionBombError as err:
        raise ImageError(f"refusing to read the image: {err}") from None
    except UnidentifiedImageError:
        raise ImageError("not a readable JPEG/PNG image") from None
    except (OSError, SyntaxError, ValueError) as err:   # truncated or corrupt data, permissions
        raise ImageError(f"cannot read the image: {err}") from None


def to_rgb(image: "PIL.Image.Image") -> "PIL.Image.Image":
    """An RGB (8 bits per channel) copy of ``image``. Pillow reads a 16-bit grayscale PNG as
    mode "I;16" (or "I") and its ``convert("RGB")`` clips every value above 255 to white; such
    an image is scaled to 8 bits as Pillow does for 16-bit colour PNGs (the high byte)."""
    from PIL import Image

    if image.mode.startswith("I"):
        values = np.asarray(image).astype(np.int64)
        gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return image.convert("RGB")


def upright_size(path) -> Tuple[int, int]:
    """(H, W) of an image file as ``read_image`` returns it (EXIF orientation applied), from its
    header alone. Raises ``ImageError("not a readable image (...)")`` when Pillow cannot open it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(os.fspath(path)) as image:
            w, h = image.size
            turned = image.getexif().get(EXIF_ORIENTATION, 1) in TURNED_ORIENTATIONS
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageError(f"not a readable image ({err})") from None
    return (w, h) if turned else (h, w)
