"""Hostile and broken files through the user-facing paths (``hyperseg.load``, ``hyperseg predict``,
``hyperseg eval``): each case is a row of a table, and each gets a clear error naming the file and
the problem (never a library traceback), with nothing written; images in unusual but valid
formats are segmented at their own (upright) size. The README's Reliability section lists these
rows.

The 10,000 x 10,000 image runs in its own process with its peak memory measured (about a minute):

    HYPERSEG_BIG_IMAGE=1 pytest -m slow tests/test_hostile_inputs.py
"""
import io
import os
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import hyperseg
from hyperseg.__main__ import main
from hyperseg.checkpoint import CheckpointError
from checkpoint_utils import OFFICIAL_ARCH, write_official

SIZE = ["--size", "64x128"]


class _RunsAShellCommand:
    """A pickle payload that would create ``marker`` if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A good model file (3 classes) and an image to segment with it."""
    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    model = hyperseg.build("hyperseg-m", num_classes=3, backend="torch")
    hyperseg.save(model, root / "good.safetensors")
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "photo.png")
    return root, model


# -- checkpoints ------------------------------------------------------------------------------------

def _flip(data: bytes, position: int) -> bytes:
    flipped = bytearray(data)
    flipped[position] ^= 0x10
    return bytes(flipped)


def _header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def _with_metadata(path, model, change):
    """``model`` saved, then its safetensors metadata changed by ``change(dict)``."""
    from safetensors.torch import save_file
    hyperseg.save(model, path)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    change(metadata)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}   # channels_last weights
    save_file(tensors, str(path), metadata=metadata)


def _official(arch):
    def write(path, model):
        full = hyperseg.build("hyperseg-m", backend="torch")
        write_official(path, full, arch)
    return write


def _malicious(path, model):
    full = hyperseg.build("hyperseg-m", backend="torch")
    write_official(path, full, OFFICIAL_ARCH["hyperseg-m-cityscapes"],
                   payload=_RunsAShellCommand(path.parent / "pwned"))


# name -> (write(path, model), the problem the error states)
CHECKPOINT_CASES = {
    "truncated.safetensors": (
        lambda p, m: (hyperseg.save(m, p), p.write_bytes(p.read_bytes()[:-4096])),
        "is not a readable safetensors file (truncated or corrupt)"),
    "bit-flipped-data.safetensors": (
        lambda p, m: (hyperseg.save(m, p), p.write_bytes(_flip(p.read_bytes(), -5000))),
        "is corrupt: its tensor data does not match the SHA-256 checksum"),
    "bit-flipped-header.safetensors": (
        lambda p, m: (hyperseg.save(m, p),
                      p.write_bytes(_flip(p.read_bytes(), 8 + _header_length(p.read_bytes()) - 30))),
        "is not a readable safetensors file"),
    "header-too-long.safetensors": (
        lambda p, m: (hyperseg.save(m, p), p.write_bytes(
            struct.pack("<Q", 10 * p.stat().st_size) + p.read_bytes()[8:])),
        "its header claims"),
    "no-config.safetensors": (
        lambda p, m: _with_metadata(p, m, lambda d: d.pop("config")),
        "without a hyperseg model config in its metadata"),
    "bad-config.safetensors": (
        lambda p, m: _with_metadata(p, m, lambda d: d.update(config='{"arch": "v9"}')),
        "invalid model config in the metadata"),
    "wrong-config.safetensors": (
        lambda p, m: _with_metadata(p, m, lambda d: d.update(
            config=d["config"].replace('"num_classes": 3', '"num_classes": 7'))),
        "its tensors do not fit the hyperseg-m-cityscapes model its config metadata describes"),
    "malicious-pickle.pth": (_malicious, "could run arbitrary code"),
    "arch-of-another-model.pth": (
        _official(OFFICIAL_ARCH["hyperseg-s-camvid"]),
        "its tensors do not fit the hyperseg-s-camvid model its 'arch' entry describes"),
    "arch-of-a-foreign-model.pth": (
        _official("torchvision.models.resnet50(pretrained=True)"),
        "unsupported architecture 'torchvision.models.resnet50'"),
}


