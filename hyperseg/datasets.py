"""Segmentation datasets read from their public folder layouts, a synthetic dataset, and the joint
image + mask augmentation (``torchvision.transforms.v2``).

Every dataset yields ``(tv_tensors.Image, tv_tensors.Mask)``: the RGB image as (3, H, W) uint8 and
its label map as (H, W) uint8 class ids, 255 marking unlabelled pixels. Nothing is downloaded; a
missing or malformed folder raises ``DatasetError`` saying what was expected where.

    dataset = open_dataset(parse_data_spec("cityscapes:/data/cityscapes"), "train")
    image, mask = dataset[0]
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .images import ImageError, read_image, upright_size
from .options import DATA_SPEC_HELP, parse_size
from .palettes import CAMVID_PALETTE
from .zoo import CAMVID_CLASSES, CITYSCAPES_CLASSES, VOC_CLASSES

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class DatasetError(ValueError):
    """A dataset folder, file or specification that cannot be used."""

    def __init__(self, message: str = ""):
        # torch's DataLoader re-raises a worker's error as DatasetError(the worker's whole
        # traceback as text): keep the message alone
        if isinstance(message, str) and "\nOriginal Traceback" in message:
            message = message.rstrip().rsplit(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


# ------------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------------

def _read_image(path: str) -> tv_tensors.Image:
    try:
        image = read_image(path)
    except ImageError as err:
        raise DatasetError(f"{path}: {err}") from None
    array = np.asarray(image, dtype=np.uint8)
    return tv_tensors.Image(torch.from_numpy(array.copy()).permute(2, 0, 1))


def _read_label(path: str, colour: bool = False) -> np.ndarray:
    """A label PNG as an (H, W) array of its values (palette indices for "P" images), or as
    (H, W, 3) RGB when ``colour``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as label:
            if colour:
                return np.asarray(label.convert("RGB"))
            if label.mode not in ("L", "P", "I;16", "I"):
                raise DatasetError(f"{path}: a label image must be single-channel class ids "
                                   f"(8-bit grayscale or palette PNG), got mode {label.mode}")
            return np.asarray(label)
    except FileNotFoundError:
        raise DatasetError(f"{path}: label file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(f"{path}: cannot read the label image: {err}") from None


def _check_ids(ids: np.ndarray, num_ids: int, path: str) -> None:
    bad = np.unique(ids[(ids >= num_ids) & (ids != IGNORE_INDEX)])
    if bad.size:
        raise DatasetError(f"{path}: label values {bad[:10].tolist()} are not class ids "
                           f"0..{num_ids - 1} or {IGNORE_INDEX} (ignore)")


def _image_files(folder: str) -> List[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def _split_names(split: Union[str, Sequence[str]]) -> List[str]:
    """``"train+val"`` or ``["train", "val"]`` -> ``["train", "val"]``."""
    names = split.split("+") if isinstance(split, str) else list(split)
    names = [n.strip() for n in names]
    if not names or not all(names):
        raise DatasetError(f"invalid split {split!r}")
    return names


def _missing_error(dataset: str, missing: List[str], what: str) -> DatasetError:
    return DatasetError(f"{dataset}: {len(missing)} image(s) have no {what}, e.g. {missing[0]}")


# ------------------------------------------------------------------------------------------------
# Datasets on disk
# ------------------------------------------------------------------------------------------------

class SegmentationDataset(torch.utils.data.Dataset):
    """Image / label file pairs. Subclasses fill ``samples`` and decode their label format."""

    name = "dataset"
    classes: Tuple[str, ...] = ()
    void_class: Optional[int] = None        # a class that mIoU may leave out (CamVid's Void)

    def __init__(self, root: str, split: Union[str, Sequence[str]]):
        self.root = os.fspath(root)
        self.splits = _split_names(split)
        self.split = "+".join(self.splits)
        self.samples: List[Tuple[str, str]] = []
        if not os.path.isdir(self.root):
            raise DatasetError(f"{self.name}: the dataset folder {self.root!r} does not exist "
                               f"(expected {self.layout()})")

    @classmethod
    def layout(cls) -> str:
        return "the dataset's folders"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def decode_label(self, path: str) -> np.ndarray:
        ids = _read_label(path)
        _check_ids(ids, self.num_classes, path)
        return ids.astype(np.uint8)

    def __getitem__(self, index: int) -> Tuple[tv_tensors.Image, tv_tensors.Mask]:
        image_path, label_path = self.samples[index]
        image = _read_image(image_path)
        label = self.decode_label(label_path)
        if tuple(label.shape[:2]) != tuple(image.shape[-2:]):
            raise DatasetError(f"{label_path}: the label is {label.shape[0]}x{label.shape[1]} but "
                               f"its image {image_path} is {image.shape[-2]}x{image.shape[-1]}")
        return image, tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(label)))

    def _finish(self, missing: List[str], what: str) -> None:
        if missing:
            raise _missing_error(f"{self.name} {self.split}", missing, what)
        if not self.samples:
            raise DatasetError(f"{self.name} {self.split}: no images found under {self.root!r} "
                               f"(expected {self.layout()})")


