"""torch.compile: the Triton kernels are PyTorch custom ops with fake implementations, so Dynamo
traces the model through them in one graph; Inductor compiles the torch backend to the eager
result. On CPU the kernels run through the Triton interpreter (conftest.py), which exercises the
same ops and graphs as a GPU, except for the GPU code generation."""
import copy

import pytest
import torch

import hyperseg
from hyperseg import kernels
from kernel_utils import DEVICE, randn
from parity_utils import calibrate_conditioned, max_error

OPS = ("patch_conv2d", "meta_patch_conv", "meta_inverted_residual")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _op_arguments(device):
    """Small valid arguments of each op, in schema order."""
    x = randn(1, 4, 8, 8).to(device)
    signal = randn(1, 16, 2, 2).to(device)
    norm = [randn(8).to(device) for _ in range(4)] + [randn(4).to(device) for _ in range(2)]
    return {
        "patch_conv2d": (x, randn(1, 2, 2, 3, 4, 3, 3).to(device), randn(1, 2, 2, 3).to(device),
                         "reflect", 1),
        "meta_patch_conv": (x, signal, randn(112, 4, 1, 1).to(device), 6, 0, 4, 2, 2, 3,
                            randn(6).to(device), randn(6).to(device), "relu6", "replicate"),
        "meta_inverted_residual": (x, signal, randn(140, 8, 1, 1).to(device), 8, 4, 0, 2, 4, 3,
                                   *norm, True, "reflect"),
    }


def test_kernels_are_registered_custom_ops():
    for name in OPS:
        op = getattr(torch.ops.hyperseg, name)
        assert isinstance(op.default, torch._ops.OpOverload)
        assert "Tensor" in str(op.default._schema)


@pytest.mark.parametrize("name", OPS)
def test_fake_implementations_give_the_output_shape(name):
    """The fake (meta) implementation: shapes, dtype and device without running a kernel."""
    args = _op_arguments("meta")
    out = getattr(torch.ops.hyperseg, name)(*args[name])
    assert out.device.type == "meta"
    expected_channels = {"patch_conv2d": 3, "meta_patch_conv": 6, "meta_inverted_residual": 4}[name]
    assert tuple(out.shape) == (1, expected_channels, 8, 8)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    """torch.library.opcheck: schema, fake tensor and AOT dispatch tests on the real kernels."""
    args = _op_arguments(DEVICE)[name]
    torch.library.opcheck(getattr(torch.ops.hyperseg, name).default, args)


@pytest.mark.parametrize("name", OPS)
def test_ops_equal_the_public_functions(name):
    args = _op_arguments(DEVICE)[name]
    got = getattr(torch.ops.hyperseg, name)(*args)
    if name == "patch_conv2d":
        ref = kernels.patch_conv2d(args[0], args[1], args[2], padding_mode=args[3], groups=args[4])
    elif name == "meta_patch_conv":
        x, s, g, cout, off, gg, row, groups, k, scale, shift, act, mode = args
        ref = kernels.meta_patch_conv(x, s, g, out_channels=cout, signal_offset=off,
                                      generator_groups=gg, row_start=row, groups=groups,
                                      kernel_size=k, scale=scale, shift=shift, activation=act,
                                      padding_mode=mode)
    else:
        x, s, g, hidden, cout, off, gg, row, k, *rest = args
        n, residual, mode = rest[:6], rest[6], rest[7]
        ref = kernels.meta_inverted_residual(
            x, s, g, hidden=hidden, out_channels=cout, signal_offset=off, generator_groups=gg,
            row_start=row, kernel_size=k, norm1=n[0:2], norm2=n[2:4], norm3=n[4:6],
            residual=residual, padding_mode=mode)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_triton_backend_compiles_into_one_graph():
    """Dynamo traces the model on backend="triton" without a graph break, the fused kernels being
    nodes of the graph; a fullgraph compile through AOTAutograd (which traces the ops' fake
    implementations) then runs the real kernels to eager's result. The v0.1 (VOC) blocks are
    checked on a GPU only: through the interpreter they take too long."""
    x = torch.randn(1, 3, 64, 64, device=DEVICE)
    model = calibrate_conditioned(hyperseg.build("hyperseg-m", backend="triton").to(DEVICE), x)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        assert explained.graph_count == 1
        targets = [str(n.target) for g in explained.graphs for n in g.graph.nodes]
        fused = [t.split(".")[1] for t in targets if t.startswith("hyperseg.")]
        assert fused == ["meta_patch_conv"] * 3 + ["meta_inverted_residual"] * 2
        torch._dynamo.reset()
        ref = model(x)
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    assert ref.abs().max() > 0.5
    assert max_error(got, ref) <= 1e-5


def test_inductor_compile_of_the_torch_backend_matches_eager():
    """torch.compile(model) with the default (Inductor) backend on the torch backend."""
    x = torch.randn(1, 3, 64, 128, device=DEVICE)
    model = calibrate_conditioned(hyperseg.build("hyperseg-s-camvid", backend="torch").to(DEVICE), x)
    with torch.no_grad():
        ref = model(x)
        compiled = torch.compile(model)
        got = compiled(x)
        again = compiled(x)
    assert ref.abs().max() > 0.5 and ref.std() > 0.05
    assert got.shape == ref.shape
    assert max_error(got, ref) <= 1e-4
    torch.testing.assert_close(again, got, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["hyperseg-m-cityscapes", "hyperseg-l-voc"])
def test_gpu_triton_backend_compiles_without_graph_breaks(name):
    """On a GPU: no graph break on backend="triton" (torch._dynamo.explain), and the
    Inductor-compiled model equals eager."""
    size = (256, 512) if name != "hyperseg-l-voc" else (256, 256)
    x = torch.randn(1, 3, *size, device="cuda")
    model = calibrate_conditioned(hyperseg.build(name, backend="triton").cuda(), x)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        assert any(str(n.target).startswith("hyperseg.") for g in explained.graphs
                   for n in g.graph.nodes)
        torch._dynamo.reset()
        ref = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    assert max_error(got, ref) <= 1e-4


def test_training_on_the_triton_backend_compiles_into_one_graph():
    """Train mode on backend="triton": torch.compile(fullgraph=True), which fails on any graph
    break, traces the differentiable kernels (autograd Functions around custom ops), and the
    compiled training step (AOTAutograd traces the backward too) gives the reference's gradients
    (eager backend "torch", which eager backend "triton" equals: test_triton_training.py)."""
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    model = hyperseg.build("hyperseg-m", num_classes=3, backend="triton").to(DEVICE).train()
    reference = copy.deepcopy(model)
    reference.backend = "torch"
    grads = []
    for net, owner in ((torch.compile(model, backend="aot_eager", fullgraph=True), model),
                       (reference, reference)):
        torch.manual_seed(1)                     # the same drop-path draws
        net(x).square().mean().backward()
        grads.append([p.grad for p in owner.decoder.parameters()])
    largest = max(g.abs().max().item() for g in grads[1])
    for got, ref in zip(*grads):
        # within 1e-4 of each gradient, or of 1e-3 of the largest for rounding-noise gradients
        assert (got - ref).abs().max() <= 1e-4 * max(ref.abs().max().item(), 1e-3 * largest)
