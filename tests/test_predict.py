"""Segmenting images: the Python API, the palettes and ``hyperseg predict``."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hyperseg
from hyperseg import palettes
from hyperseg.__main__ import main
from hyperseg.predict import ImageError, parse_size, read_image, to_tensor
from parity_utils import calibrate_conditioned

NAME = "hyperseg-s-camvid"
SIZE = (64, 64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = hyperseg.build(NAME, backend="torch")
    return calibrate_conditioned(m, torch.rand(2, 3, *SIZE) * 4 - 2)


def random_image(h, w, seed=0) -> np.ndarray:
    """A smooth random RGB image (blobs), so that predictions are not pure noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((w, h), Image.BILINEAR))


@pytest.fixture
def images(tmp_path):
    """A directory with two good images (one in a sub-directory), a corrupt PNG and a text file."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(random_image(70, 90, 1)).save(root / "street.png")
    Image.fromarray(random_image(50, 80, 2)).save(root / "sub" / "road.jpg", quality=95)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    (root / "notes.txt").write_text("not an image")
    return root


# -- palettes --------------------------------------------------------------------------------

def test_voc_colormap_is_the_bit_interleaved_one():
    cmap = palettes.voc_colormap(256)
    assert cmap.shape == (256, 3) and cmap.dtype == np.uint8
    expected = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128),
                7: (128, 128, 128), 8: (64, 0, 0), 15: (192, 128, 128), 20: (0, 64, 128),
                255: (224, 224, 192)}
    for index, rgb in expected.items():
        assert tuple(cmap[index]) == rgb, index
    assert len({tuple(c) for c in cmap}) == 256


def test_dataset_palettes():
    for name, dataset_colors in (("hyperseg-m", palettes.CITYSCAPES_PALETTE),
                                 ("hyperseg-s-camvid", palettes.CAMVID_PALETTE),
                                 ("hyperseg-l-voc", palettes.VOC_PALETTE)):
        config = hyperseg.get_config(name)
        colors = hyperseg.palette(config)
        assert colors.shape == (config.num_classes, 3) and colors.dtype == np.uint8
        np.testing.assert_array_equal(colors, dataset_colors)
        assert len({tuple(c) for c in colors}) == config.num_classes
    assert tuple(palettes.CITYSCAPES_PALETTE[0]) == (128, 64, 128)       # road
    assert tuple(palettes.CITYSCAPES_PALETTE[13]) == (0, 0, 142)         # car
    assert tuple(palettes.CAMVID_PALETTE[0]) == (128, 128, 128)          # sky
    assert tuple(palettes.CAMVID_PALETTE[11]) == (0, 0, 0)               # void
    # a class count beyond the dataset's palette falls back to the VOC colormap
    custom = hyperseg.palette(hyperseg.get_config("hyperseg-m", num_classes=40))
    np.testing.assert_array_equal(custom, palettes.voc_colormap(40))
    np.testing.assert_array_equal(hyperseg.palette(hyperseg.get_config("hyperseg-m", num_classes=5)),
                                  palettes.CITYSCAPES_PALETTE[:5])


def test_colorize_and_overlay():
    labels = torch.tensor([[0, 1], [2, 99]])
    colors = np.array([(10, 20, 30), (40, 50, 60), (70, 80, 90)], dtype=np.uint8)
    rgb = hyperseg.colorize(labels, colors)
    np.testing.assert_array_equal(rgb, [[(10, 20, 30), (40, 50, 60)], [(70, 80, 90), (0, 0, 0)]])
    image = np.full((2, 2, 3), 200, dtype=np.uint8)
    np.testing.assert_array_equal(palettes.overlay(image, rgb, 0.25)[0, 0], (152, 155, 158))
    with pytest.raises(ValueError):
        palettes.overlay(image, rgb[:1], 0.5)
    with pytest.raises(TypeError):
        hyperseg.colorize(np.zeros((2, 2)), colors)


# -- the Python API ------------------------------------------------------------------------

def test_predict_accepts_every_image_kind(model, tmp_path):
    array = random_image(70, 90)
    path = tmp_path / "image.png"
    Image.fromarray(array).save(path)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    results = [hyperseg.predict(model, image, size=SIZE)
               for image in (path, str(path), Image.open(path), array, tensor)]
    for labels in results:
        assert labels.shape == (70, 90) and labels.dtype == torch.int64
        assert labels.device.type == "cpu"
        assert 0 <= labels.min() and labels.max() < model.num_classes
        torch.testing.assert_close(labels, results[0], rtol=0, atol=0)
    assert len(results[0].unique()) > 1


def test_predict_resizes_to_the_network_and_back(model):
    image = random_image(40, 100)
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    labels = hyperseg.predict(model, image, size=SIZE)
    # the same computation by hand
    net = torch.nn.functional.interpolate(x[None], size=SIZE, mode="bilinear", align_corners=False,
                                          antialias=True)
    mean = torch.tensor(model.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.config.std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model((net - mean) / std)
    logits = torch.nn.functional.interpolate(logits, size=(40, 100), mode="bilinear",
                                             align_corners=False)
    assert (labels == logits.argmax(1)[0]).float().mean() > 0.999
    # native size: the network sees the image itself (padded by the model to 64 x 128)
    assert hyperseg.predict(model, image, size="native").shape == (40, 100)
    assert hyperseg.predict(model, image, size="48x96").shape == (40, 100)


def test_predict_batch_equals_predict(model):
    images = [random_image(64, 64, 3), random_image(70, 90, 4), random_image(64, 64, 5),
              random_image(50, 60, 6)]
    for size, batch_size in ((SIZE, 3), ("native", 2)):
        batched = hyperseg.predict_batch(model, images, size=size, batch_size=batch_size)
        assert len(batched) == len(images)
        for image, labels in zip(images, batched):
            single = hyperseg.predict(model, image, size=size)
            assert labels.shape == image.shape[:2]
            assert (labels == single).float().mean() > 0.999


def test_tta_passes_a_pyramid_to_the_model(model):
    image = random_image(64, 96)
    labels = hyperseg.predict(model, image, size=SIZE, tta=True, tta_scales=(1.0, 0.5, 1.5))
    assert labels.shape == (64, 96)
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    mean = torch.tensor(model.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.config.std).view(1, 3, 1, 1)
    def resize(t, size):
        return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False,
                                               antialias=True)
    net = (resize(x, SIZE) - mean) / std
    with torch.no_grad():     # the network-size input first, then its scaled copies; flips too
        logits = model([net, resize(net, (32, 32)), resize(net, (96, 96))])
    logits = torch.nn.functional.interpolate(logits, size=(64, 96), mode="bilinear",
                                             align_corners=False)
    assert (labels == logits.argmax(1)[0]).float().mean() > 0.999


def test_tta_flip_is_the_image_and_its_mirror_image(model, images):
    """tta="flip" as eval's: the image and its mirror image (merged as the model merges flips),
    whatever the model's own tta_hflip; tta=True is "ms" (the pyramid)."""
    expected = hyperseg.predict(model, images / "street.png", size=SIZE, tta="flip")
    x = to_tensor(images / "street.png")
    net = torch.nn.functional.interpolate(x[None], size=SIZE, mode="bilinear",
                                          align_corners=False, antialias=True)
    mean = torch.tensor(model.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.config.std).view(1, 3, 1, 1)
    net = (net - mean) / std
    with torch.no_grad():
        both = torch.max(model(net), model(net.flip(-1)).flip(-1))
    both = torch.nn.functional.interpolate(both, size=(70, 90), mode="bilinear",
                                           align_corners=False)
    assert (expected == both.argmax(1)[0]).float().mean() > 0.999
    with pytest.raises(ValueError, match="tta must be one of"):
        hyperseg.predict(model, images / "street.png", tta="mirror")
    pyramid = hyperseg.predict(model, images / "street.png", size=SIZE, tta="ms",
                               tta_scales=(1.0, 0.5))
    assert torch.equal(pyramid, hyperseg.predict(model, images / "street.png", size=SIZE,
                                                 tta=True, tta_scales=(1.0, 0.5)))