# The 34 Cityscapes label ids -> the 19 train ids (cityscapesScripts' label table); others ignored.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                        24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
_CITYSCAPES_LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _label_id, _train_id in CITYSCAPES_TRAIN_IDS.items():
    _CITYSCAPES_LUT[_label_id] = _train_id


class Cityscapes(SegmentationDataset):
    """Cityscapes fine annotations: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with
    ``gtFine/{split}/{city}/*_gtFine_labelIds.png`` (mapped to the 19 train ids, 255 ignored), or
    ``*_gtFine_labelTrainIds.png`` when present (used as is)."""

    name = "cityscapes"
    classes = CITYSCAPES_CLASSES

    @classmethod
    def layout(cls) -> str:
        return ("<root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png and "
                "<root>/gtFine/<split>/<city>/<name>_gtFine_labelIds.png")

    def __init__(self, root: str, split: Union[str, Sequence[str]] = "train"):
        super().__init__(root, split)
        missing: List[str] = []
        for s in self.splits:
            image_dir = os.path.join(self.root, "leftImg8bit", s)
            label_dir = os.path.join(self.root, "gtFine", s)
            for folder in (image_dir, label_dir):
                if not os.path.isdir(folder):
                    raise DatasetError(f"cityscapes: no folder {folder!r} "
                                       f"(expected {self.layout()})")
            for city in sorted(os.listdir(image_dir)):
                if not os.path.isdir(os.path.join(image_dir, city)):
                    continue
                for file in sorted(os.listdir(os.path.join(image_dir, city))):
                    if not file.endswith("_leftImg8bit.png"):
                        continue
                    image = os.path.join(image_dir, city, file)
                    stem = os.path.join(label_dir, city, file[:-len("_leftImg8bit.png")])
                    for suffix in ("_gtFine_labelTrainIds.png", "_gtFine_labelIds.png"):
                        if os.path.isfile(stem + suffix):
                            self.samples.append((image, stem + suffix))
                            break
                    else:
                        missing.append(stem + "_gtFine_labelIds.png")
        self._finish(missing, "label file (<name>_gtFine_labelIds.png or _labelTrainIds.png)")

    def decode_label(self, path: str) -> np.ndarray:
        ids = _read_label(path)
        if path.endswith("_labelTrainIds.png"):
            _check_ids(ids, self.num_classes, path)
            return ids.astype(np.uint8)
        if ids.max(initial=0) > 255:
            raise DatasetError(f"{path}: label ids above 255 (is this an instance-id file?)")
        return _CITYSCAPES_LUT[ids]


class CamVid(SegmentationDataset):
    """CamVid, 11 classes plus Void (class 11, trained and evaluated as in the official code).

    Two layouts are read, per split:

    * SegNet: ``{split}/*.png`` images with ``{split}annot/*.png`` (same names) of class ids
      0..10 and 11 for Void;
    * the official code's (Kaggle): ``{split}/*.png`` with ``{split}_labels/<name>_L.png`` colour
      labels; the colours of the 11 classes and Void (black) map to 0..11, any other colour is
      ignored (255).
    """

    name = "camvid"
    classes = CAMVID_CLASSES
    void_class = 11

    @classmethod
    def layout(cls) -> str:
        return ("<root>/<split>/*.png with <root>/<split>annot/*.png (SegNet class ids) or "
                "<root>/<split>_labels/<name>_L.png (colour labels), split train, val or test")

    def __init__(self, root: str, split: Union[str, Sequence[str]] = "train"):
        super().__init__(root, split)
        self._colour_labels = set()
        missing: List[str] = []
        for s in self.splits:
            image_dir = os.path.join(self.root, s)
            index_dir, colour_dir = image_dir + "annot", image_dir + "_labels"
            if not os.path.isdir(image_dir):
                raise DatasetError(f"camvid: no folder {image_dir!r} (expected {self.layout()})")
            colour = not os.path.isdir(index_dir)
            if colour and not os.path.isdir(colour_dir):
                raise DatasetError(f"camvid: {image_dir!r} has no label folder: expected "
                                   f"{index_dir!r} (SegNet layout) or {colour_dir!r} (colour "
                                   f"labels <name>_L.png)")
            for file in _image_files(image_dir):
                if colour:
                    label = os.path.join(colour_dir, os.path.splitext(file)[0] + "_L.png")
                else:
                    label = os.path.join(index_dir, file)
                if not os.path.isfile(label):
                    missing.append(label)
                    continue
                self.samples.append((os.path.join(image_dir, file), label))
                if colour:
                    self._colour_labels.add(label)
        self._finish(missing, "label file")

    def decode_label(self, path: str) -> np.ndarray:
        if path not in self._colour_labels:
            return super().decode_label(path)
        rgb = _read_label(path, colour=True).astype(np.int32)
        packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        ids = np.full(packed.shape, IGNORE_INDEX, dtype=np.uint8)
        for class_id, (r, g, b) in enumerate(CAMVID_PALETTE.astype(np.int32)):
            ids[packed == ((r << 16) | (g << 8) | b)] = class_id
        return ids


