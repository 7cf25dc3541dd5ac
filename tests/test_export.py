"""ONNX export: every zoo model's graph, run by onnxruntime, equals the PyTorch model."""
import pytest
import torch

import hyperseg
from hyperseg.__main__ import main
from parity_utils import calibrate_conditioned, max_error

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

# Small sizes; hyperseg-l-camvid's is not a multiple of 64, so its graph pads and crops.
SIZES = {"hyperseg-m-cityscapes": (64, 128), "hyperseg-s-cityscapes": (64, 128),
         "hyperseg-s-camvid": (64, 128), "hyperseg-l-camvid": (72, 120),
         "hyperseg-l-voc": (128, 128)}


def run_onnx(path, x: torch.Tensor):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


# These two are exported with a dynamic batch (example batch 2) and run at batch 1 and 3: they
# cover both depthwise paths (the v1 inverted residual's and patch_conv2d's, for v0.1).
DYNAMIC = ("hyperseg-m-cityscapes", "hyperseg-l-voc")


@pytest.mark.parametrize("name", list(SIZES))
def test_onnx_graph_matches_pytorch(name, tmp_path, capsys):
    torch.manual_seed(0)
    size = SIZES[name]
    x = torch.randn(3 if name in DYNAMIC else 1, 3, *size)
    model = calibrate_conditioned(hyperseg.build(name, backend="triton"), x)
    path = tmp_path / f"{name}.onnx"
    if name in DYNAMIC:
        hyperseg.export_onnx(model, path, size=size, batch_size=2, dynamic_batch=True)
        with torch.no_grad():
            model.backend = "torch"
            ref = model(x)
        for batch in (1, 3):
            err = max_error(run_onnx(path, x[:batch]), ref[:batch])
            assert err <= 1e-4, f"batch {batch}: {err:.2e}"
        assert ref.abs().max() > 0.5 and ref.std() > 0.05
        return
    if name == "hyperseg-s-camvid":
        # the command line, from a checkpoint whose architecture it reads
        hyperseg.save(model, tmp_path / "weights.safetensors")
        code = main(["export", "--weights", str(tmp_path / "weights.safetensors"),
                     "--onnx", str(path), "--size", f"{size[0]}x{size[1]}"])
        out = capsys.readouterr()
        assert code == 0, out.err
        assert "torch backend" in out.out and "WARNING" not in out.err
    else:
        assert hyperseg.export_onnx(model, path, size=size) == str(path)
        assert model.backend == "triton" and not model.training     # restored
    assert not list(tmp_path.glob("*.data"))                       # one self-contained file
    with torch.no_grad():
        model.backend = "torch"
        ref = model(x)
    got = run_onnx(path, x)
    assert got.shape == ref.shape == (1, model.num_classes, *size)
    assert ref.abs().max() > 0.5 and ref.std() > 0.05             # not a comparison of zeros
    err = max_error(got, ref)
    print(f"{name}: max|onnx - torch| / max(1, max|torch|) = {err:.2e}")
    assert err <= 1e-4


def test_export_arguments(tmp_path):
    model = hyperseg.build("hyperseg-s-camvid")
    with pytest.raises(ValueError, match="at least 32"):
        hyperseg.export_onnx(model, tmp_path / "m.onnx", size=(16, 64))
    with pytest.raises(ValueError, match="batch_size"):
        hyperseg.export_onnx(model, tmp_path / "m.onnx", size=(64, 64), batch_size=0)
    with pytest.raises(TypeError, match="HyperSeg"):
        hyperseg.export_onnx(torch.nn.Conv2d(3, 3, 1), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_export_command_errors(tmp_path, capsys):
    assert main(["export", "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "--weights" in capsys.readouterr().err
    assert main(["export", "--model", "hyperseg-m", "--size", "native",
                 "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "native" in capsys.readouterr().err
    assert main(["export", "--weights", str(tmp_path / "none.safetensors"),
                 "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "no checkpoint file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--model", "hyperseg-m", "--size", "10x10", "--onnx", "m.onnx"])
