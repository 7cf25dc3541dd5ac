"""Property-based fuzzing (hypothesis) of every op of ``hyperseg.kernels`` against ``hyperseg.ops``,
forward and backward.

An example draws shapes (batch, patch grid, patch size, channels, groups, kernel size), padding
mode, dtypes, memory layouts and, for generated weights, the generator's groups, rows and signal
offset. The op runs with every float tensor it allocates (outputs, gradients, scratch) filled with
NaN first, so an element no kernel writes fails; the reference runs in float32 (float64 when an
input is float64) on the same rounded inputs.

Profiles (``HYPERSEG_FUZZ_PROFILE``): ``ci``, the default, a few derandomized examples per op
(about 75 s of one CPU core); ``long``, 1,000 random examples per op:
``HYPERSEG_FUZZ_PROFILE=long pytest tests/ -m fuzz --dist load`` (``--dist load`` spreads this
module's tests over the pytest-xdist workers; the suite's default keeps a module on one worker).
``HYPERSEG_FUZZ_EXAMPLES=N`` sets the examples per op. The run ends with a summary per op
(``fuzz_utils``, merged over the workers): cases run (shrinking re-runs included), mismatches,
errors, and the variants the cases hit.
"""
import contextlib
import importlib
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hyperseg import kernels, ops
from hyperseg.kernels import _common
from fuzz_utils import PROFILE, STATS
from kernel_utils import DEVICE

pytestmark = pytest.mark.fuzz

_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                 HealthCheck.large_base_example]
settings.register_profile("hyperseg-fuzz-ci", derandomize=True, deadline=None, database=None,
                          print_blob=True, suppress_health_check=_SLOW_IS_FINE)
settings.register_profile("hyperseg-fuzz-long", max_examples=1000, deadline=None, database=None,
                          print_blob=True, suppress_health_check=_SLOW_IS_FINE)
# examples per op in the ci profile, sized to each op's cost in the interpreter
CI_EXAMPLES = {"meta_patch_conv": 18, "meta_inverted_residual": 14, "patch_conv2d": 20,
               "generate_weights": 30, "generated_patch_conv2d": 12}


def fuzz(op, share=1):
    """Settings of ``op``'s test: the profile's examples, split over ``share`` parametrizations."""
    profile = settings.get_profile(f"hyperseg-fuzz-{PROFILE}")
    n = int(os.environ.get("HYPERSEG_FUZZ_EXAMPLES", 0)) or (
        CI_EXAMPLES[op] if PROFILE == "ci" else profile.max_examples)
    return settings(profile, max_examples=math.ceil(n / share))


# ------------------------------------------------------------------------------------------------
# Counting, NaN poisoning, comparison
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def counted(op, **variant):
    """One case of ``op``, counted with its outcome and its variant (the body may add to it)."""
    STATS[op]["cases"] += 1
    try:
        yield variant
    except AssertionError:
        STATS[op]["mismatches"] += 1
        raise
    except Exception:
        STATS[op]["errors"] += 1
        raise
    finally:
        for key, value in variant.items():
            value = str(value).replace("torch.", "")
            STATS[op][f"{key}:{value}"] += 1
            event(f"{key}: {value}")


@contextlib.contextmanager
def nan_poisoned():
    """While active, every float tensor made by ``torch.empty_like`` or ``Tensor.new_empty`` (how
    the ops allocate outputs, gradients and scratch) starts as NaN. Yields the tensors made."""
    made = []
    empty_like, new_empty = torch.empty_like, torch.Tensor.new_empty
    own = torch.Tensor.__dict__.get("new_empty")

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        made.append(t)
        return t

    torch.empty_like = lambda *args, **kwargs: poison(empty_like(*args, **kwargs))
    torch.Tensor.new_empty = lambda self, *args, **kwargs: poison(new_empty(self, *args, **kwargs))
    try:
        yield made
    finally:
        torch.empty_like = empty_like
        if own is None:
            del torch.Tensor.new_empty
        else:
            torch.Tensor.new_empty = own


