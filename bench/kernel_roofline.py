"""Roofline of every decoder block: the minimal work and traffic, and the floor time on a GPU.

Needs only the model's structure (no Triton, no compilation): ``block_floors`` is cheap enough for
``profile_kernels.py`` to print each block's predicted floor beside its measured time.

Minimal multiply-accumulates (MACs) per block, with patches P = B * GH * GW:
  generation: P * num_params * spg (every generated parameter once per patch);
  kernel-1 MetaConv: B*H*W * Cout * Cin / groups;
  v1 inverted residual: expand over each patch plus its halo B*GH*GW*(ph+2r)*(pw+2r) * hidden * Cin,
  depthwise B*H*W * hidden * k*k, project B*H*W * Cout * hidden;
  v0.1 inverted residual: expand B*H*W * hidden * Cin, then the same depthwise and project.
Minimal bytes: the input read once, the output written once, the signal slice read once
(P * spg * groups values), the generator rows used read once (num_params * spg values, in the
generator's dtype: the model's); v0.1 also writes and reads its two hidden maps (three launches).
The v1 halo re-read is reported apart (``halo_bytes``), not counted as minimal. BatchNorm vectors
are negligible. FLOPs = 2 * MACs.
"""
from __future__ import annotations

# Dense peaks of the SXM parts (NVIDIA's datasheet figures, no sparsity), bytes/s and FLOP/s.
GPUS = {
    "h100": dict(name="H100 SXM", bandwidth=3.35e12, fp32_fma=67e12, tf32_tensor=494.7e12,
                 fp16_tensor=989.4e12),
    "h200": dict(name="H200 SXM", bandwidth=4.8e12, fp32_fma=67e12, tf32_tensor=494.7e12,
                 fp16_tensor=989.4e12),
}
PEAKS = ("fp32_fma", "tf32_tensor", "fp16_tensor")
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# The peak that bounds each dtype's kernels: fp32 dots follow torch.backends.cudnn.allow_tf32,
# which is on by default (tf32 tensor cores); fp16 / bf16 on tensor cores.
DEFAULT_PEAK = {"fp32": "tf32_tensor", "fp16": "fp16_tensor", "bf16": "fp16_tensor"}


def level_geometry(model, size, batch: int, level: int) -> dict:
    """Shapes at a decoder level: the feature map (H, W) at stride 32 / 2**level of the input
    padded to the model's size divisor, the patch grid (GH, GW) at stride 32, P = B*GH*GW."""
    divisor = model.config.size_divisor
    hp, wp = (-(-s // divisor) * divisor for s in size)
    gh, gw = hp // 32, wp // 32
    h, w = hp * 2 ** level // 32, wp * 2 ** level // 32
    return dict(B=batch, H=h, W=w, GH=gh, GW=gw, P=batch * gh * gw, ph=h // gh, pw=w // gw)


def minimal_work(block, generator, g: dict, act_bytes: int) -> dict:
    """Minimal MACs (total and by part), minimal bytes and the v1 halo bytes of one block."""
    b, h, w, p = g["B"], g["H"], g["W"], g["P"]
    spg = generator.weight.shape[1]
    pixels = b * h * w
    parts = {"generation": p * block.num_params * spg}
    cin, cout = block.in_channels, block.out_channels
    traffic = pixels * (cin + cout) * act_bytes
    traffic += p * spg * generator.groups * act_bytes                       # the signal slice
    traffic += block.num_params * spg * generator.weight.element_size()     # the generator rows
    halo = 0
    if not hasattr(block, "hidden"):          # MetaConv, kernel 1
        parts["conv"] = pixels * cout * cin // block.groups
    else:
        hidden, k = block.hidden, block.kernel_size
        r = k // 2
        if block.version == "v1":
            tile = p * (g["ph"] + 2 * r) * (g["pw"] + 2 * r)
            parts["expand"] = tile * hidden * cin
            halo = (tile - p * g["ph"] * g["pw"]) * cin * act_bytes
        else:
            parts["expand"] = pixels * hidden * cin
            traffic += 4 * pixels * hidden * act_bytes
        parts["depthwise"] = pixels * hidden * k * k
        parts["project"] = pixels * cout * hidden
    return dict(macs=sum(parts.values()), parts=parts, bytes=traffic, halo_bytes=halo)


def floors_us(macs: int, traffic: int, gpu: str) -> dict:
    """max(bytes / bandwidth, FLOPs / peak) in microseconds, for each compute peak."""
    spec = GPUS[gpu]
    return {peak: 1e6 * max(traffic / spec["bandwidth"], 2 * macs / spec[peak]) for peak in PEAKS}


def block_describe(block) -> str:
    if not hasattr(block, "hidden"):
        return f"MetaConv k1 {block.in_channels}->{block.out_channels}" + (
            f" g{block.groups}" if block.groups > 1 else "")
    return (f"InvRes {block.version} k{block.kernel_size} {block.in_channels}->{block.hidden}->"
            f"{block.out_channels}")


def block_roofline(model, size, batch: int, dtype: str) -> list:
    """Per decoder level: geometry, minimal work and bytes, and floors on every GPU of ``GPUS``."""
    decoder = model.decoder
    rows = []
    for level, block in enumerate(decoder.blocks):
        index, _ = decoder.sources[level]
        g = level_geometry(model, size, batch, level)
        work = minimal_work(block, decoder.generators[index], g, DTYPE_BYTES[dtype])
        rows.append(dict(level=level, block=block_describe(block), geometry=g, minimal=work,
                         floors_us={gpu: floors_us(work["macs"], work["bytes"], gpu) for gpu in GPUS}))
    return rows


def block_floors(model, size, batch: int = 1, dtype: str = "fp32", gpu: str = "h100",
                 peak: str = None) -> dict:
    """{level: floor in µs} of each decoder block of ``model`` at input ``size`` (H, W): the
    roofline floor on ``gpu`` at ``peak`` (default: FFMA for fp32, tensor cores for fp16/bf16).
    Needs no compilation; for ``profile_kernels.py``'s predicted times."""
    peak = peak or DEFAULT_PEAK[dtype]
    rows = block_roofline(model, size, batch, dtype)
    return {row["level"]: row["floors_us"][gpu][peak] for row in rows}
