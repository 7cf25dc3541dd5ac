"""Checkpoints: official .pth files (parsed and loaded safely), our safetensors format, errors."""
import os
import pickle
import subprocess
import sys

import pytest
import torch

import hyperseg
from checkpoint_utils import (CAMVID, OFFICIAL_ARCH, coordinate_buffers,  # noqa: F401
                              randomize_buffers, same_state, write_official)
from hyperseg.checkpoint import (CheckpointError, config_from_arch, load_official_state_dict,
                                 official_state_dict, parse_arch)

@pytest.fixture(scope="module")
def camvid():
    torch.manual_seed(0)
    return randomize_buffers(hyperseg.build(CAMVID, backend="torch"))


@pytest.fixture(scope="module")
def official_file(camvid, tmp_path_factory):
    optimizer = torch.optim.Adam(camvid.parameters(), lr=1e-3, betas=(0.5, 0.999))
    path = tmp_path_factory.mktemp("ckpt") / "camvid_official.pth"
    return write_official(path, camvid, OFFICIAL_ARCH[CAMVID], optimizer=optimizer.state_dict())


# -- the arch string ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(OFFICIAL_ARCH))
def test_official_arch_strings_map_to_the_zoo(name):
    config = config_from_arch(OFFICIAL_ARCH[name])
    assert config == hyperseg.get_config(name)


def test_other_class_counts_and_custom_architectures():
    config = config_from_arch(OFFICIAL_ARCH[CAMVID].replace("num_classes=12", "num_classes=5"))
    assert config.name == CAMVID and config.num_classes == 5
    custom = config_from_arch(OFFICIAL_ARCH[CAMVID].replace("expand_ratio=2", "expand_ratio=3"))
    assert custom.name == "custom-v1_0" and custom.expand_ratio == 3
    model = hyperseg.HyperSeg(custom)
    assert model.decoder.blocks[3].hidden == 3 * model.decoder.blocks[3].in_channels


def test_parse_arch_splits_a_literal_call():
    func, args, kwargs = parse_arch("a.b.c(1, 'x', k=[1, (2, 3)], n=None)")
    assert func == "a.b.c" and args == [1, "x"] and kwargs == {"k": [1, (2, 3)], "n": None}


MALFORMED = [
    ("hyperseg.models.hyperseg_v1_0.hyperseg_efficientnet(__import__('os').system('touch x'))", "literal"),
    ("hyperseg.models.hyperseg_v1_0.hyperseg_efficientnet('efficientnet-b1',levels=os.sep)", "literal"),
    ("hyperseg.models.hyperseg_v1_0.hyperseg_efficientnet('efficientnet-b1',levels=two)", "literal"),
    ("hyperseg.models.hyperseg_v1_0.hyperseg_efficientnet('efficientnet-b1',f=lambda: 0)", "literal"),
    ("hyperseg.models.hyperseg_v1_0.hyperseg_efficientnet(*['efficientnet-b1'])", "unpack"),
    ("hyperseg.models.hyperseg_v1_0.hyperseg_efficientnet(**{'levels': 2})", "unpack"),
    ("getattr(os, 'system')('x')", "dotted name"),
    ("1 + 1", "single function call"),
    ("hyperseg_efficientnet(", "not a Python call"),
    ("os.system('rm -rf /')", "unsupported architecture"),
    ("hyperseg.models.hyperseg_v1_0.hyperseg_efficientnet('resnet50',level_channels=[1])", "backbone"),
    ("hyperseg.models.hyperseg_v1_0.hyperseg_efficientnet('efficientnet-b1',level_channels=[8],"
     "weight_groups=[8],with_out_fc=True)", "with_out_fc"),
    ("hyperseg.models.hyperseg_v1_0.hyperseg_efficientnet('efficientnet-b1',level_channels=[8],"
     "weight_groups=[8],colour='red')", "unsupported arguments"),
    ("hyperseg.models.hyperseg_v1_0.hyperseg_efficientnet('efficientnet-b1',level_channels=[8],"
     "weight_groups=[],num_classes=3)", "weight_groups"),
    ("hyperseg.models.hyperseg_v1_0.hyperseg_efficientnet('efficientnet-b1',level_channels=[8],"
     "weight_groups=[8],num_classes=0)", "num_classes"),
    ("x(" + "1," * 6000 + ")", "long"),
]


@pytest.mark.parametrize("arch,match", MALFORMED)
def test_malformed_or_unsafe_arch_strings_are_refused(arch, match):
    with pytest.raises(CheckpointError, match=match):
        config_from_arch(arch)


def test_parsing_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(CheckpointError):
        config_from_arch(f"hyperseg.models.hyperseg_v1_0.hyperseg_efficientnet(open({str(marker)!r}, 'w'))")
    assert not marker.exists()


# -- state dict mapping ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(OFFICIAL_ARCH))
def test_official_layout_round_trip_is_the_identity(name):
    torch.manual_seed(1)
    source = randomize_buffers(hyperseg.build(name))
    target = hyperseg.build(name)
    load_official_state_dict(target, official_state_dict(source))
    assert same_state(source, target)


# -- files --------------------------------------------------------------------------------------

def test_load_an_official_training_checkpoint(camvid, official_file):
    model = hyperseg.load(official_file, backend="torch")
    assert model.config.name == CAMVID and not model.training
    assert same_state(model, camvid)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), camvid(x))


def test_build_with_weights(camvid, official_file):
    assert same_state(hyperseg.build(CAMVID, weights=official_file), camvid)
    with pytest.raises(CheckpointError, match="num_classes: 12 vs 5"):
        hyperseg.build(CAMVID, num_classes=5, weights=official_file)
    with pytest.raises(CheckpointError, match="hyperseg-m-cityscapes"):
        hyperseg.build("hyperseg-m", weights=official_file)


