"""Folder datasets (``--data folder:ROOT``): layouts, classes.json, colour masks, the deterministic
validation fraction, and a clear error for every malformed folder."""
import dataclasses
import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from hyperseg.datasets import (DatasetError, FolderDataset, open_dataset, parse_data_spec,
                               split_by_fraction)
from hyperseg.palettes import palette
from hyperseg.zoo import ModelConfig, get_config

H, W = 6, 8
PALETTE = [[0, 0, 0], [250, 10, 10], [10, 10, 250]]


def _image(path, seed=0, size=(H, W)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def _mask(path, ids, colours=None):
    """Class ids as an 8-bit PNG, or as an RGB PNG of ``colours[id]``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = np.asarray(ids, dtype=np.uint8)
    array = ids if colours is None else np.asarray(colours, dtype=np.uint8)[ids]
    Image.fromarray(array).save(path)


def _ids(seed, classes=3):
    return np.random.default_rng(seed).integers(0, classes, (H, W), dtype=np.uint8)


def _classes(root, names=("background", "red", "blue"), colours=PALETTE):
    data = {"classes": list(names)}
    if colours is not None:
        data["palette"] = colours
    (root / "classes.json").write_text(json.dumps(data))


def _split_tree(root, counts=(("train", 3), ("val", 2)), colours=None):
    """images/<split>/<i>.png (or .jpg) with masks/<split>/<i>.png; returns the written ids."""
    written = {}
    for split, n in counts:
        for i in range(n):
            ext = "jpg" if i % 2 else "png"
            _image(root / "images" / split / f"{split}{i}.{ext}", seed=i)
            written[(split, i)] = _ids(10 * i + len(split))
            _mask(root / "masks" / split / f"{split}{i}.png", written[(split, i)], colours)
    return written


def _flat_tree(root, n=10):
    for i in range(n):
        _image(root / "images" / f"img{i:02d}.png", seed=i)
        _mask(root / "masks" / f"img{i:02d}.png", _ids(i))


def test_split_folders_with_classes_json(tmp_path):
    written = _split_tree(tmp_path)
    _classes(tmp_path)
    train = open_dataset(parse_data_spec(f"folder:{tmp_path}"), "train")
    val = FolderDataset(tmp_path, "val")
    assert (len(train), len(val)) == (3, 2)
    assert train.classes == ("background", "red", "blue") and train.num_classes == 3
    assert train.palette == tuple(tuple(c) for c in PALETTE)
    image, mask = val[1]
    assert image.shape == (3, H, W) and mask.shape == (H, W)
    assert np.array_equal(mask.numpy(), written[("val", 1)])
    assert len(FolderDataset(tmp_path, "train+val")) == 5


def test_rgb_colour_masks_map_to_the_palette(tmp_path):
    written = _split_tree(tmp_path, colours=PALETTE)
    _classes(tmp_path)
    dataset = FolderDataset(tmp_path, "train")
    for i in range(3):
        assert np.array_equal(dataset[i][1].numpy(), written[("train", i)])


def test_a_colour_outside_the_palette_or_without_a_palette_is_an_error(tmp_path):
    _split_tree(tmp_path, colours=PALETTE)
    _classes(tmp_path, colours=None)
    with pytest.raises(DatasetError, match="an RGB colour mask, but .*classes.json gives no "
                                           "\"palette\""):
        FolderDataset(tmp_path, "train")
    _classes(tmp_path)
    ids = np.zeros((H, W), np.uint8)
    rgb = np.asarray(PALETTE, np.uint8)[ids]
    rgb[2, 5] = (7, 7, 7)
    Image.fromarray(rgb).save(tmp_path / "masks/train/train1.png")
    with pytest.raises(DatasetError, match=r"train1.png: colour \(7, 7, 7\) at \(x=5, y=2\) is "
                                           r"not in the palette"):
        FolderDataset(tmp_path, "train")


def test_without_classes_json_the_classes_come_from_all_masks_with_a_warning(tmp_path):
    _split_tree(tmp_path)
    ids = np.zeros((H, W), np.uint8)
    ids[0, 0], ids[1, 1] = 6, 255                      # only in a val mask; 255 is ignored
    _mask(tmp_path / "masks/val/val0.png", ids)
    with pytest.warns(UserWarning, match=r"no classes.json, so the classes are 0..6"):
        train = FolderDataset(tmp_path, "train")
    assert train.classes == tuple(str(i) for i in range(7)) and train.palette == ()


def stems(dataset):
    return {os.path.splitext(os.path.basename(image))[0] for image, _ in dataset.samples}


def test_without_split_folders_the_val_fraction_splits_deterministically(tmp_path):
    _flat_tree(tmp_path, 10)
    _classes(tmp_path, colours=None)
    train = FolderDataset(tmp_path, "train", val_fraction=0.3)
    val = FolderDataset(tmp_path, "val", val_fraction=0.3)
    assert len(val) == 3 and len(train) == 7 and not stems(train) & stems(val)
    assert stems(FolderDataset(tmp_path, "val", val_fraction=0.3)) == stems(val)
    assert stems(open_dataset(f"folder:{tmp_path}", "val")) == stems(
        FolderDataset(tmp_path, "val", val_fraction=0.1))
    # the assignment follows the names, not the listing order, and a larger fraction only adds
    parts = split_by_fraction([f"img{i:02d}" for i in reversed(range(10))], 0.3)
    assert set(parts["val"]) == stems(val) and len(parts["train"]) == 7
    half = split_by_fraction([f"img{i:02d}" for i in range(10)], 0.5)
    assert set(half["val"]) > set(parts["val"])
    assert len(split_by_fraction(["a", "b"], 0.01)["val"]) == 1
    with pytest.raises(DatasetError, match="no split folders, so its splits are train and val"):
        FolderDataset(tmp_path, "test")
    with pytest.raises(DatasetError, match="an empty split"):
        FolderDataset(tmp_path, "val", val_fraction=0.0)
    with pytest.raises(DatasetError, match=r"validation fraction must be in \[0, 1\)"):
        FolderDataset(tmp_path, "val", val_fraction=1.0)


def test_stems_sizes_and_class_ids_are_checked_on_opening(tmp_path):
    _split_tree(tmp_path)
    _classes(tmp_path)
    (tmp_path / "images/train/train0.png").rename(tmp_path / "train0.png")
    with pytest.raises(DatasetError, match=r"1 mask\(s\) have no image, e\.g\. .*masks/train/"
                                           r"train0\.png"):
        FolderDataset(tmp_path, "train")
    (tmp_path / "train0.png").rename(tmp_path / "images/train/train0.png")
    (tmp_path / "masks/val/val1.png").unlink()
    with pytest.raises(DatasetError, match=r"1 image\(s\) have no mask, e\.g\. .*images/val/"
                                           r"val1\.jpg \(expected val1\.png in"):
        FolderDataset(tmp_path, "val")
    _mask(tmp_path / "masks/val/val1.png", np.zeros((H + 1, W), np.uint8))
    with pytest.raises(DatasetError, match=rf"val1.png: the mask is {H + 1}x{W} \(HxW\) but its "
                                           rf"image .*val1.jpg is {H}x{W}"):
        FolderDataset(tmp_path, "val")
    ids = np.zeros((H, W), np.uint8)
    ids[3, 3] = 3
    _mask(tmp_path / "masks/val/val1.png", ids)
    with pytest.raises(DatasetError, match=r"val1.png: label values \[3\] are not class ids 0..2"):
        FolderDataset(tmp_path, "val")
    _image(tmp_path / "images/train/train1.png")
    with pytest.raises(DatasetError, match="two files share the stem 'train1'"):
        FolderDataset(tmp_path, "train")


def test_unreadable_images_and_masks_without_classes(tmp_path):
    _split_tree(tmp_path, counts=(("train", 2),))
    for i in range(2):
        _mask(tmp_path / f"masks/train/train{i}.png", np.full((H, W), 255))
    with pytest.raises(DatasetError, match=r"every mask under .* is all ignore \(255\); name the "
                                           r"classes in .*classes.json"):
        FolderDataset(tmp_path, "train")
    _classes(tmp_path)
    (tmp_path / "images/train/train0.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"train0.png: not a readable image"):
        FolderDataset(tmp_path, "train")


def test_missing_and_empty_splits(tmp_path):
    with pytest.raises(DatasetError, match="the dataset folder .* does not exist"):
        FolderDataset(tmp_path / "nothing", "train")
    with pytest.raises(DatasetError, match=r"no folder .*images"):
        FolderDataset(tmp_path, "train")
    _split_tree(tmp_path, counts=(("train", 2),))
    with pytest.raises(DatasetError, match=r"no folder .*images/val"):
        FolderDataset(tmp_path, "val")
    (tmp_path / "images/val").mkdir()
    (tmp_path / "masks/val").mkdir()
    with pytest.raises(DatasetError, match=r"folder val: an empty split: no images in"):
        FolderDataset(tmp_path, "val")
    with pytest.raises(DatasetError, match="applies to folder datasets only"):
        open_dataset("synthetic:8", "train", val_fraction=0.2)
    with pytest.raises(DatasetError, match="has no folder: write folder:PATH"):
        parse_data_spec("folder:")


@pytest.mark.parametrize("content, message", [
    ("[1, 2", "not valid JSON"),
    ('["a", "b"]', 'expected an object with a "classes" list'),
    ('{"classes": ["a"], "colours": []}', r"unknown entries \['colours'\]"),
    ('{"classes": []}', '"classes" must be a non-empty list of names'),
    ('{"classes": ["a", "a"]}', "class names must be distinct"),
    ('{"classes": ["a", "b"], "palette": [[0, 0, 0]]}', r'one \[R, G, B\] colour \(0..255\) per '
                                                        r'class \(2\)'),
    ('{"classes": ["a"], "palette": [[0, 0, 256]]}', r"one \[R, G, B\] colour"),
    ('{"classes": ["a", "b"], "palette": [[1, 2, 3], [1, 2, 3]]}', "colours must be distinct"),
])
def test_malformed_classes_json(tmp_path, content, message):
    _split_tree(tmp_path, counts=(("train", 1),))
    (tmp_path / "classes.json").write_text(content)
    with pytest.raises(DatasetError, match=message):
        FolderDataset(tmp_path, "train")


def test_a_models_palette_and_class_names_travel_in_its_config():
    config = get_config("hyperseg-m", 3)
    assert not np.array_equal(palette(config), PALETTE)
    own = dataclasses.replace(config, class_names=("a", "b", "c"),
                              palette=tuple(tuple(c) for c in PALETTE))
    assert np.array_equal(palette(own), PALETTE)
    again = ModelConfig.from_dict(json.loads(json.dumps(own.to_dict())))
    assert again == own and again.palette == own.palette
    with pytest.raises(ValueError, match=r"palette must hold one \(R, G, B\) colour"):
        dataclasses.replace(own, palette=((0, 0, 0),)).validate()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_config("hyperseg-m").palette == ()


NAMES = ("background", "red", "blue", "green", "grey")
COLOURS = [[0, 0, 0], [250, 10, 10], [10, 10, 250], [10, 250, 10], [128, 128, 128]]


def test_fine_tune_an_official_checkpoint_on_a_folder_then_evaluate_and_predict(tmp_path, capsys):
    """The issue's three commands: train --weights official.pth --data folder:... --num-classes 5
    (no --model: the file's), then eval and predict with the folder's class names and palette."""
    import torch

    import hyperseg
    from hyperseg.__main__ import main
    from checkpoint_utils import OFFICIAL_ARCH, write_official

    root = tmp_path / "data"
    for split, n in (("train", 2), ("val", 1)):
        for i in range(n):
            _image(root / "images" / split / f"{i}.png", seed=i, size=(64, 64))
            _mask(root / "masks" / split / f"{i}.png",
                  np.random.default_rng(i).integers(0, 5, (64, 64)), COLOURS)
    _classes(root, NAMES, COLOURS)
    torch.manual_seed(0)
    write_official(tmp_path / "official.pth", hyperseg.build("hyperseg-m", backend="torch"),
                   OFFICIAL_ARCH["hyperseg-m-cityscapes"])

    run = tmp_path / "run"
    assert main(["train", "--weights", str(tmp_path / "official.pth"), "--data", f"folder:{root}",
                 "--num-classes", "5", "--out", str(run), "--steps", "1", "--epoch-size", "2",
                 "--batch-size", "2", "--crop", "64x64", "--no-pretrained-backbone",
                 "--workers", "0", "--quiet", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "training hyperseg-m-cityscapes (5 classes)" in out
    assert "re-initialised 7 tensor(s) whose shape differs" in out
    assert "decoder.blocks.4.bn3.weight" in out and "backbone.body" not in out.split("re-init")[1]
    model = hyperseg.load(run / "latest.safetensors")
    assert model.config.class_names == NAMES and model.config.palette == tuple(map(tuple, COLOURS))

    assert main(["eval", "--weights", str(run / "latest.safetensors"), "--data", f"folder:{root}",
                 "--workers", "0", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "(val, 1 images)" in table and all(name in table for name in NAMES)
    assert main(["predict", str(root / "images/val/0.png"), "--weights",
                 str(run / "latest.safetensors"), "--out", str(tmp_path / "seg"), "--size",
                 "64x64", "--quiet"]) == 0
    labels = np.asarray(Image.open(tmp_path / "seg/0_labels.png"))
    colours = np.asarray(Image.open(tmp_path / "seg/0_color.png").convert("RGB"))
    assert np.array_equal(colours, np.asarray(COLOURS, np.uint8)[labels])


def test_train_options_for_folders_and_backbones_are_checked_first(tmp_path, capsys):
    from hyperseg.__main__ import main

    def fails(args, message):
        assert main(["train", "--out", str(tmp_path / "run"), "--quiet"] + args) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert not (tmp_path / "run").exists()

    data = ["--model", "hyperseg-m", "--data", "synthetic:8,size=64"]
    fails(data + ["--backbone", "resnet_9000"], "unknown backbone 'resnet_9000': timm has no model")
    fails(data + ["--val-fraction", "0.2"], "--val-fraction applies to folder datasets only")
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "run")] + data + ["--val-fraction", "1"])
    assert "--val-fraction: must be below 1" in capsys.readouterr().err
    fails(["--model", "hyperseg-m", "--data", f"folder:{tmp_path / 'none'}"],
          "the dataset folder")
    (tmp_path / "w.safetensors").write_bytes(b"")
    fails(["--weights", str(tmp_path / "w.safetensors"), "--data", "synthetic:8,size=64"],
          "the file is empty")


def test_train_weights_without_model_need_a_zoo_model(tmp_path, capsys):
    import torch

    import hyperseg
    from hyperseg.__main__ import main
    from checkpoint_utils import write_official

    torch.manual_seed(0)
    model = hyperseg.build("hyperseg-s-camvid", backend="torch")
    write_official(tmp_path / "no_arch.pth", model)
    custom_arch = ("hyperseg.models.hyperseg_v1_0.hyperseg_efficientnet('efficientnet-b1', "
                   "levels=2, level_channels=[64, 32, 16, 16, 8], kernel_sizes=[1, 1, 1, 3, 3], "
                   "expand_ratio=2, weight_groups=[64, 32, 32, 16, 8], out_feat_scale=0.25, "
                   "num_classes=12)")
    write_official(tmp_path / "custom.pth", model, custom_arch)
    for name, message in (("no_arch.pth", "does not say which model it holds: give --model NAME"),
                          ("custom.pth", "holds a custom-v1_0 model, which is no zoo model")):
        assert main(["train", "--weights", str(tmp_path / name), "--data", "synthetic:8,size=64",
                     "--out", str(tmp_path / "run"), "--quiet"]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
