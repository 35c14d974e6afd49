"""The package's layers, read from the source with ``ast`` (no imports, no processes).

Dependencies point one way: ``server -> engine -> models -> runtime, parallel, cache``, with
``ithaca.types`` and ``ithaca.config`` below all of them. Every ``import`` counts,
including the lazy ones inside functions: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "ithaca"

FORBIDDEN = {
    # layer: the layers it must never import
    "types": {"config", "server", "engine", "models", "cache", "parallel", "testing", "api"},
    "config": {"server", "engine", "models", "cache", "parallel", "testing", "api"},
    "autolayout": {"config", "server", "engine", "models", "cache", "parallel", "testing", "api"},
    "parallel": {"server", "engine", "models", "cache", "testing", "api"},
    "cache": {"server", "engine", "models", "testing", "api"},
    "models": {"server", "engine", "testing", "api"},
    "runtime": {"server", "engine", "models", "testing", "api"},
    "engine": {"server", "testing"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The ithaca modules ``path`` imports (``from pkg import sub`` -> ``pkg.sub``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ithaca")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            if not base.startswith("ithaca"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


@functools.cache  # read once per run, not once per test (13 tests; the tree is ~150 files)
def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_graph_is_read():
    graph = _graph()
    assert {"ithaca.types", "ithaca.parallel"} <= graph["ithaca.runtime.loop"]
    assert "ithaca.parallel.comm" in graph["ithaca.cache.base"]  # from pkg import submodule


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_downwards_only(layer):
    graph = _graph()
    wrong = sorted(
        f"{src} imports {dst}"
        for src, dsts in graph.items()
        if _layer(src) == layer
        for dst in dsts
        if _layer(dst) in FORBIDDEN[layer]
    )
    assert wrong == []


def test_runtime_never_imports_test_helpers():
    graph = _graph()
    wrong = sorted(
        f"{src} imports {dst}"
        for src, dsts in graph.items()
        if _layer(src) != "testing"
        for dst in dsts
        if _layer(dst) == "testing"
    )
    assert wrong == []


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path, or None (iterative DFS with colours)."""
    colour: dict[str, int] = {}
    for start in sorted(graph):
        if colour.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(child) == 1:
                return [*path[path.index(child) :], child]
            elif not colour.get(child):
                colour[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return None


def test_no_import_cycle_between_layers():
    graph = _graph()
    layers: dict[str, set[str]] = {}
    for src, dsts in graph.items():
        layers.setdefault(_layer(src), set()).update(
            _layer(d) for d in dsts if _layer(d) != _layer(src)
        )
    assert _cycle(layers) is None


def test_no_import_cycle_between_modules():
    graph = _graph()
    # A package's __init__ re-exporting its submodules is not a cycle of its own making.
    edges = {
        src: {d for d in dsts if not (src.startswith(d + ".") and _modules_is_pkg(d))}
        for src, dsts in graph.items()
    }
    assert _cycle(edges) is None


def _modules_is_pkg(name: str) -> bool:
    return (ROOT.parent / Path(*name.split(".")) / "__init__.py").is_file()


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
