"""The package's layers point one way (ARCHITECTURE.md), checked from the source with ``ast``.

    reference, testing, timing, _ext  ->  triton/  ->  ops/  ->  nn/  ->  models/  ->  explain, distributed, __main__

A module may import its own floor and the floors below it, never above: ``ops/`` and ``triton/`` never
import ``nn/`` or ``models/``, ``nn/`` never imports ``models/``, ``triton/`` never imports ``ops/``. The
module-level import graph has no cycle, and no module imports a paca_kernels module inside a function
(a lazy import is how a cycle hides). Each rule is also run on a small synthetic package that breaks
it, so that a checker that found nothing would fail here.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

from paca_kernels import PaCaAttention, _ext

PKG = Path(__file__).resolve().parents[1] / "paca_kernels"

#: Floor of each module, by its dotted name's first component below the package (longest match).
FLOORS: dict[str, int] = {
    "reference": 0, "testing": 0, "timing": 0, "_ext": 0, "_build_info": 0,
    "triton": 1,
    "ops": 2,
    "nn": 3,
    "models": 4,
    "explain": 5, "distributed": 5, "deploy": 5, "__main__": 5, "": 5,  # "" is the package's __init__
}


def _modules(root: Path) -> dict[str, Path]:
    """Dotted name (relative to the package, "" for its __init__) -> file."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return name == "" or modules[name].name == "__init__.py"


def _resolve(name: str, node: ast.ImportFrom | ast.Import, modules: dict[str, Path], top: str) -> list[str]:
    """The package modules an import statement in module ``name`` refers to."""
    targets: list[str] = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == top or alias.name.startswith(top + "."):
                targets.append(alias.name.removeprefix(top).removeprefix("."))
        return [t for t in targets if t in modules]
    if node.level == 0:
        if not (node.module == top or (node.module or "").startswith(top + ".")):
            return []
        base = node.module.removeprefix(top).removeprefix(".")
    else:
        here = name.split(".") if name else []
        if not _is_package(name, modules):
            here = here[:-1]
        up = node.level - 1
        if up > len(here):
            raise AssertionError(f"{name}: relative import beyond the package")
        base_parts = here[: len(here) - up] if up else here
        if node.module:
            base_parts = base_parts + node.module.split(".")
        base = ".".join(base_parts)
    for alias in node.names:
        sub = f"{base}.{alias.name}" if base else alias.name
        targets.append(sub if sub in modules else base)
    return [t for t in targets if t in modules]


def import_graph(root: Path, top: str) -> tuple[dict[str, set[str]], list[str]]:
    """(module-level import edges between the package's modules, imports found inside functions)."""
    modules = _modules(root)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    lazy: list[str] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(n) for f in funcs for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = [t for t in _resolve(name, node, modules, top) if t != name]
            if id(node) in inside:
                lazy.extend(f"{name or top} imports {t or top} inside a function (line {node.lineno})"
                            for t in targets)
            else:
                edges[name].update(targets)
    return edges, lazy


