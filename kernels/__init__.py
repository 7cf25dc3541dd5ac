"""Triton kernels of HyperSeg, installed as ``hyperseg.kernels``."""

# Set to True once the fused decoder kernels are implemented (see the kernels issue).
KERNELS_READY = False
