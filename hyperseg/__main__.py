"""Command line: ``python -m hyperseg list|convert|predict|export|train|eval|benchmark`` (also
installed as ``hyperseg``)."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

UNTRAINED_WARNING = """\
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  WARNING: no --weights given. {name} is RANDOMLY INITIALISED and UNTRAINED.
!!  Its {what} meaningless: use it only to try out the pipeline.
!!  Pass --pretrained (the official weights) or --weights FILE (an official .pth
!!  checkpoint or a hyperseg .safetensors file).
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"""


class UsageError(ValueError):
    """A command line that cannot run as given."""


def _list(args: argparse.Namespace) -> int:
    from .zoo import ALIASES, PRETRAINED, get_config, list_models

    aliases = {target: alias for alias, target in ALIASES.items()}
    print(f"{'name':24s} {'alias':11s} {'dataset':11s} {'classes':>7s} {'input (HxW)':>12s}  "
          f"{'arch':11s} pretrained")
    for name in list_models(include_aliases=False):
        c = get_config(name)
        size = f"{c.input_size[0]}x{c.input_size[1]}"
        weights = "yes" if name in PRETRAINED else "no"
        print(f"{name:24s} {aliases.get(name, ''):11s} {c.dataset:11s} {c.num_classes:7d} "
              f"{size:>12s}  {c.arch:11s} {weights}")
    return 0


# ------------------------------------------------------------------------------------------------
# Checks that run before any work (all but the device's before torch is imported): a wrong
# argument is reported at once, and nothing is created.
# ------------------------------------------------------------------------------------------------

def _check_checkpoint_file(path: str, option: Optional[str] = "--weights") -> None:
    if not os.path.isfile(path):
        prefix = f"{option}: " if option else ""
        what = " (it is a folder)" if os.path.isdir(path) else ""
        raise UsageError(f"{prefix}no checkpoint file at {path!r}{what}")


def _check_model_args(args: argparse.Namespace) -> None:
    """--weights FILE (an existing file), --model NAME --pretrained (a zoo model with official
    weights) or --model NAME (a zoo name)."""
    from .zoo import get_config

    if getattr(args, "pretrained", False):
        _check_pretrained(args.model, args.weights)
    elif args.weights:
        _check_checkpoint_file(args.weights)
    elif not args.model:
        raise UsageError("give --weights FILE, or --model NAME --pretrained (or --model NAME "
                         "alone for an untrained model)")
    if args.model:
        get_config(args.model)


def _check_pretrained(model: Optional[str], weights: Optional[str]) -> None:
    """--pretrained needs --model NAME of a model with official weights, and no --weights."""
    from .zoo import pretrained_weights

    if weights:
        raise UsageError("give either --weights FILE or --pretrained, not both")
    if not model:
        raise UsageError("--pretrained needs --model NAME (see 'hyperseg list')")
    pretrained_weights(model)


def _check_output_file(path: Optional[str], option: str) -> None:
    from .options import output_file_problem

    problem = path and output_file_problem(path)
    if problem:
        raise UsageError(f"{option}: {problem}")


def _check_backend(backend: str, device) -> None:
    """--backend triton on a device where the kernels cannot run is a usage error."""
    from .options import triton_device_problem

    if backend == "triton":
        problem = triton_device_problem(device.type)
        if problem:
            raise UsageError(f"--backend triton on {device}: {problem}")


def _remove_empty_dirs(top: str) -> None:
    """Remove ``top`` and the folders under it, if they hold no file."""
    for root, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
        try:
            os.rmdir(root)
        except OSError:
            pass


def _convert(args: argparse.Namespace) -> int:
    _check_checkpoint_file(args.source, None)
    _check_output_file(args.target, "TARGET")
    from .checkpoint import load, save

    model = load(args.source, backend="torch")
    save(model, args.target)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.source} -> {args.target}: {model.config.name} ({model.config.arch}), "
          f"{model.num_classes} classes, {params:,} parameters")
    return 0


def _load_model(args: argparse.Namespace, backend: str, what: str):
    """The model of ``--weights`` (architecture from the file, or ``--model``'s), or an untrained
    ``--model`` with a loud warning on stderr."""
    from .checkpoint import load
    from .model import build

    if getattr(args, "pretrained", False):
        model = build(args.model, pretrained=True, weights_dir=args.weights_dir, backend=backend)
    elif args.weights:
        model = (build(args.model, weights=args.weights, backend=backend) if args.model
                 else load(args.weights, backend=backend))
    elif not args.model:
        raise UsageError("give --weights FILE (or --model NAME for an untrained model)")
    else:
        model = build(args.model, backend=backend)
        print(UNTRAINED_WARNING.format(name=model.config.name, what=what), file=sys.stderr)
    return _fast_path(model, args)


def _fast_path(model, args: argparse.Namespace):
    """--precision, --channels-last and --compile (predict) on a loaded model."""
    if hasattr(args, "precision"):
        model.precision = args.precision
        model.channels_last = args.channels_last
    if getattr(args, "compile", None):
        model.compile(**({} if args.compile == "default" else {"mode": args.compile}))
    return model


def _device(name: Optional[str]):
    """The torch device of ``--device`` (default: cuda if available, else cpu)."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"invalid --device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def _size_arg(text: str):
    from .options import parse_size
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


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


VAL_FRACTION_HELP = ("folder data without split folders: the share of the images held out as "
                     "the val split, chosen deterministically from their names (default 0.1)")


def _scales_arg(text: str) -> Tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not scales or any(s <= 0 for s in scales):
        raise argparse.ArgumentTypeError(f"expected positive scales, got {text!r}")
    return scales


# ------------------------------------------------------------------------------------------------
# predict
# ------------------------------------------------------------------------------------------------

@dataclass
class _Job:
    source: str           # the image or video file
    out_dir: str          # where its outputs go
    stem: str             # output names: <stem>_labels.png, <stem>_color.png, <stem>_overlay.png
    video: bool = False   # a video: <stem>_color.mp4, <stem>_overlay.mp4, <stem>_labels.mkv


def _plan_jobs(inputs: Sequence[str], out: str) -> Tuple[List[_Job], List[str]]:
    """One job per image or video: files as given (a missing file, one of another type, or a
    video without PyAV installed is that input's error), directories searched recursively for
    JPEG/PNG files, whose outputs mirror their sub-directories under ``out``. Output names that
    would collide get the source extension, then a counter. Returns the jobs and the errors of
    inputs that yield nothing to segment."""
    from .options import (VIDEO_EXTENSIONS, image_path_problem, is_image_file, is_video_file,
                          video_path_problem)

    jobs, errors, taken = [], [], set()

    def add(source: str, rel_dir: str, name: str, video: bool = False) -> None:
        base, ext = os.path.splitext(name)
        stem = base or name
        candidates = [stem, f"{stem}_{ext.lstrip('.')}" if ext else stem]
        key = None
        for candidate in candidates:
            if (rel_dir, candidate) not in taken:
                key = candidate
                break
        n = 2
        while key is None:
            if (rel_dir, f"{candidates[-1]}~{n}") not in taken:
                key = f"{candidates[-1]}~{n}"
            n += 1
        taken.add((rel_dir, key))
        jobs.append(_Job(source, os.path.join(out, rel_dir) if rel_dir else out, key, video))

    for item in inputs:
        if os.path.isdir(item):
            found = 0
            for root, dirs, files in os.walk(item):
                dirs.sort()
                for name in sorted(files):
                    if is_image_file(name):
                        rel = os.path.relpath(root, item)
                        add(os.path.join(root, name), "" if rel == "." else rel, name)
                        found += 1
            if not found:
                errors.append(f"{item}: no JPEG/PNG images in this directory")
        elif is_video_file(item):
            problem = video_path_problem(item)
            if problem:
                errors.append(f"{item}: {problem}")
            else:
                add(item, "", os.path.basename(os.path.normpath(item)), video=True)
        else:
            problem = image_path_problem(item)
            if problem:
                if problem.startswith("unsupported"):
                    problem += f", or a video ({', '.join(VIDEO_EXTENSIONS)})"
                errors.append(f"{item}: {problem}")
            else:
                add(item, "", os.path.basename(os.path.normpath(item)))
    return jobs, errors


def _predict(args: argparse.Namespace) -> int:
    from .options import output_dir_problem

    def report(message: str) -> None:
        print(f"hyperseg predict: error: {message}", file=sys.stderr, flush=True)

    _check_model_args(args)
    jobs, errors = _plan_jobs(args.inputs, args.out)
    for message in errors:
        report(message)
    if not jobs:
        report("no input image or video to segment; nothing was done")
        return 1
    problem = output_dir_problem(args.out)
    if problem:
        report(f"cannot create the output directory {args.out!r}: {problem}; no image was "
               f"segmented")
        return 1
    device = _device(args.device)
    _check_backend(args.backend, device)

    model = _load_model(args, args.backend, "predictions are").to(device)
    out_existed = os.path.exists(args.out)
    images = [job for job in jobs if not job.video]
    videos = [job for job in jobs if job.video]
    done = _predict_images(args, model, images) + _predict_videos(args, model, videos)
    failed = len(errors) + len(jobs) - done
    total = len(jobs) + len(errors)
    if not done:
        if not out_existed:
            _remove_empty_dirs(args.out)
        what = "image or video was segmented to its end" if videos else "image was segmented"
        report(f"no {what} ({failed} of {total} input(s) failed; see above)")
        return 1
    print(f"segmented {done} of {total} {'input(s)' if videos else 'image(s)'} with "
          f"{model.config.name}; outputs in {args.out}")
    return 1 if failed else 0


def _report_in_progress(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"hyperseg predict: error: {message}", file=sys.stderr)


def _predict_images(args: argparse.Namespace, model, jobs: List[_Job]) -> int:
    """Segment the image jobs, ``--batch-size`` at a time; returns how many were written."""
    import torch
    from tqdm import tqdm

    from .predict import (ImageError, model_palette, network_size, read_image, save_prediction,
                          segment, to_uint8_tensor)

    if not jobs:
        return 0
    colors = model_palette(model)

    def run(batch: List[Tuple[_Job, "torch.Tensor"]]) -> int:
        try:
            labels = segment(model, [image for _, image in batch], size=args.size,
                             batch_size=args.batch_size, tta=args.tta, tta_scales=args.tta_scales)
        except (RuntimeError, ValueError) as err:
            for job, _ in batch:
                _report_in_progress(f"{job.source}: segmentation failed: {err}")
            return 0
        ok = 0
        for (job, image), label in zip(batch, labels):
            try:
                save_prediction(label, image, colors, job.out_dir, job.stem, args.alpha)
                ok += 1
            except OSError as err:
                where = err.filename or job.out_dir
                _report_in_progress(f"{job.source}: cannot write its outputs to {where!r}: "
                                    f"{err.strerror or err}")
        return ok

    done = 0
    progress = tqdm(total=len(jobs), unit="image", file=sys.stderr,
                    disable=True if args.quiet else None)
    batch: List[Tuple[_Job, torch.Tensor]] = []
    with progress:
        for job in jobs:
            try:
                image = to_uint8_tensor(read_image(job.source))
                network_size(model.config, args.size, tuple(image.shape[-2:]))
            except ImageError as err:
                _report_in_progress(f"{job.source}: {err}")
                progress.update(1)
                continue
            batch.append((job, image))
            if len(batch) == args.batch_size:
                done += run(batch)
                progress.update(len(batch))
                batch = []
        if batch:
            done += run(batch)
            progress.update(len(batch))
    return done


def _predict_videos(args: argparse.Namespace, model, jobs: List[_Job]) -> int:
    """Segment the video jobs one after the other, each streamed through ``predict_video`` with
    a progress bar of its frames; returns how many were segmented to their end."""
    from tqdm import tqdm

    from .video import DEFAULT_MAX_IN_FLIGHT, VideoError, predict_video

    done = 0
    for job in jobs:
        progress = tqdm(unit="frame", desc=os.path.basename(job.source), file=sys.stderr,
                        disable=True if args.quiet else None)
        try:
            with progress:
                result = predict_video(
                    model, job.source, job.out_dir, job.stem, size=args.size,
                    batch_size=args.batch_size, tta=args.tta, tta_scales=args.tta_scales,
                    alpha=args.alpha, max_in_flight=max(DEFAULT_MAX_IN_FLIGHT, args.batch_size),
                    progress=progress)
        except VideoError as err:
            _report_in_progress(f"{job.source}: {err}")
            continue
        written = ", ".join(result.paths)
        if result.error:
            kept = (f"the {result.frames} frame(s) segmented before it are in {written}"
                    if result.frames else "no frame was written")
            _report_in_progress(f"{job.source}: {result.error}; {kept}")
            continue
        print(f"{job.source}: {result.frames} frames in {result.seconds:.1f} s "
              f"({result.fps:.2f} frames/s) -> {written}")
        done += 1
    return done


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------

def _export(args: argparse.Namespace) -> int:
    if args.size == "native":
        raise UsageError("--size native has no meaning for an export: give HxW")
    _check_model_args(args)
    _check_output_file(args.onnx, "--onnx")
    from .export import DEFAULT_OPSET, check_exporter, export_onnx

    try:
        check_exporter()
    except (ImportError, RuntimeError) as err:
        print(f"hyperseg export: error: {err}", file=sys.stderr)
        return 2
    model = _load_model(args, "torch", "exported graph is")
    size = args.size or tuple(model.config.input_size)
    existed = os.path.exists(args.onnx)
    try:
        export_onnx(model, args.onnx, size=size, batch_size=args.batch_size,
                    dynamic_batch=args.dynamic_batch, opset=args.opset, verbose=args.verbose)
    except (ImportError, RuntimeError) as err:
        if not existed and os.path.exists(args.onnx):
            os.remove(args.onnx)
        print(f"hyperseg export: error: {err}", file=sys.stderr)
        return 2
    batch = "B" if args.dynamic_batch else args.batch_size
    print(f"exported {model.config.name} (torch backend, input {batch}x3x{size[0]}x"
          f"{size[1]}, opset {args.opset or DEFAULT_OPSET}) to {args.onnx}")
    return 0


# ------------------------------------------------------------------------------------------------
# train and eval
# ------------------------------------------------------------------------------------------------

# --flag destinations that override a training recipe or run setting (see hyperseg.train).
TRAIN_OVERRIDES = ("epochs", "epoch_size", "batch_size", "accumulate", "lr", "poly_power", "crop",
                   "scale_range", "loss", "pretrained_backbone", "num_classes", "seed", "amp",
                   "sync_bn", "weights", "pretrained", "train_split", "val_split", "val_every",
                   "backbone", "val_fraction")


def _model_of_weights(path: str) -> Tuple[str, Optional[str]]:
    """The zoo name and timm backbone (None: the official one) of the model in a checkpoint, for
    ``train --weights FILE`` without ``--model``."""
    from .checkpoint import read_checkpoint
    from .zoo import get_config

    config = read_checkpoint(path).config
    if config is None:
        raise UsageError(f"--weights {path!r} does not say which model it holds: give --model NAME")
    base, _, backbone = config.name.partition("+")
    try:
        get_config(base)
    except ValueError:
        raise UsageError(f"--weights {path!r} holds a {config.name} model, which is no zoo model "
                         f"(so it has no training recipe): give --model NAME") from None
    return base, backbone or None


def _train(args: argparse.Namespace) -> int:
    from .options import output_dir_problem

    if not args.resume:
        if not args.data or not (args.model or args.weights):
            raise UsageError("give --model NAME (or --weights FILE) and --data SPEC (or --resume "
                             "to continue the run in --out)")
        problem = output_dir_problem(args.out)
        if problem:
            raise UsageError(f"--out {args.out!r}: {problem}")
    if args.pretrained:
        _check_pretrained(args.model, args.weights)
    elif args.weights:
        _check_checkpoint_file(args.weights)
    device = _device(args.device)
    _check_backend(args.backend, device)
    if args.weights and not args.model and not args.resume:
        args.model, backbone = _model_of_weights(args.weights)
        args.backbone = args.backbone or backbone

    from .train import RunOptions, TrainInterrupted, make_config, resume_config, train

    overrides = {name: getattr(args, name) for name in TRAIN_OVERRIDES}
    if args.resume:
        config = resume_config(args.out, args.model, args.data, overrides)
    else:
        config = make_config(args.model, args.data, overrides)
    options = RunOptions(steps=args.steps, device=str(device), backend=args.backend,
                         workers=args.workers, quiet=args.quiet, weights_dir=args.weights_dir)
    try:
        train(config, args.out, resume=args.resume, options=options)
    except TrainInterrupted as stop:
        print(f"hyperseg train: {stop}", file=sys.stderr)
        return 130                          # the shell's code for a run stopped by Ctrl-C
    return 0


def _eval(args: argparse.Namespace) -> int:
    _check_model_args(args)
    _check_output_file(args.json, "--json")
    device = _device(args.device)
    _check_backend(args.backend, device)

    import json

    from . import distributed
    from .datasets import DEFAULT_SPLITS, open_dataset, parse_data_spec
    from .evaluate import class_names, evaluate, evaluation_dataset, format_table, summarize
    from .options import default_workers

    spec = parse_data_spec(args.data)
    split = args.split or DEFAULT_SPLITS[spec.kind][1]
    dataset = open_dataset(spec, split, args.val_fraction)
    context = distributed.setup(device)
    try:
        model = _load_model(args, args.backend, "scores are").to(context.device)
        if dataset.num_classes > model.num_classes:
            raise UsageError(f"the {spec.kind} labels have {dataset.num_classes} classes but "
                             f"{model.config.name} predicts {model.num_classes}")
        data = evaluation_dataset(dataset, spec.kind, model.config, args.size)
        workers = default_workers(context.world_size) if args.workers is None else args.workers
        matrix = evaluate(model, data, batch_size=args.batch_size, device=context.device,
                          workers=workers, tta=args.tta, tta_scales=args.tta_scales,
                          quiet=args.quiet)
        if context.is_main:
            summary = summarize(matrix, class_names(model.config, dataset),
                                getattr(dataset, "void_class", None))
            tta = f", tta {args.tta}" if args.tta else ""
            print(f"{model.config.name} on {spec} ({split}, {len(dataset)} images{tta})")
            print(format_table(summary))
            if args.json:
                report = {"model": model.config.name, "weights": args.weights, "data": str(spec),
                          "split": split, "images": len(dataset), "tta": args.tta, **summary}
                with open(args.json, "w") as f:
                    json.dump(report, f, indent=2)
                    f.write("\n")
    finally:
        distributed.teardown(context)
    return 0


# ------------------------------------------------------------------------------------------------
# benchmark
# ------------------------------------------------------------------------------------------------

def _benchmark(args: argparse.Namespace) -> int:
    from .zoo import get_config

    get_config(args.model)
    if args.size == "native":
        raise UsageError("--size native has no meaning for a benchmark: give HxW")
    if args.json and args.json != "-":
        _check_output_file(args.json, "--json")
    device = _device(args.device)
    _check_backend(args.backend, device)

    import json

    from .benchmark import format_report, run_benchmark

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    compile_mode = {None: False, "default": True}.get(args.compile, args.compile)
    result = run_benchmark(args.model, size=args.size, device=device, backend=args.backend,
                           precision=args.precision, channels_last=args.channels_last,
                           compile=compile_mode, frames=args.frames, warmup=args.warmup,
                           baseline=not args.no_baseline)
    text = json.dumps(result, indent=2)
    if args.json == "-":
        print(text)
        return 0
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


def _crop_arg(text: str) -> Tuple[int, int]:
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW or N, got {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 32:
        raise argparse.ArgumentTypeError(f"expected HxW or N with sides >= 32, got {text!r}")
    return values[0], values[1]


def _scale_range_arg(text: str) -> Tuple[float, float]:
    try:
        low, high = (float(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}") from None
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"expected 0 < LOW <= HIGH, got {text!r}")
    return low, high


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------

LIST_DESCRIPTION = """\
List the zoo models: name, alias, dataset, class count, official input resolution (H x W), the
official architecture, and whether official weights exist (--pretrained). Any name or alias is
accepted by --model and hyperseg.build."""

CONVERT_DESCRIPTION = """\
Convert a checkpoint to hyperseg's .safetensors format (the tensors, and the model configuration
as metadata). SOURCE is an official HyperSeg .pth file (read with torch.load(weights_only=True):
nothing in it runs; its architecture comes from its 'arch' string, parsed, never evaluated) or a
hyperseg .safetensors file. TARGET's folder must exist."""

PREDICT_DESCRIPTION = """\
Segment JPEG/PNG images and videos. Each image is resized to the network input size (--size; by
default the model's official resolution), normalised with the model's dataset mean/std, segmented, and the
logits are resized back to the image's own size. For every image three PNGs are written to
--out: <name>_labels.png (class ids, 8-bit), <name>_color.png (the palette of the classes.json
of the folder the model was trained on, else the dataset's: Cityscapes, CamVid or PASCAL VOC)
and <name>_overlay.png (the image blended with the colours). Directories are searched
recursively and their sub-directories mirrored under --out. Missing inputs are reported before
the model is loaded; an image that cannot be read or written is reported on stderr and the
others are still processed; the exit status is 1 if any image failed. --out is created when the
first image is written.

Videos (.mp4, .m4v, .mov, .mkv, .webm, .avi; needs PyAV: pip install "hyperseg[video]") are
segmented frame by frame (decoding, preprocessing, the model and encoding overlap in threads,
with a bounded number of frames in memory) into <name>_color.mp4 and <name>_overlay.mp4 (H.264)
and <name>_labels.mkv (class ids, lossless FFV1), at the input's frame size and frame rate (audio
is dropped). A video that cannot be decoded to its end is reported, the frames segmented before
the failure are written (playable files), and the exit status is 1."""

EXPORT_DESCRIPTION = """\
Export a model to ONNX with the torch exporter (torch.onnx.export(..., dynamo=True)). The graph
is the pure-PyTorch reference decoder: the export always uses backend="torch", because the
Triton kernels cannot be exported to ONNX. The graph has static shapes: input "images"
(B, 3, H, W), normalised with the model's mean/std, and output "logits" (B, classes, H, W).
Needs the onnx and onnxscript packages. The folder of --onnx must exist."""

TRAIN_DESCRIPTION = """\
Train a zoo model with its official recipe (see README, "Train and evaluate"); every recipe value
can be overridden. Writes to --out: run.json (the configuration), latest.safetensors and
latest_state.pt after every epoch and when the run stops (at --steps or the end),
best.safetensors when the validation mIoU improves (validation runs every --val-every epochs and
when the run stops), metrics.jsonl. A run that fails before its first checkpoint leaves nothing
behind. --resume continues the run in --out exactly where it stopped. Under torchrun (e.g.
torchrun --nproc_per_node 4 -m hyperseg train ...) it trains with DDP, one process per GPU
(NCCL) or CPU process (gloo); --batch-size is the global batch."""

EVAL_DESCRIPTION = """\
Evaluate a model on a dataset split: per-class IoU, mIoU, pixel accuracy and mean class accuracy,
printed as a table (and written with --json). Preprocessing follows the official evaluation
(Cityscapes and CamVid resized to the model's resolution, logits resized back to the labels;
VOC padded to 512x512; folder and synthetic data at their own size). Under torchrun the split is
sharded over the processes."""

BENCHMARK_DESCRIPTION = """\
Frames per second of a zoo model as users measure them: batch 1, --warmup untimed passes, then
--frames timed frames, each synchronised with the device. Prints FPS, latency p50/p90/p99, peak
memory (CUDA: max_memory_allocated; CPU: growth of the peak resident set size), the first pass
(which includes any compilation), the device and the torch/triton versions, and the same for the
official HyperSeg decoder algorithm (fp32, not compiled, backbone and context head shared), so
that the speed-up is one number. The weights are random, with BatchNorm statistics calibrated on
the input (timings do not depend on trained values)."""

BACKEND_HELP = ("decoder implementation: torch (the pure-PyTorch reference), triton (the Triton "
                "kernels: CUDA, or CPU through the interpreter with TRITON_INTERPRET=1) or auto "
                "(triton for CUDA inference, torch otherwise; default)")


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
    from .options import PRECISIONS

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
    from .options import BACKENDS

    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available" +
                             ("; under torchrun each process takes cuda:LOCAL_RANK)" if torchrun
                              else ")"))
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help=backend_help)
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bar (the result lines are still printed)")