def test_predict_errors(model, tmp_path):
    with pytest.raises(ImageError, match="unsupported image type"):
        hyperseg.predict(model, tmp_path / "a.gif")
    with pytest.raises(ImageError, match="no such file"):
        hyperseg.predict(model, tmp_path / "missing.png")
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(ImageError, match="not a readable"):
        read_image(tmp_path / "bad.jpg")
    with pytest.raises(ImageError, match="uint8"):
        to_tensor(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ImageError, match=r"\(3, H, W\)"):
        to_tensor(torch.zeros(1, 3, 8, 8))
    with pytest.raises(TypeError):
        to_tensor(42)
    with pytest.raises(ImageError, match="native size"):
        hyperseg.predict(model, random_image(20, 64), size="native")
    with pytest.raises(ValueError, match="HxW"):
        parse_size("big")
    with pytest.raises(ValueError, match="at least 32"):
        hyperseg.predict(model, random_image(64, 64), size=(16, 64))


def test_label_images_are_8_bit_or_16_bit(tmp_path):
    from hyperseg.predict import label_image
    assert label_image(torch.tensor([[0, 255]])).mode == "L"
    wide = label_image(np.array([[0, 300]]))
    wide.save(tmp_path / "wide.png")
    np.testing.assert_array_equal(read_png(tmp_path / "wide.png"), [[0, 300]])
    with pytest.raises(ValueError):
        label_image(np.array([[-1, 0]]))


