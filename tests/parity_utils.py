"""A well-conditioned random model for comparing two implementations of the *whole* network.

``hyperseg.calibration.calibrate_batchnorm`` fits every BatchNorm exactly to its input. That keeps activations
of order one, but a random network calibrated so is chaotic: wherever a convolution nearly cancels
the signal (a depthwise kernel whose taps sum to about zero, a BatchNorm over a 2 x 4 map), the
BatchNorm divides by a tiny spread and amplifies float32 rounding noise. Through the ~70 layers of
the backbone and the context head, 1e-7 differences in rounding order (PyTorch's vs onnxruntime's
or Inductor's convolutions) grow to 1e-3 .. 1e-2 of the logits: float32 PyTorch itself differs
from float64 PyTorch that much. The triton-vs-torch tests do not see this because both sides
share the backbone.

``calibrate_conditioned`` calibrates like ``calibrate_batchnorm`` but floors each BatchNorm's
variance at ``kappa`` times the energy that white noise in its input would have after the layer
before it: ``sum(w ** 2)`` over the fan-in of each output channel, times the mean square of that
layer's input. A BatchNorm then never amplifies noise more than ``1 / sqrt(kappa)`` relative to
that layer's input, while channels that carry signal are still normalised to unit spread. The
layer before a BatchNorm is an ``nn.Conv2d`` (backbone, context head) or a patch-wise convolution
with generated weights (decoder blocks, whose per-patch kernels are averaged over the patches).
"""
import torch
import torch.nn.functional as F

from hyperseg.decoder import MetaConv, MetaInvertedResidual
from hyperseg.calibration import reference_pass

KAPPA = 16.0


def _kernel_energy(kernels: torch.Tensor, fan_in_dims) -> torch.Tensor:
    """Per output channel, the sum of squared weights over the fan-in, averaged over patches."""
    energy = kernels.detach().float().pow(2).sum(dim=fan_in_dims)
    return energy.reshape(-1, energy.shape[-1]).mean(0)


def calibrate_conditioned(model, x, kappa: float = KAPPA):
    """Give a random model BatchNorm statistics fitted to ``x`` with the noise floor above; the
    model is left in eval mode with its backend unchanged."""
    floors = {}          # BatchNorm -> (per-channel gain, where the input energy comes from)
    energy = {}          # BatchNorm -> per-channel mean square of ReLU6(its output)
    last_conv = {}

    def conv_hook(conv, args, out):
        inp = args[0].detach().float()
        gain = conv.weight.detach().float().pow(2).flatten(1).sum(1)
        last_conv["floor"] = gain * inp.pow(2).mean()

    def block_params(block, args):
        x_in, signal, generator, row_start = args[:4]
        return x_in, generator(signal, row_start, block.num_params)

    def meta_conv_hook(block, args):
        x_in, params = block_params(block, args)
        gain = _kernel_energy(block.kernels(params), (-3, -2, -1))
        floors[block.bn] = gain * x_in.detach().float().pow(2).mean()

    def meta_ir_hook(block, args):
        x_in, params = block_params(block, args)
        expand, depthwise, project = block.kernels(params)
        floors[block.bn1] = _kernel_energy(expand, (-1,)) * x_in.detach().float().pow(2).mean()
        floors[block.bn2] = (_kernel_energy(depthwise, (-2, -1)), block.bn1, "channel")
        floors[block.bn3] = (_kernel_energy(project, (-1,)), block.bn2, "mean")

    def bn_pre_hook(bn, args):
        t = args[0].detach().float()
        dims = [0] + list(range(2, t.dim()))
        mean, var = t.mean(dims), t.var(dims, unbiased=False)
        floor = floors.get(bn)             # kept: eval-mode v1 blocks may run in bands of rows
        if isinstance(floor, tuple):
            gain, source, how = floor
            e = energy[source]
            floor = gain * (e if how == "channel" else e.mean())
        conv_floor = last_conv.pop("floor", None)
        if floor is None and conv_floor is not None and conv_floor.shape == var.shape:
            floor = conv_floor
        if floor is not None:
            var = torch.maximum(var, kappa * floor)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var.clamp_min(1e-2))

    def bn_hook(bn, args, out):
        t = F.relu6(out.detach().float())
        energy[bn] = t.pow(2).mean([0] + list(range(2, t.dim())))

    handles = []
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            handles += [m.register_forward_pre_hook(bn_pre_hook), m.register_forward_hook(bn_hook)]
        elif isinstance(m, torch.nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, MetaConv):
            handles.append(m.register_forward_pre_hook(meta_conv_hook))
        elif isinstance(m, MetaInvertedResidual):
            handles.append(m.register_forward_pre_hook(meta_ir_hook))
    return reference_pass(model, x, handles)


def max_error(got, ref) -> float:
    """max |got - ref| / max(1, max |ref|): the parity measure of the tests."""
    got = torch.as_tensor(got).double()
    ref = torch.as_tensor(ref).double()
    return (got - ref).abs().max().item() / max(1.0, ref.abs().max().item())
