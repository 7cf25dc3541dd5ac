"""What the commands of ``python -m hyperseg`` do, given their parsed arguments (the parser is in
``hyperseg.__main__``): check the arguments, load the model, and hand the work to the library
(``predict_jobs``, ``export``, ``train``, ``evaluate``, ``benchmark``). Every command checks its
arguments before it imports torch; each ``run_*`` returns the exit status, and its docstring is
its command's ``--help`` description."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

UNTRAINED_WARNING = """\
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  WARNING: no --weights given. {name} is RANDOMLY INITIALISED and UNTRAINED.
!!  Its {what} meaningless: use it only to try out the pipeline.
!!  Pass --pretrained (the official weights) or --weights FILE (an official .pth
!!  checkpoint or a hyperseg .safetensors file).
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"""


class UsageError(ValueError):
    """A command line that cannot run as given."""


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

# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

def _load_model(args: argparse.Namespace, backend: str, what: str):
    """The model of ``--weights`` (architecture from the file, or ``--model``'s), or an untrained
    ``--model`` with a loud warning on stderr."""
    from .model import build, load

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

# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------

def run_list(args: argparse.Namespace) -> int:
    """List the zoo models: name, alias, dataset, class count, official input resolution (H x W),
    the official architecture, and whether official weights exist (--pretrained). Any name or alias
    is accepted by --model and hyperseg.build."""
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


def run_convert(args: argparse.Namespace) -> int:
    """Convert a checkpoint to hyperseg's .safetensors format (the tensors, and the model
    configuration as metadata). SOURCE is an official HyperSeg .pth file (read with
    torch.load(weights_only=True): nothing in it runs; its architecture comes from its 'arch'
    string, parsed, never evaluated) or a hyperseg .safetensors file. TARGET's folder must exist."""
    _check_checkpoint_file(args.source, None)
    _check_output_file(args.target, "TARGET")
    from .checkpoint import save
    from .model import load

    model = load(args.source, backend="torch")
    save(model, args.target)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.source} -> {args.target}: {model.config.name} ({model.config.arch}), "
          f"{model.num_classes} classes, {params:,} parameters")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """Segment JPEG/PNG images and videos. Each image is resized to the network input size (--size;
    by default the model's official resolution), normalised with the model's dataset mean/std,
    segmented, and the logits are resized back to the image's own size. For every image three PNGs
    are written to --out: <name>_labels.png (class ids, 8-bit), <name>_color.png (the palette of the
    classes.json of the folder the model was trained on, else the dataset's: Cityscapes, CamVid or
    PASCAL VOC) and <name>_overlay.png (the image blended with the colours). Directories are
    searched recursively and their sub-directories mirrored under --out. Missing inputs are reported
    before the model is loaded; an image that cannot be read or written is reported on stderr and
    the others are still processed; the exit status is 1 if any image failed. --out is created when
    the first image is written.

    Videos (.mp4, .m4v, .mov, .mkv, .webm, .avi; needs PyAV: pip install "hyperseg[video]") are
    segmented frame by frame (decoding, preprocessing, the model and encoding overlap in threads,
    with a bounded number of frames in memory) into <name>_color.mp4 and <name>_overlay.mp4 (H.264)
    and <name>_labels.mkv (class ids, lossless FFV1), at the input's frame size and frame rate
    (audio is dropped). A video that cannot be decoded to its end is reported, the frames segmented
    before the failure are written (playable files), and the exit status is 1."""
    _check_model_args(args)
    from .options import output_dir_problem
    from .predict_jobs import PredictSettings, plan_jobs, report, segment_jobs

    jobs, errors = plan_jobs(args.inputs, args.out)
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
    settings = PredictSettings(size=args.size, batch_size=args.batch_size, tta=args.tta,
                               tta_scales=args.tta_scales, alpha=args.alpha, quiet=args.quiet)
    return segment_jobs(model, jobs, errors, args.out, settings)


