#!/usr/bin/env python
"""Static GPU report of every Triton launch of a HyperSeg model, made without a GPU.

For a zoo model, size, batch and dtype: records every Triton launch of one inference pass (and,
with ``--train``, of one training step) on CPU tensors without running a kernel
(``kernel_record``), compiles each specialisation for sm_90 exactly as the JIT would and reads
ptxas and the SASS (``kernel_sass``), and sets each decoder block's executed work (from the kernel
modules' ``executed_work``) against its roofline (``kernel_roofline``).

    python bench/kernel_report.py                                  # hyperseg-m, fp32 and fp16
    python bench/kernel_report.py --model all --json report.json
    python bench/kernel_report.py --model hyperseg-m --size 128x256 --dtype fp32 --train --check
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import multiprocessing
import operator
import os
import platform
import shutil
import sys
import tempfile
import time

from kernel_roofline import DTYPE_BYTES, GPUS, PEAKS, block_floors, block_roofline  # noqa: F401

# Properties every inference kernel must meet (``--check``): (field, operator, value). The
# activation loads and stores of the image interior sit on source lines tagged
# ``# interior: vector`` (kernel_sass.VECTOR_TAG); each kernel has some, and every one compiles to
# at least 8 bytes per thread (or, in a tile smaller than that per thread, to all its elements).
CHECKS = [
    ("compiled", "==", True),
    ("spill_bytes", "==", 0),
    ("stack", "==", 0),
    ("warps_per_sm", ">=", 16),
    ("vector_lines", ">=", 1),
    ("narrow_vector_lines", "==", 0),
]
# Properties every kernel of the training step must meet (``--train --check``): no spills, no
# stack frame, executed multiply-adds within 2x of the useful ones (over all its launches; the
# kernel module's ``executed_work`` gives both). Occupancy is not required there: the backward
# gathers keep larger tiles live.
TRAIN_CHECKS = [
    ("compiled", "==", True),
    ("spill_bytes", "==", 0),
    ("stack", "==", 0),
    ("redundancy", "<=", 2.0),
    ("narrow_vector_lines", "==", 0),
]
# Properties every decoder block must meet: executed work within 2x of the minimal (which counts
# the v1 expand over each patch's halo as minimal).
BLOCK_CHECKS = [
    ("redundancy", "<=", 2.0),
]
_OPS = {"==": operator.eq, "!=": operator.ne, ">=": operator.ge, "<=": operator.le,
        ">": operator.gt, "<": operator.lt}
DTYPES = ("fp32", "fp16", "bf16")


def failed_checks(report: dict, checks=CHECKS, block_checks=BLOCK_CHECKS,
                  train_checks=TRAIN_CHECKS) -> list:
    """Messages for every (model, dtype, kernel or block, check) of a report (the JSON dict) that
    fails: ``checks`` on inference kernels, ``train_checks`` on the kernels only the training step
    launches, ``block_checks`` on decoder blocks; an empty list when all pass."""
    failures = []
    for entry in report["reports"]:
        for row in entry.get("blocks", []):
            for field, op, value in block_checks:
                got = row.get(field)
                if got is None or not _OPS[op](got, value):
                    failures.append(f"{entry['model']} {entry['dtype']} L{row['level']} {row['block']}: "
                                    f"{field} {op} {value!r} failed (got {got!r})")
        for kernel in entry["kernels"]:
            kernel_checks = checks if "inference" in kernel["phases"] else train_checks
            for field, op, value in kernel_checks:
                got = kernel.get(field)
                if got is None or not _OPS[op](got, value):
                    failures.append(f"{entry['model']} {entry['dtype']} kernel #{kernel['id']} "
                                    f"{kernel['kernel']} ({' '.join(kernel['used_by'])}): "
                                    f"{field} {op} {value!r} failed (got {got!r})")
    return failures


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def _size(text: str):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x1024, got {text!r}")
    return h, w


def _train_batch(text: str):
    if text == "recipe":
        return text
    try:
        batch = int(text)
    except ValueError:
        batch = 0
    if batch < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'recipe', got {text!r}")
    return batch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kernel_report.py", allow_abbrev=False, description=(
        "Compile every Triton launch of a HyperSeg model for sm_90 without a GPU; report registers, "
        "spills, occupancy, SASS and a per-block roofline."))
    p.add_argument("--model", default="hyperseg-m-cityscapes", help="zoo name, alias or 'all'")
    p.add_argument("--size", type=_size, help="HxW (default: the model's input_size)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=DTYPES + ("all",), action="append",
                   help="repeatable; default fp32 and fp16; 'all': fp32, fp16, bf16")
    p.add_argument("--train", action="store_true", help="also record a training step per --train-batch")
    p.add_argument("--train-batch", type=_train_batch, action="append",
                   help="batch of a recorded training step, or 'recipe' (the model's official "
                        "recipe batch); repeatable, default: 'recipe' and 2. The tiles the "
                        "launchers pick do not depend on the batch, but the JIT specialises "
                        "integer arguments divisible by 16, and the patch count is one")
    p.add_argument("--train-size", type=_size, help="HxW (default: the model's official recipe crop; "
                                                    "with --size, half of it)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU of the printed floors "
                                                                        "(the JSON holds all)")
    p.add_argument("--cache-dir", help="Triton cache to use (default: a fresh temporary one, so that "
                                       "every kernel really compiles)")
    p.add_argument("--reuse-cache", action="store_true", help="use the user's Triton cache")
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--check", action="store_true", help="exit 1 if a kernel or block fails its checks")
    p.add_argument("--half-encoder", action="store_true",
                   help="fp16: run the backbone and context head in fp16 too (slow on CPUs; by "
                        "default they run in bf16 and hand fp16 outputs to the decoder)")
    p.add_argument("--ieee", action="store_true",
                   help="fp32 kernels with IEEE fp32 dots (torch.backends.cudnn.allow_tf32 off); "
                        "by default tf32 tensor cores, PyTorch's default for convolutions")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                   help="compiler processes (default: the CPU count, at most 4)")
    p.add_argument("--from-json", metavar="PATH", help="print and check a saved report instead of "
                                                       "making one (no recording, no compilation)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    args.train_batch = args.train_batch or ["recipe", 2]
    dtypes = args.dtype or ["fp32", "fp16"]
    args.dtypes = list(DTYPES) if "all" in dtypes else list(dict.fromkeys(dtypes))
    return args


def _train_batches(args, name) -> list:
    """The training batches to record for one model: ``--train-batch`` with 'recipe' replaced by
    the model's official recipe batch, each once."""
    from hyperseg.train import RECIPES
    import hyperseg
    recipe = RECIPES[hyperseg.get_config(name).name].batch_size
    return list(dict.fromkeys(recipe if b == "recipe" else b for b in args.train_batch))


