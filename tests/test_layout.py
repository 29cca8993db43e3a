"""The house plan, enforced: the runtime never imports export, and no import cycle (deferred imports included).

Read from the source with `ast`, so the test needs nothing installed and names the offending line.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "export", "kernels", "bench")
# entry points: the only engine modules allowed to import export/ (build, bench, demo are commands)
ENTRY_POINTS = ("auraflow_edge.engine.cli",)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out["auraflow_edge." + ".".join(parts)] = f
    return out


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, relative ones resolved."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # `from pkg import submodule` depends on the submodule
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in known else mod, node.lineno))
    return [(m, line) for m, line in out if m.startswith("auraflow_edge.")]


def _graph() -> tuple[dict[str, list[tuple[str, int]]], dict[str, Path]]:
    mods = _modules()
    known = set(mods)
    return {n: _imports(n, p, known) for n, p in mods.items()}, mods


def test_runtime_never_imports_export():
    graph, mods = _graph()
    bad = [
        f"{mods[n].relative_to(ROOT)}:{line} imports {m}"
        for n, edges in graph.items()
        if n.startswith("auraflow_edge.engine") and not n.startswith(ENTRY_POINTS)
        for m, line in edges
        if m.startswith(("auraflow_edge.export", "auraflow_edge.bench"))
    ]
    assert not bad, "the runtime imports export/bench:\n" + "\n".join(bad)


def test_kernels_import_only_kernels():
    graph, mods = _graph()
    bad = [
        f"{mods[n].relative_to(ROOT)}:{line} imports {m}"
        for n, edges in graph.items()
        if n.startswith("auraflow_edge.kernels")
        for m, line in edges
        if not m.startswith("auraflow_edge.kernels")
    ]
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w, _ in graph.get(v, ()):
            if w not in graph:
                continue
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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    graph, _ = _graph()
    # a package's __init__ importing nothing is not part of a cycle; drop self-edges of packages
    graph = {n: [(m, line) for m, line in e if m != n] for n, e in graph.items()}
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    g = {"a": [("b", 1)], "b": [("c", 1)], "c": [("a", 1)], "d": [("a", 1)]}
    assert _cycles(g) == [["a", "b", "c"]]
