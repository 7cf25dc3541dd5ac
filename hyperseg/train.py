"""Training: the official recipes as data, and the training loop behind ``hyperseg train``.

    python -m hyperseg train --model hyperseg-m --data cityscapes:/data/cityscapes --out runs/m
    torchrun --nproc_per_node 4 -m hyperseg train ...        # DDP, one process per GPU

Each zoo model has the recipe of its official configuration (``RECIPES``): Adam (betas 0.5,
0.999), a poly learning-rate schedule, bootstrapped cross-entropy (plain cross-entropy for VOC),
random rescale / crop / flip, the official crop sizes, epochs and batch sizes. Every value can be
overridden (``TrainConfig``).

Results do not depend on the number of processes: ``batch_size`` is the global batch, split into
``world_size * accumulate`` equal micro-batches, and step ``k`` of epoch ``e`` always trains on the
same samples with the same augmentation (each sample's random draws are seeded from the run's
seed, the epoch and its position) and the same drop-path masks (the global RNG is reseeded from
(seed, step, micro-batch) before each micro-batch). So ``--resume`` continues exactly, and 2
processes with ``accumulate=1`` train the same parameters as 1 process with ``accumulate=2``, up
to float reduction order. BatchNorm normalises each micro-batch on its own (use ``sync_bn`` on
GPUs to normalise over the whole step).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from . import distributed
from .datasets import (DEFAULT_SPLITS, Augmentation, DataSpec, TransformedDataset, collate,
                       open_dataset, parse_data_spec, train_transform)
from .losses import LOSSES, build_loss
from .model import BACKENDS, HyperSeg
from .options import AMP_MODES, default_workers, triton_device_problem
from .zoo import get_config, with_backbone

SCHEDULES = ("step", "epoch")
STATE_FORMAT = "hyperseg-train-state"
STATE_VERSION = 1
LATEST, BEST, STATE, RUN, METRICS = ("latest.safetensors", "best.safetensors", "latest_state.pt",
                                     "run.json", "metrics.jsonl")


class TrainError(ValueError):
    """A training run that cannot start or continue as asked."""


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped the run after its current step, once a resumable checkpoint of
    that step was written."""

    def __init__(self, out: str, step: int):
        super().__init__(f"interrupted: wrote a checkpoint of step {step} in {out}; continue "
                         f"with: hyperseg train --out {out} --resume")
        self.out, self.step = out, step


def _ignore_interrupts(worker_id: int) -> None:
    """Data-loading workers leave Ctrl-C to the main process, which finishes its step first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass(frozen=True)
class Recipe:
    """The optimisation and augmentation settings of one official training configuration."""

    epochs: int
    epoch_size: int                         # samples per epoch (the official train_iterations)
    batch_size: int                         # global batch per optimizer step
    lr: float
    poly_power: float
    crop: Tuple[int, int]
    scale_range: Optional[Tuple[float, float]]
    betas: Tuple[float, float] = (0.5, 0.999)
    schedule: str = "step"                  # the poly LR decays every "step" or every "epoch"
    loss: str = "bootstrapped_ce"
    scale_probability: float = 0.5
    rotation: float = 0.0
    pad: str = "around"                     # see datasets.Augmentation
    hflip: bool = True
    color_jitter: float = 0.0
    pretrained_backbone: bool = True
    official_config: str = ""


RECIPES: Dict[str, Recipe] = {
    "hyperseg-m-cityscapes": Recipe(
        epochs=360, epoch_size=4000, batch_size=16, lr=1e-3, poly_power=0.9, crop=(512, 1024),
        scale_range=(0.25, 2.0), official_config="cityscapes_efficientnet_b1_hyperseg-m"),
    "hyperseg-s-cityscapes": Recipe(
        epochs=360, epoch_size=4000, batch_size=16, lr=1e-3, poly_power=0.9, crop=(768, 768),
        scale_range=(0.375, 1.5), color_jitter=0.25,
        official_config="cityscapes_efficientnet_b1_hyperseg-s"),
    "hyperseg-s-camvid": Recipe(
        epochs=120, epoch_size=2000, batch_size=2, lr=1e-3, poly_power=2.0, crop=(576, 576),
        scale_range=(0.5, 2.0), official_config="camvid_efficientnet_b1_hyperseg-s"),
    "hyperseg-l-camvid": Recipe(
        epochs=120, epoch_size=2000, batch_size=16, lr=1e-3, poly_power=2.0, crop=(768, 768),
        scale_range=(0.75, 2.0), official_config="camvid_efficientnet_b1_hyperseg-l"),
    "hyperseg-l-voc": Recipe(
        epochs=160, epoch_size=20000, batch_size=32, lr=1e-4, poly_power=3.0, crop=(512, 512),
        scale_range=(0.25, 0.9), schedule="epoch", loss="ce", rotation=30.0, pad="bottom-right",
        color_jitter=0.5, official_config="vocsbd_efficientnet_b3_hyperseg-l"),
}

# On synthetic data a short run at the images' own size, from scratch (no download).
SYNTHETIC_RECIPE = dict(epochs=10, batch_size=8, scale_range=(0.75, 1.5), rotation=0.0,
                        pad="around", color_jitter=0.0, pretrained_backbone=False)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run's result (written to ``run.json``)."""

    model: str
    data: str
    recipe: Recipe
    num_classes: Optional[int] = None       # None: the dataset's class count
    seed: int = 0
    amp: str = "off"
    sync_bn: bool = False
    accumulate: int = 1                     # micro-batches per process per step
    weights: Optional[str] = None           # start from these weights
    pretrained: bool = False                # start from the model's official weights
    train_split: Optional[str] = None       # None: the dataset's official split
    val_split: Optional[str] = None         # None: the official one; "none": no validation
    val_every: int = 1                      # validate every N epochs (and after the last)
    backbone: Optional[str] = None          # a timm backbone instead of the official one
    val_fraction: Optional[float] = None    # folder data without split folders: held-out share

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        values = dict(data)
        recipe = dict(values.pop("recipe"))
        for key in ("crop", "scale_range", "betas"):
            if isinstance(recipe.get(key), list):
                recipe[key] = tuple(recipe[key])
        try:
            return cls(recipe=Recipe(**recipe), **values)
        except TypeError as err:
            raise TrainError(f"not a training configuration: {err}") from None

    @property
    def steps_per_epoch(self) -> int:
        return self.recipe.epoch_size // self.recipe.batch_size

    @property
    def total_steps(self) -> int:
        return self.recipe.epochs * self.steps_per_epoch


