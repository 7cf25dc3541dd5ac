"""The test set-up itself (conftest.py, fuzz_utils): pytest-xdist's workers and their threads, and
the kernel fuzz tally gathered from the workers into one summary."""
import collections
import os
import types

import torch

import conftest
import fuzz_utils


def test_one_worker_per_core_at_most_eight():
    assert [conftest.auto_workers(n) for n in (1, 2, 3, 8, 64)] == [1, 2, 3, 8, 8]


def test_workers_share_the_cores_out():
    assert conftest.torch_threads(2, 1) == 2          # no xdist: 2 threads, as before
    assert conftest.torch_threads(2, 2) == 1          # CI: 2 workers on 2 cores, 1 thread each
    assert conftest.torch_threads(16, 8) == 2
    assert conftest.torch_threads(1, 4) == 1
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    assert torch.get_num_threads() <= conftest.torch_threads(conftest.cpu_count(), workers)


def test_fuzz_tallies_of_the_workers_make_one_summary(monkeypatch):
    monkeypatch.setattr(fuzz_utils, "STATS", collections.defaultdict(collections.Counter))
    assert fuzz_utils.summary_lines() == []
    fuzz_utils.STATS["patch_conv2d"].update({"cases": 2, "dtype:float32": 2})
    worker = {"patch_conv2d": {"cases": 3, "mismatches": 1, "dtype:float32": 1, "dtype:float16": 2},
              "generate_weights": {"cases": 4, "errors": 1}}
    conftest.pytest_testnodedown(types.SimpleNamespace(workeroutput={"kernel_fuzz": worker}), None)
    conftest.pytest_testnodedown(types.SimpleNamespace(workeroutput={}), None)   # no fuzz test ran
    conftest.pytest_testnodedown(types.SimpleNamespace(), "crashed")             # a lost worker
    assert fuzz_utils.summary_lines() == [
        "generate_weights: 4 cases, 0 mismatches, 1 errors",
        "patch_conv2d: 5 cases, 1 mismatches, 0 errors (dtype:float16 2, dtype:float32 3)",
        "all ops: 9 cases, 1 mismatches, 1 errors",
    ]
    assert fuzz_utils.tally()["patch_conv2d"]["cases"] == 5


def test_a_worker_hands_its_tally_over(monkeypatch):
    monkeypatch.setattr(fuzz_utils, "STATS", collections.defaultdict(collections.Counter))
    fuzz_utils.STATS["meta_patch_conv"]["cases"] += 1
    config = types.SimpleNamespace(workeroutput={})
    conftest.pytest_sessionfinish(types.SimpleNamespace(config=config))
    assert config.workeroutput == {"kernel_fuzz": {"meta_patch_conv": {"cases": 1}}}
    conftest.pytest_sessionfinish(types.SimpleNamespace(config=types.SimpleNamespace()))  # no xdist