@pytest.mark.parametrize("name", sorted(CHECKPOINT_CASES))
def test_a_broken_or_hostile_checkpoint_gets_a_clear_error_and_nothing_is_written(
        name, files, tmp_path, capsys):
    root, model = files
    write, problem = CHECKPOINT_CASES[name]
    path = tmp_path / name
    write(path, model)
    with pytest.raises(CheckpointError) as caught:
        hyperseg.load(path)
    assert repr(str(path)) in str(caught.value) and problem in str(caught.value), caught.value
    out = tmp_path / "out"
    assert main(["predict", str(root / "photo.png"), "--weights", str(path), "--out", str(out),
                 "--quiet", *SIZE]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and problem in err and "Traceback" not in err, err
    assert not out.exists()
    assert not (tmp_path / "pwned").exists()          # nothing in a checkpoint ever runs


def test_a_checkpoint_with_nan_or_inf_weights_loads_with_a_warning(files, tmp_path):
    _, model = files
    broken = hyperseg.build("hyperseg-m", num_classes=3, backend="torch")
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.decoder.blocks[0].bn.weight[0] = float("nan")
        broken.decoder.blocks[1].bn.bias[0] = float("inf")
    path = tmp_path / "diverged.safetensors"
    hyperseg.save(broken, path)
    with pytest.warns(RuntimeWarning, match=r"2 tensor\(s\) hold NaN or infinite values") as caught:
        hyperseg.load(path)
    assert str(path) in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hyperseg.load(_good(files))                  # a good file: no warning


def _good(files):
    return files[0] / "good.safetensors"


# -- images -----------------------------------------------------------------------------------------

def _rgb(height=48, width=80, seed=1):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3),
                                                                dtype=np.uint8))


def _exif_rotated(path):
    image = _rgb()
    exif = image.getexif()
    exif[0x0112] = 6                                  # orientation: rotate 90 degrees to view
    image.save(path, exif=exif)


def _truncated_jpeg(path):
    buffer = io.BytesIO()
    _rgb().save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


# name -> (write(path), the (height, width) of the label map)
READABLE_IMAGES = {
    "grayscale.png": (lambda p: _rgb().convert("L").save(p), (48, 80)),
    "rgba.png": (lambda p: _rgb().convert("RGBA").save(p), (48, 80)),
    "palette.png": (lambda p: _rgb().convert("P").save(p), (48, 80)),
    "gray16.png": (lambda p: Image.fromarray(np.random.default_rng(2).integers(
        0, 65536, (48, 80)).astype(np.uint16)).save(p), (48, 80)),
    "rgb48.png": (lambda p: p.write_bytes(_rgb48_png()), (48, 80)),
    "cmyk.jpg": (lambda p: _rgb().convert("CMYK").save(p), (48, 80)),
    "exif-rotated.jpg": (_exif_rotated, (80, 48)),
}
# name -> (write(path), the problem the error states)
UNREADABLE_IMAGES = {
    "truncated.jpg": (_truncated_jpeg, "image file is truncated"),
    "decompression-bomb.png": (lambda p: Image.new("1", (20000, 20000)).save(p),
                               "refusing to read the image: Image size (400000000 pixels)"),
    "not-an-image.jpg": (lambda p: p.write_text("hello"), "not a readable JPEG/PNG image"),
}


def _rgb48_png() -> bytes:
    """A 16-bit-per-channel RGB PNG (which Pillow reads as 8-bit RGB), written by hand."""
    import zlib
    rows = np.random.default_rng(3).integers(0, 65536, (48, 80, 3)).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", 80, 48, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def test_images_of_every_mode_are_segmented_at_their_upright_size(files, tmp_path, capsys):
    root, _ = files
    folder = tmp_path / "images"
    folder.mkdir()
    for name, (write, _) in READABLE_IMAGES.items():
        write(folder / name)
    out = tmp_path / "out"
    assert main(["predict", str(folder), "--weights", str(_good(files)), "--out", str(out),
                 "--quiet", *SIZE]) == 0, capsys.readouterr().err
    for name, (_, (height, width)) in READABLE_IMAGES.items():
        stem = os.path.splitext(name)[0]
        with Image.open(out / f"{stem}_labels.png") as labels:
            assert labels.size == (width, height), name
        with Image.open(out / f"{stem}_overlay.png") as overlay:
            assert overlay.size == (width, height) and overlay.mode == "RGB", name