# Fields of ``Recipe`` and ``TrainConfig`` that ``make_config`` accepts as overrides.
RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "recipe")


def default_recipe(model: str, spec: DataSpec) -> Recipe:
    """The official recipe of ``model``, adapted to synthetic data when ``spec`` is synthetic."""
    name = get_config(model).name
    recipe = RECIPES[name]
    if spec.kind == "synthetic":
        recipe = dataclasses.replace(recipe, crop=spec.size, epoch_size=spec.length,
                                     **SYNTHETIC_RECIPE)
    return recipe


def make_config(model: str, data: str, overrides: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """The recipe of ``model`` on ``data`` with ``overrides`` (recipe or config field -> value;
    None values are ignored), checked."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(RECIPE_FIELDS) - set(CONFIG_FIELDS))
    if unknown:
        raise TrainError(f"unknown training settings: {', '.join(unknown)}")
    spec = parse_data_spec(data)
    recipe = default_recipe(model, spec)
    recipe = dataclasses.replace(recipe, **{k: v for k, v in overrides.items()
                                            if k in RECIPE_FIELDS})
    config = TrainConfig(model=get_config(model).name, data=str(spec) if spec.kind == "synthetic"
                         else data, recipe=recipe,
                         **{k: v for k, v in overrides.items() if k in CONFIG_FIELDS})
    check_config(config)
    return config


def check_config(config: TrainConfig) -> None:
    """Raise TrainError for settings that cannot train."""
    r = config.recipe
    positive = {"epochs": r.epochs, "epoch_size": r.epoch_size, "batch_size": r.batch_size,
                "accumulate": config.accumulate, "val_every": config.val_every}
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise TrainError(f"{name} must be an integer >= 1, got {value!r}")
    if r.epoch_size < r.batch_size:
        raise TrainError(f"epoch_size ({r.epoch_size}) is smaller than one batch ({r.batch_size})")
    if not r.lr > 0:
        raise TrainError(f"lr must be > 0, got {r.lr}")
    if r.schedule not in SCHEDULES:
        raise TrainError(f"schedule must be one of {SCHEDULES}, got {r.schedule!r}")
    if r.loss not in LOSSES:
        raise TrainError(f"loss must be one of {LOSSES}, got {r.loss!r}")
    if config.amp not in AMP_MODES:
        raise TrainError(f"amp must be one of {AMP_MODES}, got {config.amp!r}")
    if min(r.crop) < 32:
        raise TrainError(f"crop must be at least 32x32, got {r.crop[0]}x{r.crop[1]}")
    if r.scale_range is not None and not 0 < r.scale_range[0] <= r.scale_range[1]:
        raise TrainError(f"scale range must satisfy 0 < low <= high, got {r.scale_range}")
    if config.weights and config.pretrained:
        raise TrainError("give either weights (a checkpoint) or pretrained (the official weights), "
                         "not both")
    if config.num_classes is not None and config.num_classes < 1:
        raise TrainError(f"num_classes must be >= 1, got {config.num_classes}")
    if config.val_fraction is not None:
        if parse_data_spec(config.data).kind != "folder":
            raise TrainError("--val-fraction applies to folder datasets only (--data folder:ROOT)")
        if not 0 <= config.val_fraction < 1:
            raise TrainError(f"val_fraction must be in [0, 1), got {config.val_fraction}")
    if config.backbone is not None:
        import timm

        if not timm.is_model(config.backbone):
            raise TrainError(f"unknown backbone {config.backbone!r}: timm has no model of that "
                             f"name (see timm.list_models())")


def micro_batch_size(config: TrainConfig, world_size: int) -> int:
    """Images per micro-batch: the global batch over world_size * accumulate."""
    parts = world_size * config.accumulate
    if config.recipe.batch_size % parts:
        raise TrainError(f"batch size {config.recipe.batch_size} is not divisible by "
                         f"{world_size} process(es) x {config.accumulate} accumulation step(s); "
                         f"the global batch is split into equal micro-batches")
    return config.recipe.batch_size // parts


def poly_schedule(config: TrainConfig) -> Callable[[int], float]:
    """The learning-rate factor after ``step`` optimizer steps: ``(1 - t / T) ** power`` over
    the whole run (T steps), with t the step ("step" schedule) or the start of its epoch
    ("epoch" schedule), as the official ``PolyLR`` stepped per batch or per epoch."""
    total, per_epoch, power = config.total_steps, config.steps_per_epoch, config.recipe.poly_power
    by_epoch = config.recipe.schedule == "epoch"

    def factor(step: int) -> float:
        t = (step // per_epoch) * per_epoch if by_epoch else step
        return max(0.0, 1.0 - t / total) ** power
    return factor


def _mix_seed(*values: int) -> int:
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, np.uint64)[0]
               & 0x7FFF_FFFF_FFFF_FFFF)


class StepBatchSampler(Sampler):
    """Micro-batches of ``(index, augmentation seed)`` keys for one rank, one epoch.

    Epoch ``e`` draws ``steps_per_epoch * batch_size`` samples from successive random
    permutations of the dataset (seeded by the run's seed and ``e``). Step ``k`` trains on the
    contiguous block ``k * batch_size ...`` of that order, cut into ``world_size * accumulate``
    micro-batches: rank ``r`` takes micro-batches ``r * accumulate ... (r + 1) * accumulate - 1``.
    ``set_position`` starts an epoch at a given step (resume).
    """

    def __init__(self, dataset_size: int, steps_per_epoch: int, batch_size: int, accumulate: int,
                 rank: int, world_size: int, seed: int):
        if dataset_size < 1:
            raise TrainError("the training set is empty")
        self.dataset_size, self.steps_per_epoch = dataset_size, steps_per_epoch
        self.batch_size, self.accumulate = batch_size, accumulate
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.micro = batch_size // (world_size * accumulate)
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch: int, step: int = 0) -> None:
        self.epoch, self.start_step = epoch, step

    def epoch_order(self, epoch: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The dataset indices and augmentation seeds of every sample of ``epoch``."""
        generator = torch.Generator().manual_seed(_mix_seed(self.seed, epoch, 1))
        needed = self.steps_per_epoch * self.batch_size
        rounds = math.ceil(needed / self.dataset_size)
        order = torch.cat([torch.randperm(self.dataset_size, generator=generator)
                           for _ in range(rounds)])[:needed]
        seeds = torch.randint(0, 2 ** 62, (needed,), generator=generator)
        return order, seeds

    def __iter__(self):
        order, seeds = self.epoch_order(self.epoch)
        order, seeds = order.tolist(), seeds.tolist()
        for step in range(self.start_step, self.steps_per_epoch):
            for a in range(self.accumulate):
                start = step * self.batch_size + (self.rank * self.accumulate + a) * self.micro
                yield [(order[i], seeds[i]) for i in range(start, start + self.micro)]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accumulate


# ------------------------------------------------------------------------------------------------
# Training state (optimizer, scheduler, position, RNG): plain containers and tensors only
# ------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """The global RNG states as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() \
            and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))


