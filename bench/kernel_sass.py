"""Compile one recorded launch for sm_90 on the CPU and read what the compiler made of it.

``compile_launch`` runs ``triton.compile`` on the launch's ``ASTSource`` with the JIT's own
signature, constexprs, specialisation attributes and options, past Triton's cache, and reads
registers, stack frame and spill bytes from the ``ptxas -v`` log of the very ptxas run that made
the cubin (so the flags are those of the installed Triton: 3.8 passes ``--regAllocOptLevel=2``,
3.6 does not), and static instruction counts from ``cuobjdump -sass`` on the cubin.
``occupancy`` gives the warps per SM an H100 can hold for the kernel.
"""
from __future__ import annotations

import collections
import contextlib
import io
import operator
import os
import re
import subprocess
import tempfile
import time

import triton
from triton import knobs
from triton.backends.nvidia.compiler import get_ptxas
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


def compile_with_ptxas_log(source, options: dict):
    """``triton.compile`` on the CPU, always compiling (a cached kernel runs no ptxas), with
    Triton's own ``ptxas -v`` log of that compile, which its backend prints when asked."""
    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    log = io.StringIO()
    try:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(source, target=TARGET, options=options)
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved
    return kernel, log.getvalue()


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


# Global memory accesses. Their widths come from the LLVM IR Triton hands to the NVPTX backend
# (inline PTX ld.global / st.global / cp.async, or plain loads and stores of addrspace(1)), each
# with the debug location of the Triton op it lowers; the size of each op's tile from the TTGIR.
_LL_ASM = re.compile(r'asm sideeffect "([^"]*)".*!dbg !(\d+)')
_LL_PLAIN = re.compile(r"(?:= load (<\d+ x \w+>|\w+), ptr addrspace\(1\)|"
                       r"store (<\d+ x \w+>|\w+) [^,]+, ptr addrspace\(1\)).*!dbg !(\d+)")
_LL_META = re.compile(r"^!(\d+) = (?:distinct )?!(DILocation|DISubprogram|DILexicalBlockFile|"
                      r"DILexicalBlock|DIFile)\((.*)\)\s*$")
_PTX_ACCESS = re.compile(r"(?<![a-z.])(ld|st)\.global(?:\.[a-z0-9:]+)*?(?:\.v(\d))?"
                         r"\.([bfsu])(\d+)\b|"
                         r"(?<![a-z.])cp\.async\.\w+\.shared\.global(?:\.[\w:]+)?\s*\[[^\]]*\],\s*"
                         r"\[[^\]]*\],\s*(0x[0-9a-f]+|\d+)")
_LL_BITS = {"double": 64, "i64": 64, "float": 32, "i32": 32, "half": 16, "bfloat": 16,
            "i16": 16, "i8": 8}
_TT_ACCESS = re.compile(r"\b(tt\.load|tt\.store|ttg\.async_copy_global_to_local)\b")
_TT_PTR = re.compile(r"(?:tensor<([0-9x]+)x)?!tt\.ptr<(\w+)>")
_TT_LOC_USE = re.compile(r"loc\((#loc\d*)\)\s*$")
_TT_LOC_DEF = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$")
_ELEMENT_BYTES = {"f64": 8, "i64": 8, "f32": 4, "i32": 4, "f16": 2, "bf16": 2, "i16": 2, "i8": 1,
                  "i1": 1}
# A source line marked with this comment loads or stores activations in the image interior and
# must compile to vectors of at least VECTOR_BYTES bytes per thread (kernel_report's check).
VECTOR_TAG = "# interior: vector"
VECTOR_BYTES = 8


def _field(text: str, name: str):
    m = re.search(name + r': (?:!(\d+)|"([^"]*)"|(\d+))', text)
    return None if not m else (m.group(1) or m.group(2) or m.group(3))


