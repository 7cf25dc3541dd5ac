"""bench/kernel_report.py: every Triton launch of a small model compiles for sm_90 and is reported.

The report runs in a subprocess without TRITON_INTERPRET (it needs real JIT functions), with a
fresh Triton cache so that every specialisation really compiles.
"""
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPT = BENCH / "kernel_report.py"
sys.path.insert(0, str(BENCH))
import kernel_report  # noqa: E402  (light: no triton, no hyperseg at import)

# Every reported inference kernel meets kernel_report.CHECKS (no spills, no stack frame, at least
# 16 warps per SM), every kernel only the training step launches kernel_report.TRAIN_CHECKS (no
# spills, no stack frame, executed work within 2x of the useful), and every block
# kernel_report.BLOCK_CHECKS (executed work within 2x of the minimal), checked on hyperseg-m at its
# official size and recipe crop.
ENFORCE_PROPERTIES = True


def _nvidia_tools_available():
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return os.path.exists(get_ptxas(90).path)
    except Exception:  # noqa: BLE001 - no NVIDIA backend, or no ptxas in it
        return False


def _run(args, tmp_path, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def property_failures(report: dict) -> list:
    """The --check verdict on a report: one message per failed (kernel, property)."""
    return kernel_report.failed_checks(report)


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    if not _nvidia_tools_available():
        pytest.skip("triton without its NVIDIA backend or ptxas")
    tmp_path = tmp_path_factory.mktemp("kernel_report")
    out = tmp_path / "report.json"
    result = _run(["--model", "hyperseg-m", "--size", "512x1024", "--dtype", "fp32", "--train",
                   "--train-size", "512x1024", "--json", str(out),
                   "--cache-dir", str(tmp_path / "triton-cache")], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def test_every_launch_compiles_and_is_read(small_report):
    report, stdout = small_report
    (entry,) = report["reports"]
    assert entry["model"] == "hyperseg-m-cityscapes" and entry["dtype"] == "fp32"
    kernels = entry["kernels"]
    assert {p for k in kernels for p in k["phases"]} == {"inference", "train"}
    for kernel in kernels:
        assert kernel["compiled"], kernel.get("error")
        assert kernel["registers"] > 0 and kernel["warps_per_sm"] > 0
        assert kernel["sass"]["instructions"] > 0
    names = {k["kernel"] for k in kernels if "inference" in k["phases"]}
    assert names == {"_meta_conv_many_patches_kernel", "_meta_inverted_residual_kernel"}
    train = {k["kernel"] for k in kernels if "train" in k["phases"]}
    assert {"_patch_conv_input_grad_kernel", "_patch_conv_weight_grad_kernel",
            "_generate_weights_weight_grad_kernel"} <= train
    assert "warps/SM" in stdout and "floor us" in stdout
    if ENFORCE_PROPERTIES:
        assert not property_failures(report), property_failures(report)


def test_block_roofline_covers_every_level(small_report):
    report, _ = small_report
    (entry,) = report["reports"]
    blocks = entry["blocks"]
    assert [b["level"] for b in blocks] == list(range(5))        # hyperseg-m has 5 decoder levels
    for block in blocks:
        assert block["minimal"]["macs"] > 0 and block["minimal"]["bytes"] > 0
        assert block["kernels"], f"no launch was tagged with level {block['level']}"
        assert block["executed"]["macs"] >= block["minimal"]["macs"] * 0.99
        assert all(f > 0 for gpu in block["floors_us"].values() for f in gpu.values())
    # the fused v1 kernel of L4 expands each band's halo tile once (padded to whole dot tiles)
    assert 1 <= blocks[4]["redundancy_by_part"]["expand"] < 2
    assert blocks[4]["redundancy_by_part"]["generation"] < 1.1          # once per patch


@pytest.mark.parametrize("model,dtype,options", [
    ("hyperseg-m", "fp32", ["--ieee"]),     # IEEE float32 dots: torch.backends.cudnn.allow_tf32 off
    ("hyperseg-l-voc", "fp16", []),         # 3x3 depthwise meta convolutions on vector taps
], ids=["hyperseg-m-ieee", "hyperseg-l-voc-fp16"])
def test_inference_kernels_pass_the_checks(model, dtype, options, tmp_path):
    """The inference kernels of the paths the small report does not reach pass every check."""
    if not _nvidia_tools_available():
        pytest.skip("triton without its NVIDIA backend or ptxas")
    out = tmp_path / "report.json"
    result = _run(["--model", model, "--dtype", dtype, *options, "--json", str(out),
                   "--cache-dir", str(tmp_path / "triton-cache")], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    kernels = report["reports"][0]["kernels"]
    assert kernels and all(k["compiled"] for k in kernels)
    if "--ieee" in options:
        assert report["fp32_dots"] == "ieee"
    else:
        depthwise = [k for k in kernels if k["constexprs"].get("VEC", 1) > 1]
        assert depthwise and all(k["vector_lines"] >= 4 for k in depthwise)
    if ENFORCE_PROPERTIES:
        assert not property_failures(report), property_failures(report)
    shutil.rmtree(tmp_path / "triton-cache", ignore_errors=True)


def _fake_report(spill_stores: int, train_spill: int = 0, train_warps: int = 8,
                 redundancy: float = 1.5) -> dict:
    """A saved report with one inference kernel (spilling ``spill_stores`` bytes) and one
    train-only kernel (spilling ``train_spill`` bytes, at ``train_warps`` warps per SM, executing
    ``redundancy`` times its useful work)."""
    sass = dict(HGMMA=0, HMMA=0, FFMA=10, widest_load=4, LDL=0, STL=0)
    kernel = dict(id=1, kernel="_fake_kernel", variant="", phases=["inference"], used_by=["L4"],
                  grids=[[1, 1, 1]], compiled=True, num_warps=4, registers=255, stack=0,
                  spill_stores=spill_stores, spill_loads=0, spill_bytes=spill_stores, shared=0,
                  warps_per_sm=16, sass=sass, compile_s=0.0, vector_lines=2,
                  narrow_vector_lines=0)
    train_only = dict(copy.deepcopy(kernel), id=2, kernel="_fake_backward_kernel", phases=["train"],
                      used_by=["train:L4"], spill_stores=train_spill, spill_bytes=train_spill,
                      stack=train_spill, warps_per_sm=train_warps, redundancy=redundancy)
    entry = dict(model="fake", dtype="fp32", size=[64, 64], batch=1, train=None, launches=2,
                 kernels=[kernel, train_only], blocks=[])
    return dict(reports=[entry], wall_s=0.0)


def test_check_flags_a_spill_in_an_inference_kernel():
    # the train-only kernel at 8 warps/SM passes: occupancy is checked on inference kernels only
    assert property_failures(_fake_report(0)) == []
    failures = property_failures(_fake_report(128))
    assert len(failures) == 1 and "spill_bytes == 0" in failures[0] and "_fake_kernel" in failures[0]


def test_check_flags_a_spill_or_stack_in_a_training_kernel():
    failures = property_failures(_fake_report(0, train_spill=64))
    assert len(failures) == 2 and all("_fake_backward_kernel" in f for f in failures)
    assert any("spill_bytes == 0" in f for f in failures) and any("stack == 0" in f for f in failures)
    failures = property_failures(_fake_report(0, redundancy=2.5))
    assert len(failures) == 1 and "redundancy <= 2.0" in failures[0]


def test_check_flags_interior_accesses_that_are_not_vectors():
    report = _fake_report(0)
    report["reports"][0]["kernels"][0]["narrow_vector_lines"] = 1
    failures = property_failures(report)
    assert len(failures) == 1 and "narrow_vector_lines == 0" in failures[0]
    report["reports"][0]["kernels"][0].update(vector_lines=0, narrow_vector_lines=0)
    failures = property_failures(report)       # an inference kernel without tagged accesses
    assert len(failures) == 1 and "vector_lines >= 1" in failures[0]


def test_check_option_exit_status(tmp_path):
    for spill, status in ((0, 0), (128, 1)):
        path = tmp_path / f"fake{spill}.json"
        path.write_text(json.dumps(_fake_report(spill)))
        result = _run(["--from-json", str(path), "--check"], tmp_path, timeout=120)
        assert result.returncode == status, result.stdout + result.stderr
        assert ("FAILED" in result.stdout) == bool(status)
    shutil.rmtree(tmp_path / "triton-cache", ignore_errors=True)


def test_compile_workers_keep_the_order_and_report_a_failed_compile(monkeypatch, tmp_path):
    """--jobs N compiles on N forked processes: the entries come back in launch order, the same
    as on one, and a compile that raises is an entry with compiled False and the error."""
    import kernel_sass

    def compile_launch(launch):
        if launch == "bad":
            raise RuntimeError("ptxas fatal: out of registers")
        return {"compiled": True, "registers": len(launch), "pid": os.getpid()}

    monkeypatch.setattr(kernel_sass, "compile_launch", compile_launch)
    monkeypatch.setattr(kernel_report, "_describe_spec",
                        lambda index, launches: {"id": index, "kernel": launches[0], "used_by": []})
    monkeypatch.setattr(kernel_report, "_executed", lambda launch: None)
    groups = [["a"], ["bad"], ["ccc"], ["dddd"], ["ee"]]
    serial = kernel_report._compile_groups(groups, jobs=1)
    forked = kernel_report._compile_groups(groups, jobs=2)
    for entries in (serial, forked):
        assert [e["id"] for e in entries] == [1, 2, 3, 4, 5]
        assert [e.get("registers") for e in entries] == [1, None, 3, 4, 2]
        assert entries[1]["compiled"] is False
        assert entries[1]["error"] == "RuntimeError: ptxas fatal: out of registers"
    assert {e["pid"] for e in serial if "pid" in e} == {os.getpid()}
    assert os.getpid() not in {e["pid"] for e in forked if "pid" in e}
    assert kernel_report._GROUPS == []
    with pytest.raises(SystemExit):
        kernel_report.parse_args(["--jobs", "0"])


def _run_python(code: str, tmp_path):
    """Run ``code`` with bench/ importable, without TRITON_INTERPRET; assert it succeeds."""
    if not _nvidia_tools_available():
        pytest.skip("triton without its NVIDIA backend or ptxas")
    script = tmp_path / "script.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_bf16_encoder_gives_the_decoder_what_the_fp16_model_does(tmp_path):
    """The report's fast fp16 path (encoder in bf16) records the same launches as the fp16 model."""
    _run_python(
        "import torch, hyperseg\n"
        "from kernel_record import Recorder, record_inference\n"
        "runs = []\n"
        "for fast in (True, False):\n"
        "    r = Recorder()\n"
        "    record_inference(hyperseg.build('hyperseg-m'), (64, 64), 1, torch.float16, r, fast)\n"
        "    runs.append([(l.spec_key, l.grid, l.level, l.args) for l in r.launches])\n"
        "assert {run[2] for run in runs[0]} == set(range(5)) and runs[0] == runs[1], runs\n"
        "print('ok')\n", tmp_path)


def test_train_step_launches_are_recorded_and_tagged(tmp_path):
    """--train records the forward and backward kernels of one step, each tagged with its level
    (recording only: compiling the ~40 training specialisations takes a minute)."""
    _run_python(
        "import torch, hyperseg\n"
        "from kernel_record import Recorder, group_launches, record_train_step\n"
        "r = Recorder()\n"
        "record_train_step(hyperseg.build('hyperseg-m'), (64, 128), 2, torch.float32, r)\n"
        "names = {l.name for l in r.launches}\n"
        "assert names == {'_generate_weights_kernel', '_patch_conv_kernel',\n"
        "                 '_patch_conv_input_grad_kernel', '_patch_conv_weight_grad_kernel',\n"
        "                 '_generate_weights_signal_grad_kernel',\n"
        "                 '_generate_weights_weight_grad_kernel'}, names\n"
        "assert {l.phase for l in r.launches} == {'train'}\n"
        "assert {l.level for l in r.launches} == set(range(5))\n"
        "assert len(group_launches(r.launches)) < len(r.launches)\n"
        "print('ok')\n", tmp_path)


def test_backbone_on_one_image_leaves_every_launch_as_it_was(tmp_path):
    """The recorded training step runs the backbone on one image and repeats its outputs: every
    launch (arguments with their shapes, dtypes and strides, grid, specialisation, level) is the
    one the whole-batch backbone gives, in fp32 and under fp16 autocast; and the backbone's own
    forward is restored afterwards."""
    _run_python(
        "import contextlib, torch, hyperseg, kernel_record\n"
        "from kernel_record import Recorder, record_train_step\n"
        "def launches(dtype, one_image):\n"
        "    saved = kernel_record.backbone_on_one_image\n"
        "    if not one_image:\n"
        "        kernel_record.backbone_on_one_image = lambda model: contextlib.nullcontext()\n"
        "    try:\n"
        "        r = Recorder()\n"
        "        model = hyperseg.build('hyperseg-m')\n"
        "        record_train_step(model, (64, 128), 3, dtype, r)\n"
        "    finally:\n"
        "        kernel_record.backbone_on_one_image = saved\n"
        "    assert 'forward' not in vars(model.backbone)\n"
        "    return [(l.spec_key, l.grid, l.level, l.args) for l in r.launches]\n"
        "for dtype in (torch.float32, torch.float16):\n"
        "    whole, one = launches(dtype, False), launches(dtype, True)\n"
        "    assert whole and whole == one, dtype\n"
        "print('ok')\n", tmp_path)


def test_train_batches_default_to_the_recipe_and_two():
    args = kernel_report.parse_args(["--train"])
    assert kernel_report._train_batches(args, "hyperseg-m") == [16, 2]
    assert kernel_report._train_batches(args, "hyperseg-l-voc") == [32, 2]
    assert kernel_report._train_batches(args, "hyperseg-s-camvid") == [2]     # its recipe: 2
    args = kernel_report.parse_args(["--train", "--train-batch", "4", "--train-batch", "recipe"])
    assert kernel_report._train_batches(args, "hyperseg-m") == [4, 16]
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit):
            kernel_report.parse_args(["--train", "--train-batch", bad])


PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    2472 bytes stack frame, 3772 bytes spill stores, 3544 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2472 bytes cumulative stack size
"""
SASS = """
        /*0080*/                   LDG.E.128 R4, desc[UR6][R2.64] ;
        /*0090*/              @!P0 LDG.E.U16 R8, desc[UR6][R6.64] ;
        /*00a0*/                   LDGSTS.E.BYPASS.128 [R9], desc[UR6][R2.64] ;
        /*00b0*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], RZ ;
        /*00c0*/                   FFMA R1, R2, R3, R4 ;
        /*00d0*/                   HFMA2.MMA R5, -RZ, RZ, 0, 0 ;
        /*00e0*/                   STL.64 [R1+0x8], R10 ;
        /*00f0*/                   STG.E desc[UR6][R2.64], R0 ;
"""


def test_compiler_output_parsers():
    if not _nvidia_tools_available():
        pytest.skip("triton without its NVIDIA backend or ptxas")
    import collections
    import kernel_sass
    assert kernel_sass.parse_ptxas_log(PTXAS_LOG) == dict(
        registers=255, stack=2472, spill_stores=3772, spill_loads=3544)
    # an empty log (a Triton whose backend printed none) is an error, not zero registers
    with pytest.raises(RuntimeError, match="could not parse the ptxas output"):
        kernel_sass.parse_ptxas_log("")
    lines = map(kernel_sass._SASS_LINE.search, SASS.splitlines())
    opcodes = collections.Counter(m.group(1) for m in lines if m)
    s = kernel_sass.sass_summary(opcodes)
    assert (s["HGMMA"], s["FFMA"], s["HFMA2"], s["STL"], s["instructions"]) == (1, 1, 0, 1, 8)
    assert s["LDG"] == {"2": 1, "16": 1} and s["LDGSTS"] == {"16": 1} and s["STG"] == {"4": 1}
    assert s["widest_load"] == 16
    # H100: 255 registers x 4 warps -> 8 warps/SM (the figure); 64 registers -> 32
    assert kernel_sass.occupancy(255, 0, 4)["warps_per_sm"] == 8
    assert kernel_sass.occupancy(64, 0, 4)["warps_per_sm"] == 32
    assert kernel_sass.occupancy(32, 100 * 1024, 4) == dict(warps_per_sm=8, blocks_per_sm=2,
                                                            limited_by="shared")


def test_block_floors_from_the_structure_alone():
    import hyperseg
    from kernel_roofline import block_floors, block_roofline
    model = hyperseg.build("hyperseg-m")
    rows = block_roofline(model, (512, 1024), 1, "fp32")
    l4 = rows[4]
    assert l4["geometry"] == dict(B=1, H=256, W=512, GH=16, GW=32, P=512, ph=16, pw=16)
    # expand over each 16x16 patch plus its one-pixel halo, 34 -> 68 channels
    assert l4["minimal"]["parts"]["expand"] == 512 * 18 * 18 * 68 * 34
    floors = block_floors(model, (512, 1024))
    assert sorted(floors) == list(range(5)) and all(f > 0 for f in floors.values())
    assert block_floors(model, (512, 1024), dtype="fp16")[4] < floors[4]


TTGIR = """#loc3 = loc("/src/k.py":12:18)
#loc7 = loc("/src/k.py":20:5)
module {
    %xv = tt.load %p, %m, %c : tensor<32x64x!tt.ptr<f16>, #blocked> loc(#loc8)
    %sc = tt.load %r : !tt.ptr<f32> loc(#loc3)
    tt.store %o, %v, %m : tensor<2x64x!tt.ptr<bf16>, #blocked1> loc(#loc9)
}
#loc8 = loc("xv"(#loc3))
#loc9 = loc(callsite(#loc7 at #loc3))
"""
LLIR = """
  %1 = tail call { i32, i32 } asm sideeffect "mov.u32 $0, 0x0;\\0A\\09@$3 ld.global.v2.b32 { $0, $1 }, [ $2 + 0 ];", "=r,=r,l,b"(ptr addrspace(1) %a, i1 %m) #4, !dbg !12
  %2 = tail call i32 asm sideeffect "mov.u32 $0, 0x0;\\0A\\09ld.global.b32 { $0 }, [ $1 + 0 ];", "=r,l"(ptr addrspace(1) %b, i1 %m) #4, !dbg !12
  tail call void asm sideeffect "cp.async.cg.shared.global [ $0 + 0 ], [ $1 + 0 ], 0x10, $2;", "r,l,r"(ptr addrspace(3) %s, ptr addrspace(1) %c, i32 %n) #4, !dbg !12
  tail call void asm sideeffect "@$2 st.global.b16 [ $1 + 0 ], { $0 };", "c,l,b"(i16 %v, ptr addrspace(1) %d, i1 %m) #4, !dbg !14
  %3 = load <4 x float>, ptr addrspace(1) %e, align 16, !dbg !15
!2 = !DIFile(filename: "k.py", directory: "/src")
!4 = distinct !DISubprogram(name: "_k", linkageName: "_k", scope: !2, file: !2, line: 5)
!6 = distinct !DISubprogram(name: "_helper", scope: !2, file: !2, line: 18)
!12 = !DILocation(line: 12, column: 18, scope: !4)
!13 = !DILocation(line: 30, column: 3, scope: !4)
!14 = !DILocation(line: 20, column: 5, scope: !6, inlinedAt: !13)
!15 = !DILocation(line: 40, column: 9, scope: !4)
"""


def test_global_accesses_from_the_compiler_output():
    """Each global access instruction of the LLVM IR, by the source line of its debug location
    (the helper's line for inlined code), with its bytes per thread; the tile's size from the
    TTGIR op on that line."""
    import kernel_sass
    accesses = kernel_sass.global_accesses(LLIR, TTGIR)
    got = {(a["op"], a["line"], a["bytes"], tuple(a["widths"].items()), a["elements"],
            a["element_bytes"]) for a in accesses}
    assert got == {("read", 12, 4, (("4", 1), ("8", 1), ("16", 1)), 2048, 2),
                   ("write", 20, 2, (("2", 1),), 128, 2),
                   ("read", 40, 16, (("16", 1),), 1, 16)}, got
    tagged = [dict(a, code="x  # interior: vector") for a in accesses]
    # 4 warps: line 12 has a 4-byte load in a tile of 2048 half elements (16 per thread): narrow;
    # the 128-element bf16 store is one element per thread (tile-bound: 2 bytes suffice)
    check = kernel_sass.vector_check(tagged, num_warps=4)
    assert (check["tagged"], check["bounded"]) == (3, 1)
    assert [a["line"] for a in check["narrow"]] == [12]
    # with one warp the store's tile holds 4 elements (8 bytes) per thread: 2 bytes is too narrow
    check = kernel_sass.vector_check(tagged, num_warps=1)
    assert [a["line"] for a in check["narrow"]] == [12, 20]


VECTORS = '''
import torch, triton, triton.language as tl
from kernel_record import Recorder, group_launches, recording
from kernel_sass import compile_launch, global_accesses

@triton.jit
def _shifted_copy(x_ptr, out_ptr, SHIFT: tl.constexpr):
    i = tl.program_id(0) * 1024 + tl.arange(0, 1024)
    v = tl.load(x_ptr + i + SHIFT)  # interior: vector
    tl.store(out_ptr + i, v)  # interior: vector

x = torch.empty(4096 + 1)
recorder = Recorder()
with recording(recorder):
    for shift in (0, 1):
        _shifted_copy[(4,)](x, torch.empty(4096), SHIFT=shift)
results = [compile_launch(l) for l in recorder.launches]
assert [r["vector_lines"] for r in results] == [2, 2], results
# aligned: 16-byte loads and stores; shifted by one float: 4-byte loads, flagged
assert [r["narrow_vector_lines"] for r in results] == [0, 1], [r["accesses"] for r in results]
print("ok")
'''


GRADIENT_TILE_VECTORS = '''
import dataclasses, importlib, torch
from kernel_record import Recorder, recording
from kernel_sass import compile_launch
gw = importlib.import_module("hyperseg.kernels.generate_weights")

# fp16, 8 groups of 8 signal inputs and 20 rows: both gradients take 16-patch x 16-row
# multiply-add tiles of the output gradient (256 values)
signal = torch.zeros(2, 64, 16, 32, dtype=torch.float16)
weight = torch.zeros(160, 8)
dout = torch.zeros(2, 16, 32, gw.gradient_stride(160, 2), dtype=torch.float16)
recorder = Recorder()
with recording(recorder):
    torch.ops.hyperseg.generate_weights_backward(dout, signal, weight, 8, 0, 160, True, True)
launches = {l.name: l for l in recorder.launches}
assert set(launches) == {"_generate_weights_signal_grad_kernel",
                         "_generate_weights_weight_grad_kernel"}, launches
for name, launch in launches.items():
    assert (launch.args["BLOCK_N"], launch.args["BLOCK_R"], launch.args["FMA"]) == (16, 16, True)
    assert launch.options.num_warps == 2, (name, launch.options)
    result = compile_launch(launch)
    reads = [a for a in result["accesses"] if a["op"] == "read" and "vector of ROW_ALIGN" in a["code"]]
    assert len(reads) == 1 and reads[0]["bytes"] == 8, (name, reads)
    assert result["narrow_vector_lines"] == 0 and result["spill_bytes"] == 0, (name, result)
    # the same tile on four warps: 2 values, 4 bytes a thread (what the launcher avoids)
    four = dataclasses.replace(launch, options=dataclasses.replace(launch.options, num_warps=4))
    reads = [a for a in compile_launch(four)["accesses"]
             if a["op"] == "read" and "vector of ROW_ALIGN" in a["code"]]
    assert reads[0]["bytes"] == 4, (name, reads)
print("ok")
'''


def test_small_gradient_tiles_read_8_byte_vectors(tmp_path):
    """The generator's gradient kernels run a 16-patch x 16-row tile of a 16-bit output gradient
    on two warps, so that each thread reads 4 values (8 bytes) of it, not 2 (compiled for
    sm_90: with four warps the same read is 4 bytes)."""
    _run_python(GRADIENT_TILE_VECTORS, tmp_path)


GENERATOR_ROW_VECTORS = '''
import importlib, torch
from kernel_record import Recorder, recording
from kernel_sass import compile_launch
gw = importlib.import_module("hyperseg.kernels.generate_weights")

# fp16, 2 groups of 13 signal inputs (as in most zoo generators) and 64 rows: the signal
# gradient runs 32-row x 16-input dots over the generator's rows (512 values on 4 warps)
signal = torch.zeros(2, 26, 16, 32, dtype=torch.float16)
weight = torch.zeros(128, 13, dtype=torch.float16)
dout = torch.zeros(2, 16, 32, 128, dtype=torch.float16)


def generator_reads(padded_rows):
    gw.padded_rows = padded_rows
    recorder = Recorder()
    with recording(recorder):
        torch.ops.hyperseg.generate_weights_backward(dout, signal, weight, 2, 0, 128, True, False)
    (launch,) = recorder.launches
    assert (launch.args["BLOCK_R"], launch.args["BLOCK_S"], launch.args["FMA"]) == (32, 16, False)
    result = compile_launch(launch)
    assert result["spill_bytes"] == result["stack"] == 0, result
    reads = [a for a in result["accesses"] if "vector of GEN_ALIGN" in a["code"]]
    return launch.args["GEN_ALIGN"], result, reads


align, result, reads = generator_reads(gw.padded_rows)
# rows padded to 16 values: 4 values (8 bytes) a thread
assert align == 8 and len(reads) == 1 and reads[0]["bytes"] == 8, reads
assert result["narrow_vector_lines"] == 0, result
# the rows read where they lie, 13 values apart: one value (2 bytes) a thread, which the check
# accepts only as bounded by the data (GEN_ALIGN 1)
align, result, reads = generator_reads(lambda w: (w, w.shape[1]))
assert align == 1 and reads[0]["bytes"] == 2, reads
print("ok")
'''


def test_signal_gradient_reads_generator_rows_as_vectors(tmp_path):
    """The generator's signal gradient reads the generator's rows of 13 values (odd, as in most
    zoo models) from a copy padded to 16: 8-byte vectors in fp16, where the rows as they lie give
    2 bytes (compiled for sm_90)."""
    _run_python(GENERATOR_ROW_VECTORS, tmp_path)


DENSE_TILE_VECTORS = '''
import dataclasses, torch
from kernel_record import Recorder, recording
from kernel_sass import compile_launch

# fp16, a dense 1x1 convolution of 16 -> 16 channels over 4 x 4-pixel patches: the forward, the
# input gradient and the kernel gradient each take 16 x 16 x 16 tiles on dots
x = torch.zeros(1, 16, 16, 16, dtype=torch.float16)
weight = torch.zeros(1, 4, 4, 16, 16, 1, 1, dtype=torch.float16)
recorder = Recorder()
with recording(recorder):
    torch.ops.hyperseg.patch_conv2d(x, weight, None, "reflect", 1)
    torch.ops.hyperseg.patch_conv2d_backward(x, x, weight, True, True, False, "reflect", 1)
launches = {l.name: l for l in recorder.launches}
assert set(launches) == {"_patch_conv_kernel", "_patch_conv_input_grad_kernel",
                         "_patch_conv_weight_grad_kernel"}, launches
for name, launch in launches.items():
    a = launch.args
    assert (a["BLOCK_CO"], a["BLOCK_CI"], a["BLOCK_P"], a["FMA"]) == (16, 16, 16, False), (name, a)
    assert launch.options.num_warps == 2, (name, launch.options)
    two = compile_launch(launch)
    four = compile_launch(dataclasses.replace(
        launch, options=dataclasses.replace(launch.options, num_warps=4)))
    lines = lambda result: {(a["line"], a["op"]): a["bytes"] for a in result["accesses"]
                            if "interior: vector" in a["code"]}
    # every tagged access of a 256-value tile: 8 bytes a thread on two warps, 4 on four
    assert len(lines(two)) >= 2 and set(lines(two).values()) == {8}, (name, lines(two))
    assert set(lines(four).values()) == {4}, (name, lines(four))
    assert two["narrow_vector_lines"] == 0 and two["spill_bytes"] == two["stack"] == 0, two
    assert two["registers"] <= four["registers"] + 8, (two["registers"], four["registers"])
print("ok")
'''


def test_small_dense_dot_tiles_read_8_byte_vectors(tmp_path):
    """The patch-wise convolution's dense kernels on dots run 16 x 16 x 16 tiles on two warps:
    each of their tagged loads and stores moves 8 bytes a thread in 16-bit (4 on four warps),
    with no spill and about the same registers (compiled for sm_90)."""
    _run_python(DENSE_TILE_VECTORS, tmp_path)


def test_vector_tag_conditions_and_runs():
    """``# interior: vector [of NAME] [when NAME OP VALUE and ...]``: the condition selects the
    specialisations the tag applies to; the run bounds the vector by its alignment."""
    import kernel_sass
    tag = kernel_sass.vector_tag
    assert tag("x = 1", {}) is None
    assert tag("tl.load(p)  # interior: vector", {}) == 0
    assert tag("tl.load(p)  # interior: vector when K == 1", {"K": 1}) == 0
    assert tag("tl.load(p)  # interior: vector when K == 1", {"K": 3}) is None
    assert tag("tl.load(p)  # interior: vector of PW when K == 1 and TAIL == False",
               {"K": 1, "PW": 10, "TAIL": False}) == 10
    with pytest.raises(ValueError, match="condition"):
        tag("tl.load(p)  # interior: vector when K", {"K": 1})
    with pytest.raises(ValueError, match="run"):
        tag("tl.load(p)  # interior: vector of PW", {"K": 1})
    # a 10-wide row of fp16 (the v1 block's patches laid out with their halos) starts at even
    # elements only: 4 bytes are all a vector can hold there, 8 for a 16-wide one
    access = dict(code="tl.load(p)  # interior: vector of PW", elements=1024, element_bytes=2,
                  bytes=4, widths={"4": 1})
    assert kernel_sass.vector_check([access], 4, {"PW": 10})["narrow"] == []
    assert kernel_sass.vector_check([access], 4, {"PW": 16})["narrow"] == [access]


def test_vector_check_on_compiled_kernels(tmp_path):
    """The check reads what the compiler made: a load shifted off the 16-byte alignment compiles
    to scalar loads and is flagged, the aligned one is not."""
    _run_python(VECTORS, tmp_path)


PTXAS_LOG_OF_THE_COMPILE = '''
import subprocess
import triton, triton.language as tl
import triton.backends.nvidia.compiler as nvidia
from triton import knobs
from triton.compiler import ASTSource
from kernel_sass import compile_with_ptxas_log, parse_ptxas_log

@triton.jit
def _double(x_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(x_ptr + i, 2 * tl.load(x_ptr + i))

commands, original_run = [], subprocess.run
def run(cmd, *args, **kwargs):
    commands.append(cmd)
    return original_run(cmd, *args, **kwargs)
nvidia.subprocess.run = run       # the backend's own ptxas call (and every other), recorded

before = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
source = ASTSource(_double, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {(1,): 1024})
for compiles in (1, 2):           # the second finds the first in Triton's cache
    kernel, log = compile_with_ptxas_log(source, {"num_warps": 4})
    ptxas = [c for c in commands if "-v" in c and any("gpu-name" in a for a in c)]
    assert len(ptxas) == compiles, commands
    usage = parse_ptxas_log(log)
    assert usage["registers"] > 0 and usage["stack"] == usage["spill_stores"] == 0, log
assert (knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log) == before
print("ok")
'''


def test_registers_and_spills_come_from_tritons_own_ptxas_run(tmp_path):
    """Registers and spills are read from the log of the ptxas run that made the cubin, with
    the flags of the installed Triton (3.8 passes --regAllocOptLevel=2, 3.6 does not), also
    when the kernel is already in Triton's cache; the compiler's settings are left as found."""
    _run_python(PTXAS_LOG_OF_THE_COMPILE, tmp_path)


AUTOTUNED = '''
import torch, triton, triton.language as tl
from kernel_record import Recorder, group_launches, recording
from kernel_sass import compile_launch

@triton.autotune(configs=[triton.Config({"BLOCK": 32}, num_warps=1),
                          triton.Config({"BLOCK": 64}, num_warps=2)], key=["n"])
@triton.heuristics({"EVEN": lambda args: args["n"] % args["BLOCK"] == 0})
@triton.jit
def _double(x_ptr, out_ptr, n, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, 2 * tl.load(x_ptr + i, mask=i < n), mask=i < n)

x = torch.empty(256)
recorder = Recorder()
with recording(recorder):
    _double[lambda meta: (triton.cdiv(256, meta["BLOCK"]),)](x, torch.empty_like(x), 256)
launches = [g[0] for g in group_launches(recorder.launches)]
assert [(l.variant.split(",")[0], l.grid, l.args["EVEN"], l.options.num_warps) for l in launches] == [
    ("BLOCK: 32", (8, 1, 1), True, 1), ("BLOCK: 64", (4, 1, 1), True, 2)], launches
assert all(compile_launch(l)["registers"] > 0 for l in launches)
# the configs of one autotuned call share its call number (its work counts once per block)
assert len({l.call for l in recorder.launches}) == 1 and len(recorder.launches) == 2
print("ok")
'''


def test_autotuned_kernels_are_recorded_config_by_config(tmp_path):
    """Every config of an autotuned (and heuristics-decorated) kernel is a variant of its own."""
    _run_python(AUTOTUNED, tmp_path)


def test_check_flags_a_block_that_does_too_much_work():
    report = _fake_report(0)
    report["reports"][0]["blocks"] = [dict(level=3, block="InvRes v1", redundancy=2.5),
                                      dict(level=4, block="InvRes v1", redundancy=1.6)]
    failures = property_failures(report)
    assert len(failures) == 1 and "L3" in failures[0] and "redundancy <= 2.0" in failures[0]


def test_from_json_refuses_a_missing_or_malformed_report(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    other = tmp_path / "other.json"
    other.write_text('{"tool": "something else"}')
    for path in (tmp_path / "missing.json", bad, other):
        result = _run(["--from-json", str(path)], tmp_path, timeout=120)
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"--from-json {path}: not a readable report" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
