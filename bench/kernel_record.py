"""Record every Triton launch a HyperSeg model makes, on CPU tensors, without running a kernel.

``recording()`` patches, for its duration only, ``JITFunction.run`` (what ``kernel[grid](...)``
calls) so that a launch binds its arguments with Triton's own binder for an sm_90 target (the
signature types, the divisibility-by-16 and equal-to-1 specialisations, the constexprs: exactly
what the JIT would compile) and returns without compiling or launching; ``Autotuner.run`` so that
every config of an autotuned kernel is recorded as a variant; and the kernels' ``check_device`` so
that CPU tensors are accepted. Outputs stay as ``torch.empty`` left them: garbage, never read for
anything but shapes. Must run without ``TRITON_INTERPRET`` (the kernels are then real
``JITFunction``s and the launchers choose their GPU block sizes).
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections import namedtuple
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime import autotuner
from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)

# What a launch keeps of a tensor argument (the tensor itself is not kept alive).
TensorArg = namedtuple("TensorArg", "shape dtype stride")


@dataclasses.dataclass
class Launch:
    """One recorded launch. ``args``: every bound argument by name, constexprs included, tensors
    as ``TensorArg``; ``grid``: (x, y, z) programs; ``options``: the backend's parsed options
    (``num_warps``, ``num_stages``...); ``signature`` / ``constexprs`` / ``attrs``: what
    ``ASTSource`` takes; ``key``: the JIT's cache key (one compiled kernel per key); ``variant``:
    the autotune config, or ""; ``phase``: "inference" or "train"; ``level``: the decoder level
    that was running (None outside the decoder blocks); ``call``: the number of the kernel call
    it belongs to (an autotuned call records one launch per config, all with one number)."""
    fn: Any
    args: Dict[str, Any]
    grid: Tuple[int, int, int]
    options: Any
    signature: Dict[str, str]
    constexprs: Dict[tuple, Any]
    attrs: Dict[tuple, Any]
    key: str
    variant: str
    phase: str
    level: Optional[int]
    call: int = 0

    @property
    def name(self) -> str:
        return self.fn.__name__

    @property
    def spec_key(self) -> tuple:
        """Launches with equal ``spec_key`` compile to one kernel."""
        return (self.fn.__module__, self.fn.__qualname__, self.variant, self.key)


class Recorder:
    """Collects ``Launch``es; ``phase`` / ``level`` / ``variant`` tag the launches made while set."""

    def __init__(self):
        self.launches: List[Launch] = []
        self.phase = "inference"
        self.level: Optional[int] = None
        self.variant = ""
        self.calls = 0                          # kernel calls so far
        self.tuning = False                     # inside an autotuned call
        self.inputs: Dict[int, tuple] = {}      # level -> shape of the block's input (inference)
        self._binders: Dict[int, Any] = {}
        self._key_cache: Dict[Any, str] = {}

    def record(self, fn: JITFunction, args, grid, kwargs) -> None:
        """Bind the arguments as ``JITFunction.run`` does and keep the launch."""
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = self._binders.get(id(fn))
        if binder is None:
            binder = create_function_from_signature(fn.signature, fn.params, BACKEND)
            self._binders[id(fn)] = binder
        bound, specialization, options = binder(*args, **kwargs)
        key = compute_cache_key(self._key_cache, specialization, options)
        parsed, signature, constexprs, attrs = fn._pack_args(BACKEND, kwargs, bound, specialization,
                                                             options)
        if callable(grid):
            grid = grid(bound)
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        described = {k: TensorArg(tuple(v.shape), v.dtype, tuple(v.stride()))
                     if isinstance(v, torch.Tensor) else v for k, v in bound.items()}
        if not self.tuning:
            self.calls += 1
        self.launches.append(Launch(fn, described, grid, parsed, signature, constexprs, attrs, key,
                                    self.variant, self.phase, self.level, self.calls))


def _kernel_modules():
    return [m for name, m in sorted(sys.modules.items())
            if m is not None and (name == "hyperseg.kernels" or name.startswith("hyperseg.kernels."))]


@contextlib.contextmanager
def recording(recorder: Recorder):
    """Within: launches are recorded by ``recorder`` instead of compiled and run, and the kernels
    accept CPU tensors. Everything patched is restored on exit."""
    import hyperseg.kernels  # noqa: F401  (loads every kernel module)
    from hyperseg.kernels import _common
    if _common.interpreting():
        raise RuntimeError("recording needs real JIT functions: unset TRITON_INTERPRET before "
                           "importing triton")
    original_check = _common.check_device
    patched = [m for m in _kernel_modules() if getattr(m, "check_device", None) is original_check]
    original_run, original_autotune = JITFunction.run, autotuner.Autotuner.run

    def run(self, *args, grid, warmup, **kwargs):
        recorder.record(self, args, grid, kwargs)

    def autotune_run(self, *args, **kwargs):
        """Record every (pruned) config of the autotuner as a variant, run none."""
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = self.prune_configs(kwargs)
        except Exception:     # a pruning that needs a GPU: all configs
            configs = self.configs
        recorder.calls += 1
        recorder.tuning = True
        try:
            for config in configs:
                recorder.variant = str(config)
                self.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            recorder.variant = ""
            recorder.tuning = False
        self.nargs = None

    try:
        for module in patched:
            module.check_device = lambda *tensors: None
        JITFunction.run = run
        autotuner.Autotuner.run = autotune_run
        yield recorder
    finally:
        JITFunction.run = original_run
        autotuner.Autotuner.run = original_autotune
        for module in patched:
            module.check_device = original_check


@contextlib.contextmanager
def level_tags(decoder, recorder: Recorder):
    """Tag launches with the decoder level running them: hooks on each block set
    ``recorder.level`` while the block runs, and a hook on its output sets it again when autograd
    reaches that block in the backward pass."""
    def before(level):
        def hook(block, args):
            recorder.level = level
            if recorder.phase == "inference":
                recorder.inputs[level] = tuple(args[0].shape)
        return hook

    def after(level):
        def hook(block, args, out):
            recorder.level = None
            if out.requires_grad:
                out.register_hook(lambda grad: setattr(recorder, "level", level))
        return hook

    handles = []
    try:
        for level, block in enumerate(decoder.blocks):
            handles.append(block.register_forward_pre_hook(before(level)))
            handles.append(block.register_forward_hook(after(level), always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _flush_denormals():
    """Garbage outputs hold denormals that slow the CPU's float arithmetic badly (a first train
    step took 9 s instead of 2 s): flush them to zero while recording."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _cast(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


