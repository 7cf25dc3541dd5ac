"""Compile one recorded launch for sm_90 on the CPU and read what the compiler made of it.

``compile_launch`` runs ``triton.compile`` on the launch's ``ASTSource`` with the JIT's own
signature, constexprs, specialisation attributes and options; then ``ptxas -v`` (the binary and
the flags Triton's backend uses) on the PTX for registers, stack frame and spill bytes, and
``cuobjdump -sass`` on the cubin for static instruction counts. ``occupancy`` gives the warps per
SM an H100 can hold for the kernel.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
import time

import triton
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource

from kernel_record import TARGET

# H100 SM limits used by ``occupancy``.
SM = dict(registers=65536, register_unit_thread=8, register_unit_warp=256, shared_bytes=228 * 1024,
          shared_reserved_per_block=1024, max_shared_per_block=227 * 1024, max_warps=64, max_blocks=32)

_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = (r"Function properties for {}\s+(\d+) bytes stack frame, (\d+) bytes spill stores, "
                r"(\d+) bytes spill loads")
_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
_WIDTHS = {".128": 16, ".64": 8, ".U16": 2, ".S16": 2, ".U8": 1, ".S8": 1}


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(get_ptxas(90).path), name)


def ptxas_usage(ptx: str, options, capability: int = 90) -> dict:
    """Registers, stack frame and spill bytes from ``ptxas -v`` with Triton's flags."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        fmad = [] if options.enable_fp_fusion else ["--fmad=false"]
        cmd = [get_ptxas(capability).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(capability)}", src, "-o", src + ".o"]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    return parse_ptxas_log(log)


def parse_ptxas_log(log: str) -> dict:
    """The entry function's registers, stack frame and spill bytes from a ``ptxas -v`` log."""
    entry = _PTXAS_ENTRY.search(log)           # the kernel (device functions have blocks too)
    frame = entry and re.search(_PTXAS_FRAME.format(re.escape(entry.group(1))), log)
    used = entry and _PTXAS_USED.search(log, entry.end())
    if not (entry and frame and used):
        raise RuntimeError(f"could not parse the ptxas output:\n{log}")
    stack, spill_stores, spill_loads = (int(v) for v in frame.groups())
    return dict(registers=int(used.group(1)), stack=stack, spill_stores=spill_stores,
                spill_loads=spill_loads)


def sass_opcodes(cubin: bytes) -> collections.Counter:
    """Static count of every opcode (with its modifiers) in the cubin's SASS."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], check=True, capture_output=True,
                              text=True).stdout
    return collections.Counter(m.group(1) for m in map(_SASS_LINE.search, sass.splitlines()) if m)


def access_width(opcode: str) -> int:
    """Bytes per thread of a global load / store opcode (LDG.E.128 -> 16, LDG.E -> 4)."""
    return next((w for suffix, w in _WIDTHS.items() if suffix + "." in opcode + "."), 4)


def sass_summary(opcodes: collections.Counter) -> dict:
    """The counts the report shows: tensor-core and FMA instructions, local memory, global
    loads / stores by width in bytes, and the widest global load (LDG or LDGSTS). HFMA2 leaves
    out ``HFMA2.MMA``, which ptxas emits as a register move."""
    def base(name):
        return sum(n for op, n in opcodes.items() if op.split(".")[0] == name)

    def by_width(name):
        widths = collections.Counter()
        for op, n in opcodes.items():
            if op.split(".")[0] == name:
                widths[access_width(op)] += n
        return {str(w): widths[w] for w in sorted(widths)}

    ldg, ldgsts = by_width("LDG"), by_width("LDGSTS")
    return dict(HGMMA=base("HGMMA"), HMMA=base("HMMA"), FFMA=base("FFMA"), DFMA=base("DFMA"),
                HFMA2=base("HFMA2") - opcodes["HFMA2.MMA"], LDL=base("LDL"), STL=base("STL"),
                LDG=ldg, LDGSTS=ldgsts, STG=by_width("STG"),
                widest_load=max([int(w) for w in (*ldg, *ldgsts)], default=0),
                instructions=sum(opcodes.values()))


def occupancy(registers: int, shared: int, num_warps: int) -> dict:
    """Resident warps per H100 SM, and which resource limits them: registers (rounded up to 8 per
    thread, allocated per warp in units of 256), shared memory (plus 1 KB reserved per block),
    64 warps and 32 blocks per SM."""
    regs_warp = -(-max(registers, 1) // SM["register_unit_thread"]) * SM["register_unit_thread"] * 32
    regs_warp = -(-regs_warp // SM["register_unit_warp"]) * SM["register_unit_warp"]
    blocks = {"registers": (SM["registers"] // regs_warp) // num_warps,
              "shared": SM["shared_bytes"] // (shared + SM["shared_reserved_per_block"])
              if shared <= SM["max_shared_per_block"] else 0,
              "warps": SM["max_warps"] // num_warps, "blocks": SM["max_blocks"]}
    limit = min(blocks, key=blocks.get)
    return dict(warps_per_sm=blocks[limit] * num_warps, blocks_per_sm=blocks[limit], limited_by=limit)


def compile_launch(launch) -> dict:
    """Compile a recorded launch exactly as the JIT would for sm_90 and read the results."""
    start = time.perf_counter()
    source = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
    kernel = triton.compile(source, target=TARGET, options=launch.options.__dict__)
    compile_s = time.perf_counter() - start
    usage = ptxas_usage(kernel.asm["ptx"], launch.options)
    sass = sass_summary(sass_opcodes(kernel.asm["cubin"]))
    shared = int(kernel.metadata.shared)
    result = dict(compiled=True, compile_s=round(compile_s, 2), **usage,
                  spill_bytes=usage["spill_stores"] + usage["spill_loads"], shared=shared,
                  num_warps=launch.options.num_warps, num_stages=launch.options.num_stages,
                  **occupancy(usage["registers"], shared, launch.options.num_warps), sass=sass)
    result["read_s"] = round(time.perf_counter() - start - compile_s, 2)
    return result