class VOCSBD(SegmentationDataset):
    """PASCAL VOC 2012 with the SBD augmented annotations, as the official code prepares it:
    ``VOCdevkit/VOC2012/`` holding ``JPEGImages/``, ``SegmentationClassAug/`` and the pair lists
    ``train_aug.txt`` / ``val.txt`` (lines ``/JPEGImages/x.jpg /SegmentationClassAug/x.png``).

    ``root`` is the folder containing ``VOCdevkit`` or ``VOC2012`` itself. ``split`` names a pair
    list in ``VOC2012`` (or is a path to one); without one, a plain VOC id list
    ``ImageSets/Segmentation/{split}.txt`` is read with labels from ``SegmentationClassAug/``
    (or ``SegmentationClass/``). Labels are class ids 0..20, 255 on boundaries (ignored).
    """

    name = "voc"
    classes = VOC_CLASSES

    @classmethod
    def layout(cls) -> str:
        return ("<root>/VOCdevkit/VOC2012/ with JPEGImages/, SegmentationClassAug/ and the pair "
                "lists train_aug.txt and val.txt (or ImageSets/Segmentation/<split>.txt)")

    def __init__(self, root: str, split: Union[str, Sequence[str]] = "train_aug"):
        super().__init__(root, split)
        devkit = os.path.join(self.root, "VOCdevkit", "VOC2012")
        voc_root = devkit if os.path.isdir(devkit) else self.root
        if not os.path.isdir(os.path.join(voc_root, "JPEGImages")):
            raise DatasetError(f"voc: no JPEGImages folder in {devkit!r} or {self.root!r} "
                               f"(expected {self.layout()})")
        self.voc_root = voc_root
        missing: List[str] = []
        for s in self.splits:
            for image, label in self._list(s):
                if not os.path.isfile(image):
                    missing.append(image)
                elif not os.path.isfile(label):
                    missing.append(label)
                else:
                    self.samples.append((image, label))
        self._finish(missing, "file (image or label listed in the split file)")

    def _list(self, split: str) -> List[Tuple[str, str]]:
        voc_root = self.voc_root
        candidates = [split] if split.endswith(".txt") else []
        name = split if split.endswith(".txt") else split + ".txt"
        candidates.append(os.path.join(voc_root, name))
        for path in candidates:
            if os.path.isfile(path):
                return self._read_pairs(path)
        id_list = os.path.join(voc_root, "ImageSets", "Segmentation", split + ".txt")
        if not os.path.isfile(id_list):
            raise DatasetError(f"voc: no split file for {split!r}: expected the pair list "
                               f"{candidates[-1]!r} or the id list {id_list!r}")
        label_dir = os.path.join(voc_root, "SegmentationClassAug")
        if not os.path.isdir(label_dir):
            label_dir = os.path.join(voc_root, "SegmentationClass")
        with open(id_list) as f:
            ids = [line.strip() for line in f if line.strip()]
        return [(os.path.join(voc_root, "JPEGImages", i + ".jpg"),
                 os.path.join(label_dir, i + ".png")) for i in ids]

    def _read_pairs(self, path: str) -> List[Tuple[str, str]]:
        pairs = []
        with open(path) as f:
            for number, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2:
                    raise DatasetError(f"{path}, line {number}: expected '<image> <label>' (paths "
                                       f"relative to {self.voc_root!r}), got {line.strip()!r}")
                pairs.append(tuple(os.path.join(self.voc_root, p.lstrip("/")) for p in parts))
        return pairs


# ------------------------------------------------------------------------------------------------
# Your own data: a folder of images and masks
# ------------------------------------------------------------------------------------------------

CLASSES_FILE = "classes.json"
DEFAULT_VAL_FRACTION = 0.1


