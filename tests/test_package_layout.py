"""The package's shape, checked: one concern per readable module, imports at the top, no import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "arena"
MAX_LINES = 600
# Imports a library module may defer: optional or heavy packages used by one rarely-called function, and the
# doctor's stack checks, which must report a broken torch/torchcodec install instead of failing to import.
DEFERRABLE = {"matplotlib", "matplotlib.pyplot", "optuna.visualization", "torch", "torch.hub", "torchcodec",
              "torchcodec._core", "torchcodec._internally_replaced_utils", "timm.models", "pynvml"}
# The one arena import a library module may defer: the doctor's face-detector check, because arena.faces.detect
# imports torch, and the doctor must be importable (to report it) when torch is broken.
DEFERRABLE_ARENA = {"arena.doctor": {"arena.faces.detect", "arena.faces.detect.DETECTORS",
                                     "arena.faces.detect.detector_info"}}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module top) for every import statement of ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.module, id(node) in top)] + [(f"{node.module}.{a.name}", id(node) in top) for a in node.names]
    return out


def test_no_module_is_over_600_lines():
    sizes = {name: len(p.read_text(encoding="utf-8").splitlines()) for name, p in _modules().items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}


def test_library_modules_import_at_the_top():
    late = []
    for name, path in _modules().items():
        if name.startswith("arena.cli"):
            continue  # the CLI defers imports so that `arena --help` does not load torch
        allowed = DEFERRABLE_ARENA.get(name, set())
        late += [f"{name}: {mod}" for mod, at_top in _imports(path) if not at_top and mod not in allowed and
                 (mod.startswith("arena") or not any(mod == d or mod.startswith(d + ".") for d in DEFERRABLE))]
    assert late == []


def test_no_import_cycle_between_arena_modules():
    mods = _modules()
    graph = {name: {m for m, _ in _imports(path) if m in mods and m != name} for name, path in mods.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    # A package importing its own submodules (arena.cache -> arena.cache.reader) is not a cycle of concerns.
    cycles = [c for c in cycles if not all(x.startswith(c[0] + ".") or x == c[0] for x in c)]
    assert cycles == []


def test_help_does_not_import_torch():
    code = "import sys; from arena.cli import main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
