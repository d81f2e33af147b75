"""The layout DESIGN.md asks for, checked on the source: no import circle anywhere in
src/loradex (counting the imports inside functions too, which is how circles used to be hidden),
and no module grown into an everything-room."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
#: "no module over ~600 lines": the hard limit leaves room for a docstring or two
MAX_LINES = 700


def _modules() -> dict[str, Path]:
    out = {}
    for f in (SRC / "loradex").rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_graph(lazy: bool) -> dict[str, set[str]]:
    """Module -> the loradex modules it imports (``lazy``: imports inside functions too;
    ``if TYPE_CHECKING:`` blocks never count: they do not run)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, f in mods.items():
        edges: set[str] = set()

        def visit(node: ast.AST, edges: set[str] = edges) -> None:
            for n in ast.iter_child_nodes(node):
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and not lazy:
                    continue
                if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
                    continue
                if isinstance(n, ast.Import):
                    edges.update(resolve(a.name) for a in n.names if a.name.startswith("loradex"))
                elif isinstance(n, ast.ImportFrom) and not n.level and (n.module or "").startswith("loradex"):
                    for a in n.names:
                        full = f"{n.module}.{a.name}"
                        edges.add(resolve(full) if full in mods else resolve(n.module))
                visit(n, edges)

        visit(ast.parse(f.read_text()))
        edges.discard(mod)
        edges.discard(None)
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_in_src_loradex():
    assert cycles(import_graph(lazy=False)) == []
    assert cycles(import_graph(lazy=True)) == []  # not even through imports inside functions


def test_core_imports_nothing_above_it():
    graph = import_graph(lazy=True)
    above = [(m, d) for m, deps in graph.items() if m.startswith("loradex.core")
             for d in deps if not d.startswith(("loradex.core", "loradex.errors", "loradex.log", "loradex.fsutil"))
             and d != "loradex"]
    assert above == []


def test_no_module_grows_into_an_everything_room():
    big = {m: n for m, f in _modules().items() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert big == {}
