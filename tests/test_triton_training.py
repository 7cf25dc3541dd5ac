"""Training on the Triton kernels: meta blocks and a whole model, against the reference."""
import copy

import pytest
import torch
import torch.nn as nn

import hyperseg
from hyperseg import ops
from hyperseg.decoder import (AUTOGRAD_KERNELS, REFERENCE, GeneratorSpec, MetaConv, MetaInvertedResidual,
                              WeightGenerator)
from kernel_utils import DEVICE

# float16 autocast, on CPU too: bfloat16's 8-bit mantissa alone moves these random blocks'
# gradients by 5 to 20 % of the largest, with either implementation
HALF = torch.float16


def test_tiled_inverted_residual_equals_reference_in_train_mode():
    """The decomposition the kernels train with (three patch-wise convolutions over patches laid
    out with their halos) gives the reference block's output, gradients and BatchNorm statistics."""
    b, grid, patch, cin, hidden, cout = 2, (2, 3), (4, 5), 6, 12, 6
    x = torch.randn(b, cin, grid[0] * patch[0], grid[1] * patch[1], requires_grad=True)
    weights = [torch.randn(b, *grid, *shape, requires_grad=True)
               for shape in ((hidden, cin), (hidden, 3, 3), (cout, hidden))]
    norms = [nn.BatchNorm2d(c).train() for c in (hidden, hidden, cout)]
    tiled_norms = copy.deepcopy(norms)
    ref = ops.patch_inverted_residual(x, *weights, norm1=norms[0], norm2=norms[1], norm3=norms[2],
                                      residual=True, padding_mode="reflect")
    got = ops.inverted_residual_layers(x, *ops.explicit_convs(*weights), grid=grid, tiled=True,
                                       norm1=tiled_norms[0], norm2=tiled_norms[1], norm3=tiled_norms[2],
                                       residual=True, padding_mode="reflect")
    torch.testing.assert_close(got, ref)
    for n, t in zip(norms, tiled_norms):
        torch.testing.assert_close(t.running_mean, n.running_mean)
        torch.testing.assert_close(t.running_var, n.running_var)
    dout = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(got, [x] + weights, dout),
                    torch.autograd.grad(ref, [x] + weights, dout)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def _block(kind):
    if kind == "meta_conv":
        return MetaConv(21, 16)
    if kind == "inverted_residual_v1":
        return MetaInvertedResidual(10, 10, expand_ratio=2, version="v1")
    if kind == "inverted_residual_v1_no_residual":
        return MetaInvertedResidual(12, 6, expand_ratio=2, version="v1")
    return MetaInvertedResidual(10, 10, expand_ratio=2, version="v0_1")