def _floor(name: str) -> int:
    first = name.split(".")[0] if name else ""
    return FLOORS[first]


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a higher floor."""
    return sorted(
        f"{a or '<package>'} (floor {_floor(a)}) imports {b} (floor {_floor(b)})"
        for a, targets in edges.items() for b in targets if _floor(b) > _floor(a)
    )


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles (one path per strongly connected component of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


# -- the package ------------------------------------------------------------------------------------


def test_every_module_has_a_floor() -> None:
    edges, _ = import_graph(PKG, "paca_kernels")
    unknown = [m for m in edges if (m.split(".")[0] if m else "") not in FLOORS]
    assert not unknown, f"modules outside the known floors (add them to ARCHITECTURE.md and FLOORS): {unknown}"


def test_layers_point_one_way() -> None:
    edges, _ = import_graph(PKG, "paca_kernels")
    assert not upward_imports(edges), "imports against the layering:\n" + "\n".join(upward_imports(edges))


def test_no_import_cycles() -> None:
    edges, _ = import_graph(PKG, "paca_kernels")
    assert not cycles(edges), f"import cycles: {cycles(edges)}"


def test_no_package_imports_inside_functions() -> None:
    _, lazy = import_graph(PKG, "paca_kernels")
    assert not lazy, "lazy imports of the package's own modules:\n" + "\n".join(lazy)


def test_ops_take_tensors_not_modules() -> None:
    """The ops (and the Triton launchers) never touch torch.nn modules: no ``nn`` import at all."""
    offenders = []
    for path in sorted((PKG / "ops").rglob("*.py")) + sorted((PKG / "triton").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(
                a.name == "nn" for a in node.names
            ):
                offenders.append(str(path.relative_to(PKG)))
            if isinstance(node, ast.Import) and any(a.name == "torch.nn" for a in node.names):
                offenders.append(str(path.relative_to(PKG)))
    assert not offenders, f"ops/triton modules importing torch.nn: {offenders}"


# -- the checker catches what it must --------------------------------------------------------------


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pk"
    for rel, text in {"__init__.py": "", "ops/__init__.py": "", "nn/__init__.py": "",
                      "models/__init__.py": "", "triton/__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "expect"),
    [
        ({"ops/a.py": "from ..nn import b\n", "nn/b.py": ""}, "ops.a (floor 2) imports nn.b (floor 3)"),
        ({"ops/a.py": "from pk.models import m\n", "models/m.py": ""}, "ops.a (floor 2) imports models.m"),
        ({"nn/a.py": "from .. import models\n"}, "nn.a (floor 3) imports models (floor 4)"),
        ({"triton/k.py": "from ..ops import x\n", "ops/x.py": ""}, "triton.k (floor 1) imports ops.x"),
    ],
    ids=["ops-nn", "ops-models-absolute", "nn-models", "triton-ops"],
)
def test_checker_finds_upward_imports(tmp_path: Path, files: dict[str, str], expect: str) -> None:
    edges, _ = import_graph(_fake_package(tmp_path, files), "pk")
    assert any(expect in line for line in upward_imports(edges)), upward_imports(edges)


def test_checker_finds_cycles_and_lazy_imports(tmp_path: Path) -> None:
    root = _fake_package(tmp_path, {
        "nn/a.py": "from .b import g\n",
        "nn/b.py": "from . import a\n\ndef g():\n    from ..models import m\n",
        "models/m.py": "",
    })
    edges, lazy = import_graph(root, "pk")
    assert cycles(edges) == [["nn.a", "nn.b"]]
    assert lazy == ["nn.b imports models.m inside a function (line 4)"]


# -- one decision point: a layer call enters each file once -----------------------------------------


def _entries_per_file(fn) -> dict[str, int]:
    """How often each package file is entered from another file while ``fn()`` runs (Python calls)."""
    counts: dict[str, int] = {}

    def name(frame) -> str | None:
        f = frame.f_code.co_filename
        return f.split("paca_kernels/")[-1] if "/paca_kernels/" in f else None

    def prof(frame, event, arg) -> None:
        if event != "call":
            return
        callee = name(frame)
        if callee is not None and (frame.f_back is None or name(frame.f_back) != callee):
            counts[callee] = counts.get(callee, 0) + 1

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return counts


def test_a_layer_call_enters_each_file_once() -> None:
    """PaCaAttention.forward in CPU inference asks one function which path serves the call and runs
    that path: no file of the package is entered twice (before the one decision point, the layer
    asked three ops in turn whether they applied, each asking the backend registry again: 21 stays
    in 8 files). The modules' path is not held to this: it runs two differentiable ops, each
    validated and dispatched, and the modules' own forwards."""
    if not _ext.load():
        pytest.skip(f"C++ extension: {_ext.unavailable_reason()}")
    layer = PaCaAttention(32, 2, 8, backend="cpu").eval()
    x = torch.randn(1, 16, 32)
    with torch.no_grad():
        layer(x, 4, 4)  # warm: first-call imports and registrations
        counts = _entries_per_file(lambda: layer(x, 4, 4))
    assert counts.get("nn/attention.py") == 1
    assert "ops/fused/conv_paca_layer.py" in counts  # the whole layer as one op
    twice = {f: n for f, n in counts.items() if n > 1}
    assert not twice, f"files entered more than once in one layer call: {twice} (all: {counts})"
