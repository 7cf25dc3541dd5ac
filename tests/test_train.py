"""Training and evaluation: recipes, schedule, sampler, a short synthetic run that learns, exact
resume, the train / eval commands and their errors."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import hyperseg
from hyperseg.__main__ import main
from hyperseg.datasets import parse_data_spec
from hyperseg.train import (RECIPES, RunOptions, StepBatchSampler, TrainConfig, TrainError,
                            make_config, poly_schedule, read_state, train)

# A learnable toy problem: 64x64 images with three kinds of large coloured shapes + background.
LEARN_DATA = "synthetic:100,size=64,classes=4,seed=0"
LEARN_STEPS = dict(epochs=8, batch_size=4)          # 8 x 25 = 200 steps
MIOU_BOUND = 0.6                                     # measured 0.74: see test_short_run_learns
TINY_DATA = "synthetic:16,size=64,classes=3"


def _read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _quiet():
    return RunOptions(workers=0, quiet=True, log=lambda message: None)


# -- recipes, schedule, sampler -----------------------------------------------------------------

def test_recipes_are_the_official_configurations():
    m = RECIPES["hyperseg-m-cityscapes"]
    assert (m.epochs, m.epoch_size, m.batch_size, m.lr, m.betas, m.poly_power, m.crop,
            m.scale_range, m.loss) == (360, 4000, 16, 1e-3, (0.5, 0.999), 0.9, (512, 1024),
                                       (0.25, 2.0), "bootstrapped_ce")
    voc = RECIPES["hyperseg-l-voc"]
    assert (voc.lr, voc.poly_power, voc.schedule, voc.loss, voc.batch_size, voc.epoch_size,
            voc.rotation, voc.pad) == (1e-4, 3.0, "epoch", "ce", 32, 20000, 30.0, "bottom-right")
    assert RECIPES["hyperseg-s-camvid"].batch_size == 2
    assert set(RECIPES) == set(hyperseg.list_models(include_aliases=False))
    config = make_config("hyperseg-s", "cityscapes:/data", {"lr": 5e-4, "crop": (256, 256)})
    assert config.model == "hyperseg-s-cityscapes" and config.recipe.lr == 5e-4
    assert config.recipe.crop == (256, 256) and config.recipe.color_jitter == 0.25
    synthetic = make_config("hyperseg-m", "synthetic:32,size=64x96", {})
    assert synthetic.recipe.crop == (64, 96) and synthetic.recipe.epoch_size == 32
    assert synthetic.recipe.pretrained_backbone is False
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_poly_schedule_matches_the_official_formula():
    config = make_config("hyperseg-m", TINY_DATA, {"epochs": 3, "batch_size": 4, "poly_power": 2.0})
    factor = poly_schedule(config)                         # 4 steps per epoch, 12 in all
    assert [factor(t) for t in (0, 3, 6, 12, 13)] == pytest.approx(
        [1.0, (1 - 3 / 12) ** 2, (1 - 6 / 12) ** 2, 0.0, 0.0])
    by_epoch = poly_schedule(make_config("hyperseg-l-voc", TINY_DATA,
                                         {"epochs": 3, "batch_size": 4}))   # power 3, per epoch
    assert [by_epoch(t) for t in (0, 3, 4, 7, 8)] == pytest.approx(
        [1.0, 1.0, (2 / 3) ** 3, (2 / 3) ** 3, (1 / 3) ** 3])
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3 * (1 - 3 / 12) ** 2)


def test_sampler_splits_each_step_the_same_way_whatever_the_world_size():
    def batches(world, accumulate, rank=0):
        sampler = StepBatchSampler(10, 3, 4, accumulate, rank, world, seed=7)
        sampler.set_position(epoch=1)
        return list(sampler)

    single = batches(1, 2)                         # 3 steps x 2 micro-batches of 2
    ranks = [batches(2, 1, rank) for rank in (0, 1)]
    assert len(single) == 6 and all(len(b) == 2 for b in single)
    assert single[0::2] == ranks[0] and single[1::2] == ranks[1]
    assert batches(1, 1) == [single[0] + single[1], single[2] + single[3], single[4] + single[5]]
    keys = [k for b in single for k in b]
    assert len({i for i, _ in keys}) == 10       # 12 draws: a full permutation first
    sampler = StepBatchSampler(10, 3, 4, 2, 0, 1, seed=7)
    sampler.set_position(epoch=1, step=2)
    assert list(sampler) == single[4:] and len(sampler) == 2
    sampler.set_position(epoch=2)
    assert list(sampler) != single
    with pytest.raises(TrainError, match="not divisible"):
        train(make_config("hyperseg-m", TINY_DATA, {"batch_size": 6, "accumulate": 4}), "unused")


# -- a short run learns -------------------------------------------------------------------------

def test_short_run_learns(tmp_path, capsys):
    """200 steps of batch 4 on 64x64 synthetic shapes (about 35 s on 2 CPU cores). Measured with
    seed 0: the mean training loss falls from 1.25 (first epoch) to 0.68 (last), and the held-out
    mIoU reaches 0.74 (pixel accuracy 0.91); with data and training seeds 1, 2, 3: mIoU 0.81,
    0.90, 0.81. Evaluation (eval mode) lags the training loss at first, because the backbone's
    BatchNorm statistics move with the official momentum of 0.01."""
    out = tmp_path / "run"
    config = make_config("hyperseg-m", LEARN_DATA, LEARN_STEPS)
    model = train(config, str(out), options=_quiet())
    metrics = _read_metrics(out)
    assert [m["step"] for m in metrics] == [25 * (i + 1) for i in range(8)]
    assert metrics[-1]["loss"] < 0.7 * metrics[0]["loss"]
    assert metrics[-1]["miou"] > MIOU_BOUND
    assert metrics[-1]["lr"] == 0.0 and not model.training
    # best.safetensors is the best validation epoch; eval on the held-out split agrees with it
    best = max(metrics, key=lambda m: m["miou"])
    report = tmp_path / "eval.json"
    assert main(["eval", "--weights", str(out / "best.safetensors"), "--data", LEARN_DATA,
                 "--json", str(report), "--batch-size", "4", "--workers", "0", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "mIoU" in table and "ellipse-2" in table and "pixel accuracy" in table
    result = json.loads(report.read_text())
    assert result["split"] == "val" and result["images"] == 32
    assert result["miou"] == pytest.approx(best["miou"], abs=1e-9)
    assert result["pixel_accuracy"] == pytest.approx(best["pixel_accuracy"], abs=1e-9)
    assert set(result["per_class_iou"]) == {"background", "rectangle-1", "ellipse-2", "triangle-3"}


# -- resume ---------------------------------------------------------------------------------------

def _train_cli(out, *extra):
    return main(["train", "--model", "hyperseg-m", "--data", TINY_DATA, "--out", str(out),
                 "--epochs", "3", "--batch-size", "4", "--val-split", "none", "--workers", "0",
                 "--quiet", *extra])


def test_resume_continues_exactly(tmp_path):
    """5 steps, stop (inside epoch 2), resume to 9 == 9 steps in one go."""
    assert _train_cli(tmp_path / "split", "--steps", "5") == 0
    state = read_state(str(tmp_path / "split/latest_state.pt"), torch.device("cpu"))
    assert state["step"] == 5 and state["epoch"] == 1
    stopped = load_file(str(tmp_path / "split/latest.safetensors"))
    assert main(["train", "--out", str(tmp_path / "split"), "--resume", "--steps", "9",
                 "--quiet", "--workers", "0"]) == 0
    assert _train_cli(tmp_path / "once", "--steps", "9") == 0
    resumed = load_file(str(tmp_path / "split/latest.safetensors"))
    once = load_file(str(tmp_path / "once/latest.safetensors"))
    assert resumed.keys() == once.keys()
    for name in once:
        torch.testing.assert_close(resumed[name], once[name], rtol=1e-5, atol=1e-6, msg=name)
    assert sum(not torch.equal(stopped[n], resumed[n]) for n in once) > len(once) // 2
    a = read_state(str(tmp_path / "split/latest_state.pt"), torch.device("cpu"))
    b = read_state(str(tmp_path / "once/latest_state.pt"), torch.device("cpu"))
    assert a["step"] == b["step"] == 9
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 9
    for key, value in b["optimizer"]["state"].items():
        torch.testing.assert_close(a["optimizer"]["state"][key]["exp_avg"], value["exp_avg"],
                                   rtol=1e-4, atol=1e-7)
    steps = [m["step"] for m in _read_metrics(tmp_path / "split")]
    assert steps == [4, 5, 8, 9]


def test_training_state_is_plain_tensors_and_a_foreign_object_is_refused(tmp_path):
    assert _train_cli(tmp_path / "run", "--steps", "1", "--amp", "bf16") == 0
    state = torch.load(tmp_path / "run/latest_state.pt", weights_only=True)
    assert set(state) >= {"optimizer", "scheduler", "scaler", "rng", "step", "best_miou"}
    assert math.isfinite(_read_metrics(tmp_path / "run")[0]["loss"])
    torch.save({"format": "hyperseg-train-state", "version": 1, "payload": TrainConfig},
               tmp_path / "evil.pt")
    with pytest.raises(TrainError, match="cannot read the training state"):
        read_state(str(tmp_path / "evil.pt"), torch.device("cpu"))
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(TrainError, match="not a hyperseg training state"):
        read_state(str(tmp_path / "other.pt"), torch.device("cpu"))


# -- errors -------------------------------------------------------------------------------------

def test_train_errors_are_reported_clearly(tmp_path, capsys):
    def fails(args, message):
        command = ["train", "--out", str(tmp_path / "run"), "--quiet", "--workers", "0"]
        assert main(command + args) == 2
        err = capsys.readouterr().err
        assert message in err, err

    fails(["--model", "hyperseg-m", "--data", f"cityscapes:{tmp_path / 'missing'}"],
          f"cityscapes: the dataset folder '{tmp_path / 'missing'}' does not exist (expected "
          f"<root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png")
    (tmp_path / "camvid/train").mkdir(parents=True)
    fails(["--model", "hyperseg-s-camvid", "--data", f"camvid:{tmp_path / 'camvid'}"],
          "has no label folder: expected")
    fails(["--model", "hyperseg-m", "--data", "kitti:/data"], "unknown dataset 'kitti'")
    fails(["--data", TINY_DATA], "give --model NAME (or --weights FILE) and --data SPEC")
    fails(["--model", "hyperseg-x", "--data", TINY_DATA], "unknown model name 'hyperseg-x'")
    fails(["--model", "hyperseg-m", "--data", TINY_DATA, "--sync-bn"], "--sync-bn needs CUDA")
    fails(["--model", "hyperseg-m", "--data", TINY_DATA, "--num-classes", "2"],
          "dataset has 3 classes but the model would have 2")
    fails(["--model", "hyperseg-m", "--data", TINY_DATA, "--batch-size", "3", "--accumulate", "2"],
          "batch size 3 is not divisible by 1 process(es) x 2 accumulation step(s)")
    fails(["--model", "hyperseg-m", "--data", TINY_DATA, "--epoch-size", "2"],
          "epoch_size (2) is smaller than one batch (8)")
    fails(["--resume"], "holds no run to resume (no run.json)")
    assert _train_cli(tmp_path / "run", "--steps", "1") == 0
    fails(["--model", "hyperseg-m", "--data", TINY_DATA], "already holds a run (latest_state.pt)")
    fails(["--resume", "--lr", "0.1"], "its lr is 0.001, not 0.1")
    fails(["--resume", "--data", "synthetic:16,size=96"], "trains on synthetic:16,size=64x64")
    fails(["--resume", "--model", "hyperseg-s"], "trains hyperseg-m-cityscapes, not hyperseg-s")
    (tmp_path / "run/latest_state.pt").write_bytes(b"garbage")
    fails(["--resume", "--steps", "2"], "cannot read the training state")


def test_eval_errors_are_reported_clearly(tmp_path, capsys):
    def fails(args, message):
        assert main(["eval", "--quiet", "--workers", "0"] + args) == 2
        err = capsys.readouterr().err
        assert message in err, err

    fails(["--data", TINY_DATA], "give --weights FILE, or --model NAME --pretrained")
    fails(["--model", "hyperseg-m", "--data", f"voc:{tmp_path}"], "no JPEGImages folder")
    fails(["--model", "hyperseg-m", "--data", "synthetic:16,size=64", "--split", "holdout"],
          "unknown split 'holdout'")
    model = hyperseg.build("hyperseg-m", num_classes=2)
    hyperseg.save(model, tmp_path / "two.safetensors")
    fails(["--weights", str(tmp_path / "two.safetensors"), "--data", TINY_DATA],
          "labels have 3 classes but hyperseg-m-cityscapes predicts 2")


def test_eval_command_with_tta_on_an_untrained_model(tmp_path, capsys):
    report = tmp_path / "r.json"
    assert main(["eval", "--model", "hyperseg-m", "--data", "synthetic:16,size=64,classes=3",
                 "--tta", "flip", "--json", str(report), "--workers", "0", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "RANDOMLY INITIALISED" in captured.err and "mIoU" in captured.out
    result = json.loads(report.read_text())
    assert result["tta"] == "flip" and len(result["confusion_matrix"]) == 19
    assert sum(map(sum, result["confusion_matrix"])) == result["labelled_pixels"] == 32 * 64 * 64
    assert parse_data_spec(result["data"]).length == 16


def test_eval_on_a_camvid_folder_scores_full_resolution_labels(tmp_path, capsys):
    """Resize preprocessing: the images are segmented at --size and the logits resized back to
    the 48x72 labels; multi-scale TTA; CamVid also reports mIoU without Void."""
    root, rng = tmp_path / "camvid", np.random.default_rng(0)
    (root / "test").mkdir(parents=True)
    (root / "testannot").mkdir()
    for i in range(2):
        image = rng.integers(0, 256, (48, 72, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / f"test/f{i}.png")
        labels = rng.integers(0, 12, (48, 72)).astype(np.uint8)
        labels[0] = 255
        Image.fromarray(labels).save(root / f"testannot/f{i}.png")
    report = tmp_path / "camvid.json"
    assert main(["eval", "--model", "hyperseg-s-camvid", "--data", f"camvid:{root}", "--size",
                 "64x64", "--tta", "ms", "--tta-scales", "1,1.5", "--json", str(report),
                 "--workers", "0", "--quiet"]) == 0
    result = json.loads(report.read_text())
    assert result["split"] == "test" and result["images"] == 2 and result["tta"] == "ms"
    assert result["labelled_pixels"] == 2 * 47 * 72
    assert "Void" in result["per_class_iou"] and result["miou_without_void"] is not None
    assert "mIoU without Void" in capsys.readouterr().out


# -- a new user's first runs ----------------------------------------------------------------------

def test_a_short_run_validates_when_it_stops_and_says_what_it_wrote(tmp_path, capsys):
    """--steps stops inside the first epoch: the run still validates, so best.safetensors exists
    for `hyperseg eval`, and its last line names the files. With stderr not a terminal (as
    here) progress lines replace the bar; --quiet drops them, not the header and epoch lines."""
    out = tmp_path / "run"
    common = ["--workers", "0"]
    assert main(["train", "--model", "hyperseg-m", "--data", TINY_DATA, "--out", str(out),
                 "--batch-size", "4", "--steps", "1", *common]) == 0
    captured = capsys.readouterr()
    assert "training hyperseg-m-cityscapes" in captured.out and "val mIoU" in captured.out
    assert f"{out / 'best.safetensors'} is the model of the best validation" in captured.out
    assert "Continue with: hyperseg train --out" in captured.out
    assert "epoch 1/10, step 1/4: loss" in captured.err
    assert (out / "best.safetensors").is_file()
    assert [m["step"] for m in _read_metrics(out)] == [1]
    assert "miou" in _read_metrics(out)[0]
    # without validation there is no best model, and the last line says which file to use
    assert main(["train", "--model", "hyperseg-m", "--data", TINY_DATA, "--out",
                 str(tmp_path / "noval"), "--batch-size", "4", "--steps", "1",
                 "--val-split", "none", "--quiet", *common]) == 0
    captured = capsys.readouterr()
    assert "training hyperseg-m-cityscapes" in captured.out
    assert "stopped in epoch 1/10 (step 1)" in captured.out
    assert "no validation (--val-split none), so no best.safetensors" in captured.out
    assert "step 1/4: loss" not in captured.err
    assert not (tmp_path / "noval/best.safetensors").exists()


def test_failed_runs_leave_nothing_behind(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"

    def fails(args, message, code=2):
        assert main(["train", "--out", str(out), "--quiet", "--workers", "0"] + args) == code
        err = capsys.readouterr().err
        assert message in err, err
        assert not out.exists()

    fails(["--model", "hyperseg-m", "--data", f"cityscapes:{tmp_path / 'missing'}"],
          "does not exist")
    fails(["--model", "hyperseg-m", "--data", TINY_DATA, "--weights", str(tmp_path / "w.pth")],
          "no checkpoint file at")
    (tmp_path / "w.pth").write_text("weights\n")
    fails(["--model", "hyperseg-m", "--data", TINY_DATA, "--weights", str(tmp_path / "w.pth")],
          "it is a text file")
    # --backend triton on CPU needs the Triton interpreter (the tests run with it set)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fails(["--model", "hyperseg-m", "--data", TINY_DATA, "--backend", "triton"],
          "backend triton on cpu: the Triton kernels need a CUDA device")
    with pytest.raises(TrainError, match="TRITON_INTERPRET=1"):
        train(make_config("hyperseg-m", TINY_DATA), str(out),
              options=RunOptions(backend="triton", device="cpu"))
    # a failure during the first epoch: run.json and the folder go (--resume would take them for
    # a run)
    from hyperseg.train import _Trainer

    def crash(self, *args, **kwargs):
        assert (out / "run.json").is_file()
        raise RuntimeError("out of memory (simulated)")
    monkeypatch.setattr(_Trainer, "_train_epoch", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        main(["train", "--model", "hyperseg-m", "--data", TINY_DATA, "--out", str(out),
              "--quiet", "--workers", "0"])
    assert not out.exists()
    # a folder that holds only run.json is no run to resume
    out.mkdir()
    (out / "run.json").write_text("{}")
    fails_resume = main(["train", "--out", str(out), "--resume"])
    assert fails_resume == 2
    assert "holds no checkpoint to resume from (no latest_state.pt)" in capsys.readouterr().err