@contextlib.contextmanager
def encoder_in_bf16(model):
    """Run the backbone and context head of a float16 model in bfloat16, handing their outputs on
    in float16. float16 convolutions are slow on CPUs (hyperseg-l-voc's backbone: ~2 minutes),
    bfloat16 ones fast; the encoder launches no Triton kernel and its values are never used, so
    the decoder, and every launch, sees what the float16 model gives it. The model's input check
    is skipped meanwhile (it compares the input's dtype with the backbone's)."""
    encoder = [model.backbone, model.context_head]
    hooks = []
    try:
        for module in encoder:
            module.to(torch.bfloat16)
            hooks.append(module.register_forward_pre_hook(lambda m, args: _cast(args, torch.bfloat16)))
            hooks.append(module.register_forward_hook(lambda m, args, out: _cast(out, torch.float16)))
        model.check_input = lambda x: None
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for module in encoder:
            module.to(torch.float16)
        model.__dict__.pop("check_input", None)


def record_inference(model, size, batch: int, dtype: torch.dtype, recorder: Recorder,
                     fast_encoder: bool = True) -> None:
    """One eval-mode forward without autograd, backend triton, the model and input in ``dtype``
    (float16: the encoder in bfloat16 when ``fast_encoder``, see ``encoder_in_bf16``)."""
    model.to(dtype).eval()
    model.backend = "triton"
    x = torch.randn(batch, 3, *size, dtype=dtype)
    recorder.phase = "inference"
    fast = fast_encoder and dtype == torch.float16
    encoder = encoder_in_bf16(model) if fast else contextlib.nullcontext()
    with recording(recorder), level_tags(model.decoder, recorder), torch.no_grad(), _flush_denormals():
        with encoder:
            model(x)


@contextlib.contextmanager
def backbone_on_one_image(model):
    """Within: the backbone runs on the first image of a batch only, without autograd, and its
    outputs are repeated to the whole batch as leaves that require gradients. It launches no
    Triton kernel and its values are never used, so the decoder sees what a whole-batch backbone
    gives it (shapes, dtypes, strides; its backward starts from leaves where the backbone's
    would continue) at a fraction of the time and memory: a recipe batch of 16-32 at the recipe
    crop would need tens of GiB on CPU for the backbone's activations."""
    backbone = model.backbone
    forward = backbone.forward

    def one_image(x):
        with torch.no_grad():
            feats, head = forward(x[:1])

        def whole_batch(t):
            return t.repeat(x.shape[0], *([1] * (t.dim() - 1))).requires_grad_(True)
        return [whole_batch(f) for f in feats], whole_batch(head)

    backbone.forward = one_image
    try:
        yield
    finally:
        del backbone.forward


def record_train_step(model, size, batch: int, dtype: torch.dtype, recorder: Recorder) -> None:
    """One train-mode step, backend triton: forward, cross-entropy, backward. The model stays in
    float32; float16 / bfloat16 run under CPU autocast, as mixed-precision training does. The
    backbone runs on one image (``backbone_on_one_image``)."""
    model.to(torch.float32).train()
    model.backend = "triton"
    x = torch.randn(batch, 3, *size)
    target = torch.randint(0, model.num_classes, (batch, *size))
    amp = (torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    recorder.phase = "train"
    with recording(recorder), level_tags(model.decoder, recorder), _flush_denormals(), \
            backbone_on_one_image(model):
        with amp:
            logits = model(x)
        F.cross_entropy(logits.float(), target).backward()
    recorder.level = None
    model.zero_grad(set_to_none=True)


def group_launches(launches: List[Launch]) -> List[List[Launch]]:
    """Launches grouped by specialisation (one compiled kernel each), in first-launch order."""
    groups: Dict[tuple, List[Launch]] = {}
    for launch in launches:
        groups.setdefault(launch.spec_key, []).append(launch)
    return list(groups.values())