@pytest.mark.parametrize("name", sorted(UNREADABLE_IMAGES))
def test_an_unreadable_image_gets_a_clear_error_and_nothing_is_written(name, files, tmp_path,
                                                                       capsys):
    write, problem = UNREADABLE_IMAGES[name]
    path = tmp_path / name
    write(path)
    out = tmp_path / "out"
    assert main(["predict", str(path), "--weights", str(_good(files)), "--out", str(out),
                 "--quiet", *SIZE]) == 1
    err = capsys.readouterr().err
    assert f"{path}: " in err and problem in err and "Traceback" not in err, err
    assert not out.exists()


def test_upsampled_argmax_in_bands_equals_the_whole_image_at_once():
    """The bounded-memory path of large images gives the labels of the plain one."""
    import torch.nn.functional as F

    from hyperseg.predict import upsampled_argmax
    for classes, small, size in ((19, (8, 16), (301, 517)), (3, (2, 4), (64, 128)),
                                 (5, (16, 32), (1000, 77))):
        scores = torch.randn(classes, *small)
        whole = F.interpolate(scores[None], size=size, mode="bilinear",
                              align_corners=False).argmax(1)[0]
        assert torch.equal(upsampled_argmax(scores, size, limit=1000), whole)


@pytest.mark.slow
@pytest.mark.skipif("HYPERSEG_BIG_IMAGE" not in os.environ,
                    reason="the 10,000 x 10,000 image: set HYPERSEG_BIG_IMAGE=1")
def test_a_100_megapixel_photo_is_segmented_in_bounded_memory(files, tmp_path):
    """A 10,000 x 10,000 JPEG: its outputs at full size, with a peak resident memory under
    4 GiB (measured 2.7 GiB; the image's pixels as floats alone take 1.1 GiB and the int64
    label map 0.75 GiB; before the banded arg-max it took 6.5 GiB)."""
    path = tmp_path / "big.jpg"
    pixels = np.random.default_rng(0).integers(0, 256, (10_000, 10_000, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=50)
    del pixels
    out = tmp_path / "out"
    script = ("import resource, sys; from hyperseg.__main__ import main; code = main(sys.argv[1:]); "
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", script, "predict", str(path), "--weights",
                             str(_good(files)), "--out", str(out), "--quiet", *SIZE],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    peak_gib = int(result.stdout.split()[-1]) / 2 ** 20
    print(f"peak resident memory {peak_gib:.2f} GiB")
    assert peak_gib < 4.0
    with Image.open(out / "big_labels.png") as labels:
        assert labels.size == (10_000, 10_000)


# -- datasets -----------------------------------------------------------------------------------------

def _camvid(root, label_size=(64, 64), label_value=1, missing=False):
    (root / "test").mkdir(parents=True)
    (root / "testannot").mkdir()
    for i in range(2):
        _rgb(64, 64, seed=i).save(root / f"test/f{i}.png")
        if missing and i == 1:
            continue
        labels = np.full(label_size, 3, dtype=np.uint8)
        labels[0, :4] = (0, 11, 255, label_value)
        Image.fromarray(labels).save(root / f"testannot/f{i}.png")


# name -> (keyword arguments of _camvid, the file named, the problem the error states)
DATASET_CASES = {
    "missing label file": (dict(missing=True), "testannot/f1.png", "have no label file"),
    "image/label size mismatch": (dict(label_size=(64, 48)), "testannot/f0.png",
                                  "the label is 64x48 but its image"),
    "label value outside the classes": (dict(label_value=40), "testannot/f0.png",
                                        "label values [40] are not class ids 0..11 or 255"),
}


@pytest.mark.parametrize("case", sorted(DATASET_CASES))
def test_a_broken_dataset_gets_a_clear_error_and_no_report(case, tmp_path, capsys):
    """Read in a data-loading worker, whose errors torch re-raises with their traceback as the
    message: the message alone is reported."""
    layout, file, problem = DATASET_CASES[case]
    root = tmp_path / "camvid"
    _camvid(root, **layout)
    report = tmp_path / "report.json"
    assert main(["eval", "--model", "hyperseg-s-camvid", "--data", f"camvid:{root}", "--size",
                 "64x64", "--json", str(report), "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(root / file) in err and problem in err and "Traceback" not in err, err
    assert not report.exists()
