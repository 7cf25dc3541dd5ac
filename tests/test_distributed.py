"""DDP under torchrun on CPU (gloo): two ranks train a few steps and end with identical
parameters, equal to one process accumulating the same two micro-batches per step."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hyperseg
from hyperseg.datasets import open_dataset
from hyperseg.evaluate import evaluate, evaluation_dataset
from hyperseg.train import RunOptions, make_config, train

WORKER = Path(__file__).with_name("distributed_worker.py")
MODEL, DATA = "hyperseg-m", "synthetic:16,size=64,classes=3"
OVERRIDES = {"epochs": 1, "batch_size": 4}          # 4 steps; 2 images per rank and step


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), str(out), MODEL, DATA, json.dumps(OVERRIDES)],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_both_ranks_end_with_identical_parameters(two_ranks):
    out, result = two_ranks
    rank0 = load_file(str(out / "rank0.safetensors"))
    rank1 = load_file(str(out / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    for name in rank0:                       # parameters, and BatchNorm buffers (synchronised)
        assert torch.equal(rank0[name], rank1[name]), name
    saved = load_file(str(out / "latest.safetensors"))
    assert all(torch.equal(saved[name], rank0[name]) for name in saved)
    # rank 0 alone logs and writes
    assert result.stdout.count("training hyperseg-m-cityscapes") == 1
    assert "2 process(es) x 1 x 2" in result.stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_validation_is_sharded_and_reduced_over_the_ranks(two_ranks):
    out, _ = two_ranks
    logged = json.loads((out / "metrics.jsonl").read_text())
    model = hyperseg.load(out / "latest.safetensors")
    val = open_dataset(DATA, "val")
    matrix = evaluate(model, evaluation_dataset(val, "synthetic", model.config), batch_size=2,
                      quiet=True)
    assert matrix.total == len(val) * 64 * 64
    assert logged["miou"] == pytest.approx(matrix.miou(), abs=1e-9)
    assert logged["pixel_accuracy"] == pytest.approx(matrix.pixel_accuracy(), abs=1e-9)


def test_two_ranks_equal_one_process_accumulating_two_micro_batches(two_ranks, tmp_path):
    """Without SyncBatchNorm (which torch runs on GPUs only) BatchNorm normalises each
    micro-batch; one process with --accumulate 2 sees the very same micro-batches, so the
    parameters agree up to float reduction order. (BatchNorm running statistics differ: DDP keeps
    rank 0's, accumulation updates them with both micro-batches.)

    Both runs use one thread: Adam turns the rounding differences of another thread count into
    updates of +-lr on parameters whose gradients are ~1e-10 (e.g. BatchNorm biases whose effect
    a following BatchNorm cancels), which would make the comparison meaningless."""
    out, _ = two_ranks
    config = make_config(MODEL, DATA, dict(OVERRIDES, accumulate=2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(config, str(tmp_path), options=RunOptions(workers=0, quiet=True,
                                                                   log=lambda m: None))
    finally:
        torch.set_num_threads(threads)
    rank0 = load_file(str(out / "rank0.safetensors"))
    torch.manual_seed(config.seed)                           # the runs' initialisation
    initial = hyperseg.build(MODEL, num_classes=3)
    moved = 0
    for name, parameter in single.named_parameters():
        torch.testing.assert_close(parameter.detach(), rank0[name], rtol=1e-5, atol=1e-7,
                                   msg=name)
        moved += not torch.equal(rank0[name], initial.state_dict()[name])
    assert moved > 300                                     # the runs did train
    ddp_loss = json.loads((out / "metrics.jsonl").read_text())["loss"]
    single_loss = json.loads((tmp_path / "metrics.jsonl").read_text())["loss"]
    assert ddp_loss == pytest.approx(single_loss, rel=1e-5)