def read_classes_file(path: str) -> Tuple[Tuple[str, ...], Tuple[Tuple[int, int, int], ...]]:
    """The class names and palette of a ``classes.json``: ``{"classes": ["background", "cat"],
    "palette": [[0, 0, 0], [255, 0, 0]]}`` (the palette is optional: one colour per class)."""
    import json

    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot read it ({err.strerror or err})") from None
    example = '{"classes": ["background", "cat"], "palette": [[0, 0, 0], [255, 0, 0]]}'
    if not isinstance(data, dict) or "classes" not in data:
        raise DatasetError(f"{path}: expected an object with a \"classes\" list, e.g. {example}")
    unknown = sorted(set(data) - {"classes", "palette"})
    if unknown:
        raise DatasetError(f"{path}: unknown entries {unknown}; expected \"classes\" and "
                           f"optionally \"palette\", e.g. {example}")
    names = data["classes"]
    if not isinstance(names, list) or not names or \
            not all(isinstance(n, str) and n.strip() for n in names):
        raise DatasetError(f"{path}: \"classes\" must be a non-empty list of names, got {names!r}")
    if len(names) > IGNORE_INDEX:
        raise DatasetError(f"{path}: at most {IGNORE_INDEX} classes (8-bit masks, 255 ignored), "
                           f"got {len(names)}")
    if len(set(names)) != len(names):
        raise DatasetError(f"{path}: class names must be distinct, got {names!r}")
    colours = data.get("palette", [])
    if not isinstance(colours, list) or (colours and len(colours) != len(names)) or not all(
            isinstance(c, list) and len(c) == 3 and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in c)
            for c in colours):
        raise DatasetError(f"{path}: \"palette\" must give one [R, G, B] colour (0..255) per "
                           f"class ({len(names)}), got {colours!r}")
    if len({tuple(c) for c in colours}) != len(colours):
        raise DatasetError(f"{path}: the palette's colours must be distinct")
    return tuple(names), tuple(tuple(c) for c in colours)


def _upright_size(path: str) -> Tuple[int, int]:
    """(H, W) of an image file as ``_read_image`` returns it (EXIF orientation applied), from its
    header alone."""
    try:
        return upright_size(path)
    except ImageError as err:
        raise DatasetError(f"{path}: {err}") from None


def _files_by_stem(folder: str, extensions: Sequence[str]) -> Dict[str, str]:
    found: Dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in extensions or not os.path.isfile(os.path.join(folder, name)):
            continue
        if stem in found:
            raise DatasetError(f"{folder}: two files share the stem {stem!r} "
                               f"({os.path.basename(found[stem])} and {name})")
        found[stem] = os.path.join(folder, name)
    return found


def _pair_files(image_dir: str, mask_dir: str) -> List[Tuple[str, str, str]]:
    """(stem, image, mask) of the images and masks of two folders that share stems; an image
    without a mask, or a mask without an image, is an error."""
    for folder in (image_dir, mask_dir):
        if not os.path.isdir(folder):
            raise DatasetError(f"folder: no folder {folder!r} (expected {FolderDataset.layout()})")
    images = _files_by_stem(image_dir, IMAGE_EXTENSIONS)
    masks = _files_by_stem(mask_dir, (".png",))
    lonely_masks = sorted(set(masks) - set(images))
    if lonely_masks:
        raise DatasetError(f"folder: {len(lonely_masks)} mask(s) have no image, e.g. "
                           f"{masks[lonely_masks[0]]} (expected {lonely_masks[0]}.png or .jpg in "
                           f"{image_dir})")
    lonely_images = sorted(set(images) - set(masks))
    if lonely_images:
        raise DatasetError(f"folder: {len(lonely_images)} image(s) have no mask, e.g. "
                           f"{images[lonely_images[0]]} (expected {lonely_images[0]}.png in "
                           f"{mask_dir})")
    return [(stem, images[stem], masks[stem]) for stem in sorted(images)]


def split_by_fraction(stems: Sequence[str], val_fraction: float) -> Dict[str, List[str]]:
    """A deterministic train / val split of ``stems``: ordered by a hash of each stem, the first
    ``round(n * val_fraction)`` (at least one when the fraction is positive and n >= 2) go to val.
    A stem keeps its split when other files are added, unless the count at its place changes."""
    import hashlib

    if not 0 <= val_fraction < 1:
        raise DatasetError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    order = sorted(stems, key=lambda stem: hashlib.sha256(stem.encode()).hexdigest())
    count = round(len(order) * val_fraction)
    if val_fraction > 0 and len(order) >= 2:
        count = max(1, count)
    return {"val": sorted(order[:count]), "train": sorted(order[count:])}