def read_state(path: str, device: torch.device) -> dict:
    """A training-state file, read with ``torch.load(weights_only=True)``."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise TrainError(f"no training state {path!r} to resume from") from None
    except Exception as err:   # unpickling errors: refused objects, corrupt files
        raise TrainError(f"cannot read the training state {path!r}: {err}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainError(f"{path!r} is not a hyperseg training state")
    if state.get("version") != STATE_VERSION:
        raise TrainError(f"{path!r} has training-state version {state.get('version')!r}; this "
                         f"hyperseg reads version {STATE_VERSION}")
    return state


# Tests only: seconds to sleep after a temporary file is complete and before it replaces its
# target, so that a test can kill the run in the middle of a checkpoint write.
WRITE_PAUSE_ENV = "HYPERSEG_TEST_PAUSE_BEFORE_RENAME"
_TEMPORARY = re.compile("^(" + "|".join(re.escape(n) for n in (LATEST, BEST, STATE, RUN, METRICS))
                        + r")\.tmp\d+$")


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:              # some file systems cannot sync a directory: the rename stands
        if not directory:
            raise
    finally:
        os.close(fd)


def _replace_atomically(path: str, write: Callable[[str], None]) -> None:
    """Write ``path`` through ``write(temporary path)``, flush it to disk and rename it over
    ``path``: a crash at any instant leaves either the old or the new complete file (and perhaps
    a stale temporary file, which ``remove_temporary_files`` deletes)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        _fsync(tmp)
        pause = os.environ.get(WRITE_PAUSE_ENV)
        if pause:
            time.sleep(float(pause))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync(os.path.dirname(os.path.abspath(path)), directory=True)


def remove_temporary_files(out: str) -> None:
    """Delete the temporary files of writes that a killed run left unfinished in ``out``."""
    for name in os.listdir(out):
        if _TEMPORARY.match(name):
            os.remove(os.path.join(out, name))


