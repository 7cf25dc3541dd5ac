"""The package's import structure: no cycles, imports only go down the layers, and the modules that
others build on import alone.

The graph is read from the source with ``ast``: every ``import`` of a ``hyperseg`` module, at module
level or inside a function, except those under ``if TYPE_CHECKING:`` (annotations only) and those
in a module's ``__getattr__`` (the deprecated aliases of names that moved).
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each module's layer; a module may import modules of its own layer or below. A new module must be
# placed here.
LAYERS = {
    0: ["errors", "options", "layout", "palettes", "zoo"],
    1: ["ops", "kernels"],
    2: ["backbone", "context_head", "decoder", "distributed", "metrics", "losses", "images"],
    3: ["official", "checkpoint", "pretrained"],
    4: ["model"],
    5: ["calibration", "export", "baseline", "predict", "datasets", "timing"],
    6: ["evaluate", "video", "benchmark"],
    7: ["train", "predict_jobs"],
    8: ["commands"],
    9: ["__main__"],
}
LAYER = {name: level for level, names in LAYERS.items() for name in names}


def _module_files():
    """{module name under hyperseg (kernels.* as 'kernels'): its source files}."""
    files = {}
    for path in sorted((ROOT / "hyperseg").glob("*.py")):
        if path.stem != "__init__":
            files.setdefault(path.stem, []).append(path)
    files["kernels"] = sorted((ROOT / "kernels").glob("*.py"))
    return files


def _skipped_blocks(tree):
    """Nodes whose imports do not count: ``if TYPE_CHECKING:`` bodies and ``__getattr__``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            yield node
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            yield node


def _imports(module: str, path: Path) -> set:
    """The hyperseg modules that ``path`` (part of ``module``) imports."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for block in _skipped_blocks(tree) for n in ast.walk(block)}
    package = "kernels" if module == "kernels" else None
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names = []
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names = [node.module or ""]
            else:
                # relative: from hyperseg/X.py level 1 is hyperseg; from kernels/X.py level 1 is
                # hyperseg.kernels and level 2 hyperseg
                base = ["hyperseg"] + ([package] if package and node.level == 1 else [])
                if node.module:
                    names = [".".join(base + [node.module])]
                else:
                    names = [".".join(base + [alias.name]) for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "hyperseg" and len(parts) > 1:
                found.add(parts[1])
    found.discard(module)
    return found


# Edges the layers allow but the design does not: the kernels are tested against the reference,
# never built on it; reading a dataset does not go through prediction code.
FORBIDDEN = [("kernels", "ops"), ("ops", "kernels"), ("checkpoint", "model"), ("datasets", "predict")]


def import_graph() -> dict:
    """{module: the modules of the package it imports} (names imported from the package's
    ``__init__``, such as ``__version__``, are not modules)."""
    files = _module_files()
    return {module: set().union(*(_imports(module, p) for p in paths)) & set(files)
            for module, paths in files.items()}


def test_no_forbidden_import():
    graph = import_graph()
    found = [f"{src} imports {dst}" for src, dst in FORBIDDEN if dst in graph.get(src, ())]
    assert not found, found


def test_every_module_has_a_layer():
    unplaced = sorted(set(import_graph()) - set(LAYER))
    assert not unplaced, f"place these modules in LAYERS: {unplaced}"


def test_imports_go_down_the_layers():
    upward = [f"{src} (layer {LAYER[src]}) imports {dst} (layer {LAYER[dst]})"
              for src, dsts in import_graph().items() for dst in sorted(dsts)
              if src in LAYER and dst in LAYER and LAYER[dst] > LAYER[src]]
    assert not upward, "\n".join(upward)


def test_import_graph_has_no_cycle():
    graph = import_graph()
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_graph_reader_sees_imports(tmp_path):
    """The reader itself: module-level, relative, in-function imports count; TYPE_CHECKING and
    ``__getattr__`` ones do not."""
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import ops\n"
        "from .zoo import get_config\n"
        "import hyperseg.layout\n"
        "if TYPE_CHECKING:\n    from .model import HyperSeg\n"
        "def f():\n    from .decoder import Decoder\n"
        "def __getattr__(name):\n    from .train import train\n")
    assert _imports("m", source) == {"ops", "zoo", "layout", "decoder"}
    kernel = tmp_path / "k.py"
    kernel.write_text("from ._common import x\nfrom ..layout import check_grid\n")
    assert _imports("kernels", kernel) == {"layout"}


def _all_modules():
    names = [f"hyperseg.{p.stem}" for p in sorted((ROOT / "hyperseg").glob("*.py"))
             if p.stem != "__init__"]
    return names + [f"hyperseg.kernels.{p.stem}" for p in sorted((ROOT / "kernels").glob("*.py"))
                    if p.stem != "__init__"]


# Run by test_every_module_imports_alone in a fresh interpreter: loads the third-party libraries
# once, then imports each module named on the command line in a forked child of its own, which
# starts with no module of the package loaded. Prints "name: traceback" for each failure.
_IMPORT_EACH = """
import importlib, os, sys, traceback
import numpy, torch, torchvision, timm, triton
assert not [m for m in sys.modules if m.split('.')[0] == 'hyperseg'], 'hyperseg already loaded'
for name in sys.argv[1:]:
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
            code = 0
        except BaseException:
            print(name + ':', traceback.format_exc()[-1500:])
            code = 1
        sys.stdout.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if not os.WIFEXITED(status):
        print(name + ': the child was ended by signal', os.WTERMSIG(status))
"""


def test_every_module_imports_alone():
    """Each module of the package is the first of the package that an interpreter imports (an
    import cycle, or a module that works only after another has been imported, fails here). The
    interpreter has loaded torch, triton and the other third-party libraries, then forks one
    child per module, so each start does not pay for importing torch again."""
    modules = _all_modules()
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *modules], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "", proc.stdout