class FolderDataset(SegmentationDataset):
    """Your own data: ``<root>/images/<split>/*.{jpg,png}`` with ``<root>/masks/<split>/*.png``
    sharing stems, or ``<root>/images/*`` with ``<root>/masks/*`` split into train and val by
    ``val_fraction`` (``split_by_fraction``).

    A mask holds 8-bit class ids (255 ignored), or RGB colours of the palette of
    ``<root>/classes.json`` (``read_classes_file``), which also names the classes. Without that
    file the classes are 0..max over all masks of the folder (a warning says so). On opening,
    every pair is checked (stems, sizes, class ids), so a bad file stops the run before training.
    """

    name = "folder"

    @classmethod
    def layout(cls) -> str:
        return ("<root>/images/<split>/*.jpg|png with <root>/masks/<split>/*.png of the same "
                "names, or <root>/images/* with <root>/masks/* (split by --val-fraction), and "
                "optionally <root>/classes.json")

    def __init__(self, root: str, split: Union[str, Sequence[str]] = "train",
                 val_fraction: float = DEFAULT_VAL_FRACTION):
        super().__init__(root, split)
        image_root, mask_root = os.path.join(self.root, "images"), os.path.join(self.root, "masks")
        classes_path = os.path.join(self.root, CLASSES_FILE)
        if os.path.isfile(classes_path):
            self.classes, self.palette = read_classes_file(classes_path)
        else:
            self.classes, self.palette = (), ()
        self.split_folders = os.path.isdir(image_root) and any(
            os.path.isdir(os.path.join(image_root, d)) for d in os.listdir(image_root))
        if self.split_folders:
            for s in self.splits:
                pairs = _pair_files(os.path.join(image_root, s), os.path.join(mask_root, s))
                if not pairs:
                    raise DatasetError(f"folder {s}: an empty split: no images in "
                                       f"{os.path.join(image_root, s)!r}")
                self.samples += [(image, mask) for _, image, mask in pairs]
        else:
            self.samples = self._fraction_samples(image_root, mask_root, val_fraction)
        if not self.classes:
            self.classes = self._classes_from_masks(mask_root)
        self._check_samples()

    def _fraction_samples(self, image_root: str, mask_root: str, val_fraction: float):
        pairs = _pair_files(image_root, mask_root)
        parts = split_by_fraction([stem for stem, _, _ in pairs], val_fraction)
        unknown = [s for s in self.splits if s not in parts]
        if unknown:
            raise DatasetError(f"folder: {self.root!r} has no split folders, so its splits are "
                               f"train and val (by --val-fraction), not {unknown[0]!r}")
        chosen = {stem for s in self.splits for stem in parts[s]}
        if not chosen:
            raise DatasetError(f"folder {self.split}: an empty split: {len(pairs)} image(s) in "
                               f"{image_root!r} with validation fraction {val_fraction:g}")
        return [(image, mask) for stem, image, mask in pairs if stem in chosen]

    def _classes_from_masks(self, mask_root: str) -> Tuple[str, ...]:
        """Class names 0..max over every mask under ``mask_root`` (every split), with a warning."""
        import warnings

        largest = -1
        for folder, _, files in os.walk(mask_root):
            for name in sorted(f for f in files if f.lower().endswith(".png")):
                path = os.path.join(folder, name)
                ids = self._decode_ids(path)
                ids = ids[ids != IGNORE_INDEX]
                if ids.size:
                    largest = max(largest, int(ids.max()))
        if largest < 0:
            raise DatasetError(f"folder: every mask under {mask_root!r} is all ignore "
                               f"({IGNORE_INDEX}); "
                               f"name the classes in {os.path.join(self.root, CLASSES_FILE)}")
        warnings.warn(f"{self.root}: no {CLASSES_FILE}, so the classes are 0..{largest} (the "
                      f"largest id in the masks); write {CLASSES_FILE} to name them and fix "
                      f"their number", stacklevel=3)
        return tuple(str(i) for i in range(largest + 1))

    def _decode_ids(self, path: str) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as mask:
                colour = mask.mode in ("RGB", "RGBA")
        except OSError:
            colour = False       # _read_label reports it
        if not colour:
            return _read_label(path)
        if not self.palette:
            raise DatasetError(f"{path}: an RGB colour mask, but "
                               f"{os.path.join(self.root, CLASSES_FILE)} "
                               f"gives no \"palette\" to map its colours to classes")
        rgb = _read_label(path, colour=True).astype(np.int32)
        packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        ids = np.full(packed.shape, IGNORE_INDEX, dtype=np.uint8)
        known = np.zeros(packed.shape, dtype=bool)
        for class_id, (r, g, b) in enumerate(self.palette):
            hit = packed == ((r << 16) | (g << 8) | b)
            ids[hit], known = class_id, known | hit
        if not known.all():
            y, x = np.argwhere(~known)[0]
            raise DatasetError(f"{path}: colour {tuple(int(v) for v in rgb[y, x])} at (x={x}, "
                               f"y={y}) is not in the palette of {CLASSES_FILE}")
        return ids

    def decode_label(self, path: str) -> np.ndarray:
        ids = self._decode_ids(path)
        _check_ids(ids, self.num_classes, path)
        return ids.astype(np.uint8)

    def _check_samples(self) -> None:
        """Each mask has its image's size and only declared class ids (or 255)."""
        for image, mask in self.samples:
            image_size, mask_size = _upright_size(image), _upright_size(mask)
            if image_size != mask_size:
                raise DatasetError(f"{mask}: the mask is {mask_size[0]}x{mask_size[1]} (HxW) but "
                                   f"its image {image} is {image_size[0]}x{image_size[1]}")
            self.decode_label(mask)


