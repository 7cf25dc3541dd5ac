"""Dataset readers on tiny fake folder trees, their errors, the synthetic dataset and the joint
image + mask augmentation."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from hyperseg.datasets import (SYNTHETIC_COLOURS, Augmentation, CamVid, Cityscapes, DatasetError,
                               PadTo, SyntheticShapes, TransformedDataset, VOCSBD, collate,
                               eval_transform, open_dataset, parse_data_spec, train_transform)
from hyperseg.palettes import CAMVID_PALETTE

H, W = 6, 8


def _image(path, seed=0, size=(H, W)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(array).save(path)
    return array


def _label(path, values, mode="L"):
    """Write class ids as an 8-bit grayscale ("L") or palette ("P") PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(values, dtype=np.uint8)
    if mode == "P":
        image = Image.new("P", (array.shape[1], array.shape[0]))
        image.putdata(array.flatten().tolist())
        image.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    else:
        image = Image.fromarray(array)
    image.save(path)


def _ids(pattern):
    """An (H, W) label map cycling through ``pattern``."""
    return np.resize(np.asarray(pattern, dtype=np.uint8), (H, W))


# -- Cityscapes -------------------------------------------------------------------------------

@pytest.fixture
def cityscapes(tmp_path):
    root = tmp_path / "cityscapes"
    _image(root / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png", 1)
    _label(root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png",
           _ids([7, 8, 26, 0, 33, 4]))
    _image(root / "leftImg8bit/train/bremen/bremen_000001_000019_leftImg8bit.png", 2)
    _label(root / "gtFine/train/bremen/bremen_000001_000019_gtFine_labelTrainIds.png",
           _ids([18, 255, 3]))
    _image(root / "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png", 3)
    _label(root / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png", _ids([23]))
    return root


def test_cityscapes_maps_label_ids_to_train_ids(cityscapes):
    data = Cityscapes(cityscapes, "train")
    assert len(data) == 2 and data.num_classes == 19
    image, mask = data[0]
    assert isinstance(image, tv_tensors.Image) and isinstance(mask, tv_tensors.Mask)
    assert image.shape == (3, H, W) and image.dtype == torch.uint8 and mask.shape == (H, W)
    # road 7 -> 0, sidewalk 8 -> 1, car 26 -> 13, unlabeled 0 -> 255, bicycle 33 -> 18,
    # static 4 -> 255
    assert torch.equal(mask, torch.from_numpy(np.resize(np.array([0, 1, 13, 255, 18, 255],
                                                                 np.uint8), (H, W))))
    _, mask = data[1]                                     # a labelTrainIds file is used as is
    assert torch.equal(mask, torch.from_numpy(_ids([18, 255, 3])))
    both = open_dataset(parse_data_spec(f"cityscapes:{cityscapes}"), "train+val")
    assert len(both) == 3 and both[2][1].unique().tolist() == [10]      # sky 23 -> 10


def test_cityscapes_errors_name_what_is_missing(cityscapes, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        Cityscapes(tmp_path / "nowhere", "train")
    with pytest.raises(DatasetError, match=r"gtFine/test.*expected .*_gtFine_labelIds.png"):
        (cityscapes / "leftImg8bit/test").mkdir()
        Cityscapes(cityscapes, "test")
    (cityscapes / "gtFine/test").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        Cityscapes(cityscapes, "test")
    _image(cityscapes / "leftImg8bit/train/aachen/aachen_000009_000019_leftImg8bit.png")
    with pytest.raises(DatasetError, match=r"1 image\(s\) have no label file.*aachen_000009_000019"
                                           r"_gtFine_labelIds.png"):
        Cityscapes(cityscapes, "train")


def test_cityscapes_bad_label_files_are_errors(cityscapes):
    label = cityscapes / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png"
    _label(label, np.zeros((H + 1, W)))
    with pytest.raises(DatasetError, match=r"label is 7x8 but its image .* is 6x8"):
        Cityscapes(cityscapes, "val")[0]
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(label)
    with pytest.raises(DatasetError, match="single-channel class ids"):
        Cityscapes(cityscapes, "val")[0]
    label.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot read the label image"):
        Cityscapes(cityscapes, "val")[0]
    _label(cityscapes / "gtFine/train/bremen/bremen_000001_000019_gtFine_labelTrainIds.png",
           _ids([19]))
    with pytest.raises(DatasetError, match=r"label values \[19\] are not class ids 0..18"):
        Cityscapes(cityscapes, "train")[1]


# -- CamVid -----------------------------------------------------------------------------------

def test_camvid_segnet_layout_keeps_void_as_class_11(tmp_path):
    root = tmp_path / "camvid"
    _image(root / "train/0001TP_006690.png")
    _label(root / "trainannot/0001TP_006690.png", _ids([3, 11, 0]))
    _image(root / "val/0016E5_07959.png")
    _label(root / "valannot/0016E5_07959.png", _ids([10]))
    data = CamVid(root, "train+val")
    assert len(data) == 2 and data.num_classes == 12 and data.void_class == 11
    assert torch.equal(data[0][1], torch.from_numpy(_ids([3, 11, 0])))
    _label(root / "valannot/0016E5_07959.png", _ids([12]))
    with pytest.raises(DatasetError, match=r"label values \[12\] are not class ids 0..11"):
        data[1]


def test_camvid_colour_labels_map_the_12_colours_and_ignore_others(tmp_path):
    root = tmp_path / "camvid"
    _image(root / "test/Seq05VD_f00000.png")
    colours = np.zeros((H, W, 3), np.uint8)
    colours[0] = CAMVID_PALETTE[0]            # Sky
    colours[1] = CAMVID_PALETTE[8]            # Car
    colours[2] = (1, 2, 3)                    # not a CamVid class colour
    (root / "test_labels").mkdir()
    Image.fromarray(colours).save(root / "test_labels/Seq05VD_f00000_L.png")
    mask = CamVid(root, "test")[0][1]
    assert mask[0].unique().tolist() == [0] and mask[1].unique().tolist() == [8]
    assert mask[2].unique().tolist() == [255] and mask[3:].unique().tolist() == [11]  # black: Void


def test_camvid_errors(tmp_path):
    root = tmp_path / "camvid"
    _image(root / "train/a.png")
    with pytest.raises(DatasetError, match=r"no label folder: expected .*trainannot.*train_labels"):
        CamVid(root, "train")
    (root / "trainannot").mkdir()
    with pytest.raises(DatasetError, match=r"have no label file, e.g. .*trainannot/a.png"):
        CamVid(root, "train")
    with pytest.raises(DatasetError, match=r"no folder .*test'.*expected"):
        CamVid(root, "test")


# -- VOC + SBD --------------------------------------------------------------------------------

@pytest.fixture
def voc(tmp_path):
    root = tmp_path / "vocsbd"
    voc_root = root / "VOCdevkit/VOC2012"
    for name, seed in (("2007_000032", 1), ("2007_000039", 2)):
        _image(voc_root / f"JPEGImages/{name}.jpg", seed)
    _label(voc_root / "SegmentationClassAug/2007_000032.png", _ids([0, 15, 255]), mode="P")
    _label(voc_root / "SegmentationClassAug/2007_000039.png", _ids([20]))
    (voc_root / "train_aug.txt").write_text(
        "/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n"
        "/JPEGImages/2007_000039.jpg /SegmentationClassAug/2007_000039.png\n\n")
    (voc_root / "ImageSets/Segmentation").mkdir(parents=True)
    (voc_root / "ImageSets/Segmentation/val.txt").write_text("2007_000039\n")
    return root


def test_voc_reads_pair_lists_and_id_lists(voc):
    data = VOCSBD(voc, "train_aug")
    assert len(data) == 2 and data.num_classes == 21
    assert torch.equal(data[0][1], torch.from_numpy(_ids([0, 15, 255])))   # palette indices
    val = VOCSBD(voc / "VOCdevkit/VOC2012", "val")                      # root = VOC2012 itself
    assert len(val) == 1 and val[0][1].unique().tolist() == [20]
    assert len(VOCSBD(voc, str(voc / "VOCdevkit/VOC2012/train_aug.txt"))) == 2


def test_voc_errors(voc, tmp_path):
    voc_root = voc / "VOCdevkit/VOC2012"
    with pytest.raises(DatasetError, match=r"no JPEGImages folder.*expected .*train_aug.txt"):
        VOCSBD(tmp_path, "val")
    with pytest.raises(DatasetError, match=r"no split file for 'trainval'.*trainval.txt"):
        VOCSBD(voc, "trainval")
    (voc_root / "bad.txt").write_text("/JPEGImages/2007_000032.jpg\n")
    with pytest.raises(DatasetError, match=r"bad.txt, line 1: expected '<image> <label>'"):
        VOCSBD(voc, "bad")
    (voc_root / "missing.txt").write_text("/JPEGImages/x.jpg /SegmentationClassAug/x.png\n")
    with pytest.raises(DatasetError, match=r"1 image\(s\) have no file .*JPEGImages/x.jpg"):
        VOCSBD(voc, "missing")
    _label(voc_root / "SegmentationClassAug/2007_000039.png", _ids([21]))
    with pytest.raises(DatasetError, match=r"label values \[21\] are not class ids 0..20"):
        VOCSBD(voc, "val")[0]


# -- specs and synthetic data -------------------------------------------------------------------

def test_data_specs_parse_and_bad_ones_are_clear_errors(tmp_path):
    assert parse_data_spec("cityscapes:/data/cs").root == "/data/cs"
    assert parse_data_spec("VOCSBD:/data/voc").kind == "voc"
    spec = parse_data_spec("synthetic:16,size=64x96,classes=3,seed=5")
    assert (spec.kind, spec.length, spec.size, spec.classes, spec.seed) == \
        ("synthetic", 16, (64, 96), 3, 5)
    assert parse_data_spec(str(spec)) == spec
    assert parse_data_spec("synthetic").length == 512
    for text, message in (("imagenet:/x", "unknown dataset 'imagenet'"),
                          ("camvid", "has no folder: write camvid:PATH"),
                          ("synthetic:size=big", "size must be N or HxW"),
                          ("synthetic:colour=red", "unknown synthetic option 'colour'"),
                          ("synthetic:many", "needs an integer")):
        with pytest.raises(DatasetError, match=message):
            parse_data_spec(text)
    with pytest.raises(DatasetError, match=r"camvid: the dataset folder .*nowhere.* not exist"):
        open_dataset(f"camvid:{tmp_path / 'nowhere'}", "train")


def test_synthetic_shapes_are_deterministic_and_labelled():
    data = SyntheticShapes(length=6, size=(64, 96), num_classes=5, seed=3)
    again = SyntheticShapes(length=6, size=(64, 96), num_classes=5, seed=3)
    other = SyntheticShapes(length=6, size=(64, 96), num_classes=5, seed=4)
    val = SyntheticShapes(length=6, size=(64, 96), num_classes=5, seed=3, split="val")
    seen = set()
    for i in range(6):
        image, mask = data[i]
        assert image.shape == (3, 64, 96) and mask.shape == (64, 96)
        assert torch.equal(image, again[i][0]) and torch.equal(mask, again[i][1])
        assert not torch.equal(image, other[i][0]) and not torch.equal(image, val[i][0])
        seen |= set(mask.unique().tolist())
        # every foreground pixel has its class's colour (within the jitter)
        for k in mask.unique().tolist():
            if k:
                colour = image[:, mask == k].float().mean(1)
                expected = torch.tensor(SYNTHETIC_COLOURS[k - 1], dtype=torch.float32)
                assert (colour - expected).abs().max() <= 20.5
    assert seen <= set(range(5)) and 0 in seen and len(seen) >= 4
    assert data.classes[0] == "background" and len(data.classes) == 5
    with pytest.raises(IndexError):
        data[6]
    for kwargs, message in (({"num_classes": 1}, "classes must be 2..9"),
                            ({"length": 0}, "length must be >= 1"),
                            ({"size": (16, 64)}, "at least 32x32"),
                            ({"split": "holdout"}, "unknown split 'holdout'")):
        with pytest.raises(DatasetError, match=message):
            SyntheticShapes(**kwargs)


# -- augmentation -------------------------------------------------------------------------------

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def test_train_transform_crops_pads_with_ignore_and_is_seeded_per_sample():
    source = SyntheticShapes(length=4, size=(64, 64), num_classes=4, seed=0)
    aug = Augmentation(crop=(96, 80), scale_range=(0.5, 1.5), rotation=10, color_jitter=0.25)
    data = TransformedDataset(source, train_transform(aug, MEAN, STD))
    image, mask = data[(1, 1234)]
    assert image.shape == (3, 96, 80) and image.dtype == torch.float32
    assert mask.shape == (96, 80) and mask.dtype == torch.int64
    assert (mask == 255).any()                              # 64x64 (<= 96 tall) padded with 255
    assert set(mask.unique().tolist()) <= {0, 1, 2, 3, 255}
    state = torch.get_rng_state()
    again = data[(1, 1234)]
    assert torch.equal(torch.get_rng_state(), state)        # the global RNG is left alone
    assert torch.equal(image, again[0]) and torch.equal(mask, again[1])
    assert not torch.equal(image, data[(1, 99)][0])


def test_geometric_augmentation_moves_image_and_mask_together():
    """A flip / rescale / crop that moved image and mask differently would break the colour of
    labelled pixels; check it on many draws."""
    source = SyntheticShapes(length=8, size=(64, 64), num_classes=2, seed=1)
    aug = Augmentation(crop=(64, 64), scale_range=(0.7, 1.4), scale_probability=1.0)
    data = TransformedDataset(source, train_transform(aug, (0.0,) * 3, (1.0,) * 3))
    red = 0
    for i in range(8):
        image, mask = data[(i, 7 * i)]
        shape = mask == 1
        if shape.sum() > 50:                                     # the red shape (class 1)
            outside = torch.nn.functional.max_pool2d((~shape).float()[None, None], 3, 1, 1)[0, 0]
            interior = outside == 0
            redness = image[0, interior] - image[1, interior]
            assert redness.mean() > 0.5
            red += 1
    assert red >= 3


def test_eval_transforms_resize_only_the_image_or_pad_both():
    image = tv_tensors.Image(torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.randint(0, 3, (40, 50), dtype=torch.uint8))
    x, y = eval_transform("resize", (64, 128), MEAN, STD)(image, mask)
    assert x.shape == (3, 64, 128) and torch.equal(y, mask)
    x, y = eval_transform("pad", (64, 64), MEAN, STD)(image, mask)
    assert x.shape == (3, 64, 64) and y.shape == (64, 64)
    assert torch.equal(y[:40, :50], mask) and (y[40:] == 255).all() and (y[:, 50:] == 255).all()
    assert torch.allclose(x[:, 40:], torch.tensor(-2.0))                 # black, normalised
    x, y = eval_transform("native", None, MEAN, STD)(image, mask)
    assert x.shape == (3, 40, 50)
    with pytest.raises(ValueError, match="eval mode"):
        eval_transform("stretch", (64, 64), MEAN, STD)
    padded, _ = PadTo((32, 32))(image, mask)                             # already large enough
    assert padded.shape == (3, 40, 50)


def test_collate_stacks_equal_sizes_and_lists_others():
    a = (torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.long))
    b = (torch.zeros(3, 4, 5), torch.zeros(4, 5, dtype=torch.long))
    images, labels = collate([a, a])
    assert images.shape == (2, 3, 4, 4) and labels.shape == (2, 4, 4)
    images, labels = collate([a, b])
    assert isinstance(images, list) and len(labels) == 2


def test_datasets_read_images_without_the_prediction_module():
    """datasets.py reads its images through hyperseg.images, the layer below hyperseg.predict
    (which re-exports read_image and ImageError)."""
    import subprocess
    import sys

    code = ("import sys, hyperseg.datasets, hyperseg.images as images; "
            "assert 'hyperseg.predict' not in sys.modules, 'datasets imported predict'; "
            "import importlib; predict = importlib.import_module('hyperseg.predict'); "
            "assert predict.read_image is images.read_image; "
            "assert predict.ImageError is images.ImageError")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