def _llvm_locations(llir: str) -> dict:
    """{metadata id: (path, line)} of the LLVM IR's DILocations (the innermost, inlined line)."""
    meta = {}
    for line in llir.splitlines():
        m = _LL_META.match(line)
        if m:
            meta[m.group(1)] = (m.group(2), m.group(3))

    def file_of(scope, depth=0):
        kind, body = meta.get(scope, ("", ""))
        if kind == "DIFile":
            return os.path.join(_field(body, "directory") or "", _field(body, "filename") or "")
        ref = _field(body, "file") if kind != "DILocation" else None
        ref = ref or _field(body, "scope")
        return file_of(ref, depth + 1) if ref and depth < 20 else "?"

    return {key: (file_of(_field(body, "scope")), int(_field(body, "line") or 0))
            for key, (kind, body) in meta.items() if kind == "DILocation"}


def _ttgir_tiles(ttgir: str) -> dict:
    """{(path, line, "read" / "write"): (elements of the largest tile, element bytes)} of the
    TTGIR's global loads, async copies and stores."""
    defs = {}
    for line in ttgir.splitlines():
        m = _TT_LOC_DEF.match(line)
        if m:
            defs[m.group(1)] = m.group(2)

    def resolve(name, depth=0):
        text = defs.get(name, "")
        m = re.match(r'^"([^"]+)":(\d+):\d+', text)
        if m:
            return m.group(1), int(m.group(2))
        inner = re.search(r"#loc\d*", text)      # named, call-site (callee first) or fused
        return resolve(inner.group(0), depth + 1) if inner and depth < 50 else None

    tiles = {}
    for line in ttgir.splitlines():
        op, use = _TT_ACCESS.search(line), _TT_LOC_USE.search(line)
        ptr = op and use and _TT_PTR.search(line, op.end())
        where = ptr and resolve(use.group(1))
        if not where:
            continue
        numel = 1
        for v in (ptr.group(1).split("x") if ptr.group(1) else ()):
            numel *= int(v)
        key = (*where, "write" if op.group(1) == "tt.store" else "read")
        tiles[key] = max(tiles.get(key, (0, 0)), (numel, _ELEMENT_BYTES.get(ptr.group(2), 4)))
    return tiles