# ------------------------------------------------------------------------------------------------
# Synthetic shapes
# ------------------------------------------------------------------------------------------------

# Foreground classes: a saturated colour and a shape each (background is class 0, greyish).
SYNTHETIC_COLOURS = ((220, 40, 40), (40, 180, 60), (50, 80, 230), (235, 210, 40), (200, 50, 200),
                     (40, 200, 210), (245, 140, 30), (120, 50, 170))
SYNTHETIC_SHAPES = ("rectangle", "ellipse", "triangle", "diamond")
SYNTHETIC_SPLITS = {"train": 0, "val": 1, "test": 2}


class SyntheticShapes(torch.utils.data.Dataset):
    """Random shapes of known classes on random backgrounds, generated on the fly.

    Image ``i`` of a split depends only on ``(seed, split, i)``: the same arguments always give
    the same images, and the splits are disjoint streams. Class 0 is the background (a random grey
    gradient with noise); class ``k >= 1`` is a shape of kind ``SYNTHETIC_SHAPES[(k - 1) % 4]`` in
    colour ``SYNTHETIC_COLOURS[k - 1]`` (jittered). Each image holds one to four large shapes.
    """

    name = "synthetic"
    void_class = None

    def __init__(self, length: int = 512, size: Tuple[int, int] = (128, 128), num_classes: int = 4,
                 seed: int = 0, split: str = "train"):
        if split not in SYNTHETIC_SPLITS:
            raise DatasetError(f"synthetic: unknown split {split!r}; expected one of "
                               f"{', '.join(SYNTHETIC_SPLITS)}")
        if not 2 <= num_classes <= len(SYNTHETIC_COLOURS) + 1:
            raise DatasetError(f"synthetic: classes must be 2..{len(SYNTHETIC_COLOURS) + 1}, got "
                               f"{num_classes}")
        if length < 1:
            raise DatasetError(f"synthetic: length must be >= 1, got {length}")
        h, w = size
        if h < 32 or w < 32:
            raise DatasetError(f"synthetic: size must be at least 32x32, got {h}x{w}")
        self.length, self.size, self.seed = length, (int(h), int(w)), seed
        self.split = split
        shapes = SYNTHETIC_SHAPES
        self.classes = ("background",) + tuple(f"{shapes[(k - 1) % len(shapes)]}-{k}"
                                               for k in range(1, num_classes))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tuple[tv_tensors.Image, tv_tensors.Mask]:
        from PIL import Image, ImageDraw

        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        rng = np.random.default_rng([self.seed, SYNTHETIC_SPLITS[self.split], index])
        h, w = self.size
        ends = rng.integers(30, 226, size=2)
        ramp = np.linspace(0.0, 1.0, w)[None, :] if rng.random() < 0.5 else \
            np.linspace(0.0, 1.0, h)[:, None]
        grey = ends[0] + (ends[1] - ends[0]) * np.broadcast_to(ramp, (h, w))
        tint = rng.integers(-12, 13, size=3)
        background = grey[..., None] + tint + rng.normal(0, 6, (h, w, 3))
        image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
        mask = Image.new("L", (w, h), 0)
        paint, label = ImageDraw.Draw(image), ImageDraw.Draw(mask)
        for _ in range(int(rng.integers(1, 5))):
            k = int(rng.integers(1, self.num_classes))
            sh, sw = rng.uniform(0.25, 0.55) * h, rng.uniform(0.25, 0.55) * w
            top, left = rng.uniform(-0.1 * h, h - 0.9 * sh), rng.uniform(-0.1 * w, w - 0.9 * sw)
            box = (left, top, left + sw, top + sh)
            colour = tuple(int(c) for c in np.clip(np.array(SYNTHETIC_COLOURS[k - 1])
                                                   + rng.integers(-20, 21, size=3), 0, 255))
            for draw, fill in ((paint, colour), (label, k)):
                _draw_shape(draw, SYNTHETIC_SHAPES[(k - 1) % len(SYNTHETIC_SHAPES)], box, fill)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return tv_tensors.Image(pixels), tv_tensors.Mask(torch.from_numpy(np.asarray(mask).copy()))


def _draw_shape(draw, kind: str, box, fill) -> None:
    left, top, right, bottom = box
    cx, cy = (left + right) / 2, (top + bottom) / 2
    if kind == "rectangle":
        draw.rectangle(box, fill=fill)
    elif kind == "ellipse":
        draw.ellipse(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, top), (right, bottom), (left, bottom)], fill=fill)
    else:
        draw.polygon([(cx, top), (right, cy), (cx, bottom), (left, cy)], fill=fill)