def test_grayscale_and_rgba_files_are_read_as_rgb(tmp_path):
    Image.fromarray(random_image(40, 40)[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([random_image(40, 40), np.full((40, 40), 9, np.uint8)])).save(
        tmp_path / "rgba.png")
    for name in ("gray.png", "rgba.png"):
        image = read_image(tmp_path / name)
        assert image.mode == "RGB" and image.size == (40, 40)


# -- the command line ------------------------------------------------------------------------

def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_predict_command(model, images, tmp_path, capsys):
    weights = tmp_path / "model.safetensors"
    hyperseg.save(model, weights)
    out = tmp_path / "out"
    code = main(["predict", str(images), "--weights", str(weights), "--out", str(out),
                 "--size", "64x64", "--batch-size", "2", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 1                                            # the broken PNG failed
    assert "broken.png" in captured.err and "not a readable" in captured.err
    assert "notes.txt" not in captured.err                      # only images are taken from a dir
    assert "WARNING" not in captured.err
    assert "segmented 2 of 3" in captured.out
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["street_color.png", "street_labels.png", "street_overlay.png",
                       "sub/road_color.png", "sub/road_labels.png", "sub/road_overlay.png"]

    labels = read_png(out / "street_labels.png")
    assert labels.shape == (70, 90) and labels.dtype == np.uint8
    expected = hyperseg.predict(model, images / "street.png", size=(64, 64)).numpy()
    assert (labels == expected).mean() > 0.99
    colors = hyperseg.palette(model.config)
    np.testing.assert_array_equal(read_png(out / "street_color.png"), colors[labels])
    original = np.asarray(Image.open(images / "street.png").convert("RGB"))
    blend = np.rint(0.5 * original.astype(np.float64) + 0.5 * colors[labels]).astype(np.int64)
    assert np.abs(read_png(out / "street_overlay.png").astype(np.int64) - blend).max() <= 1
    assert read_png(out / "sub" / "road_labels.png").shape == (50, 80)


def test_predict_command_reports_each_bad_input(model, images, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "sub").parent.mkdir()
    (out / "sub").write_text("a file where a directory should be")
    code = main(["predict", str(images / "street.png"), str(images / "notes.txt"),
                 str(images / "missing.jpg"), str(images / "sub" / "road.jpg"),
                 str(images / "broken.png"), "--model", NAME, "--out", str(out),
                 "--size", "64x64", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "WARNING" in err and "UNTRAINED" in err
    assert "notes.txt: unsupported image type (.txt)" in err
    assert "missing.jpg: no such file" in err
    assert "broken.png: not a readable" in err
    assert (out / "street_labels.png").is_file() and (out / "road_labels.png").is_file()

    # a directory input whose mirrored sub-directory cannot be created: that image fails only
    code = main(["predict", str(images), "--model", NAME, "--out", str(out), "--size", "64x64"])
    err = capsys.readouterr().err
    assert code == 1
    assert "road.jpg: cannot write its outputs" in err
    assert (out / "street_labels.png").is_file()


def test_predict_command_output_dir_that_cannot_be_created(images, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main(["predict", str(images / "street.png"), "--model", NAME,
                 "--out", str(blocker / "out")])
    assert code == 1
    assert "cannot create the output directory" in capsys.readouterr().err


def test_predict_command_usage_errors(images, tmp_path, capsys):
    assert main(["predict", str(images), "--out", str(tmp_path / "o")]) == 2
    assert "--weights" in capsys.readouterr().err
    assert main(["predict", str(images), "--model", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown model name" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(empty), "--model", NAME, "--out", str(tmp_path / "o")]) == 1
    assert "no JPEG/PNG images" in capsys.readouterr().err
    assert main(["predict", str(images), "--model", NAME, "--out", str(tmp_path / "o"),
                 "--device", "nonsense"]) == 2
    assert "invalid --device" in capsys.readouterr().err
    for bad in (["--size", "tiny"], ["--batch-size", "0"], ["--alpha", "2"], ["--tta-scales", "x"]):
        with pytest.raises(SystemExit):
            main(["predict", str(images), "--model", NAME, "--out", "o", *bad])


def test_predict_command_native_size_and_tta(images, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["predict", str(images / "street.png"), "--model", NAME, "--out", str(out),
                 "--size", "native", "--tta", "--tta-scales", "1,0.5"])
    assert code == 0, capsys.readouterr().err
    assert read_png(out / "street_labels.png").shape == (70, 90)


def test_predict_command_tta_flip_as_in_eval(model, images, tmp_path):
    weights = tmp_path / "model.safetensors"
    hyperseg.save(model, weights)
    out = tmp_path / "out"
    assert main(["predict", str(images / "street.png"), "--weights", str(weights), "--out",
                 str(out), "--size", "64x64", "--tta", "flip", "--quiet"]) == 0
    expected = hyperseg.predict(model, images / "street.png", size=SIZE, tta="flip")
    assert (read_png(out / "street_labels.png") == expected.numpy()).mean() > 0.999


def test_module_predict_help():
    result = subprocess.run([sys.executable, "-m", "hyperseg", "predict", "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for option in ("--weights", "--model", "--out", "--size", "--batch-size", "--device", "--tta"):
        assert option in result.stdout


def test_console_script_help():
    script = Path(sys.executable).with_name("hyperseg")
    if not script.exists():
        found = shutil.which("hyperseg")
        if found is None:
            pytest.skip("the hyperseg console script is not installed (pip install -e .)")
        script = Path(found)
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for command in ("list", "convert", "predict", "export"):
        assert command in result.stdout


def test_export_help_says_the_triton_kernels_are_not_exported(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0
    assert "Triton kernels cannot be exported" in " ".join(capsys.readouterr().out.split())


# -- 16-bit images ------------------------------------------------------------------------------

def test_16_bit_pngs_are_scaled_not_clipped(tmp_path):
    """Pillow reads a 16-bit grayscale PNG as mode I;16, whose convert("RGB") clips every value
    above 255 to white; it is scaled to 8 bits instead, as Pillow reads 16-bit colour PNGs."""
    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "gray16.png")
    with Image.open(tmp_path / "gray16.png") as raw:
        assert raw.mode.startswith("I")                   # what Pillow makes of it
    image = np.asarray(read_image(tmp_path / "gray16.png"))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], values >> 8)
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    tensor = to_tensor(Image.open(tmp_path / "gray16.png"))
    assert 0.45 < tensor.mean() < 0.55


# -- failing before any work, leaving nothing behind ---------------------------------------------

def _no_model(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr("hyperseg.commands._load_model", fail)


def test_predict_checks_inputs_and_output_before_loading_the_model(images, tmp_path, capsys,
                                                                   monkeypatch):
    _no_model(monkeypatch)
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "missing.png"), "--model", NAME, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "missing.png: no such file" in err and "nothing was done" in err
    assert main(["predict", str(images / "notes.txt"), "--model", NAME, "--out", str(out)]) == 1
    assert "unsupported image type (.txt)" in capsys.readouterr().err
    assert not out.exists()
    # --backend triton on a CPU without the Triton interpreter
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["predict", str(images), "--model", NAME, "--out", str(out), "--device", "cpu",
                 "--backend", "triton"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err
    assert not out.exists()


def test_predict_that_segments_nothing_leaves_no_output_folder(images, tmp_path, capsys):
    out = tmp_path / "out"
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint\n")
    assert main(["predict", str(images), "--weights", str(bad), "--out", str(out)]) == 2
    assert "it is a text file (starting with 'not a checkpoint')" in capsys.readouterr().err
    assert not out.exists()
    # every image unreadable: the model runs on nothing and the folder is not left behind
    assert main(["predict", str(images / "broken.png"), "--model", NAME, "--out", str(out / "x"),
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "no image was segmented" in err and "segmented 0" not in err
    assert not out.exists()


def test_one_size_parser_serves_sizes_crops_and_synthetic_data():
    """options.parse_size: HxW or 'native' for --size; N or HxW without a lower bound for
    synthetic data (checked by the dataset) and --crop (checked by the command line)."""
    assert parse_size("512x1024") == (512, 1024)
    assert parse_size(" Native ") == "native"
    assert parse_size("64", native=False, square=True, min_side=None) == (64, 64)
    assert parse_size("8x16", native=False, square=True, min_side=None) == (8, 16)
    with pytest.raises(ValueError, match="size must be N or HxW, got 'native'"):
        parse_size("native", native=False, square=True, min_side=None)
    with pytest.raises(ValueError, match=r"HxW \(e.g. 512x1024\), got '64'"):
        parse_size("64", native=False)