def global_accesses(llir: str, ttgir: str) -> list:
    """The kernel's global memory accesses by source line: for each (line, read or write), the
    bytes per thread of each load / store / async-copy instruction the compiler emitted for it
    (``widths``: {bytes: instructions}; ``bytes``: the narrowest), and the elements of the op's
    tile and their size (from the TTGIR)."""
    import linecache
    locations = _llvm_locations(llir)
    tiles = _ttgir_tiles(ttgir)
    found = {}
    for line in llir.splitlines():
        widths = []
        asm = _LL_ASM.search(line)
        if asm:
            for m in _PTX_ACCESS.finditer(asm.group(1)):
                if m.group(5):
                    widths.append(("read", int(m.group(5), 0)))
                else:
                    lanes = int(m.group(2) or 1)
                    widths.append(("read" if m.group(1) == "ld" else "write",
                                   lanes * int(m.group(4)) // 8))
            dbg = asm.group(2)
        else:
            plain = _LL_PLAIN.search(line)
            if not plain:
                continue
            kind = "read" if plain.group(1) else "write"
            ty = plain.group(1) or plain.group(2)
            vec = re.match(r"<(\d+) x (\w+)>", ty)
            lanes, scalar = (int(vec.group(1)), vec.group(2)) if vec else (1, ty)
            widths.append((kind, lanes * _LL_BITS.get(scalar, 32) // 8))
            dbg = plain.group(3)
        where = locations.get(dbg, ("?", 0))
        for kind, width in widths:
            entry = found.get((where, kind))
            if entry is None:
                code = linecache.getline(where[0], where[1]).strip() if where[0] != "?" else ""
                numel, element = tiles.get((*where, kind), (1, width))
                entry = found[(where, kind)] = dict(
                    op=kind, file=os.path.basename(where[0]), line=where[1], code=code[:120],
                    widths={}, elements=numel, element_bytes=element)
            entry["widths"][width] = entry["widths"].get(width, 0) + 1
    for entry in found.values():
        entry["bytes"] = min(entry["widths"])
        entry["widths"] = {str(w): n for w, n in sorted(entry["widths"].items())}
    return sorted(found.values(), key=lambda a: (a["file"], a["line"], a["op"]))


_CONDITION = re.compile(r"^\s*(\w+)\s*(==|!=|<=|>=|<|>)\s*(-?\d+|True|False)\s*$")


def vector_tag(code: str, constexprs: dict):
    """Read a source line's ``VECTOR_TAG``: None when the line has none, or when its condition
    (``when NAME OP VALUE [and ...]``, constexprs of the launch against integers or booleans)
    does not hold for ``constexprs`` (the launch's arguments by name); else the line's run length
    in elements (``of NAME``: the rows it accesses are NAME elements long and start at multiples
    of NAME, so its vectors hold at most NAME's largest power-of-two factor) or 0 (no bound)."""
    if VECTOR_TAG not in code:
        return None
    rest = code.split(VECTOR_TAG, 1)[1].strip()
    run = 0
    m = re.match(r"^of (\w+)\s*", rest)
    if m:
        if m.group(1) not in constexprs:
            raise ValueError(f"the vector tag's run {m.group(1)!r} is not an argument: {code!r}")
        run = int(constexprs[m.group(1)])
        rest = rest[m.end():]
    if not rest:
        return run
    if not rest.startswith("when "):
        raise ValueError(f"cannot read the vector tag in {code!r}")
    for part in rest[len("when "):].split(" and "):
        m = _CONDITION.match(part)
        if not m or m.group(1) not in constexprs:
            raise ValueError(f"cannot read the vector tag's condition {part!r} in {code!r}")
        name, op, value = m.groups()
        value = {"True": True, "False": False}[value] if value in ("True", "False") else int(value)
        if not {"==": operator.eq, "!=": operator.ne, "<=": operator.le, ">=": operator.ge,
                "<": operator.lt, ">": operator.gt}[op](constexprs[name], value):
            return None
    return run


def vector_check(accesses: list, num_warps: int, constexprs: dict = None) -> dict:
    """The accesses on source lines tagged ``VECTOR_TAG`` (``vector_tag`` for the launch's
    ``constexprs``): each instruction must move VECTOR_BYTES bytes per thread, or less where
    the data cannot give that much: where the op's tile holds fewer bytes per thread of the CTA
    (``num_warps`` warps), all of its elements per thread; where the tag's run (``of NAME``) is
    aligned to fewer elements, that many. Each lane of a warp still accesses the element after
    its neighbour's. {"tagged": n, "bounded": n (lines that need less than VECTOR_BYTES),
    "narrow": [failing accesses]}."""
    narrow, bound, tagged = [], 0, 0
    for a in accesses:
        run = vector_tag(a["code"], constexprs or {})
        if run is None:
            continue
        tagged += 1
        need = min(VECTOR_BYTES,
                   max(1, a["elements"] // (32 * num_warps)) * a["element_bytes"])
        if run:
            need = min(need, (run & -run) * a["element_bytes"])
        bound += need < VECTOR_BYTES
        if a["bytes"] < need:
            narrow.append(a)
    return dict(tagged=tagged, bounded=bound, narrow=narrow)


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
    kernel, log = compile_with_ptxas_log(source, launch.options.__dict__)
    compile_s = time.perf_counter() - start
    usage = parse_ptxas_log(log)
    sass = sass_summary(sass_opcodes(kernel.asm["cubin"]))
    shared = int(kernel.metadata.shared)
    result = dict(compiled=True, compile_s=round(compile_s, 2), **usage,
                  spill_bytes=usage["spill_stores"] + usage["spill_loads"], shared=shared,
                  num_warps=launch.options.num_warps, num_stages=launch.options.num_stages,
                  **occupancy(usage["registers"], shared, launch.options.num_warps), sass=sass)
    result["accesses"] = global_accesses(kernel.asm["llir"], kernel.asm["ttgir"])
    vectors = vector_check(result["accesses"], launch.options.num_warps, launch.args)
    result["vector_lines"] = vectors["tagged"]
    result["bounded_vector_lines"] = vectors["bounded"]
    result["narrow_vector_lines"] = len(vectors["narrow"])
    result["read_s"] = round(time.perf_counter() - start - compile_s, 2)
    return result