def test_checkpoint_without_arch_needs_a_name(camvid, tmp_path):
    path = write_official(tmp_path / "plain.pth", camvid, arch=None, prefix="")
    with pytest.raises(CheckpointError, match="arch"):
        hyperseg.load(path)
    assert same_state(hyperseg.build(CAMVID, weights=path), camvid)


def test_native_format_round_trip(tmp_path):
    torch.manual_seed(2)
    model = randomize_buffers(hyperseg.build(CAMVID, num_classes=5))
    hyperseg.save(model, tmp_path / "m.safetensors")
    again = hyperseg.load(tmp_path / "m.safetensors", backend="torch")
    assert again.config == model.config
    assert same_state(again, model)
    assert same_state(hyperseg.build(CAMVID, num_classes=5, weights=tmp_path / "m.safetensors"), model)
    with pytest.raises(TypeError):
        hyperseg.save(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_convert_command(official_file, camvid, tmp_path):
    target = tmp_path / "converted.safetensors"
    result = subprocess.run([sys.executable, "-m", "hyperseg", "convert", str(official_file), str(target)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert CAMVID in result.stdout
    assert same_state(hyperseg.load(target), camvid)
    bad = subprocess.run([sys.executable, "-m", "hyperseg", "convert", str(tmp_path / "none.pth"), str(target)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no checkpoint file" in bad.stderr


# -- safety and bad files -------------------------------------------------------------------------

class _CreatesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "arch": "x", "payload": _CreatesAFile(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="could run arbitrary code"):
        hyperseg.load(path)
    with pytest.raises(CheckpointError, match="could run arbitrary code"):
        hyperseg.build(CAMVID, weights=path)
    assert not marker.exists()
    # the same payload as a bare pickle
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_CreatesAFile(str(marker))))
    with pytest.raises(CheckpointError):
        hyperseg.load(raw)
    assert not marker.exists()


def test_truncated_and_foreign_files(official_file, tmp_path):
    data = open(official_file, "rb").read()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(4096))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    for path in (truncated, garbage, empty, text):
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            hyperseg.load(path)
    with pytest.raises(FileNotFoundError):
        hyperseg.load(tmp_path / "missing.pth")
    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(CheckpointError, match="not a checkpoint dict"):
        hyperseg.load(tensor_only)


def test_bad_safetensors_files(tmp_path):
    from safetensors.torch import save_file
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="without a hyperseg model config"):
        hyperseg.load(plain)
    model = hyperseg.build(CAMVID)
    good = tmp_path / "good.safetensors"
    hyperseg.save(model, good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="safetensors"):
        hyperseg.load(cut)


def test_missing_unexpected_and_misshapen_tensors(camvid, tmp_path):
    state = {k: v.clone() for k, v in official_state_dict(camvid).items()}
    arch = OFFICIAL_ARCH[CAMVID]

    missing = dict(state)
    del missing["decoder.level_3.0.bn2.running_var"]
    torch.save({"state_dict": missing, "arch": arch}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing.*decoder\.level_3\.0\.bn2\.running_var.*decoder\.blocks\.3\.bn2"):
        hyperseg.load(tmp_path / "missing.pth")

    extra = dict(state, **{"decoder.level_9.0.signal2weights.weight": torch.zeros(1)})
    torch.save({"state_dict": extra, "arch": arch}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected.*decoder\.level_9"):
        hyperseg.load(tmp_path / "extra.pth")

    wrong = dict(state)
    wrong["decoder.level_0.0.0.signal2weights.weight"] = torch.zeros(5248, 8, 1, 1)
    torch.save({"state_dict": wrong, "arch": arch}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match=r"signal2weights\.weight.*\(5248, 8, 1, 1\).*\(5248, 7, 1, 1\)"):
        hyperseg.load(tmp_path / "wrong.pth")

    foreign = {"fc.weight": torch.zeros(2, 2)}
    torch.save(foreign, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="neither"):
        hyperseg.build(CAMVID, weights=tmp_path / "foreign.pth")

    not_tensor = dict(state, **{"decoder.note": "hello"})
    torch.save({"state_dict": not_tensor, "arch": arch}, tmp_path / "str.pth")
    with pytest.raises(CheckpointError, match="decoder.note"):
        hyperseg.load(tmp_path / "str.pth")


def test_files_that_are_no_checkpoint_say_what_they_are(tmp_path):
    """A text file renamed .pth used to fail with "KeyError: 101" from the unpickler."""
    cases = {
        "notes.pth": (b"hello world\n", "it is a text file (starting with 'hello world')"),
        "lfs.pth": (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n",
                    "it is a Git LFS pointer"),
        "page.pth": (b"<!DOCTYPE html>\n<html><body>Sign in</body></html>\n", "it is a web page"),
        "empty.pth": (b"", "the file is empty"),
        "binary.pth": (b"\x01\x02\x03\xff" * 8, "neither a PyTorch file"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match="not a readable checkpoint") as info:
            hyperseg.load(tmp_path / name)
        assert message in str(info.value), (name, str(info.value))


def test_saved_models_get_the_usual_file_permissions(tmp_path):
    """safetensors' save_file makes its files 0600; every other output is 0666 minus the umask."""
    hyperseg.save(hyperseg.build("hyperseg-m", num_classes=2), tmp_path / "m.safetensors")
    (tmp_path / "plain.txt").write_text("")
    mode = (tmp_path / "m.safetensors").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.txt").stat().st_mode & 0o777