def _generator(block):
    """A generator reading signal channels 4..36 in 4 groups, with rows to spare before and after
    the block's (which start at row 3)."""
    rows = -(-(block.num_params + 7) // 4) * 4
    return WeightGenerator(GeneratorSpec(4, 32, 4, block.num_params + 3, rows, (0,))).to(DEVICE)


def _block_step(block, generator, x, signal, dout, backend):
    """One train-mode forward and backward; the output, the gradients and the BN buffers."""
    x = x.detach().requires_grad_()
    signal = signal.detach().requires_grad_()
    if backend == "triton":
        out = block(x, signal, generator, 3, AUTOGRAD_KERNELS)
    else:
        out = block(x, signal, generator, 3, REFERENCE)
    leaves = [x, signal] + list(generator.parameters()) + list(block.parameters())
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out, grads, [t.clone() for t in block.buffers()]


@pytest.mark.parametrize("kind,dtype", [
    ("meta_conv", torch.float32), ("inverted_residual_v1", torch.float32),
    ("inverted_residual_v1_no_residual", torch.float32), ("inverted_residual_v0_1", torch.float32),
    ("inverted_residual_v1", torch.float64), ("inverted_residual_v0_1", torch.float64)])
def test_meta_block_trains_on_the_kernels(kind, dtype):
    """Train-mode forward and backward of every kind of meta block on the kernels: output,
    gradients (input, signal, generator, BatchNorm affine) and BatchNorm running statistics.
    float32: gradients within 1e-4 of the largest gradient; float64: each within 1e-9 of its own
    largest value, which also covers gradients that cancel to ~1e-5 of the largest (BN1's weight
    here) and so carry float32 rounding noise of a few percent of their size."""
    torch.manual_seed(0)
    block = _block(kind).to(DEVICE, dtype).train()
    generator = _generator(block).to(dtype=dtype)
    x = torch.randn(2, block.in_channels, 8, 12, device=DEVICE, dtype=dtype)
    signal = torch.randn(2, 40, 2, 3, device=DEVICE, dtype=dtype)
    dout = torch.randn(2, block.out_channels, 8, 12, device=DEVICE, dtype=dtype)
    reference = copy.deepcopy(block)
    out, grads, buffers = _block_step(block, generator, x, signal, dout, "triton")
    ref_out, ref_grads, ref_buffers = _block_step(reference, generator, x, signal, dout, "torch")
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    names = ["x", "signal", "generator"] + [n for n, _ in block.named_parameters()]
    largest = max(r.abs().max().item() for r in ref_grads)
    for name, g, r in zip(names, grads, ref_grads):
        err = (g - r).abs().max().item()
        bound = 1e-4 * largest if dtype == torch.float32 else 1e-9 * r.abs().max().item()
        assert err <= bound, f"{name}: max |err| {err:.3e} > {bound:.3e}"
    for got, ref in zip(buffers, ref_buffers):     # running statistics and batch counts
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_meta_block_trains_under_autocast():
    """Under autocast the kernels take half-precision inputs, as the reference's convolutions and
    matmuls do, and accumulate in float32: output and gradient dtypes are the reference's, the
    gradients within 5e-2 of its largest."""
    torch.manual_seed(0)
    block = _block("inverted_residual_v1").to(DEVICE).train()
    generator = _generator(block)
    x = torch.randn(2, 10, 8, 12, device=DEVICE, dtype=HALF)
    signal = torch.randn(2, 40, 2, 3, device=DEVICE, dtype=HALF)
    dout = torch.randn(2, 10, 8, 12, device=DEVICE)
    reference = copy.deepcopy(block)
    with torch.autocast(DEVICE, dtype=HALF):
        out, grads, _ = _block_step(block, generator, x, signal, dout, "triton")
        ref_out, ref_grads, _ = _block_step(reference, generator, x, signal, dout, "torch")
    assert out.dtype == ref_out.dtype == HALF
    assert (out.float() - ref_out.float()).abs().max() <= 5e-2 * ref_out.float().abs().max()
    names = ["x", "signal", "generator"] + [n for n, _ in block.named_parameters()]
    largest = max(r.float().abs().max().item() for r in ref_grads)
    for name, g, r in zip(names, grads, ref_grads):
        assert g.dtype == r.dtype, name
        err = (g.float() - r.float()).abs().max().item()
        assert err <= 5e-2 * largest, f"{name}: max |err| {err:.3e} > {5e-2 * largest:.3e}"


def _training_step(model, x, target):
    torch.manual_seed(1)                       # the backbone's drop path draws random numbers
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    optimizer.step()
    return loss.detach()


def test_zoo_model_training_step_on_triton_equals_torch():
    """One SGD step of hyperseg-m in train mode: the same loss, parameters and BatchNorm running
    statistics with backend "triton" as with "torch". (SGD, not Adam: Adam divides by the
    gradient's magnitude, so it turns the rounding noise of gradients that are mathematically
    zero, those of BatchNorm biases followed by another BatchNorm, into steps of +-lr.)"""
    torch.manual_seed(0)
    model = hyperseg.build("hyperseg-m", num_classes=5, backend="torch").to(DEVICE).train()
    triton_model = copy.deepcopy(model)
    triton_model.backend = "triton"
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    target = torch.randint(0, 5, (2, 64, 64), device=DEVICE)
    ref_loss = _training_step(model, x, target)
    loss = _training_step(triton_model, x, target)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters()}
    largest = max(g.abs().max().item() for g in grads.values())
    for (name, p), (_, ref) in zip(triton_model.named_parameters(), model.named_parameters()):
        # each gradient within 1e-4 of its tensor's largest (or 1e-3 of the model's largest
        # gradient, for gradients that are mathematically zero and hold rounding noise only)
        scale = max(grads[name].abs().max().item(), 1e-3 * largest)
        err = (p.grad - grads[name]).abs().max().item()
        assert err <= 1e-4 * scale, f"{name}: gradient error {err:.2e} > {1e-4 * scale:.2e}"
        torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-5 * scale)
    for (name, b), ref in zip(triton_model.named_buffers(), model.buffers()):
        torch.testing.assert_close(b, ref, rtol=1e-5, atol=1e-5, msg=name)
