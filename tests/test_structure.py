"""The package's import graph has no circle: an AST pass over every module's imports,
those inside functions included (a circle closed at call time is still a circle)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlxdist"


def module_names() -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (``from a import b`` counts ``a.b`` when
    it is a module, else ``a``), at any depth of the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
    return {m for m in found if m in modules and m != name}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), and self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_circle_finder_finds_a_circle():
    # The reference: a graph with one known circle and a tail.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_import_parser_sees_function_level_and_relative_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from mlxdist.world import world\n    from . import errors\n")
    modules = {"mlxdist.world", "mlxdist.errors", "mlxdist.x.m"}
    assert imports_of("mlxdist.x.m", path, modules) == {"mlxdist.world"}
    path.write_text("from .. import errors\nimport mlxdist.world\n")
    assert imports_of("mlxdist.x.m", path, modules) == {"mlxdist.errors", "mlxdist.world"}


def test_mlxdist_has_no_import_circle():
    files = module_names()
    graph = {name: imports_of(name, path, set(files)) for name, path in files.items()}
    assert graph["mlxdist.world"] >= {"mlxdist.deadline", "mlxdist._c.gate"}
    assert circles(graph) == []


def test_the_c_gate_imports_nothing_above_it():
    """mlxdist._c imports only the compiled modules and mlxdist.errors."""
    files = module_names()
    for name, path in files.items():
        if name == "mlxdist._c" or name.startswith("mlxdist._c."):
            above = {m for m in imports_of(name, path, set(files))
                     if not (m == "mlxdist._c" or m.startswith("mlxdist._c.")) and m != "mlxdist.errors"}
            assert not above, (name, above)
