"""The README's code, run as a new user would run it, on small synthetic inputs, so that the README
stays true: every ```bash line that calls ``hyperseg`` / ``python -m hyperseg`` (in order, in one
folder, each block's outputs feeding the next ones), the Quick start and Checkpoints snippets.

A line is run with its paths as written (relative to a temporary folder) and these changes only:
real datasets become a small synthetic one, sizes become small, and training stops after one
step. Lines that cannot run here are listed in ``NOT_RUN`` with the reason, and a README line
that is neither run nor listed fails the test.
"""
import os
import re
import shlex
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

import hyperseg
from hyperseg.__main__ import main
from checkpoint_utils import OFFICIAL_ARCH, write_official
from video_utils import two_colour_frames, write_video

README = Path(__file__).resolve().parents[1] / "README.md"
DATA = "synthetic:8,size=64,classes=3"

# Command lines the test does not run: (how the line starts, why).
NOT_RUN = (
    ("pip install", "installs packages (needs the network)"),
    ("pytest tests/", "the whole test suite"),
    ("python bench/", "the benchmark (tests/test_bench.py covers it)"),
    ("torchrun", "several processes (tests/test_distributed.py runs DDP under torchrun)"),
)
# Python snippets, by the heading above them: run, or why not.
SNIPPETS_NOT_RUN = {"Training on the kernels": "needs a CUDA GPU (.cuda())"}

# Arguments replaced, and arguments added, per command.
REPLACE = {"cityscapes:/data/cityscapes": DATA, "synthetic": DATA, "512x1024": "64x128"}
ADDED = {
    "train": ["--steps", "1", "--workers", "0"],
    "train --resume": ["--steps", "2", "--workers", "0"],
    "eval": ["--batch-size", "8", "--workers", "0"],
    "predict": ["--size", "64x128"],
    "benchmark": ["--size", "64x128", "--frames", "2", "--warmup", "1"],
}
# --pretrained finds the official file in the torch hub cache; the network is never used.
UNREACHABLE = "http://127.0.0.1:9/v1.0"


def code_blocks(language):
    """(heading, code) of every ```language block of the README (dedented), with the heading of
    the section it is in."""
    blocks, heading, fence, lines = [], None, None, []
    for line in README.read_text().splitlines():
        if fence is None:
            opening = re.match(r"( *)```(\w*)$", line)
            if opening:
                fence, kind, lines = opening.group(1) + "```", opening.group(2), []
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif line == fence:
            if kind == language:
                blocks.append((heading, textwrap.dedent("\n".join(lines) + "\n")))
            fence = None
        else:
            lines.append(line)
    return blocks


