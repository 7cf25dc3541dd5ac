"""Triton kernels of HyperSeg, installed as ``hyperseg.kernels``.

Each op has a pure-PyTorch reference of the same name in ``hyperseg.ops``:

* ``patch_conv2d`` — patch-wise dynamic convolution with given per-patch kernels;
* ``meta_patch_conv`` — fused meta block: in-kernel weight generation from the context signal,
  patch-wise convolution, folded BatchNorm and activation, in one launch;
* ``meta_inverted_residual`` — fused v1 inverted-residual meta block in one launch;
* ``generate_weights`` — the weight generation as its own op (training: the fused kernels above
  are inference-only, so a training step generates the weights with this op and convolves them
  with ``patch_conv2d``, both differentiable through Triton backward kernels).

On CPU tensors the kernels run through the Triton interpreter (``TRITON_INTERPRET=1`` must be set
before triton is imported); on CUDA tensors they compile for the GPU.
"""
from .generate_weights import generate_weights
from .meta_inverted_residual import meta_inverted_residual
from .patch_conv import meta_patch_conv, patch_conv2d

__all__ = ["generate_weights", "meta_inverted_residual", "meta_patch_conv", "patch_conv2d"]