@contextlib.contextmanager
def recorded(module, name):
    """The calls of ``module.name`` while active, as (arguments, result)."""
    calls, fn = [], getattr(module, name)
    setattr(module, name, lambda *args: calls.append((args, fn(*args))) or calls[-1][1])
    try:
        yield calls
    finally:
        setattr(module, name, fn)


@contextlib.contextmanager
def tiles(small):
    """``small``: 16-pixel and 16-channel tiles (``_common``'s test knobs), so that patches and
    channels span several programs of patch_conv2d and of the backward kernels."""
    saved = _common.MAX_PIXEL_BLOCK, _common.MAX_CHANNEL_BLOCK
    if small:
        _common.MAX_PIXEL_BLOCK = _common.MAX_CHANNEL_BLOCK = 16
    try:
        yield
    finally:
        _common.MAX_PIXEL_BLOCK, _common.MAX_CHANNEL_BLOCK = saved


# allowed max |err|: relative to max(1, max |ref|) for outputs, to max |ref| for gradients; a
# result takes the loosest tolerance of its dtype and of the inputs' dtypes
OUT_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 5e-2}


def compare(name, got, ref, dtype, dtypes, grad=False):
    assert got.shape == ref.shape and got.dtype == dtype, (name, got.shape, got.dtype, ref.shape, dtype)
    assert torch.isfinite(ref).all(), f"{name}: the reference is not finite"
    nans = torch.isnan(got).sum().item()
    assert nans == 0, f"{name}: {nans} of {got.numel()} elements are NaN (unwritten?)"
    if got.numel():
        err = (got.double() - ref.double()).abs().max().item()
        scale = ref.double().abs().max().item()
        bound = max((GRAD_TOL if grad else OUT_TOL)[d] for d in (dtype, *dtypes)) * (
            scale if grad else max(1.0, scale))
        assert err <= bound, f"{name}: max |err| {err:.3e} > {bound:.3e} (max |ref| {scale:.3e})"


def run_and_compare(kernel_op, reference_op, inputs, names, dout=None, allocations=1):
    """``kernel_op(*inputs)`` with poisoned allocations, and its gradients (given ``dout``) of the
    inputs that require grad, against ``reference_op`` and autograd on float32 / float64 copies.
    The output has the first input's dtype, a gradient its input's."""
    with nan_poisoned() as made:
        got = kernel_op(*inputs)
        wanted = [(n, t) for n, t in zip(names, inputs) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(got, [t for _, t in wanted], dout) if wanted and dout is not None else ()
    assert len(made) >= allocations, "outputs not allocated through the poisoned allocators"
    ref_dtype = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in inputs) else torch.float32
    leaves = [None if t is None else t.detach().to(ref_dtype).requires_grad_(t.requires_grad) for t in inputs]
    ref = reference_op(*leaves)
    dtypes = [t.dtype for t in inputs if t is not None]
    compare("out", got, ref, inputs[0].dtype, dtypes)
    if grads:
        ref_grads = torch.autograd.grad(ref, [t for t in leaves if t is not None and t.requires_grad],
                                        dout.to(ref_dtype))
        for (name, t), g, r in zip(wanted, grads, ref_grads):
            compare(f"d{name}", g, r, t.dtype, dtypes, grad=True)


def make(gen, shape, dtype, layout="contiguous", scale=1.0, grad=False):
    """Random normal on DEVICE: contiguous, channels-last storage (4-d), or every other element
    of a tensor twice as wide (a strided view at a storage offset)."""
    wide = layout == "strided"
    t = (torch.randn(*shape[:-1], shape[-1] * (2 if wide else 1), generator=gen) * scale).to(DEVICE, dtype)
    if wide:
        t = t[..., 1::2]
    elif layout == "channels_last" and len(shape) == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


# ------------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------------

seeds = st.integers(0, 2 ** 31 - 1)
kernel_sizes = st.sampled_from([1, 3, 5])
layouts = st.sampled_from(["contiguous", "channels_last", "strided"])
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
half_or_float = st.sampled_from(FLOAT_DTYPES)
any_dtype = st.sampled_from([torch.float64] + FLOAT_DTYPES)