def run_export(args: argparse.Namespace) -> int:
    """Export a model to ONNX with the torch exporter (torch.onnx.export(..., dynamo=True)). The
    graph is the pure-PyTorch reference decoder: the export always uses backend="torch", because the
    Triton kernels cannot be exported to ONNX. The graph's height and width are static (its batch
    size too, unless --dynamic-batch): input "images" (B, 3, H, W), normalised with the model's
    mean/std, and output "logits" (B, classes, H, W). Needs the onnx and onnxscript packages. The
    folder of --onnx must exist."""
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


# --flag destinations that override a training recipe or run setting (see hyperseg.train).
TRAIN_OVERRIDES = ("epochs", "epoch_size", "batch_size", "accumulate", "lr", "poly_power", "crop",
                   "scale_range", "loss", "pretrained_backbone", "num_classes", "seed", "amp",
                   "sync_bn", "weights", "pretrained", "train_split", "val_split", "val_every",
                   "backbone", "val_fraction")


def run_train(args: argparse.Namespace) -> int:
    """Train a zoo model with its official recipe (see README, "Train and evaluate"); every recipe
    value can be overridden. Writes to --out: run.json (the configuration), latest.safetensors and
    latest_state.pt after every epoch and when the run stops (at --steps or the end),
    best.safetensors when the validation mIoU improves (validation runs every --val-every epochs and
    when the run stops), metrics.jsonl. A run that fails before its first checkpoint leaves nothing
    behind. --resume continues the run in --out exactly where it stopped. Under torchrun (e.g.
    torchrun --nproc_per_node 4 -m hyperseg train ...) it trains with DDP, one process per GPU
    (NCCL) or CPU process (gloo); --batch-size is the global batch."""
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

    from .train import (RunOptions, TrainInterrupted, make_config, model_of_weights,
                        resume_config, train)

    if args.weights and not args.model and not args.resume:
        args.model, backbone = model_of_weights(args.weights)
        args.backbone = args.backbone or backbone

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


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate a model on a dataset split: per-class IoU, mIoU, pixel accuracy and mean class
    accuracy, printed as a table (and written with --json). Preprocessing follows the official
    evaluation (Cityscapes and CamVid resized to the model's resolution, logits resized back to the
    labels; VOC padded to 512x512; folder and synthetic data at their own size). Under torchrun the
    split is sharded over the processes."""
    _check_model_args(args)
    _check_output_file(args.json, "--json")
    device = _device(args.device)
    _check_backend(args.backend, device)

    from . import distributed
    from .datasets import DEFAULT_SPLITS, open_dataset, parse_data_spec
    from .evaluate import evaluate_split, report_results

    spec = parse_data_spec(args.data)
    split = args.split or DEFAULT_SPLITS[spec.kind][1]
    dataset = open_dataset(spec, split, args.val_fraction)
    context = distributed.setup(device)
    try:
        model = _load_model(args, args.backend, "scores are").to(context.device)
        summary = evaluate_split(model, dataset, spec.kind, size=args.size,
                                 batch_size=args.batch_size, device=context.device,
                                 workers=args.workers, world_size=context.world_size,
                                 tta=args.tta, tta_scales=args.tta_scales, quiet=args.quiet)
        if context.is_main:
            report_results(model, dataset, summary, data=str(spec), split=split, tta=args.tta,
                           weights=args.weights, json_path=args.json)
    finally:
        distributed.teardown(context)
    return 0


def run_benchmark(args: argparse.Namespace) -> int:
    """Frames per second of a zoo model as users measure them: batch 1, --warmup untimed passes,
    then --frames timed frames, each synchronised with the device. Prints FPS, latency p50/p90/p99,
    peak memory (CUDA: max_memory_allocated; CPU: growth of the peak resident set size), the first
    pass (which includes any compilation), the device and the torch/triton versions, and the same
    for the official HyperSeg decoder algorithm (fp32, not compiled, backbone and context head
    shared), so that the speed-up is one number. The weights are random, with BatchNorm statistics
    calibrated on the input (timings do not depend on trained values)."""
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