# ------------------------------------------------------------------------------------------------
# --data specifications
# ------------------------------------------------------------------------------------------------

DATASETS = {"cityscapes": Cityscapes, "camvid": CamVid, "voc": VOCSBD, "folder": FolderDataset,
            "synthetic": SyntheticShapes}
DATASET_ALIASES = {"vocsbd": "voc", "voc-sbd": "voc"}
# The official splits: (training, validation) per dataset.
DEFAULT_SPLITS = {"cityscapes": ("train", "val"), "camvid": ("train+val", "test"),
                  "voc": ("train_aug", "val"), "folder": ("train", "val"),
                  "synthetic": ("train", "val")}
SYNTHETIC_DEFAULTS = {"length": 512, "size": (128, 128), "classes": 4, "seed": 0}


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value: a dataset kind and its folder (or synthetic options)."""

    kind: str
    root: Optional[str] = None
    length: int = SYNTHETIC_DEFAULTS["length"]
    size: Tuple[int, int] = SYNTHETIC_DEFAULTS["size"]
    classes: int = SYNTHETIC_DEFAULTS["classes"]
    seed: int = SYNTHETIC_DEFAULTS["seed"]

    def __str__(self) -> str:
        if self.kind != "synthetic":
            return f"{self.kind}:{self.root}"
        return (f"synthetic:{self.length},size={self.size[0]}x{self.size[1]},"
                f"classes={self.classes},seed={self.seed}")


def _parse_size(text: str) -> Tuple[int, int]:
    """A synthetic ``size=`` value: N or HxW (its sides are checked by ``SyntheticShapes``)."""
    try:
        return parse_size(text, native=False, square=True, min_side=None)
    except ValueError as err:
        raise DatasetError(str(err)) from None


def parse_data_spec(text: str) -> DataSpec:
    """``"cityscapes:/data/cs"`` -> DataSpec("cityscapes", "/data/cs"); ``"synthetic:256,size=64"``
    -> a synthetic spec. See ``DATA_SPEC_HELP``."""
    kind, _, rest = text.partition(":")
    kind = DATASET_ALIASES.get(kind.strip().lower(), kind.strip().lower())
    if kind not in DATASETS:
        raise DatasetError(f"unknown dataset {text.partition(':')[0]!r} in --data {text!r}; "
                           f"expected {DATA_SPEC_HELP}")
    if kind != "synthetic":
        if not rest:
            raise DatasetError(f"--data {text!r} has no folder: write {kind}:PATH")
        return DataSpec(kind, os.path.expanduser(rest))
    values: Dict[str, object] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().lower() if eq else "length"
        value = value if eq else item
        try:
            if key == "size":
                values["size"] = _parse_size(value)
            elif key in ("length", "classes", "seed"):
                values[key] = int(value)
            else:
                raise DatasetError(f"unknown synthetic option {key!r} in --data {text!r}; "
                                   f"expected {DATA_SPEC_HELP}")
        except ValueError as err:
            if isinstance(err, DatasetError):
                raise
            raise DatasetError(f"synthetic option {item!r} needs an integer value") from None
    return DataSpec("synthetic", None, **values)


def open_dataset(spec: Union[DataSpec, str], split: str,
                 val_fraction: Optional[float] = None):
    """The dataset of a ``--data`` spec and split (``"train+val"`` joins splits).
    ``val_fraction``: a folder dataset without split folders holds out this fraction of its
    images as "val" (default ``DEFAULT_VAL_FRACTION``); other kinds take none."""
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    if val_fraction is not None and spec.kind != "folder":
        raise DatasetError(f"a validation fraction applies to folder datasets only, not to "
                           f"{spec.kind}")
    if spec.kind == "synthetic":
        length = spec.length if split == "train" else max(32, spec.length // 8)
        return SyntheticShapes(length, spec.size, spec.classes, spec.seed, split)
    if spec.kind == "folder":
        fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
        return FolderDataset(spec.root, split, fraction)
    return DATASETS[spec.kind](spec.root, split)


# ------------------------------------------------------------------------------------------------
# Joint image + mask augmentation
# ------------------------------------------------------------------------------------------------

def _size_of(flat_inputs) -> Tuple[int, int]:
    for item in flat_inputs:
        if isinstance(item, (tv_tensors.Image, tv_tensors.Mask)):
            h, w = TF.get_size(item)
            return h, w
    raise TypeError("expected a tv_tensors.Image or Mask among the inputs")


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from ``scale_range`` (images bicubic, masks nearest),
    as the official ``RandomResize``; combine with ``v2.RandomApply`` for its probability."""

    def __init__(self, scale_range: Tuple[float, float]):
        super().__init__()
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale range must satisfy 0 < low <= high, got {scale_range}")
        self.scale_range = (float(low), float(high))

    def make_params(self, flat_inputs) -> dict:
        h, w = _size_of(flat_inputs)
        scale = float(torch.empty(1).uniform_(*self.scale_range))
        return {"size": [max(1, round(h * scale)), max(1, round(w * scale))]}

    def transform(self, inpt, params):
        return self._call_kernel(TF.resize, inpt, params["size"],
                                 interpolation=v2.InterpolationMode.BICUBIC, antialias=True)


