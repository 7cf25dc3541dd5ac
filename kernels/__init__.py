"""Triton kernels of HyperSeg, installed as ``hyperseg.kernels``.

Each op has a pure-PyTorch reference of the same name in ``hyperseg.ops``:

* ``patch_conv2d`` — patch-wise dynamic convolution with given per-patch kernels;
* ``meta_patch_conv`` — fused meta block: in-kernel weight generation from the context signal
  (once per patch), patch-wise convolution, folded BatchNorm and activation, in one launch;
* ``meta_inverted_residual`` — fused v1 inverted-residual meta block in one launch;
* ``generate_weights`` — the weight generation as its own op, and ``generated_patch_conv2d`` —
  a patch-wise convolution with generated kernels: the training ops (the fused kernels above are
  inference-only). ``patch_conv2d``, ``generate_weights`` and ``generated_patch_conv2d`` are
  differentiable through Triton backward kernels.

On CPU tensors the kernels run through the Triton interpreter (``TRITON_INTERPRET=1`` must be set
before triton is imported); on CUDA tensors they compile for the GPU.
"""
from .generate_weights import generate_weights
from .meta_inverted_residual import meta_inverted_residual
from .meta_patch_conv import meta_patch_conv
from .generated_patch_conv import generated_patch_conv2d
from .patch_conv import patch_conv2d

__all__ = ["generate_weights", "generated_patch_conv2d", "meta_inverted_residual", "meta_patch_conv",
           "patch_conv2d"]
