"""backend="auto" in training: the kernels only on a GPU class where a committed GPU run measured
them faster than the torch reference (``hyperseg.options.TRAINING_KERNELS_FASTER_ON``)."""
import glob
import json
import os
import types

import pytest
import torch

import hyperseg
from hyperseg import model as model_module
from hyperseg import options

RESULTS = os.path.join(os.path.dirname(__file__), "..", "bench", "results")


def _cuda_input(name, monkeypatch):
    """A stand-in for a CUDA batch on a GPU called ``name`` (only what resolve_backend reads)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(model_module, "triton_available", lambda: True)
    return types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), requires_grad=False)


def test_auto_trains_on_the_reference_where_no_gpu_run_proved_the_kernels(monkeypatch):
    monkeypatch.setattr(options, "TRAINING_KERNELS_FASTER_ON", ())
    net = hyperseg.build("hyperseg-s-camvid").train()
    assert net.resolve_backend(_cuda_input("NVIDIA H100 80GB HBM3", monkeypatch)) == "torch"
    assert net.resolve_backend(torch.zeros(1, 3, 64, 64)) == "torch"           # CPU
    with torch.no_grad():                                                        # inference
        assert net.eval().resolve_backend(_cuda_input("NVIDIA H100 80GB HBM3", monkeypatch)) == "triton"


def test_auto_trains_on_the_kernels_on_a_proven_gpu_class(monkeypatch):
    monkeypatch.setattr(options, "TRAINING_KERNELS_FASTER_ON", ("H100",))
    net = hyperseg.build("hyperseg-s-camvid").train()
    assert net.resolve_backend(_cuda_input("NVIDIA H100 80GB HBM3", monkeypatch)) == "triton"
    assert net.resolve_backend(_cuda_input("NVIDIA A100-SXM4-40GB", monkeypatch)) == "torch"
    assert net.resolve_backend(torch.zeros(1, 3, 64, 64)) == "torch"           # CPU never
    net.backend = "torch"
    assert net.resolve_backend(_cuda_input("NVIDIA H100 80GB HBM3", monkeypatch)) == "torch"


def _train_step_results():
    for path in sorted(glob.glob(os.path.join(RESULTS, "train-step-*.json"))):
        with open(path) as f:
            data = json.load(f)
        if str(data.get("device", "")).startswith("cpu"):
            continue
        yield path, data


def test_the_proven_gpu_classes_follow_the_committed_gpu_runs():
    """Every listed class has a committed GPU run where the kernels' step was faster, and every
    committed GPU run where they were faster names a listed class."""
    faster = [(p, d) for p, d in _train_step_results() if d.get("triton_speedup", 0) > 1.0]
    for gpu_class in options.TRAINING_KERNELS_FASTER_ON:
        assert any(gpu_class in d["device"] for _, d in faster), (
            f"{gpu_class} is in TRAINING_KERNELS_FASTER_ON without a committed GPU run showing "
            f"the kernels faster (bench/results/train-step-*.json)")
    for path, data in faster:
        assert any(c in data["device"] for c in options.TRAINING_KERNELS_FASTER_ON), (
            f"{path}: the kernels trained faster on {data['device']}; add its class to "
            f"options.TRAINING_KERNELS_FASTER_ON")