def read_metrics(path: str) -> list:
    """The records of a ``metrics.jsonl`` file; a last line cut short (a file appended to by an
    older version that was killed mid-write) is left out."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = f.read().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise TrainError(f"{path!r}, line {number}: not a JSON record") from None
    return records


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

@dataclass
class RunOptions:
    """Settings of one invocation that do not change the result."""

    steps: Optional[int] = None       # stop once the run has done this many steps in all
    device: Optional[str] = None
    backend: str = "auto"             # decoder implementation (training and validation)
    workers: Optional[int] = None     # data-loading processes per rank
    quiet: bool = False               # no progress bar (or progress lines)
    weights_dir: Optional[str] = None  # where pretrained weights are kept (default: torch hub's)
    log: Callable[[str], None] = field(default=lambda message: print(message, flush=True))
    progress: Callable[[str], None] = field(
        default=lambda message: print(message, file=sys.stderr, flush=True))


def load_run_config(out: str) -> TrainConfig:
    path = os.path.join(out, RUN)
    try:
        with open(path) as f:
            return TrainConfig.from_dict(json.load(f))
    except FileNotFoundError:
        raise TrainError(f"--resume: {out!r} holds no run to resume (no {RUN})") from None
    except (json.JSONDecodeError, KeyError, AttributeError) as err:
        raise TrainError(f"--resume: {path!r} is not a run configuration: {err}") from None


def resume_config(out: str, model: Optional[str], data: Optional[str],
                  overrides: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """The configuration of the run in ``out``; explicit settings must agree with it, except
    the data location (``RESUMABLE``)."""
    if os.path.isfile(os.path.join(out, RUN)):
        missing = [n for n in (STATE, LATEST) if not os.path.isfile(os.path.join(out, n))]
        if missing:
            raise TrainError(f"--resume: {out!r} holds no checkpoint to resume from (no "
                             f"{missing[0]}): start the run again without --resume")
    saved = load_run_config(out)
    requested = {k: v for k, v in (overrides or {}).items() if v is not None}
    if model is not None and get_config(model).name != saved.model:
        raise TrainError(f"--resume: the run in {out!r} trains {saved.model}, not {model}")
    if data is not None:
        old, new = parse_data_spec(saved.data), parse_data_spec(data)
        if old.kind != new.kind or (old.kind == "synthetic" and old != new):
            raise TrainError(f"--resume: the run in {out!r} trains on {saved.data}, not {data}")
        saved = dataclasses.replace(saved, data=data if new.kind != "synthetic" else saved.data)
    for key, value in requested.items():
        current = getattr(saved.recipe, key) if key in RECIPE_FIELDS else getattr(saved, key, None)
        if isinstance(current, tuple):
            value = tuple(value)
        if current != value:
            raise TrainError(f"--resume continues the run in {out!r} as it was configured: its "
                             f"{key} is {current!r}, not {value!r} (start a new run with another "
                             f"--out to change it)")
    return saved


def model_of_weights(path: str) -> Tuple[str, Optional[str]]:
    """The zoo name and timm backbone (None: the official one) of the model in a checkpoint, for
    a run that starts from ``--weights FILE`` without ``--model``."""
    from .checkpoint import read_checkpoint

    config = read_checkpoint(path).config
    if config is None:
        raise TrainError(f"--weights {path!r} does not say which model it holds: give --model NAME")
    base, _, backbone = config.name.partition("+")
    try:
        get_config(base)
    except ValueError:
        raise TrainError(f"--weights {path!r} holds a {config.name} model, which is no zoo model "
                         f"(so it has no training recipe): give --model NAME") from None
    return base, backbone or None


def _default_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device {name}: CUDA is not available on this machine")
    return device


def _autocast(config: TrainConfig, device: torch.device):
    if config.amp == "off":
        return nullcontext()
    dtype = torch.float16 if config.amp == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def train(config: TrainConfig, out: str, *, resume: bool = False,
          options: Optional[RunOptions] = None) -> HyperSeg:
    """Train (or, with ``resume``, continue training) the run ``config`` into the folder ``out``.

    Writes ``run.json`` (the configuration), after every epoch ``latest.safetensors`` (the
    model, ``hyperseg.save`` format), ``latest_state.pt`` (optimizer, scheduler, step, RNG
    states, best mIoU) and, when the validation mIoU improves, ``best.safetensors``; also when the
    run stops early at ``options.steps``. Under torchrun every process calls this; rank 0 logs
    and writes. Returns the trained model (on every rank).
    """
    options = options or RunOptions()
    check_config(config)
    if options.backend not in BACKENDS:
        raise TrainError(f"backend must be one of {BACKENDS}, got {options.backend!r}")
    device = _default_device(options.device)
    problem = triton_device_problem(device.type) if options.backend == "triton" else None
    if problem:
        raise TrainError(f"backend triton on {device}: {problem}")
    if config.sync_bn and device.type != "cuda":
        raise TrainError("--sync-bn needs CUDA devices: torch's SyncBatchNorm only runs on GPU "
                         "tensors (on CPU it raises during the forward pass). On CPU, train "
                         "without it; the global batch is then normalised per micro-batch")
    micro_batch_size(config, distributed.launched_world_size())
    if device.type == "cpu":
        # Tiny gradients and Adam moments become denormal floats, which slow CPU arithmetic
        # more than tenfold; flush them to zero (a process-wide setting).
        torch.set_flush_denormal(True)
    context = distributed.setup(device)
    try:
        return _Trainer(config, out, resume, options, context).run()
    finally:
        distributed.teardown(context)


@dataclass
class _Optimization:
    """What a training step updates, and where the run stands."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    criterion: Callable
    step: int = 0                             # optimizer steps done
    best: Optional[float] = None              # the best validation mIoU so far
    carried: Tuple[float, int] = (0.0, 0)     # a stopped epoch's loss sum and steps so far


