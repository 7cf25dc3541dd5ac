"""hyperseg benchmark: FPS, latency percentiles, peak memory and the official-decoder speed-up, at
a tiny size with a few frames."""
import json
import math

import pytest
import torch

from hyperseg.__main__ import main


@pytest.fixture
def restore_threads():
    """--threads sets torch's thread count for the whole process: give the next tests theirs."""
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_timing(rec, frames, warmup):
    assert rec["frames"] == frames and rec["warmup"] == warmup
    assert _positive(rec["fps"]) and _positive(rec["first_pass_s"])
    assert 0 < rec["p50_ms"] <= rec["p90_ms"] <= rec["p99_ms"]
    assert rec["fps"] == pytest.approx(1e3 / rec["mean_ms"], rel=1e-6)
    assert rec["peak_memory_mib"] >= 0 and rec["memory_measure"].startswith("peak RSS growth")


def test_benchmark_writes_json_and_prints_the_table(tmp_path, capsys, restore_threads):
    path = tmp_path / "bench.json"
    code = main(["benchmark", "--model", "hyperseg-m", "--size", "64x128", "--frames", "3",
                 "--warmup", "1", "--device", "cpu", "--threads", "1", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(path.read_text())
    assert result["model"] == "hyperseg-m-cityscapes" and result["size"] == [64, 128]
    assert result["batch"] == 1 and result["device"] == "cpu" and result["precision"] == "fp32"
    assert result["decoder"] == "torch" and result["channels_last"] is True
    assert result["versions"]["torch"] and "triton" in result["versions"]
    check_timing(result["hyperseg"], 3, 1)
    check_timing(result["official_decoder"], 3, 1)
    assert result["speedup_vs_official_decoder"] == pytest.approx(
        result["hyperseg"]["fps"] / result["official_decoder"]["fps"])
    assert "hyperseg-m-cityscapes at 64x128, batch 1, fp32" in out
    assert f"speed-up over the official decoder algorithm: " \
           f"{result['speedup_vs_official_decoder']:.2f}x" in out
    assert result["device_name"] in out and "1 torch threads" in result["device_name"]


def test_benchmark_json_to_stdout_without_baseline(capsys):
    code = main(["benchmark", "--size", "64x64", "--frames", "2", "--warmup", "1", "--device",
                 "cpu", "--no-channels-last", "--no-baseline", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["precision"] == "fp32" and result["channels_last"] is False
    assert "official_decoder" not in result and "speedup_vs_official_decoder" not in result
    check_timing(result["hyperseg"], 2, 1)


@pytest.mark.parametrize("argv,message", [
    (["--size", "native"], "--size native has no meaning for a benchmark"),
    (["--model", "hyperseg-xl"], "unknown model name 'hyperseg-xl'"),
    (["--json", "no/such/folder/b.json"], "--json: the folder 'no/such/folder'"),
    (["--backend", "triton", "--device", "cpu"], "--backend triton on cpu"),
])
def test_benchmark_checks_its_arguments_first(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["benchmark"] + argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--frames", "0"], ["--warmup", "0"], ["--precision", "fp64"]])
def test_benchmark_refuses_bad_numbers(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark"] + argv)
    assert exit_info.value.code == 2
    assert "benchmark: error: argument" in capsys.readouterr().err