def command_lines():
    return [line.strip() for _, code in code_blocks("bash") for line in code.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def hyperseg_argv(line):
    """The arguments of a ``hyperseg ...`` or ``python -m hyperseg ...`` line, else None."""
    words = shlex.split(line, comments=True)
    if words[:1] == ["hyperseg"]:
        return words[1:]
    if words[:3] == ["python", "-m", "hyperseg"]:
        return words[3:]
    return None


def small(argv):
    argv = [REPLACE.get(word, word) for word in argv]
    key = "train --resume" if argv[0] == "train" and "--resume" in argv else argv[0]
    return argv + ADDED.get(key, [])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """What the README's commands expect to find: an official checkpoint, photos, a video."""
    root = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    model = hyperseg.build("hyperseg-m", backend="torch")
    write_official(root / "cityscapes_efficientnet_b1_hyperseg-m.pth", model,
                   OFFICIAL_ARCH["hyperseg-m-cityscapes"])
    cache = root / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    shutil.copy(root / "cityscapes_efficientnet_b1_hyperseg-m.pth", cache)
    (root / "photos" / "day").mkdir(parents=True)
    image = Image.radial_gradient("L").convert("RGB").resize((96, 64))
    image.save(root / "photos" / "day" / "a.png")
    image.save(root / "street.jpg")
    write_video(root / "street.mp4", two_colour_frames(3, 64, 96))
    run_snippet("Make a tiny dataset", root)        # shapes/, for the folder:shapes commands
    return root


def run_snippet(heading, folder, namespace=None):
    """Run the README's Python block under ``heading`` in ``folder``; returns its namespace."""
    (code,) = [code for h, code in code_blocks("python") if h == heading]
    namespace = {} if namespace is None else namespace
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        exec(compile(code, f"README.md ({heading})", "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace


def test_every_command_line_is_run_or_listed():
    for line in command_lines():
        assert hyperseg_argv(line) is not None or any(line.startswith(p) for p, _ in NOT_RUN), \
            f"README line neither run by tests/test_readme.py nor listed in NOT_RUN: {line}"
    assert {h for h, _ in code_blocks("python")} >= set(SNIPPETS_NOT_RUN)


@pytest.fixture
def cached_weights(folder, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(folder / "torch-home"))
    monkeypatch.setenv("HYPERSEG_WEIGHTS_URL", UNREACHABLE)
    threads = torch.get_num_threads()          # hyperseg benchmark --threads sets the process's
    yield
    torch.set_num_threads(threads)


def test_the_readme_commands_run_in_order(folder, cached_weights, monkeypatch, capsys):
    monkeypatch.chdir(folder)
    ran = []
    for line in command_lines():
        argv = hyperseg_argv(line)
        if argv is None:
            continue
        code = main(small(argv))
        captured = capsys.readouterr()
        assert code == 0, f"{line}\n{captured.out}\n{captured.err}"
        ran.append(argv[0])
    assert sorted(set(ran)) == ["benchmark", "convert", "eval", "export", "list", "predict", "train"]
    # the README's train -> eval: a short run has its best model
    assert (folder / "runs/m/best.safetensors").is_file() and (folder / "m.json").is_file()
    assert (folder / "seg/day/a_labels.png").is_file() and (folder / "seg/street_labels.png").is_file()
    assert all((folder / f"seg/street_{kind}").is_file()
               for kind in ("color.mp4", "overlay.mp4", "labels.mkv"))
    assert (folder / "hyperseg-m.onnx").is_file()
    assert (folder / "runs/demo/best.safetensors").is_file()
    # your data: the MobileNetV3 run keeps the folder's classes, and predict uses its palette
    shapes = hyperseg.load(folder / "runs/shapes/best.safetensors")
    assert shapes.config.backbone == "mobilenetv3_large_100"
    assert shapes.config.class_names == ("background", "dim", "bright")
    colours = Image.open(folder / "shapes-seg/0_color.png").convert("RGB").getcolors()
    assert {c for _, c in colours} <= {(0, 0, 0), (200, 40, 40), (40, 40, 200)}
    assert hyperseg.load(folder / "runs/shapes-ft/latest.safetensors").num_classes == 3


def test_the_tiny_dataset_snippet_makes_a_valid_folder_dataset(folder):
    from hyperseg.datasets import FolderDataset

    train, val = FolderDataset(folder / "shapes", "train"), FolderDataset(folder / "shapes", "val")
    assert (len(train), len(val), train.num_classes) == (16, 4, 3)
    image, mask = train[0]
    assert image.shape == (3, 64, 128) and set(mask.unique().tolist()) <= {0, 1, 2}


def test_the_backbone_snippet_runs(folder):
    namespace = run_snippet("Any timm backbone", folder)
    assert namespace["model"].config.name == "hyperseg-m-cityscapes+mobilenetv3_large_100"
    assert namespace["model"].num_classes == 3


def test_the_quick_start_snippet_runs_in_bounded_memory(folder, monkeypatch):
    """The snippet at 64 x 128 instead of 512 x 1024; its forward passes record no autograd
    graph (torch.inference_mode), which is what keeps it at 1.4 GiB instead of 13.2 GiB."""
    (code,) = [code for heading, code in code_blocks("python") if heading == "Quick start"]
    assert "with torch.inference_mode():" in code
    code = code.replace("512, 1024", "64, 128")
    monkeypatch.chdir(folder)
    namespace = {}
    exec(compile(code, "README.md (Quick start)", "exec"), namespace)
    logits = namespace["logits"]
    assert logits.shape == (2, 5, 64, 128) and namespace["labels"].shape == (2, 64, 128)
    assert not logits.requires_grad


def test_the_checkpoints_snippet_runs(folder, monkeypatch):
    """It follows the Quick start, which imported hyperseg."""
    (code,) = [code for heading, code in code_blocks("python") if heading == "Checkpoints"]
    monkeypatch.chdir(folder)
    namespace = {"hyperseg": hyperseg}
    exec(compile(code, "README.md (Checkpoints)", "exec"), namespace)
    assert namespace["model"].config.name == "hyperseg-m-cityscapes"


def test_the_pretrained_weights_snippet_runs(folder, cached_weights):
    """From the torch hub cache (TORCH_HOME), with an unreachable server."""
    (code,) = [code for heading, code in code_blocks("python") if heading == "Pretrained weights"]
    namespace = {"hyperseg": hyperseg}
    exec(compile(code, "README.md (Pretrained weights)", "exec"), namespace)
    expected = hyperseg.load(folder / "cityscapes_efficientnet_b1_hyperseg-m.pth")
    got = namespace["model"].state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())