class PadTo(v2.Transform):
    """Pad at the bottom and right up to at least ``size`` (H, W): images with 0, masks with 255
    (ignored), as the official ``ConstantPad``."""

    def __init__(self, size: Tuple[int, int]):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def make_params(self, flat_inputs) -> dict:
        h, w = _size_of(flat_inputs)
        return {"padding": [0, 0, max(0, self.size[1] - w), max(0, self.size[0] - h)]}

    def transform(self, inpt, params):
        if not any(params["padding"]):
            return inpt
        fill = IGNORE_INDEX if isinstance(inpt, tv_tensors.Mask) else 0
        return self._call_kernel(TF.pad, inpt, params["padding"], fill=fill)


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation of one recipe (all geometric ops act on image and mask together)."""

    crop: Tuple[int, int]                              # output (H, W)
    scale_range: Optional[Tuple[float, float]] = None  # random rescale range...
    scale_probability: float = 0.5                     # ...applied with this probability
    rotation: float = 0.0                              # max degrees of random rotation
    pad: str = "around"                                # "around": RandomCrop pads both sides;
                                                       # "bottom-right": PadTo first
    hflip: bool = True
    color_jitter: float = 0.0                          # brightness = contrast = saturation = hue


def train_transform(aug: Augmentation, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Image + mask augmentation: random rescale, rotation, crop (padded with 0 / 255), flip,
    colour jitter, then float conversion and normalisation of the image."""
    steps: List[v2.Transform] = []
    if aug.scale_range is not None and aug.scale_probability > 0:
        steps.append(v2.RandomApply([RandomScale(aug.scale_range)], p=aug.scale_probability))
    if aug.rotation:
        steps.append(v2.RandomRotation(aug.rotation, interpolation=v2.InterpolationMode.BILINEAR,
                                       fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}))
    if aug.pad == "bottom-right":
        steps.append(PadTo(aug.crop))
    elif aug.pad != "around":
        raise ValueError(f"pad must be 'around' or 'bottom-right', got {aug.pad!r}")
    steps.append(v2.RandomCrop(aug.crop, pad_if_needed=True,
                               fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}))
    if aug.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if aug.color_jitter:
        j = aug.color_jitter
        steps.append(v2.ColorJitter(j, j, j, min(j, 0.5)))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def eval_transform(mode: str, size: Optional[Tuple[int, int]], mean: Sequence[float],
                   std: Sequence[float]) -> v2.Compose:
    """Evaluation preprocessing. ``mode`` "resize": the image is resized to ``size`` and the
    label kept at full resolution (logits are resized back to it); "pad": image and label are
    padded at the bottom and right to ``size`` (label with 255); "native": unchanged."""
    steps: List[v2.Transform] = []
    if mode == "resize":
        steps.append(_ImageOnly(v2.Resize(list(size), antialias=True)))
    elif mode == "pad":
        steps.append(PadTo(size))
    elif mode != "native":
        raise ValueError(f"eval mode must be 'resize', 'pad' or 'native', got {mode!r}")
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


class _ImageOnly(v2.Transform):
    """Apply a transform to the image and pass the mask through."""

    def __init__(self, inner: v2.Transform):
        super().__init__()
        self.inner = inner

    def transform(self, inpt, params):
        return inpt if isinstance(inpt, tv_tensors.Mask) else self.inner(inpt)


class TransformedDataset(torch.utils.data.Dataset):
    """A dataset seen through a transform, as (float image, int64 label) tensors.

    A key may be an index or ``(index, seed)``: with a seed, the transform's random draws come
    from a generator seeded with it (and the global RNG is left as it was), so a sample's
    augmentation depends on the seed alone, not on the worker or rank that produces it.
    """

    def __init__(self, dataset, transform):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> Tuple[Tensor, Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, mask = self.dataset[index]
        if seed is None:
            image, mask = self.transform(image, mask)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(int(seed))
                image, mask = self.transform(image, mask)
        return image.as_subclass(Tensor), mask.as_subclass(Tensor).long()


def collate(batch):
    """Stack images and labels; a batch of differently sized samples gives lists instead."""
    images, labels = zip(*batch)
    same = len({tuple(x.shape) for x in images}) == 1 and len({tuple(y.shape) for y in labels}) == 1
    if same:
        return torch.stack(images), torch.stack(labels)
    return list(images), list(labels)