def _add_inference_args(parser: argparse.ArgumentParser) -> None:
    """--size, --batch-size, --tta, --tta-scales: the same for predict and eval."""
    from .options import DEFAULT_TTA_SCALES, TTA_MODES

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
    from .options import AMP_MODES, BACKENDS, DATA_SPEC_HELP, LOSSES

    parser = argparse.ArgumentParser(prog="hyperseg", description="HyperSeg semantic segmentation")
    parser.add_argument("--version", action="version", version=f"hyperseg {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="list the zoo models",
                        description=LIST_DESCRIPTION).set_defaults(run=_list)
    convert = commands.add_parser(
        "convert", help="convert an official .pth checkpoint to our .safetensors format",
        description=CONVERT_DESCRIPTION)
    convert.add_argument("source", metavar="SOURCE",
                         help="official checkpoint (.pth) or a hyperseg .safetensors file")
    convert.add_argument("target", metavar="TARGET", help="the .safetensors file to write")
    convert.set_defaults(run=_convert)

    predict = commands.add_parser(
        "predict", help="segment JPEG/PNG images or videos: label, colour and overlay outputs",
        description=PREDICT_DESCRIPTION)
    predict.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="JPEG/PNG files, directories searched recursively for them, or "
                              "video files (.mp4, .mkv, ...; needs PyAV)")
    _add_model_args(predict)
    predict.add_argument("--out", "-o", required=True, metavar="DIR",
                         help="output directory (created when the first image is written)")
    _add_inference_args(predict)
    predict.add_argument("--alpha", type=_alpha_arg, default=0.5,
                         help="opacity of the colours in the overlay (default: 0.5)")
    _add_fast_path_args(predict)
    _add_run_args(predict, torchrun=False)
    predict.set_defaults(run=_predict)

    export = commands.add_parser(
        "export", help="export the torch backend to ONNX (the Triton kernels cannot be exported)",
        description=EXPORT_DESCRIPTION)
    _add_model_args(export)
    export.add_argument("--onnx", required=True, metavar="FILE",
                        help="the .onnx file to write (its folder must exist)")
    export.add_argument("--size", type=_size_arg, default=None, metavar="HxW",
                        help="input size of the graph (default: the model's official resolution)")
    export.add_argument("--batch-size", "-b", type=_positive_int, default=1, metavar="N",
                        help="batch size of the graph (default: 1)")
    export.add_argument("--dynamic-batch", action="store_true",
                        help="a graph for any batch size (--batch-size is then the example's)")
    export.add_argument("--opset", type=_positive_int, default=None, metavar="N",
                        help="ONNX opset version (default: 18)")
    export.add_argument("--verbose", action="store_true", help="show the exporter's progress")
    export.set_defaults(run=_export)

    train = commands.add_parser("train", help="train a model (official recipes; torchrun for DDP)",
                                description=TRAIN_DESCRIPTION)
    train.add_argument("--model", "-m", metavar="NAME",
                       help="zoo model name (see 'hyperseg list'; default with --weights: the "
                            "file's model)")
    train.add_argument("--data", "-d", metavar="SPEC", help=DATA_SPEC_HELP)
    train.add_argument("--out", "-o", required=True, metavar="DIR",
                       help="run folder (created when the run starts)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out (its settings come from its run.json)")
    train.add_argument("--steps", type=_positive_int, metavar="N",
                       help="stop when the run has done N optimizer steps in all (the LR schedule "
                            "still spans --epochs); the run validates and checkpoints when it "
                            "stops")
    recipe = train.add_argument_group("recipe (default: the model's official recipe)")
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
    _add_workers_arg(train)
    _add_run_args(train, BACKEND_HELP.replace(
        "auto (triton for CUDA inference, torch otherwise; default)",
        "auto (default: training on the torch reference, validation on triton on CUDA); "
        "triton trains on the Triton kernels too"))
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="mIoU, per-class IoU and pixel accuracy on a split",
                                   description=EVAL_DESCRIPTION)
    _add_model_args(evaluate)
    evaluate.add_argument("--data", "-d", required=True, metavar="SPEC", help=DATA_SPEC_HELP)
    evaluate.add_argument("--split", metavar="SPLIT",
                          help="default: the official evaluation split (val; test for CamVid)")
    evaluate.add_argument("--val-fraction", type=_fraction_arg, metavar="F",
                          help=VAL_FRACTION_HELP + "; give the training run's")
    _add_inference_args(evaluate)
    _add_workers_arg(evaluate)
    evaluate.add_argument("--json", metavar="FILE",
                          help="also write the results as JSON (its folder must exist)")
    _add_run_args(evaluate)
    evaluate.set_defaults(run=_eval)

    bench = commands.add_parser("benchmark", help="frames per second, latency and peak memory",
                                description=BENCHMARK_DESCRIPTION)
    bench.add_argument("--model", "-m", metavar="NAME", default="hyperseg-m",
                       help="zoo model name (default: hyperseg-m)")
    bench.add_argument("--size", type=_size_arg, default=None, metavar="HxW",
                       help="input size (default: the model's official resolution)")
    _add_fast_path_args(bench)
    bench.add_argument("--frames", type=_positive_int, default=50, metavar="N",
                       help="timed frames (default: 50)")
    bench.add_argument("--warmup", type=_positive_int, default=5, metavar="N",
                       help="untimed passes first (default: 5; the first one compiles)")
    bench.add_argument("--no-baseline", action="store_true",
                       help="do not time the official decoder algorithm")
    bench.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                       help="also write the results as JSON to FILE (its folder must exist), or "
                            "to stdout instead of the table when no FILE is given")
    bench.add_argument("--device", default=None,
                       help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available)")
    bench.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
    bench.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                       help="torch CPU threads (default: torch's; 1 is steadier on a busy CPU)")
    bench.set_defaults(run=_benchmark)
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
