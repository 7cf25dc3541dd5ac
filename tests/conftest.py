"""Test set-up: run Triton kernels through the interpreter when no GPU is present (made faster by
``interpreter_utils``); share the CPU out among pytest-xdist's workers; gather the kernel fuzz
tally from them.

``TRITON_INTERPRET`` must be set before anything imports triton; conftest.py is imported by pytest
before any test module, so setting it here is early enough.

``pytest tests/`` runs on pytest-xdist (``-n auto --dist loadscope`` in pyproject.toml): one worker
process per CPU core, at most ``MAX_WORKERS``, each module's tests on one worker (so that a
module-scoped fixture is built once). ``-n 0`` runs everything in this process (needed with ``-s``,
whose output the workers do not show); ``-n N`` sets the number of workers.
"""
import os

import pytest
import torch

import fuzz_utils
import interpreter_utils

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    interpreter_utils.install()      # the same results, about twice as fast

# More workers than this buy little (a module runs on one worker, and the slowest take a minute or
# two each) and cost memory: each worker holds its own torch and the models its tests build.
MAX_WORKERS = 8


def cpu_count() -> int:
    """The cores this process may run on (a container's limit, where it sets an affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:          # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def auto_workers(cores: int) -> int:
    """pytest-xdist workers for ``-n auto``: one per core, at most MAX_WORKERS."""
    return max(1, min(cores, MAX_WORKERS))


def torch_threads(cores: int, workers: int) -> int:
    """Torch threads per test process: at most 2, and the cores shared out among the workers, so
    that their OpenMP threads do not outnumber the cores (an oversubscribed OpenMP team stalls
    whenever another process holds a core)."""
    return max(1, min(2, cores // max(1, workers)))


torch.set_num_threads(min(torch.get_num_threads(), torch_threads(
    cpu_count(), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    return auto_workers(cpu_count())


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:                 # a pytest-xdist worker: hand the tally over
        workeroutput["kernel_fuzz"] = fuzz_utils.tally()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    fuzz_utils.merge(getattr(node, "workeroutput", {}).get("kernel_fuzz", {}))


def pytest_terminal_summary(terminalreporter):
    lines = fuzz_utils.summary_lines()
    if lines:
        terminalreporter.section(f"kernel fuzz, {fuzz_utils.PROFILE} profile")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _exact_float32():
    """float32 means float32 in the tests: no tf32 in cuDNN, cuBLAS or the fused kernels (which
    follow ``torch.backends.cudnn.allow_tf32``); tests of tf32 switch it on themselves."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


_DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16",
              torch.bfloat16: "bf16"}


def pytest_make_parametrize_id(config, val, argname):
    """Readable ids for parametrised cases: a (2, 3) grid is ``grid2x3`` (not ``grid0``), a
    dtype ``fp32``, a bool ``contiguous`` / ``not-contiguous``; other values keep pytest's id."""
    if isinstance(val, (tuple, list)) and val and all(isinstance(v, int) for v in val):
        return f"{argname}{'x'.join(map(str, val))}"
    if isinstance(val, torch.dtype):
        return _DTYPE_IDS.get(val, str(val).replace("torch.", ""))
    if isinstance(val, bool):
        return argname if val else f"not-{argname}"
    return None
