"""Command line: ``python -m hyperseg list|convert|predict|export|train|eval|benchmark`` (also
installed as ``hyperseg``).

This module parses the command line and dispatches it: ``build_parser`` builds one sub-parser per
command (``_add_<command>_parser``) from shared argument groups, and each command runs its
``hyperseg.commands.run_<command>``. Building and parsing imports no torch."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence, Tuple

from . import commands
from .options import (AMP_MODES, BACKENDS, DATA_SPEC_HELP, DEFAULT_TTA_SCALES, LOSSES, MIN_SIDE,
                      PRECISIONS, TTA_MODES, parse_size)
from .commands import UsageError  # noqa: F401  (part of this module's API)

# ------------------------------------------------------------------------------------------------
# Argument types: each value is checked as it is parsed, with a clear message
# ------------------------------------------------------------------------------------------------

def _number(kind, low, high=None, low_inclusive=True):
    """An argparse type: ``kind`` ("integer" or "number") within [low, high] (or (low, high]
    when ``low_inclusive`` is False), with a clear message otherwise."""
    convert = int if kind == "integer" else float

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an' if kind == 'integer' else 'a'} {kind}, "
                                             f"got {text!r}") from None
        too_low = value < low if low_inclusive else not value > low
        if too_low or (high is not None and value > high):
            bound = (f"in [{low}, {high}]" if high is not None
                     else f"{'>=' if low_inclusive else '>'} {low}")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


_positive_int = _number("integer", 1)
_non_negative_int = _number("integer", 0)
_positive_float = _number("number", 0, low_inclusive=False)
_alpha_arg = _number("number", 0.0, 1.0)


def _fraction_arg(text: str) -> float:
    value = _number("number", 0.0, 1.0)(text)
    if value == 1.0:
        raise argparse.ArgumentTypeError("must be below 1 (some images must remain for training)")
    return value


def _scales_arg(text: str) -> Tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not scales or any(s <= 0 for s in scales):
        raise argparse.ArgumentTypeError(f"expected positive scales, got {text!r}")
    return scales


def _size_arg(text: str):
    """--size: HxW, or 'native' (see ``options.parse_size``)."""
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _crop_arg(text: str) -> Tuple[int, int]:
    """--crop: HxW, or N for N x N, sides >= 32 (see ``options.parse_size``)."""
    try:
        h, w = parse_size(text, native=False, square=True, min_side=None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW or N, got {text!r}") from None
    if min(h, w) < MIN_SIDE:
        raise argparse.ArgumentTypeError(f"expected HxW or N with sides >= {MIN_SIDE}, got "
                                         f"{text!r}")
    return h, w


def _scale_range_arg(text: str) -> Tuple[float, float]:
    try:
        low, high = (float(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}") from None
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"expected 0 < LOW <= HIGH, got {text!r}")
    return low, high


# ------------------------------------------------------------------------------------------------
# Help texts
# ------------------------------------------------------------------------------------------------

BACKEND_HELP = ("decoder implementation: torch (the pure-PyTorch reference), triton (the Triton "
                "kernels: CUDA, or CPU through the interpreter with TRITON_INTERPRET=1) or auto "
                "(triton for CUDA inference, torch otherwise; default)")

TRAIN_BACKEND_HELP = (
    "decoder implementation: torch (the pure-PyTorch reference), triton (the Triton kernels, in "
    "training and validation: CUDA, or CPU through the interpreter with TRITON_INTERPRET=1) or "
    "auto (default: on CUDA, validation on the Triton kernels, and training on them only on the "
    "GPU classes where a committed GPU run measured them faster than the reference, listed in "
    "hyperseg.options.TRAINING_KERNELS_FASTER_ON; the torch reference otherwise)")

VAL_FRACTION_HELP = ("folder data without split folders: the share of the images held out as "
                     "the val split, chosen deterministically from their names (default 0.1)")

# ------------------------------------------------------------------------------------------------
# Argument groups shared by several commands
# ------------------------------------------------------------------------------------------------

def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", "-w", metavar="FILE",
                        help="checkpoint: an official .pth file or a hyperseg .safetensors file; "
                             "the architecture comes from the file unless --model is given")
    parser.add_argument("--model", "-m", metavar="NAME",
                        help="zoo model name (see 'hyperseg list'); without --weights or "
                             "--pretrained the model is RANDOM and UNTRAINED (for testing only)")
    _add_pretrained_args(parser)


def _add_pretrained_args(parser) -> None:
    parser.add_argument("--pretrained", action="store_true", default=None,
                        help="the official weights of --model (downloaded once into "
                             "<torch hub dir>/checkpoints, or --weights-dir)")
    parser.add_argument("--weights-dir", metavar="DIR", default=None,
                        help="where --pretrained keeps downloaded weights (default: "
                             "$TORCH_HOME/hub/checkpoints, ~/.cache/torch/hub/checkpoints)")


def _add_fast_path_args(parser: argparse.ArgumentParser) -> None:
    """--precision, --channels-last, --compile: the same for predict and benchmark."""
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="inference precision: fp32 (default), or fp16 / bf16 under "
                             "torch.autocast (float32 logits)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="run the backbone in channels-last memory format (default: on)")
    parser.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                        help="torch.compile the model (optionally a mode, e.g. reduce-overhead "
                             "for CUDA graphs); the first pass compiles, tens of seconds on CPU")


def _add_run_args(parser: argparse.ArgumentParser, backend_help: str = BACKEND_HELP,
                  torchrun: bool = True) -> None:
    """--device, --backend, --quiet: the same for predict, eval and train."""
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available" +
                             ("; under torchrun each process takes cuda:LOCAL_RANK)" if torchrun
                              else ")"))
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help=backend_help)
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bar (the result lines are still printed)")


def _add_inference_args(parser: argparse.ArgumentParser) -> None:
    """--size, --batch-size, --tta, --tta-scales: the same for predict and eval."""
    parser.add_argument("--size", type=_size_arg, default=None, metavar="HxW|native",
                        help="network input size: HxW, or 'native' to keep each image's size "
                             "(default: the model's official resolution, or for eval the "
                             "dataset's official preprocessing)")
    parser.add_argument("--batch-size", "-b", type=_positive_int, default=1, metavar="N",
                        help="images per forward pass (per process under torchrun; default: 1)")
    parser.add_argument("--tta", nargs="?", const="ms", choices=TTA_MODES, default=None,
                        help="test-time augmentation: flip (each image and its mirror image) or "
                             "ms (the multi-scale pyramid over --tta-scales, each level also "
                             "flipped, as the official evaluation); --tta alone means ms")
    scales = ",".join(f"{s:g}" for s in DEFAULT_TTA_SCALES)
    parser.add_argument("--tta-scales", type=_scales_arg, default=DEFAULT_TTA_SCALES,
                        metavar="S,S,...", help=f"pyramid scales for --tta ms (default: {scales})")


def _add_workers_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", "-j", type=_non_negative_int, default=None, metavar="N",
                        help="data-loading processes per process (default: one less than its "
                             "share of the CPU cores, at most 8)")


# ------------------------------------------------------------------------------------------------
# One parser per command
# ------------------------------------------------------------------------------------------------

def _add_list_parser(commands_: argparse._SubParsersAction) -> None:
    parser = commands_.add_parser("list", help="list the zoo models",
                                  description=commands.run_list.__doc__)
    parser.set_defaults(run=commands.run_list)


def _add_convert_parser(commands_: argparse._SubParsersAction) -> None:
    parser = commands_.add_parser(
        "convert", help="convert an official .pth checkpoint to our .safetensors format",
        description=commands.run_convert.__doc__)
    parser.add_argument("source", metavar="SOURCE",
                        help="official checkpoint (.pth) or a hyperseg .safetensors file")
    parser.add_argument("target", metavar="TARGET", help="the .safetensors file to write")
    parser.set_defaults(run=commands.run_convert)


def _add_predict_parser(commands_: argparse._SubParsersAction) -> None:
    parser = commands_.add_parser(
        "predict", help="segment JPEG/PNG images or videos: label, colour and overlay outputs",
        description=commands.run_predict.__doc__)
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="JPEG/PNG files, directories searched recursively for them, or "
                             "video files (.mp4, .mkv, ...; needs PyAV)")
    _add_model_args(parser)
    parser.add_argument("--out", "-o", required=True, metavar="DIR",
                        help="output directory (created when the first image is written)")
    _add_inference_args(parser)
    parser.add_argument("--alpha", type=_alpha_arg, default=0.5,
                        help="opacity of the colours in the overlay (default: 0.5)")
    _add_fast_path_args(parser)
    _add_run_args(parser, torchrun=False)
    parser.set_defaults(run=commands.run_predict)


def _add_export_parser(commands_: argparse._SubParsersAction) -> None:
    parser = commands_.add_parser(
        "export", help="export the torch backend to ONNX (the Triton kernels cannot be exported)",
        description=commands.run_export.__doc__)
    _add_model_args(parser)
    parser.add_argument("--onnx", required=True, metavar="FILE",
                        help="the .onnx file to write (its folder must exist)")
    parser.add_argument("--size", type=_size_arg, default=None, metavar="HxW",
                        help="input size of the graph (default: the model's official resolution)")
    parser.add_argument("--batch-size", "-b", type=_positive_int, default=1, metavar="N",
                        help="batch size of the graph (default: 1)")
    parser.add_argument("--dynamic-batch", action="store_true",
                        help="a graph for any batch size (--batch-size is then the example's)")
    parser.add_argument("--opset", type=_positive_int, default=None, metavar="N",
                        help="ONNX opset version (default: 18)")
    parser.add_argument("--verbose", action="store_true", help="show the exporter's progress")
    parser.set_defaults(run=commands.run_export)


def _add_train_parser(commands_: argparse._SubParsersAction) -> None:
    parser = commands_.add_parser("train", help="train a model (official recipes; torchrun for "
                                  "DDP)", description=commands.run_train.__doc__)
    parser.add_argument("--model", "-m", metavar="NAME",
                        help="zoo model name (see 'hyperseg list'; default with --weights: the "
                             "file's model)")
    parser.add_argument("--data", "-d", metavar="SPEC", help=DATA_SPEC_HELP)
    parser.add_argument("--out", "-o", required=True, metavar="DIR",
                        help="run folder (created when the run starts)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out (its settings come from its run.json)")
    parser.add_argument("--steps", type=_positive_int, metavar="N",
                        help="stop when the run has done N optimizer steps in all (the LR "
                             "schedule still spans --epochs); the run validates and checkpoints "
                             "when it stops")
    recipe = parser.add_argument_group("recipe (default: the model's official recipe)")
    _add_schedule_args(recipe)
    _add_model_recipe_args(recipe)
    _add_run_recipe_args(recipe)
    _add_workers_arg(parser)
    _add_run_args(parser, TRAIN_BACKEND_HELP)
    parser.set_defaults(run=commands.run_train)


def _add_schedule_args(recipe) -> None:
    """train: the optimisation recipe (schedule, batch, learning rate, augmentation, loss)."""
    recipe.add_argument("--epochs", type=_positive_int, metavar="N",
                        help="epochs of the whole schedule")
    recipe.add_argument("--epoch-size", type=_positive_int, metavar="N",
                        help="training samples per epoch (official: train_iterations)")
    recipe.add_argument("--batch-size", "-b", type=_positive_int, metavar="N",
                        help="global batch per optimizer step, over all processes")
    recipe.add_argument("--accumulate", type=_positive_int, metavar="N",
                        help="micro-batches per process per step (gradient accumulation; "
                             "default 1)")
    recipe.add_argument("--lr", type=_positive_float, metavar="LR", help="Adam learning rate")
    recipe.add_argument("--poly-power", type=_positive_float, metavar="P",
                        help="power of the poly LR schedule")
    recipe.add_argument("--crop", type=_crop_arg, metavar="HxW", help="training crop size")
    recipe.add_argument("--scale-range", type=_scale_range_arg, metavar="LOW,HIGH",
                        help="random rescale range")
    recipe.add_argument("--loss", choices=LOSSES,
                        help="bootstrapped_ce (bootstrapped cross-entropy) or ce (cross-entropy)")


def _add_model_recipe_args(recipe) -> None:
    """train: the model to start from (backbone, classes, weights)."""
    recipe.add_argument("--pretrained-backbone", action=argparse.BooleanOptionalAction,
                        default=None, help="start from timm's ImageNet backbone (downloaded; "
                                           "default on, off for synthetic data)")
    recipe.add_argument("--num-classes", type=_positive_int, metavar="N",
                        help="output classes (default: the dataset's)")
    recipe.add_argument("--weights", "-w", metavar="FILE",
                        help="start from these weights (a .pth or .safetensors checkpoint): "
                             "every tensor whose name and shape match is loaded, the others "
                             "(e.g. the classifier, for another --num-classes) are "
                             "re-initialised and listed")
    recipe.add_argument("--backbone", metavar="TIMM_NAME",
                        help="a timm model with features at strides 2..32 (e.g. "
                             "mobilenetv3_large_100, resnet50, efficientnet_b0) instead of the "
                             "model's official EfficientNet")
    recipe.add_argument("--val-fraction", type=_fraction_arg, metavar="F",
                        help=VAL_FRACTION_HELP)
    _add_pretrained_args(recipe)


def _add_run_recipe_args(recipe) -> None:
    """train: seed, precision, BatchNorm synchronisation, splits and validation."""
    recipe.add_argument("--seed", type=_non_negative_int, metavar="N",
                        help="seed of the initialisation, sampling and augmentation (default 0)")
    recipe.add_argument("--amp", choices=AMP_MODES, help="mixed precision (default off)")
    recipe.add_argument("--sync-bn", action="store_true", default=None,
                        help="SyncBatchNorm over all processes (CUDA only)")
    recipe.add_argument("--train-split", metavar="SPLIT",
                        help="default: the official one (e.g. train, or train+val for CamVid)")
    recipe.add_argument("--val-split", metavar="SPLIT",
                        help="validation split, or 'none' (default: the official one)")
    recipe.add_argument("--val-every", type=_positive_int, metavar="N",
                        help="validate every N epochs (default 1; the run also validates when "
                             "it stops)")


def _add_eval_parser(commands_: argparse._SubParsersAction) -> None:
    parser = commands_.add_parser("eval", help="mIoU, per-class IoU and pixel accuracy on a split",
                                  description=commands.run_eval.__doc__)
    _add_model_args(parser)
    parser.add_argument("--data", "-d", required=True, metavar="SPEC", help=DATA_SPEC_HELP)
    parser.add_argument("--split", metavar="SPLIT",
                        help="default: the official evaluation split (val; test for CamVid)")
    parser.add_argument("--val-fraction", type=_fraction_arg, metavar="F",
                        help=VAL_FRACTION_HELP + "; give the training run's")
    _add_inference_args(parser)
    _add_workers_arg(parser)
    parser.add_argument("--json", metavar="FILE",
                        help="also write the results as JSON (its folder must exist)")
    _add_run_args(parser)
    parser.set_defaults(run=commands.run_eval)


def _add_benchmark_parser(commands_: argparse._SubParsersAction) -> None:
    parser = commands_.add_parser("benchmark", help="frames per second, latency and peak memory",
                                  description=commands.run_benchmark.__doc__)
    parser.add_argument("--model", "-m", metavar="NAME", default="hyperseg-m",
                        help="zoo model name (default: hyperseg-m)")
    parser.add_argument("--size", type=_size_arg, default=None, metavar="HxW",
                        help="input size (default: the model's official resolution)")
    _add_fast_path_args(parser)
    parser.add_argument("--frames", type=_positive_int, default=50, metavar="N",
                        help="timed frames (default: 50)")
    parser.add_argument("--warmup", type=_positive_int, default=5, metavar="N",
                        help="untimed passes first (default: 5; the first one compiles)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="do not time the official decoder algorithm")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                        help="also write the results as JSON to FILE (its folder must exist), or "
                             "to stdout instead of the table when no FILE is given")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help="torch CPU threads (default: torch's; 1 is steadier on a busy CPU)")
    parser.set_defaults(run=commands.run_benchmark)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------

def _version() -> str:
    try:
        from . import __version__
    except ImportError:            # the package's __init__ did not run (see _shadowing_folder)
        from importlib.metadata import version
        return version("hyperseg")
    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The command line. Building and parsing it imports no torch: every command checks its
    arguments first and imports the heavy modules only to do its work."""
    parser = argparse.ArgumentParser(prog="hyperseg", description="HyperSeg semantic segmentation")
    parser.add_argument("--version", action="version", version=f"hyperseg {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_list_parser, _add_convert_parser, _add_predict_parser, _add_export_parser,
                _add_train_parser, _add_eval_parser, _add_benchmark_parser):
        add(subparsers)
    return parser


def _shadowing_folder() -> Optional[str]:
    """The folder that Python took for the package, when it is not the package: a folder named
    hyperseg without an __init__.py (typically a clone of the repository) in the folder Python
    runs from is a namespace package that hides the installed one from ``import hyperseg``."""
    package = sys.modules.get(__package__ or "hyperseg")
    if package is None or getattr(package, "__file__", None) is not None:
        return None
    paths = list(getattr(package, "__path__", []))
    return paths[0] if paths else None


SHADOWING_NOTE = """\
hyperseg: note: from this folder, Python takes {folder!r} (a clone of the repository?) for the
hyperseg package, so `import hyperseg` in Python started here fails ("module 'hyperseg' has no
attribute ..."); this command works. Start Python elsewhere, or rename the clone."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    folder = _shadowing_folder()
    if folder is not None:
        print(SHADOWING_NOTE.format(folder=folder), file=sys.stderr)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (OSError, ValueError) as err:      # CheckpointError and UsageError are ValueErrors
        print(f"hyperseg {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