def _model_sizes(args, name):
    """(config, inference size, train size) for one model, validated against its size divisor."""
    import hyperseg
    config = hyperseg.get_config(name)
    divisor = config.size_divisor
    size = args.size or config.input_size
    if args.train_size:
        train = args.train_size
    elif args.size:
        train = tuple(max(divisor, s // 2 // divisor * divisor) for s in size)
    else:
        from hyperseg.train import RECIPES
        train = RECIPES[config.name].crop
    for what, (h, w) in (("size", size), ("train size", train)):
        if h % divisor or w % divisor:
            raise SystemExit(f"{name}: {what} {h}x{w} must be a multiple of {divisor}")
    return config, tuple(size), tuple(train)


# ------------------------------------------------------------------------------------------------
# One model at one dtype
# ------------------------------------------------------------------------------------------------

def _executed(launch):
    """The kernel module's ``executed_work`` for a launch, or None when it has none."""
    module = importlib.import_module(launch.fn.__module__)
    hook = getattr(module, "executed_work", None)
    return hook(launch.name, launch) if hook else None


def _jsonable(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def _describe_spec(index: int, launches: list) -> dict:
    """What a specialisation is: kernel, users, grids, constexprs, specialisation attributes."""
    first = launches[0]
    params = {p.name: p for p in first.fn.params}
    names = [p.name for p in first.fn.params]
    constexprs = {names[path[0]]: _jsonable(v) for path, v in first.constexprs.items()}
    used_by, phases, grids = [], [], []
    for launch in launches:
        tag = ("" if launch.phase == "inference" else "train:") + (
            f"L{launch.level}" if launch.level is not None else "-")
        used_by += [tag] if tag not in used_by else []
        phases += [launch.phase] if launch.phase not in phases else []
        grids += [list(launch.grid)] if list(launch.grid) not in grids else []
    divisible = [names[path[0]] for path, attr in first.attrs.items()
                 if any(a[0] == "tt.divisibility" for a in attr)]
    return dict(id=index, kernel=first.name, module=first.fn.__module__, variant=first.variant,
                phases=phases, used_by=used_by, launches=len(launches), grids=grids,
                signature={k: v for k, v in first.signature.items() if v != "constexpr"},
                constexprs={k: v for k, v in constexprs.items() if params[k].is_constexpr},
                equal_to_1=[k for k in constexprs if not params[k].is_constexpr],
                divisible_by_16=divisible)


# The launch groups of the model being compiled, for the forked workers of _compile_groups (a
# fork inherits them, so no launch, JIT function or tensor is pickled; only the results are).
_GROUPS: list = []


def _compile_one(index: int) -> dict:
    """Compile group ``index`` of _GROUPS (a failed compile is reported, not raised)."""
    from kernel_sass import compile_launch
    try:
        return compile_launch(_GROUPS[index][0])
    except Exception as error:  # noqa: BLE001 - reported in the table and by --check
        return dict(compiled=False, error=f"{type(error).__name__}: {str(error)[-2000:]}")


def _compile_groups(groups: list, jobs: int = 1) -> list:
    """Describe and compile every specialisation, on ``jobs`` forked processes (each compile is
    single-threaded: Triton's passes, then ptxas and nvdisasm), in order."""
    global _GROUPS
    _GROUPS = groups
    pool = None
    if jobs > 1 and len(groups) > 1:
        pool = multiprocessing.get_context("fork").Pool(min(jobs, len(groups)))
    try:
        results = (pool.imap(_compile_one, range(len(groups))) if pool
                   else map(_compile_one, range(len(groups))))
        kernels = []
        for index, (launches, compiled) in enumerate(zip(groups, results), 1):
            entry = _describe_spec(index, launches)
            _progress(f"  compiled #{index} {entry['kernel']} {' '.join(entry['used_by'])}")
            entry.update(compiled)
            work = [_executed(launch) for launch in launches]
            entry["executed_macs"] = None if None in work else sum(w["macs"] for w in work)
            useful = None if None in work else [w.get("useful_macs") for w in work]
            if useful and None not in useful and sum(useful) > 0:
                entry["useful_macs"] = sum(useful)
                entry["redundancy"] = entry["executed_macs"] / entry["useful_macs"]
            kernels.append(entry)
    finally:
        if pool:
            pool.terminate()
        _GROUPS = []
    return kernels


def _sum_work(works: list):
    if not works or None in works:
        return None
    total = {"macs": 0, "tensor_core_macs": 0, "parts": {}}
    for w in works:
        total["macs"] += w["macs"]
        total["tensor_core_macs"] += w["tensor_core_macs"]
        for part, macs in w.get("parts", {}).items():
            total["parts"][part] = total["parts"].get(part, 0) + macs
    return total


def _blocks(model, size, batch, dtype, groups, kernels, recorded_inputs) -> list:
    """The roofline rows of every level with the executed work of its inference launches."""
    rows = block_roofline(model, size, batch, dtype)
    spec_ids = {group[0].spec_key: kernel["id"] for group, kernel in zip(groups, kernels)}
    launches = [launch for group in groups for launch in group]
    for row in rows:
        level, g = row["level"], row["geometry"]
        shape = recorded_inputs.get(level)
        if shape is not None and tuple(shape[2:]) != (g["H"], g["W"]):
            raise RuntimeError(f"level {level}: recorded input {shape}, roofline assumed {g}")
        mine = [ln for ln in launches if ln.phase == "inference" and ln.level == level]
        # an autotuned call is recorded once per config; its work counts once (configs differ
        # in warps and stages, not in the work done)
        calls = set()
        counted = [ln for ln in mine if ln.call not in calls and not calls.add(ln.call)]
        executed = _sum_work([_executed(ln) for ln in counted])
        row["kernels"] = sorted({spec_ids[ln.spec_key] for ln in mine})
        row["executed"] = executed
        row["redundancy"] = executed["macs"] / row["minimal"]["macs"] if executed else None
        if executed:
            minimal = row["minimal"]["parts"]
            row["redundancy_by_part"] = {part: macs / minimal[part] for part, macs
                                         in executed["parts"].items() if minimal.get(part)}
    return rows


def report_model(name: str, args, dtype: str) -> dict:
    """Record, compile and roofline one model at one dtype."""
    import torch
    import hyperseg
    from kernel_record import Recorder, group_launches, record_inference, record_train_step
    config, size, train_size = _model_sizes(args, name)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    recorder = Recorder()
    start = time.perf_counter()
    model = hyperseg.build(config.name)
    record_inference(model, size, args.batch, torch_dtype, recorder, fast_encoder=not args.half_encoder)
    batches = _train_batches(args, name) if args.train else []
    for batch in batches:
        record_train_step(model, train_size, batch, torch_dtype, recorder)
    record_s = time.perf_counter() - start
    _progress(f"{config.name} {dtype}: {len(recorder.launches)} launches recorded in {record_s:.1f}s")
    groups = group_launches(recorder.launches)
    kernels = _compile_groups(groups, args.jobs)
    model.to(torch_dtype)
    blocks = _blocks(model, size, args.batch, dtype, groups, kernels, recorder.inputs)
    return dict(model=config.name, dtype=dtype, size=list(size), batch=args.batch,
                train=dict(size=list(train_size), batches=batches) if args.train else None,
                launches=len(recorder.launches), record_s=round(record_s, 2),
                wall_s=round(time.perf_counter() - start, 2), kernels=kernels, blocks=blocks)


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------

_T0 = time.perf_counter()


def _progress(message: str) -> None:
    print(f"[kernel_report {time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def _short(kernel: str) -> str:
    return kernel.strip("_").removesuffix("_kernel")


def _users(used_by: list) -> str:
    """["L0", "L1", "train:L3"] -> "L0,1 train:L3"."""
    text = []
    for phase in ("", "train:"):
        levels = [u[len(phase):].lstrip("L") for u in used_by
                  if (u.startswith(phase) if phase else ":" not in u)]
        if levels:
            text.append(phase + "L" + ",".join(levels))
    return " ".join(text)


def _vector_cell(kernel: dict) -> str:
    """Tagged interior access lines that compiled to vectors / all tagged ones ("-" for none)."""
    tagged = kernel.get("vector_lines")
    if not tagged:
        return "-"
    return f"{tagged - kernel['narrow_vector_lines']}/{tagged}"


def kernel_table(entry: dict) -> list:
    lines = [f"{'#':>2} {'kernel':<34} {'used by':<22} {'grid':<13} {'w':>1} {'regs':>4} "
             f"{'spill st/ld':>11} {'stack':>5} {'smem KB':>7} {'warps/SM':>8} {'HGMMA':>5} "
             f"{'HMMA':>4} {'FFMA':>5} {'LDG max':>7} {'vector':>6} {'LDL+STL':>7} {'comp s':>6} "
             f"{'redund.':>7}"]
    for k in entry["kernels"]:
        grid = "x".join(map(str, k["grids"][0])) + ("+" if len(k["grids"]) > 1 else "")
        name = _short(k["kernel"]) + (" (tuned)" if k["variant"] else "")   # w: the config's warps
        head = f"{k['id']:>2} {name:<34} {_users(k['used_by'])[:22]:<22} {grid:<13}"
        if not k.get("compiled"):
            lines.append(f"{head} COMPILE FAILED: {k['error'].splitlines()[0][:80]}")
            continue
        s = k["sass"]
        lines.append(
            f"{head} {k['num_warps']:>1} {k['registers']:>4} "
            f"{str(k['spill_stores']) + '/' + str(k['spill_loads']):>11} {k['stack']:>5} "
            f"{k['shared'] / 1024:>7.1f} {k['warps_per_sm']:>8} {s['HGMMA']:>5} {s['HMMA']:>4} "
            f"{s['FFMA']:>5} {str(s['widest_load']) + 'B':>7} {_vector_cell(k):>6} "
            f"{s['LDL'] + s['STL']:>7} "
            f"{k['compile_s']:>6.1f} "
            + (f"{k['redundancy']:>6.2f}x" if k.get("redundancy") is not None else f"{'':>7}"))
    return lines


def block_table(entry: dict, gpu: str) -> list:
    lines = [f"{'level':<5} {'block':<30} {'HxW':<9} {'patches':>7} {'min GFLOP':>9} "
             f"{'exec GFLOP':>10} {'redund.':>7} {'min MB':>7} {'halo MB':>7} "
             f"{'floor us: fp32-FMA':>18} {'tf32':>6} {'fp16':>6}  kernels"]
    for b in entry["blocks"]:
        g, m, f = b["geometry"], b["minimal"], b["floors_us"][gpu]
        executed = f"{2 * b['executed']['macs'] / 1e9:>10.3f}" if b["executed"] else f"{'n/a':>10}"
        redundancy = f"{b['redundancy']:>6.1f}x" if b["redundancy"] else f"{'n/a':>7}"
        lines.append(
            f"L{b['level']:<4} {b['block'][:30]:<30} {str(g['H']) + 'x' + str(g['W']):<9} {g['P']:>7} "
            f"{2 * m['macs'] / 1e9:>9.3f} {executed} {redundancy} {m['bytes'] / 1e6:>7.2f} "
            f"{m['halo_bytes'] / 1e6:>7.2f} {f['fp32_fma']:>18.1f} {f['tf32_tensor']:>6.1f} "
            f"{f['fp16_tensor']:>6.1f}  {','.join('#' + str(i) for i in b['kernels'])}")
    return lines


def print_report(entry: dict, gpu: str) -> None:
    spec = GPUS[gpu]
    train = entry["train"]
    if train:       # reports before 2026-11-29 recorded one batch ("batch")
        batches = "/".join(str(b) for b in train.get("batches", [train.get("batch")]))
        step = f"  (+ train steps at batch {batches}, {train['size'][0]}x{train['size'][1]})"
    else:
        step = ""
    print(f"\n== {entry['model']}  {entry['size'][0]}x{entry['size'][1]}  batch {entry['batch']}  "
          f"{entry['dtype']}{step}  {entry['launches']} launches ==")
    print("Kernels (sm_90a, static SASS instruction counts; warps/SM on an H100):")
    print("\n".join(kernel_table(entry)))
    print(f"Blocks ({spec['name']}: {spec['bandwidth'] / 1e12:.2f} TB/s; dense peaks fp32 FMA "
          f"{spec['fp32_fma'] / 1e12:g}, tf32 {spec['tf32_tensor'] / 1e12:g}, fp16/bf16 "
          f"{spec['fp16_tensor'] / 1e12:g} TFLOP/s; floor = max(bytes/BW, FLOPs/peak)):")
    print("\n".join(block_table(entry, gpu)))


def _versions() -> dict:
    import torch
    import triton
    import hyperseg
    return dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                hyperseg=hyperseg.__version__)


def _set_up_environment(args):
    """Real JIT functions (no interpreter) and the Triton cache chosen on the command line; must
    run before anything imports triton. Returns the temporary cache it made, if any."""
    if os.environ.pop("TRITON_INTERPRET", "0") not in ("", "0"):
        _progress("TRITON_INTERPRET unset for this run (the report needs real JIT functions)")
    if args.cache_dir:
        os.environ["TRITON_CACHE_DIR"] = args.cache_dir
    elif not args.reuse_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="kernel-report-cache-")
        return os.environ["TRITON_CACHE_DIR"]
    return None


def _finish(report: dict, args) -> int:
    """Evaluate CHECKS, print the verdict, write the JSON; the exit status."""
    failures = failed_checks(report)
    report["failed_checks"] = failures
    checks = ", ".join(" ".join(map(str, c)) for c in CHECKS)
    train_checks = ", ".join(" ".join(map(str, c)) for c in TRAIN_CHECKS)
    block_checks = ", ".join(" ".join(map(str, c)) for c in BLOCK_CHECKS)
    print(f"\nTotal {report['wall_s']:.1f} s; checks ({checks}) on inference kernels, "
          f"({train_checks}) on training-step kernels, ({block_checks}) on blocks: "
          f"{'all pass' if not failures else str(len(failures)) + ' failed'}")
    for failure in failures:
        print(f"  FAILED {failure}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if args.check and failures else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        try:
            with open(args.from_json) as f:
                report = json.load(f)
            report["reports"]
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise SystemExit(f"kernel_report.py: --from-json {args.from_json}: not a readable "
                             f"report ({type(error).__name__}: {error})")
        for entry in report["reports"]:
            print_report(entry, args.gpu)
        return _finish(report, args)
    temporary_cache = _set_up_environment(args)
    import torch
    import hyperseg
    from kernel_sass import SM
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.allow_tf32 = not args.ieee        # what the fused fp32 kernels follow
    names = hyperseg.list_models(include_aliases=False) if args.model == "all" else [args.model]
    start = time.perf_counter()
    entries = []
    try:
        for name in names:
            for dtype in args.dtypes:
                entries.append(report_model(name, args, dtype))
                print_report(entries[-1], args.gpu)
    finally:
        if temporary_cache:
            shutil.rmtree(temporary_cache, ignore_errors=True)
    report = dict(tool="bench/kernel_report.py", command=sys.argv,
                  date=datetime.datetime.now().isoformat(timespec="seconds"), versions=_versions(),
                  target="cuda sm_90 (sm_90a PTX), warp 32", fp32_dots="ieee" if args.ieee else "tf32",
                  assumptions=dict(gpus=GPUS, printed_gpu=args.gpu, sm=SM, peaks=PEAKS,
                                   dtype_bytes=DTYPE_BYTES),
                  checks=[list(c) for c in CHECKS], train_checks=[list(c) for c in TRAIN_CHECKS],
                  block_checks=[list(c) for c in BLOCK_CHECKS],
                  reports=entries,
                  wall_s=round(time.perf_counter() - start, 1))
    return _finish(report, args)


if __name__ == "__main__":
    sys.exit(main())