@st.composite
def grids(draw, ph, pw, max_patches, max_pixels, max_side=4):
    """(B, GH, GW) of at most ``max_patches`` patches and ``max_pixels`` pixels."""
    limit = max(1, min(max_patches, max_pixels // (ph * pw)))
    b = draw(st.integers(1, min(3, limit)))
    gh = draw(st.integers(1, min(max_side, limit // b)))
    return b, gh, draw(st.integers(1, min(max_side, limit // (b * gh))))


def padding_modes(k, h, w):
    """reflect only where the feature map is larger than the halo."""
    return st.sampled_from(["zeros", "replicate"] + (["reflect"] if k // 2 < min(h, w) else []))


@st.composite
def generators(draw, count, cin=1):
    """A generator serving ``count`` rows from row ``start``: ``groups`` groups of ``spg`` signal
    inputs from channel ``offset`` of a ``width``-channel signal; rows per group a multiple of
    2 Cin (output tiles aligned to groups) or as few as fit (tiles spanning groups)."""
    groups, spg = draw(st.sampled_from([1, 2, 3, 4, 8, 16])), draw(st.integers(1, 24))
    start, offset = draw(st.integers(0, 9)), draw(st.integers(0, 5))
    unit = groups * (2 * cin if draw(st.booleans()) else 1)
    rows = -(-(start + count + draw(st.integers(0, 4))) // unit) * unit
    return dict(groups=groups, spg=spg, rows=rows, start=start, offset=offset,
                width=offset + groups * spg + draw(st.integers(0, 3)))


@st.composite
def convolutions(draw, kind, max_side=12):
    """(k, groups, Cin, Cout, ph, pw) of a convolution of ``kind``: "many" (meta_patch_conv's
    small-patch kernel: 1x1, one group, <= 16 pixels), "dense" (grouped or not), "depthwise"
    (groups == Cin == Cout), "multiplier" (one input channel, two outputs per group)."""
    if kind == "many":
        ph = draw(st.integers(1, 4))
        return 1, 1, draw(st.integers(1, 40)), draw(st.integers(1, 24)), ph, draw(st.integers(1, 16 // ph))
    k, ph = draw(kernel_sizes), draw(st.integers(1, max_side))
    if kind == "depthwise":
        groups = cin = cout = draw(st.integers(1, 24))
    elif kind == "multiplier":
        groups = cin = draw(st.integers(1, 4))
        cout = 2 * cin
    else:
        groups = draw(st.sampled_from([1, 1, 2, 3, 4]))
        cin, cout = groups * draw(st.integers(1, 8)), groups * draw(st.integers(1, 8))
        cout *= 2 if groups == cin == cout else 1
    low = 1 if k > 1 or groups > 1 else 16 // ph + 1      # not the small-patch kernel's case
    return k, groups, cin, cout, ph, draw(st.integers(low, max(low, max_side)))


def patch_budget(k, groups, cin, cout, pixels=0, scale=12):
    """Patches a convolution case may have: the interpreter's cost grows with the taps, the groups
    (a program each; depthwise: one) and, with 16-pixel tiles, the pixel blocks per patch."""
    per_patch = {1: 1, 3: 2, 5: 6}[k] * (1 if groups == cin == cout else groups) * max(1, -(-pixels // 16))
    return max(1, scale // per_patch)


# ------------------------------------------------------------------------------------------------
# The ops
# ------------------------------------------------------------------------------------------------

MPC = importlib.import_module("hyperseg.kernels.meta_patch_conv")
MIR = importlib.import_module("hyperseg.kernels.meta_inverted_residual")
PC = importlib.import_module("hyperseg.kernels.patch_conv")


def draw_generated(data, rng, b, grid, g, dtype, grad_signal=False, grad_generator=False, fan_in=1):
    """The signal and the generator weight of a case with generator ``g``."""
    gen_dtype = data.draw(st.sampled_from([torch.float32, dtype]), label="generator dtype")
    signal = make(rng, (b, g["width"], *grid), dtype, data.draw(layouts, label="signal layout"),
                  grad=grad_signal)
    weight = make(rng, (g["rows"], g["spg"], 1, 1), gen_dtype, scale=(g["spg"] * fan_in) ** -0.5,
                  grad=grad_generator)
    return signal, weight, dict(signal_offset=g["offset"], generator_groups=g["groups"], row_start=g["start"])


@pytest.mark.parametrize("path", ["many", "dense", "depthwise"])
@fuzz("meta_patch_conv", share=3)
@given(data=st.data())
def test_fuzz_meta_patch_conv(path, data):
    k, groups, cin, cout, ph, pw = data.draw(convolutions(path), label="k, groups, cin, cout, ph, pw")
    many = path == "many"
    if path == "depthwise" and data.draw(st.booleans(), label="a shape for the 3x3 vector taps"):
        # 3x3, patches a multiple of 4 wide, 3-4 patches per grid row (rare when drawn freely)
        k, pw = 3, 4 * min(3, -(-pw // 4))
        b, gh, gw = 1, data.draw(st.integers(1, 2), label="gh"), data.draw(st.integers(3, 4), label="gw")
    else:
        b, gh, gw = data.draw(grids(ph, pw, 48 if many else patch_budget(k, groups, cin, cout, scale=16),
                                    256 if many else 1024, 6 if many else 4), label="b, gh, gw")
    mode = data.draw(padding_modes(k, gh * ph, gw * pw), label="padding")
    g = data.draw(generators(cout * cin // groups * k * k, cin), label="generator")
    dtype = data.draw(half_or_float, label="dtype")
    rng = torch.Generator().manual_seed(data.draw(seeds, label="seed"))
    x = make(rng, (b, cin, gh * ph, gw * pw), dtype, data.draw(layouts, label="x layout"))
    signal, weight, generation = draw_generated(data, rng, b, (gh, gw), g, dtype)
    affine = data.draw(st.booleans(), label="scale and shift")
    kw = dict(out_channels=cout, groups=groups, kernel_size=k, padding_mode=mode, **generation,
              activation=data.draw(st.sampled_from([None, "relu", "relu6"]), label="activation"),
              scale=(torch.rand(cout, generator=rng) + 0.5).to(DEVICE) if affine else None,
              shift=make(rng, (cout,), torch.float32) if affine else None)
    with counted("meta_patch_conv", path=path, dtype=dtype) as variant, \
            recorded(MPC, "many_patches_plan") as many_plans, recorded(MPC, "patch_plan") as plans, \
            recorded(MPC, "depthwise_vector") as vectors:
        if path == "depthwise":         # the 3x3 vector taps need a patch between two others
            variant["taps"] = "vectors" if vectors_expected(dtype, k, pw, gw) else "per tap"
        run_and_compare(lambda *t: kernels.meta_patch_conv(*t, **kw),
                        lambda *t: ops.meta_patch_conv(*t, **kw), (x, signal, weight), ())
        launched = "many" if many_plans else "depthwise" if plans[0][0][4] else "dense"
        assert launched == path, f"drew a {path} case, the op launched the {launched} kernel"
        if path == "depthwise":
            assert (vectors[0][1] > 1 and gw >= 3) == (variant["taps"] == "vectors")


def vectors_expected(dtype, k, pw, gw):
    """Whether the depthwise meta convolution takes its 3x3 taps from vectors somewhere: 8-byte
    vectors fit the patch width, and some patch has a patch on either side."""
    vec = {torch.float32: 2, torch.float16: 4, torch.bfloat16: 4}.get(dtype, 1)
    return k == 3 and vec > 1 and pw % vec == 0 and gw >= 3


@fuzz("meta_inverted_residual")
@given(data=st.data())
def test_fuzz_meta_inverted_residual(data):
    ph, pw, k = data.draw(st.integers(1, 20), label="ph"), data.draw(st.integers(1, 16), label="pw"), \
        data.draw(kernel_sizes, label="k")
    b, gh, gw = data.draw(grids(ph, pw, 6 if k < 5 else 3, 320), label="b, gh, gw")
    cin, hidden = data.draw(st.integers(1, 20), label="cin"), data.draw(st.integers(1, 40), label="hidden")
    residual = data.draw(st.booleans(), label="residual")
    cout = cin if residual else data.draw(st.integers(1, 40), label="cout")
    mode = data.draw(padding_modes(k, gh * ph, gw * pw), label="padding")
    g = data.draw(generators(hidden * cin + hidden * k * k + cout * hidden), label="generator")
    dtype = data.draw(half_or_float, label="dtype")
    rng = torch.Generator().manual_seed(data.draw(seeds, label="seed"))
    x = make(rng, (b, cin, gh * ph, gw * pw), dtype, data.draw(layouts, label="x layout"))
    signal, weight, generation = draw_generated(data, rng, b, (gh, gw), g, dtype, fan_in=4)
    norms = [((torch.rand(c, generator=rng) + 0.5).to(DEVICE), make(rng, (c,), torch.float32))
             for c in (hidden, hidden, cout)]
    kw = dict(hidden=hidden, out_channels=cout, kernel_size=k, norm1=norms[0], norm2=norms[1],
              norm3=norms[2], residual=residual, padding_mode=mode, **generation)
    with counted("meta_inverted_residual", dtype=dtype, padding=mode) as variant, \
            recorded(MIR, "plan") as plans:
        run_and_compare(lambda *t: kernels.meta_inverted_residual(*t, **kw),
                        lambda *t: ops.meta_inverted_residual(*t, **kw), (x, signal, weight), (),
                        allocations=3)
        band = plans[0][1]["BAND"]
        variant["bands"] = "one" if band >= ph else "several, last partial" if ph % band else "several"


@fuzz("patch_conv2d")
@given(data=st.data())
def test_fuzz_patch_conv2d(data):
    kind = data.draw(st.sampled_from(["dense", "depthwise", "multiplier"]), label="kind")
    k, groups, cin, cout, ph, pw = data.draw(convolutions(kind, 8), label="k, groups, cin, cout, ph, pw")
    small = data.draw(st.booleans(), label="small tiles")
    if kind == "depthwise" and data.draw(st.booleans(), label="a shape for the 3x3 vector taps"):
        # 3x3, patches an even number of pixels wide, 3-4 patches per grid row (rare when drawn
        # freely): the forward and both backward kernels' vector taps
        k, pw = 3, 2 * data.draw(st.integers(1, 4), label="pw / 2")
        b, gh, gw = 1, data.draw(st.integers(1, 2), label="gh"), data.draw(st.integers(3, 4), label="gw")
    else:
        patches = patch_budget(k, groups, cin, cout, ph * pw if small else 0, scale=6)
        b, gh, gw = data.draw(grids(ph, pw, patches, 384), label="b, gh, gw")
    mode = data.draw(padding_modes(k, gh * ph, gw * pw), label="padding")
    dtype = data.draw(any_dtype, label="dtype")
    w_dtype = data.draw(st.sampled_from([dtype, torch.float32]), label="weight dtype")
    bias = data.draw(st.booleans(), label="bias")
    wanted = data.draw(st.sets(st.sampled_from(["x", "weight", "bias"][:2 + bias]), min_size=1),
                       label="gradients")
    rng = torch.Generator().manual_seed(data.draw(seeds, label="seed"))
    x = make(rng, (b, cin, gh * ph, gw * pw), dtype, data.draw(layouts, label="x layout"), grad="x" in wanted)
    weight = make(rng, (b, gh, gw, cout, cin // groups, k, k), w_dtype,
                  data.draw(st.sampled_from(["contiguous", "strided"]), label="weight layout"),
                  scale=(cin // groups * k * k) ** -0.5, grad="weight" in wanted)
    bias = make(rng, (b, gh, gw, cout), w_dtype, grad="bias" in wanted) if bias else None
    dout = make(rng, (b, cout, gh * ph, gw * pw), dtype, data.draw(layouts, label="dout layout"))
    with counted("patch_conv2d", kind=kind, dtype=dtype) as variant, tiles(small), \
            recorded(PC, "tap_vector") as vectors:
        run_and_compare(lambda *t: kernels.patch_conv2d(*t, padding_mode=mode, groups=groups),
                        lambda *t: ops.patch_conv2d(*t, padding_mode=mode, groups=groups),
                        (x, weight, bias), ("x", "weight", "bias"), dout, allocations=2)
        if kind == "depthwise":         # the vector taps need a patch between two others
            taps = "vectors" if any(vec > 1 for _, vec in vectors) and gw >= 3 else "per tap"
            variant["taps"] = taps
            # (an even width makes every pixel block even: a power of two of at least 2)
            assert (taps == "vectors") == (k == 3 and pw % 2 == 0 and gw >= 3
                                           and dtype != torch.float64), vectors


@fuzz("generate_weights")
@given(data=st.data())
def test_fuzz_generate_weights(data):
    b, gh, gw = data.draw(grids(1, 1, 64, 64, 6), label="b, gh, gw")
    groups = data.draw(st.sampled_from([1, 2, 3, 4, 8, 16]), label="groups")
    spg, rpg = data.draw(st.integers(1, 24), label="spg"), data.draw(st.integers(1, 40), label="rows per group")
    start = data.draw(st.integers(0, groups * rpg - 1), label="start")
    count = data.draw(st.integers(1, groups * rpg - start), label="count")
    dtype = data.draw(any_dtype, label="dtype")
    wanted = data.draw(st.sets(st.sampled_from(["signal", "weight"]), min_size=1), label="gradients")
    small = data.draw(st.booleans(), label="small tiles")
    rng = torch.Generator().manual_seed(data.draw(seeds, label="seed"))
    signal = make(rng, (b, groups * spg, gh, gw), dtype, data.draw(layouts, label="signal layout"),
                  grad="signal" in wanted)
    weight = make(rng, (groups * rpg, spg, 1, 1), data.draw(st.sampled_from([torch.float32, dtype]),
                                                            label="weight dtype"),
                  scale=spg ** -0.5, grad="weight" in wanted)
    kw = dict(groups=groups, start=start, count=count)
    with counted("generate_weights", dtype=dtype), tiles(small):
        run_and_compare(lambda *t: kernels.generate_weights(*t, **kw), lambda *t: ops.generate_weights(*t, **kw),
                        (signal, weight), ("signal", "weight"), make(rng, (b, gh, gw, count), dtype),
                        allocations=2)


@fuzz("generated_patch_conv2d")
@given(data=st.data())
def test_fuzz_generated_patch_conv2d(data):
    kind = data.draw(st.sampled_from(["dense", "depthwise", "multiplier"]), label="kind")
    k, groups, cin, cout, ph, pw = data.draw(convolutions(kind, 6), label="k, groups, cin, cout, ph, pw")
    small = data.draw(st.booleans(), label="small tiles")
    patches = patch_budget(k, groups, cin, cout, ph * pw if small else 0, scale=4)
    b, gh, gw = data.draw(grids(ph, pw, patches, 256), label="b, gh, gw")
    mode = data.draw(padding_modes(k, gh * ph, gw * pw), label="padding")
    g = data.draw(generators(cout * cin // groups * k * k, cin), label="generator")
    dtype = data.draw(any_dtype, label="dtype")
    wanted = data.draw(st.sets(st.sampled_from(["x", "signal", "generator"]), min_size=1), label="gradients")
    rng = torch.Generator().manual_seed(data.draw(seeds, label="seed"))
    x = make(rng, (b, cin, gh * ph, gw * pw), dtype, data.draw(layouts, label="x layout"), grad="x" in wanted)
    signal, weight, generation = draw_generated(data, rng, b, (gh, gw), g, dtype, "signal" in wanted,
                                                "generator" in wanted, cin // groups * k * k)
    kw = dict(out_channels=cout, groups=groups, kernel_size=k, padding_mode=mode, **generation)
    with counted("generated_patch_conv2d", kind=kind, dtype=dtype), tiles(small):
        run_and_compare(lambda *t: kernels.generated_patch_conv2d(*t, **kw),
                        lambda *t: ops.meta_patch_conv(*t, **kw), (x, signal, weight),
                        ("x", "signal", "generator"), make(rng, (b, cout, gh * ph, gw * pw), dtype),
                        allocations=3)
