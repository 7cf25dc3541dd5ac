"""The headline benchmark (bench/profile_kernels.py) runs end to end on CPU and writes every figure."""
import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hyperseg

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "profile_kernels.py"
CPU_TARGETS = {"decoder torch >= 1.5x official (sum of blocks)",
               "whole torch no slower than official decoder",
               "decoder extra memory torch <= 0.5x official"}


def _run(args, tmp_path, interpret=False):
    out = tmp_path / "out.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)       # the script sets it itself for --interpret
    # One thread: on a shared 2-core machine two OpenMP threads stall badly whenever another
    # process holds a core, which only makes the test slow.
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--threads", "1",
           "--json", str(out)] + args
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    with open(out) as f:
        return json.load(f), proc.stdout


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_context(rec, dtype="fp32"):
    assert rec["device"] and rec["device_type"] == "cpu"
    assert rec["dtype"] == dtype
    assert rec["batch"] == 1
    for name in ("torch", "triton", "timm", "hyperseg"):
        assert rec["versions"][name], name


def test_quick_cpu_run_reports_every_block(tmp_path):
    data, stdout = _run([], tmp_path)
    assert "CPU timings use 1 torch thread(s)" in stdout
    assert "at other sizes they are indicative only" in stdout      # --quick is 128x256
    name = "hyperseg-m-cityscapes"
    levels = hyperseg.get_config(name).levels
    blocks = [r for r in data["blocks"] if r["model"] == name]
    assert sorted({r["level"] for r in blocks}) == list(range(levels))
    for level in range(levels):
        by_variant = {r["variant"]: r for r in blocks if r["level"] == level}
        assert {"torch", "official"} <= set(by_variant)
        assert "triton" not in by_variant                # no GPU, no --interpret
        for rec in by_variant.values():
            _check_context(rec)
            assert rec["image_size"] == [128, 256]
            assert len(rec["input_shape"]) == 4 and len(rec["output_shape"]) == 4
            assert _positive(rec["median_ms"])
            assert all(_positive(t) for t in rec["times_ms"])
            assert _positive(rec["bytes"]) and rec["bytes"] == sum(rec["bytes_detail"].values())
            assert _positive(rec["gb_s"]) and _positive(rec["pct_peak_bw"])
            assert _positive(rec["flops"]) and _positive(rec["tflop_s"])
            assert isinstance(rec["extra_memory_bytes"], int) and rec["extra_memory_bytes"] >= 0
            assert rec["meaningful"] is True and rec["correct"] is True
            assert rec["max_abs_err"] <= 1e-4 * rec["ref_scale"]
    assert data["peak_bandwidth"]["source"] == "measured copy bandwidth"
    assert _positive(data["peak_bandwidth"]["gb_s"])

    whole = {r["backend"]: r for r in data["whole_model"] if r["model"] == name}
    assert {"torch", "official"} <= set(whole)
    for rec in whole.values():
        _check_context(rec)
        assert _positive(rec["fps"]) and _positive(rec["median_ms"])
        assert all(_positive(v) for v in rec["stages_ms"].values())
        assert _positive(rec["peak_memory_bytes"])

    targets = data["targets"]
    assert {t["target"] for t in targets} == CPU_TARGETS
    for t in targets:
        _check_context(t)
        assert t["status"] in ("met", "missed")
        assert _positive(t["measured"])
        assert (t["status"] == "missed") == ("cause" in t)
    assert "Triton timings need a GPU" in stdout
    assert data["failures"] == []


def test_quick_interpret_checks_triton_blocks(tmp_path):
    name = "hyperseg-s-camvid"
    data, stdout = _run(["--interpret", "--model", name, "--size", "64x64", "--repeats", "1"],
                        tmp_path)
    assert data["settings"]["interpret"] is True
    levels = hyperseg.get_config(name).levels
    triton = [r for r in data["blocks"] if r["variant"] == "triton"]
    assert sorted(r["level"] for r in triton) == list(range(levels))
    for rec in triton:
        _check_context(rec)
        assert rec["meaningful"] is False
        assert rec["correct"] is True
        assert rec["max_abs_err"] <= 1e-4 * max(1.0, rec["ref_scale"])
    for variant in ("torch", "official"):
        assert len([r for r in data["blocks"] if r["variant"] == variant]) == levels
    whole = {r["backend"]: r for r in data["whole_model"]}
    assert whole["triton"]["meaningful"] is False
    assert whole["triton"]["max_abs_err_vs_torch"] <= whole["triton"]["err_bound"]
    assert "interp" in stdout
    assert data["failures"] == []