class _Trainer:
    def __init__(self, config: TrainConfig, out: str, resume: bool, options: RunOptions,
                 context: distributed.Context):
        self.config, self.out, self.options, self.ctx = config, out, options, context
        self.resume = resume
        self.device = context.device
        self.log = options.log if context.is_main else (lambda message: None)
        self.created_out = False          # --out did not exist before this run
        self.checkpointed = False         # this run has written a checkpoint
        self.interrupted = False          # Ctrl-C: stop after the current step

    # -- set-up ----------------------------------------------------------------------------

    def _datasets(self):
        config = self.config
        spec = parse_data_spec(config.data)
        train_split = config.train_split or DEFAULT_SPLITS[spec.kind][0]
        val_split = config.val_split or DEFAULT_SPLITS[spec.kind][1]
        fraction = config.val_fraction if spec.kind == "folder" else None
        train_set = open_dataset(spec, train_split, fraction)
        val_set = None if val_split == "none" else open_dataset(spec, val_split, fraction)
        return spec, train_set, val_set

    def _model(self, num_classes: int, train_set, state: Optional[dict]) -> HyperSeg:
        from .model import build, load

        config = self.config
        if self.resume:
            model = load(os.path.join(self.out, LATEST), backend=self.options.backend,
                         channels_last=False)
            name = with_backbone(get_config(config.model), config.backbone).name
            if model.config.name != name or model.num_classes != num_classes:
                raise TrainError(f"{os.path.join(self.out, LATEST)!r} holds {model.config.name} "
                                 f"with {model.num_classes} classes; the run trains {name} "
                                 f"with {num_classes}")
            if state is not None and "model" in state:     # the weights of the state's step
                try:
                    model.load_state_dict(state["model"], strict=True)
                except RuntimeError as err:
                    raise TrainError(f"{os.path.join(self.out, STATE)!r}: its model tensors do "
                                     f"not fit {config.model}: {err}") from None
            return model
        torch.manual_seed(config.seed)
        from_scratch = not (config.weights or config.pretrained)
        try:
            pretrained = config.recipe.pretrained_backbone and from_scratch
            model = build(config.model, num_classes=num_classes, backbone=config.backbone,
                          pretrained=config.pretrained, weights_dir=self.options.weights_dir,
                          pretrained_backbone=pretrained, backend=self.options.backend,
                          channels_last=False)      # training speed with it not measured
        except (OSError, RuntimeError) as err:
            if config.recipe.pretrained_backbone and from_scratch:
                raise TrainError(f"cannot get the ImageNet backbone weights ({err}); they are "
                                 f"downloaded from the Hugging Face hub: check the connection, "
                                 f"or train from scratch with --no-pretrained-backbone") from None
            raise
        if config.weights:
            self._start_from(model, config.weights)
        return _with_dataset_classes(model, train_set)

    def _start_from(self, model: HyperSeg, weights: str) -> None:
        """Load ``weights``: every tensor whose name and shape match; say what was re-initialised
        (fine-tuning onto another class count re-initialises the class-dependent layers)."""
        from .checkpoint import load_matching, read_checkpoint

        result = load_matching(model, read_checkpoint(weights))
        if result.reinitialised:
            shown = ", ".join(result.reinitialised[:12])
            more = len(result.reinitialised) - 12
            self.log(f"fine-tuning from {weights}: re-initialised {len(result.reinitialised)} "
                     f"tensor(s) whose shape differs or that the file lacks: {shown}"
                     + (f" and {more} more" if more > 0 else ""))
        if result.unused:
            self.log(f"fine-tuning from {weights}: {len(result.unused)} tensor(s) of the file "
                     f"are not used, e.g. {result.unused[0]}")
        if not result.reinitialised:
            self.log(f"starting from {weights}: every tensor loaded")

    def _check_out(self) -> None:
        """A new run needs an --out that holds no run yet: no training state, the file a
        checkpoint writes last (a run killed before that has nothing to resume and is
        overwritten)."""
        if self.resume:
            return
        if os.path.exists(os.path.join(self.out, STATE)):
            raise TrainError(f"{self.out!r} already holds a run ({STATE}): pass --resume to "
                             f"continue it, or choose another --out")

    def _create_out(self) -> None:
        """Create --out and, for a new run, write run.json (main process, once everything the run
        needs has been read)."""
        self.created_out = not os.path.isdir(self.out)
        os.makedirs(self.out, exist_ok=True)
        if not self.resume:
            _replace_atomically(os.path.join(self.out, RUN),
                                lambda p: _write_json(p, self.config.to_dict()))

    def _remove_unfinished_run(self) -> None:
        """After a new run failed before its first checkpoint: remove its run.json (which
        --resume would otherwise take for a run) and --out if the run created it and nothing
        else is in it."""
        try:
            os.remove(os.path.join(self.out, RUN))
        except FileNotFoundError:
            pass
        if self.created_out:
            try:
                os.rmdir(self.out)
            except OSError:                    # not empty: something else was put there
                pass

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> HyperSeg:
        """Read everything the run needs (datasets, weights, training state) before creating
        anything; a new run that fails before its first checkpoint leaves nothing behind."""
        config, ctx, device = self.config, self.ctx, self.device
        self._check_out()
        spec, train_set, val_set = self._datasets()
        num_classes = config.num_classes or train_set.num_classes
        if train_set.num_classes > num_classes:
            raise TrainError(f"the {spec.kind} dataset has {train_set.num_classes} classes but the "
                             f"model would have {num_classes} (--num-classes)")
        state = read_state(os.path.join(self.out, STATE), "cpu") if self.resume else None
        model = self._model(num_classes, train_set, state).to(device)
        if ctx.is_main and os.path.isdir(self.out):
            remove_temporary_files(self.out)
        try:
            if ctx.is_main:
                self._create_out()
            distributed.barrier()
            with self._stop_on_interrupt():
                return self._run(spec, train_set, val_set, num_classes, model, state)
        except BaseException:
            if ctx.is_main and not self.resume and not self.checkpointed:
                self._remove_unfinished_run()
            raise

    def _run(self, spec, train_set, val_set, num_classes: int, model: HyperSeg,
             state: Optional[dict]) -> HyperSeg:
        """Train from the step of ``state`` (a resumed run) or 0 to the stop (--steps or the end
        of the schedule), one epoch (or the part of it before the stop) at a time."""
        config = self.config
        net = self._parallel(model)
        opt = self._optimization(model, state)
        train_data, val_data = self._training_data(spec, train_set, val_set, model)
        sampler = StepBatchSampler(len(train_set), config.steps_per_epoch,
                                   config.recipe.batch_size, config.accumulate, self.ctx.rank,
                                   self.ctx.world_size, config.seed)
        workers = self.options.workers
        if workers is None:
            workers = default_workers(self.ctx.world_size)
        total = config.total_steps
        stop = total if self.options.steps is None else min(total, self.options.steps)
        self._log_start(model, num_classes, train_set, opt.step)
        if opt.step >= stop:
            self.log(f"nothing to do: the run is at step {opt.step} of {stop}")
            return model
        while opt.step < stop:
            epoch = opt.step // config.steps_per_epoch
            sampler.set_position(epoch, opt.step % config.steps_per_epoch)
            loader = DataLoader(train_data, batch_sampler=sampler, num_workers=workers,
                                collate_fn=collate, pin_memory=self.device.type == "cuda",
                                worker_init_fn=_ignore_interrupts if workers else None)
            self._epoch(net, model, loader, opt, epoch, stop, val_data, workers)
        self.log(self._outputs_line(opt.step, total, opt.best, val_data is not None))
        model.eval()
        return model

    def _parallel(self, model: HyperSeg) -> torch.nn.Module:
        """The module the training step runs: ``model``, with SyncBatchNorm (--sync-bn) and in
        DistributedDataParallel under torchrun."""
        net: torch.nn.Module = model
        if self.config.sync_bn:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if self.ctx.distributed:
            net = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device] if self.device.type == "cuda" else None)
        return net

    def _optimization(self, model: HyperSeg, state: Optional[dict]) -> "_Optimization":
        """Adam, the poly schedule, the GradScaler and the loss of the recipe, restored from the
        training ``state`` of a resumed run (with the RNGs, the step and the best mIoU)."""
        config, recipe = self.config, self.config.recipe
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, betas=recipe.betas)
        opt = _Optimization(
            optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(config)),
            scaler=torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16"),
            criterion=build_loss(recipe.loss))
        if state is not None:
            opt.optimizer.load_state_dict(state["optimizer"])
            opt.scheduler.load_state_dict(state["scheduler"])
            opt.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            opt.step, opt.best = int(state["step"]), state["best_miou"]
            opt.carried = tuple(state.get("epoch_loss", (0.0, 0)))   # a stopped epoch's loss
        return opt

    def _training_data(self, spec, train_set, val_set, model: HyperSeg):
        """The training set with the recipe's augmentation, and the validation set preprocessed
        as the official evaluation (None without a validation split)."""
        from .evaluate import evaluation_dataset

        recipe = self.config.recipe
        aug = Augmentation(crop=tuple(recipe.crop), scale_range=recipe.scale_range,
                           scale_probability=recipe.scale_probability, rotation=recipe.rotation,
                           pad=recipe.pad, hflip=recipe.hflip, color_jitter=recipe.color_jitter)
        train_data = TransformedDataset(train_set, train_transform(aug, model.config.mean,
                                                                   model.config.std))
        val_data = None if val_set is None else evaluation_dataset(val_set, spec.kind, model.config)
        return train_data, val_data

    def _log_start(self, model: HyperSeg, num_classes: int, train_set, step: int) -> None:
        config, ctx, recipe = self.config, self.ctx, self.config.recipe
        micro = micro_batch_size(config, ctx.world_size)
        self.log(f"training {model.config.name} ({num_classes} classes) on {config.data}: "
                 f"{len(train_set)} images, {recipe.epochs} epochs x {config.steps_per_epoch} "
                 f"steps, batch {recipe.batch_size} = {ctx.world_size} process(es) x "
                 f"{config.accumulate} x {micro}, crop {recipe.crop[0]}x{recipe.crop[1]}, lr "
                 f"{recipe.lr:g}, "
                 f"{'resuming at step ' + str(step) if self.resume else 'from step 0'}, "
                 f"device {self.device}")

    def _epoch(self, net, model: HyperSeg, loader, opt: "_Optimization", epoch: int, stop: int,
               val_data, workers: int) -> None:
        """Train the rest of ``epoch`` (up to ``stop``), validate when it is due, checkpoint,
        log the epoch's line; raise TrainInterrupted after a Ctrl-C."""
        config, ctx = self.config, self.ctx
        per_epoch = config.steps_per_epoch
        step, loss_sum, loss_steps = self._train_epoch(
            net, loader, opt.optimizer, opt.scheduler, opt.scaler, opt.criterion, opt.step,
            min((epoch + 1) * per_epoch, stop), epoch, opt.carried)
        if self.interrupted and step == opt.step and (self.checkpointed or self.resume):
            # Ctrl-C before this call's first step: the checkpoint on disk is of this very step
            # (with any stopped epoch's loss), so there is nothing to record or write
            raise TrainInterrupted(self.out, step)
        opt.step, opt.carried = step, (0.0, 0)
        finished_epoch = step % per_epoch == 0
        mean_loss = self._mean_over_ranks(loss_sum, loss_steps)
        done = epoch + 1 if finished_epoch else epoch + (step % per_epoch) / per_epoch
        record = {"epoch": done, "step": step, "loss": mean_loss,
                  "lr": opt.scheduler.get_last_lr()[0]}
        distributed.broadcast_buffers(model)
        improved = False
        # validate every val_every epochs, and whenever the run stops (at --steps or the end)
        if val_data is not None and not self.interrupted and (step == stop or (
                finished_epoch and (epoch + 1) % config.val_every == 0)):
            improved = self._validate(model, val_data, opt, record, workers)
        if ctx.is_main:
            # a stopped epoch carries its loss so far into the resumed run (exactly, in one
            # process), so the epoch's record is the same as without the stop
            partial = (0.0, 0) if finished_epoch else (
                float(loss_sum) if ctx.world_size == 1 else mean_loss * loss_steps, loss_steps)
            self._checkpoint(model, opt.optimizer, opt.scheduler, opt.scaler, step, opt.best,
                             improved, record, partial)
            self.checkpointed = True
        distributed.barrier()
        self.log(_epoch_line(record, config.recipe.epochs, opt.best))
        if self.interrupted:
            raise TrainInterrupted(self.out, step)

    def _validate(self, model: HyperSeg, val_data, opt: "_Optimization", record: dict,
                  workers: int) -> bool:
        """Evaluate on the validation set into ``record`` and keep the best mIoU in ``opt``;
        returns whether it improved."""
        from .evaluate import evaluate

        micro = micro_batch_size(self.config, self.ctx.world_size)
        matrix = evaluate(model, val_data, batch_size=max(1, micro), device=self.device,
                          workers=workers, quiet=True)
        record.update(miou=matrix.miou(), pixel_accuracy=matrix.pixel_accuracy())
        improved = opt.best is None or record["miou"] > opt.best
        opt.best = record["miou"] if improved else opt.best
        model.train()
        return improved

    @contextmanager
    def _stop_on_interrupt(self):
        """Within: the first Ctrl-C asks the loop to stop after its step and checkpoint it; a
        second one stops at once. Single-process runs in the main thread only (under torchrun
        each process would stop at another step)."""
        if self.ctx.distributed or threading.current_thread() is not threading.main_thread():
            yield
            return

        def interrupt(signum, frame):
            self.interrupted = True
            signal.signal(signal.SIGINT, previous)
        previous = signal.signal(signal.SIGINT, interrupt)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _outputs_line(self, step: int, total: int, best, validated: bool) -> str:
        """What the run wrote and which model file to use."""
        out = self.out
        line = (f"wrote {os.path.join(out, LATEST)} (the model at step {step}), "
                f"{os.path.join(out, STATE)} and {os.path.join(out, METRICS)}; ")
        if best is not None and os.path.exists(os.path.join(out, BEST)):
            line += (f"{os.path.join(out, BEST)} is the model of the best validation "
                     f"(mIoU {100 * best:.2f}%)")
        elif validated:
            line += f"no best model yet: evaluate or predict with {os.path.join(out, LATEST)}"
        else:
            line += (f"no validation (--val-split none), so no {BEST}: evaluate or predict with "
                     f"{os.path.join(out, LATEST)}")
        if step < total:
            line += f". Continue with: hyperseg train --out {out} --resume"
        return line

    def _train_epoch(self, net, loader, optimizer, scheduler, scaler, criterion, step: int,
                     epoch_stop: int, epoch: int, carried=(0.0, 0)):
        from tqdm import tqdm

        config, ctx = self.config, self.ctx
        per_epoch, accumulate = config.steps_per_epoch, config.accumulate
        net.train()
        show = ctx.is_main and not self.options.quiet
        bar = tqdm(total=per_epoch, initial=step % per_epoch, unit="step", file=sys.stderr,
                   desc=f"epoch {epoch + 1}/{config.recipe.epochs}", dynamic_ncols=True,
                   disable=True if not show else None)
        # stderr is not a terminal (tqdm then shows nothing): a progress line every tenth of an
        # epoch instead
        every = max(1, per_epoch // 10) if show and bar.disable else 0
        batches = iter(loader)
        loss_sum = torch.tensor(float(carried[0]), device=self.device)
        loss_steps = int(carried[1])
        started, images_done = time.perf_counter(), 0
        with bar:
            while step < epoch_stop and not self.interrupted:
                step_loss = torch.zeros((), device=self.device)
                for a in range(accumulate):
                    images, labels = next(batches)
                    images = images.to(self.device, non_blocking=True)
                    labels = labels.to(self.device, non_blocking=True)
                    torch.manual_seed(_mix_seed(config.seed, step, ctx.rank * accumulate + a, 2))
                    sync = (net.no_sync() if ctx.distributed and a < accumulate - 1
                            else nullcontext())
                    with sync:
                        with _autocast(config, self.device):
                            logits = net(images)
                        loss = criterion(logits.float(), labels) / accumulate
                        scaler.scale(loss).backward()
                    step_loss += loss.detach()
                self._check_loss(step_loss, step + 1)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                loss_sum += step_loss
                loss_steps += 1
                images_done += config.recipe.batch_size
                if not bar.disable:
                    rate = images_done / max(time.perf_counter() - started, 1e-9)
                    bar.set_postfix({"loss": f"{float(loss_sum) / loss_steps:.4f}",
                                     "lr": f"{scheduler.get_last_lr()[0]:.2e}",
                                     "img/s": f"{rate:.1f}"}, refresh=False)
                    bar.update(1)
                elif every and (step % every == 0 or step == epoch_stop):
                    rate = images_done / max(time.perf_counter() - started, 1e-9)
                    self.options.progress(
                        f"epoch {epoch + 1}/{config.recipe.epochs}, step "
                        f"{(step - 1) % per_epoch + 1}/{per_epoch}: loss "
                        f"{float(loss_sum) / loss_steps:.4f}, lr {scheduler.get_last_lr()[0]:.2e}, "
                        f"{rate:.1f} img/s")
        return step, loss_sum, loss_steps

    def _check_loss(self, loss: torch.Tensor, step: int) -> None:
        """Stop before a NaN or infinite loss updates the weights (under fp16 AMP the GradScaler
        skips such steps instead, as torch does). The last checkpoint stays as it was."""
        if self.config.amp == "fp16" or bool(torch.isfinite(loss)):
            return
        raise TrainError(f"step {step}: the training loss is {float(loss)}; the run stopped "
                         f"before this step changed the weights, and the checkpoint in "
                         f"{self.out!r} (if any) is the last good one; a new run with a lower "
                         f"--lr may avoid it")

    def _mean_over_ranks(self, loss_sum: torch.Tensor, steps: int) -> float:
        values = torch.stack([loss_sum.detach().double().cpu(),
                              torch.tensor(float(steps), dtype=torch.float64)])
        if self.ctx.distributed:
            values = values.to(self.device)
            distributed.all_reduce_sum(values)
        values = values.cpu()
        return float(values[0] / values[1]) if values[1] > 0 else float("nan")

    def _checkpoint(self, model, optimizer, scheduler, scaler, step: int, best, improved: bool,
                    record: dict, partial=(0.0, 0)) -> None:
        from .checkpoint import save

        out = self.out
        state = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": step,
                 "epoch": step // self.config.steps_per_epoch, "best_miou": best,
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "rng": rng_state(),
                 "world_size": self.ctx.world_size, "epoch_loss": list(partial)}
        # The state file is written last: it is the commit point. It holds the model's tensors
        # too, so --resume continues from the state's own step even when a kill came between
        # latest.safetensors and the state; the metrics of steps after it are dropped.
        state["model"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if improved:
            _replace_atomically(os.path.join(out, BEST), lambda p: save(model, p))
        _replace_atomically(os.path.join(out, LATEST), lambda p: save(model, p))
        metrics_path = os.path.join(out, METRICS)
        records = [r for r in read_metrics(metrics_path) if r.get("step", 0) < step] + [record]
        _replace_atomically(metrics_path, lambda p: _write_lines(p, records))
        _replace_atomically(os.path.join(out, STATE), lambda p: torch.save(state, p))


def _write_lines(path: str, records: list) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def _with_dataset_classes(model: HyperSeg, dataset) -> HyperSeg:
    """Give ``model`` the class names and palette of a folder dataset (``classes.json``), so that
    its saved files predict and evaluate with them; other datasets leave it as it is."""
    names, colours = tuple(getattr(dataset, "classes", ())), tuple(getattr(dataset, "palette", ()))
    if getattr(dataset, "name", None) != "folder" or len(names) != model.num_classes:
        return model
    model.config = dataclasses.replace(model.config, class_names=names, palette=colours)
    return model


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _epoch_line(record: dict, epochs: int, best) -> str:
    epoch = record["epoch"]
    where = f"epoch {epoch}/{epochs}" if float(epoch).is_integer() else \
        f"stopped in epoch {math.ceil(epoch)}/{epochs}"
    line = f"{where} (step {record['step']}): loss {record['loss']:.4f}, lr {record['lr']:.2e}"
    if "miou" in record:
        line += (f", val mIoU {100 * record['miou']:.2f}% (best {100 * best:.2f}%), pixel "
                 f"accuracy {100 * record['pixel_accuracy']:.2f}%")
    return line
