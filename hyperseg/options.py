"""Names, limits and argument checks shared by the package and the command line.

Plain Python (no torch, torchvision or timm), so that ``hyperseg --help``, ``hyperseg list`` and
every argument check run in milliseconds: the command line imports the heavy modules only once
its arguments have been checked.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

BACKENDS = ("auto", "torch", "triton")            # decoder implementations (hyperseg.model)
MIN_SIDE = 32                                     # the smallest input side the network takes
# GPU classes (substrings of torch.cuda.get_device_name) on which a committed GPU run of
# bench/train_step.py (bench/results/train-step-*.json) measured the Triton training step faster
# than the torch reference: backend="auto" trains on the kernels there and only there (and on the
# torch reference elsewhere); tests/test_auto_backend.py keeps this list and the results in step.
TRAINING_KERNELS_FASTER_ON: Tuple[str, ...] = ()
LOSSES = ("bootstrapped_ce", "ce")                # training losses (hyperseg.losses)
AMP_MODES = ("off", "fp16", "bf16")               # mixed precision in training
PRECISIONS = ("fp32", "fp16", "bf16")             # inference precision (HyperSeg.precision)
TTA_MODES = ("flip", "ms")                        # test-time augmentation (predict and eval)
DEFAULT_TTA_SCALES = (1.0, 0.75, 1.25)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")   # read with PyAV
VIDEO_INSTALL = 'pip install "hyperseg[video]"'  # the optional extra that installs PyAV (av)
DATA_SPEC_HELP = ("cityscapes:PATH, camvid:PATH, voc:PATH, folder:PATH (your images/ and masks/, "
                  "see README), or synthetic[:N][,size=HxW][,classes=C]"
                  "[,seed=S] (N training images, default 512 of 128x128 with 4 classes)")


def parse_size(text: str, *, native: bool = True, square: bool = False,
               min_side: Optional[int] = MIN_SIDE) -> Union[str, Tuple[int, int]]:
    """The "HxW" parser of the package and the command line (sizes, crops, synthetic data).

    ``"HxW"`` (or ``"H*W"``; case and surrounding spaces do not matter) -> (H, W). With
    ``native``, ``"native"`` -> "native" (keep each image's size); with ``square``, ``"N"`` ->
    (N, N). A side below ``min_side`` raises ``check_size``'s ValueError (None: no limit, the
    caller checks). Any other text raises ValueError("size must be ..., got ...").
    """
    given, text = text, text.strip().lower()
    if native and text == "native":
        return "native"
    try:
        values = [int(p) for p in text.replace("*", "x").split("x")]
    except ValueError:
        values = []
    if square and len(values) == 1:
        values *= 2
    if len(values) != 2:
        if square:
            raise ValueError(f"size must be N or HxW, got {given!r}")
        forms = "HxW (e.g. 512x1024) or 'native'" if native else "HxW (e.g. 512x1024)"
        raise ValueError(f"size must be {forms}, got {text!r}")
    if min_side is None:
        return values[0], values[1]
    return check_size(values, min_side)


def check_size(size, min_side: int = MIN_SIDE) -> Tuple[int, int]:
    """(H, W) as ints, or ValueError when a side is below ``min_side`` (``MIN_SIDE``)."""
    h, w = size
    if h < min_side or w < min_side:
        raise ValueError(f"the network input must be at least {min_side} x {min_side}, got {h} x "
                         f"{w}")
    return int(h), int(w)


def is_image_file(path) -> bool:
    """True when ``path`` has a JPEG or PNG extension (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def image_path_problem(path) -> Optional[str]:
    """Why ``path`` cannot be an input image (another extension, missing, a directory), or None.
    Whether the file really is a readable image is only known once it is read."""
    path = os.fspath(path)
    if not is_image_file(path):
        ext = os.path.splitext(path)[1] or "no extension"
        return f"unsupported image type ({ext}); expected one of {', '.join(IMAGE_EXTENSIONS)}"
    if not os.path.exists(path):
        return "no such file"
    if os.path.isdir(path):
        return "is a directory"
    return None


def is_video_file(path) -> bool:
    """True when ``path`` has a video extension (``VIDEO_EXTENSIONS``, case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in VIDEO_EXTENSIONS


def video_path_problem(path) -> Optional[str]:
    """Why ``path`` cannot be an input video (missing, a directory, PyAV not installed), or None.
    Whether the file really is a readable video is only known once it is opened."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return "no such file"
    if os.path.isdir(path):
        return "is a directory"
    return pyav_problem()


def pyav_problem() -> Optional[str]:
    """Why videos cannot be read or written here (PyAV, the ``av`` package, is missing), or None."""
    try:
        import av  # noqa: F401
    except ImportError:
        return f"reading and writing videos needs PyAV (the av package): {VIDEO_INSTALL}"
    return None


def default_workers(world_size: int = 1) -> int:
    """Data-loading processes per rank when none are asked for: one less than this rank's share
    of the CPU cores, at most 8 (0: load in the main process)."""
    return min(8, max(0, (os.cpu_count() or 1) // max(1, world_size) - 1))


def interpreting_triton() -> bool:
    """True when the Triton kernels run through the interpreter (``TRITON_INTERPRET`` set to
    anything but 0), the only way they run on CPU tensors (as ``hyperseg.kernels`` decides)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_device_problem(device_type: str) -> Optional[str]:
    """Why backend "triton" cannot run on a device of type ``device_type``, or None."""
    if device_type == "cuda" or (device_type == "cpu" and interpreting_triton()):
        return None
    if device_type == "cpu":
        return ("the Triton kernels need a CUDA device; on CPU they run only through the Triton "
                "interpreter (set TRITON_INTERPRET=1 in the environment: slow, for testing). "
                "Use --backend torch (or auto, which picks the torch reference on CPU)")
    return f"the Triton kernels run on CUDA devices only, not on {device_type}"


def output_file_problem(path) -> Optional[str]:
    """Why the file ``path`` cannot be written (its folder is missing or not writable, or it is a
    folder), or None. Nothing is created."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return f"{path!r} is a folder, not a file name"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"the folder {os.path.dirname(path) or '.'!r} of {path!r} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {os.path.dirname(path) or '.'!r} of {path!r} is not writable"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"{path!r} exists and is not writable"
    return None


def output_dir_problem(path) -> Optional[str]:
    """Why the folder ``path`` could not be created or written into, or None. Nothing is created:
    the nearest existing ancestor must be a writable folder."""
    path = os.path.abspath(os.fspath(path))
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return f"{probe!r} is a file, so the folder {path!r} cannot be created in it"
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "folder" if probe == path else "folder in which it would be created,"
        return f"the {what} {probe!r} is not writable"
    return None