def test_train_step_refuses_cpu_without_the_interpreter():
    """bench/train_step.py times the triton backend, which on CPU runs only interpreted: without
    --interpret it says so and exits 2, before building anything."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--device", "cpu",
                           "--quick"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--interpret" in proc.stderr


def _bench_module(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_step_module():
    return _bench_module("train_step")


def test_train_step_counts_the_memory_a_module_keeps_for_backward():
    """SavedBytes counts each distinct storage autograd saves inside the module's forward once,
    and nothing saved outside it."""
    import torch
    train_step = _train_step_module()
    inner = torch.nn.Linear(64, 32)
    outer = torch.nn.Sequential(inner, torch.nn.Tanh())
    x = torch.randn(16, 64, requires_grad=True)
    with train_step.SavedBytes(inner) as meter:
        y = outer(x)                       # Linear saves x and its weight; Tanh (outside) its output
        (x * 2).sum()
    expected = (x.numel() + inner.weight.numel()) * 4
    assert meter.mib * 2 ** 20 == expected
    y.sum().backward()                     # the hooks leave autograd working
    assert x.grad is not None and inner.weight.grad is not None


def test_train_step_gradient_check_allows_the_references_own_rounding_only():
    """bench/train_step.py: a triton-vs-torch gradient error passes within the tolerance, or,
    where the reference itself is that far from float64 (rounding-dominated gradients), within
    3x that distance; anything beyond fails."""
    train_step = _train_step_module()
    check = train_step.gradient_check
    assert check({"a": 5e-4, "b": 1e-5}, None, 1e-3) == (True, 0.5)
    assert check({"a": 2e-3}, None, 1e-3)[0] is False
    assert check({"a": 2e-2}, {"a": 1e-2}, 1e-3)[0] is True        # reference off by 1e-2 itself
    assert check({"a": 2e-2, "b": 2e-2}, {"a": 1e-2, "b": 1e-4}, 1e-3)[0] is False


def test_official_speed_errors_and_options_need_no_official_clone(tmp_path, capsys):
    """bench/official_speed.py runs against a local clone of the official code, absent here: its
    error is relative to max(1, max |reference|), and --compile (a whole-model variant) is refused
    with --no-whole before the clone is read."""
    import torch
    official_speed = _bench_module("official_speed")
    err, rel = official_speed.max_error(torch.tensor([0.6, -4.2]), torch.tensor([0.5, -4.0]))
    assert math.isclose(err, 0.2, rel_tol=1e-5) and math.isclose(rel, 0.05, rel_tol=1e-5)
    err, rel = official_speed.max_error(torch.tensor([0.25, 0.0]), torch.tensor([0.5, 0.0]))
    assert err == rel == 0.25                  # max |reference| below 1: the error itself
    with pytest.raises(SystemExit) as exit_info:
        official_speed.main(["--official", str(tmp_path / "absent"), "--compile", "--no-whole"])
    assert exit_info.value.code == 2
    # a folder that is not the official clone: a clear error before any model is built
    with pytest.raises(SystemExit) as exit_info:
        official_speed.main(["--official", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "not a clone of github.com/YuvalNirkin/hyperseg" in capsys.readouterr().err


def test_train_step_collects_the_interpreters_cycles_only_within():
    """bench/train_step.py's CPU peak: within ``interpreter_cycles_collected`` every interpreted
    launch is followed by a garbage collection (its argument-copy closures form a reference cycle
    holding the launch's tensors); outside, Triton's interpreter is as it was."""
    from triton.runtime.interpreter import GridExecutor
    train_step = _train_step_module()
    original = GridExecutor.__call__
    with train_step.interpreter_cycles_collected():
        assert GridExecutor.__call__ is not original
    assert GridExecutor.__call__ is original


def _stand_in(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.mark.parametrize("xdist", [True, False])
def test_gpu_check_script_brings_back_every_figure(tmp_path, xdist):
    """bench/gpu_check.sh (the prepared GPU run), with stand-ins for python, pip and nvidia-smi:
    every step runs in order, each measurement's JSON is written under $OUT, the log records each
    step's exit status (a failing step does not stop the next), the device tool's limit of 8
    files holds, and the timeouts add up to under 7 minutes. The tests run on 8 pytest-xdist
    workers test by test, or without xdist (and without pyproject's "-n auto") where it is
    missing."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    _stand_in(bin_dir, "nvidia-smi", 'echo "NVIDIA H200"\n')
    _stand_in(bin_dir, "pip", 'echo "pip $*"\n')
    # python writes the file after --json and fails the pytest step (exit 1); "import xdist"
    # succeeds or fails as the case says
    _stand_in(bin_dir, "python", '[ "$1" = -c ] && case "$2" in *xdist*) '
              f'exit {0 if xdist else 1};; esac\n'
              'echo "python $*"\n'
              'prev=""; for a in "$@"; do [ "$prev" = --json ] && echo "{}" > "$a"; prev=$a; done\n'
              '[ "$2" = pytest ] && exit 1\nexit 0\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "OUT": str(out), "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    assert files == sorted(["log.txt"] + [f"{stem}-NVIDIA-H200-{day}{tail}.json" for stem, tail in [
        ("train-step", "-fp16-b16"), ("train-step", "-fp32"), ("bench", "-hyperseg-m"),
        ("bench", "-hyperseg-m-tf32"), ("bench", "-all")]]), files
    log = (out / "log.txt").read_text()
    steps = [line.split()[1].rstrip(":") for line in log.splitlines()
             if line.startswith("=== ") and " exit " in line]
    assert steps == ["install", "tests", "train-fp16-b16", "train-fp32", "bench-hyperseg-m",
                     "bench-tf32", "bench-all"], log
    assert "=== tests: exit 1" in log and "=== bench-all: exit 0" in log
    assert "python bench/train_step.py --amp fp16 --batch 16" in log
    parallel = "-n 8 --dist load" if xdist else "-o addopts= -p no:xdist"
    assert f"python -m pytest -q -p no:cacheprovider {parallel} tests/" in log
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    timeouts = [int(line.split()[2]) for line in script.splitlines() if line.startswith("step ")]
    assert len(timeouts) == len(steps) and sum(timeouts) < 7 * 60, timeouts
