"""The package's structure, checked with an AST pass over every module's imports (those
inside functions included: a circle closed at call time is still a circle):

- the import graph has no circle;
- every import goes to the importer's floor or a lower one, by the floor table in
  ARCHITECTURE.md (parsed from it, so the document and the code cannot drift apart);
- no module outside ``mlxdist/group.py`` reads a Group's private attributes (the layers
  beneath a Group receive its record, ``mlxdist.group_record.GroupRecord``).
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Mapping, Set
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mlxdist"
ARCHITECTURE = ROOT / "ARCHITECTURE.md"
GROUP = PACKAGE / "group.py"


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


@functools.lru_cache(maxsize=1)
def package_graph() -> dict[str, frozenset[str]]:
    """The package's import graph, parsed once for the checks that read it."""
    files = module_names()
    return {name: frozenset(imports_of(name, path, set(files))) for name, path in files.items()}


def test_mlxdist_has_no_import_circle():
    graph = package_graph()
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


# -- floors ------------------------------------------------------------------------------


def floor_table(text: str) -> dict[str, int]:
    """``{module or package name: floor}`` from the Markdown table under the heading
    "The floors, as the test reads them" (rows ``| floor | `name`, `name` ... |``)."""
    section = text.split("## The floors, as the test reads them", 1)[1].split("\n## ", 1)[0]
    table: dict[str, int] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            for name in re.findall(r"`([\w.]+)`", cells[1]):
                table[name] = int(cells[0])
    return table


def floor_of(module: str, table: dict[str, int]) -> int | None:
    """The floor of the longest table name that is ``module`` or a package above it (the
    bare package name covers only the package's own ``__init__``)."""
    best = None
    for name, floor in table.items():
        covers = module == name or (name != "mlxdist" and module.startswith(name + "."))
        if covers and (best is None or len(name) > len(best[0])):
            best = (name, floor)
    return None if best is None else best[1]


def upward_imports(graph: Mapping[str, Set[str]], table: dict[str, int]) -> list[tuple[str, int, str, int]]:
    """Every import of a module on a higher floor: (importer, its floor, imported, its floor)."""
    found = []
    for name, imported in sorted(graph.items()):
        for other in sorted(imported):
            mine, theirs = floor_of(name, table), floor_of(other, table)
            if mine is not None and theirs is not None and theirs > mine:
                found.append((name, mine, other, theirs))
    return found


def test_the_floor_checker_finds_an_upward_import():
    # The reference: a table and a graph with one import that climbs a floor.
    text = "## The floors, as the test reads them\n\n| floor | modules |\n|---|---|\n" \
           "| 2 | `pkg.top` |\n| 1 | `pkg.low`, `mlxdist` |\n\n## Next\n| 9 | `pkg.other` |\n"
    table = floor_table(text)
    assert table == {"pkg.top": 2, "pkg.low": 1, "mlxdist": 1}
    assert floor_of("pkg.low.inner", table) == 1 and floor_of("mlxdist.world", table) is None
    graph = {"pkg.top": {"pkg.low"}, "pkg.low.inner": {"pkg.top"}}
    assert upward_imports(graph, table) == [("pkg.low.inner", 1, "pkg.top", 2)]


def test_every_import_stays_on_its_floor_or_goes_down():
    files = module_names()
    graph = package_graph()
    table = floor_table(ARCHITECTURE.read_text())
    assert {"mlxdist._c", "mlxdist.group", "mlxdist._paths", "mlxdist.world"} <= set(table)
    unplaced = sorted(name for name in files if floor_of(name, table) is None)
    assert unplaced == [], f"modules with no floor in ARCHITECTURE.md: {unplaced}"
    assert upward_imports(graph, table) == []


# -- a Group's private attributes -------------------------------------------------------


def group_privates() -> set[str]:
    """The private names a Group defines: its slots and its private methods."""
    tree = ast.parse(GROUP.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Group")
    names: set[str] = set()
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("_") and not node.name.startswith("__"):
            names.add(node.name)
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__slots__" for t in node.targets):
            names.update(e.value for e in ast.walk(node.value) if isinstance(e, ast.Constant)
                         and isinstance(e.value, str) and e.value.startswith("_") and not e.value.startswith("__"))
    return names


def private_reads(path: Path, privates: set[str]) -> list[str]:
    """Reads of ``privates`` on anything but ``self``, and any ``group._x``, in one file."""
    names = "|".join(sorted(privates))
    patterns = [re.compile(rf"(?<!\bself)\.({names})\b"), re.compile(r"\bgroup\._[a-z]\w*")]
    found = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        for pattern in patterns:
            found += [f"{path.name}:{i}: {m.group(0)}" for m in pattern.finditer(line)]
    return found


def test_the_private_read_finder_finds_one(tmp_path):
    privates = group_privates()
    assert {"_record", "_peer", "_collective"} <= privates
    path = tmp_path / "m.py"
    path.write_text("def f(g, group):\n    return g._record.size + group._size\n\nclass A:\n    "
                    "def m(self):\n        return self._record, self.other._peer is myself._collective\n")
    assert private_reads(path, privates) == ["m.py:2: ._record", "m.py:2: group._size", "m.py:6: ._peer", "m.py:6: ._collective"]


def test_no_module_outside_group_reads_a_groups_private_attributes():
    privates = group_privates()
    roots = [PACKAGE, ROOT / "benchmarks", ROOT / "tests"]
    found = [read for root in roots for path in sorted(root.rglob("*.py"))
             if path != GROUP and path != Path(__file__).resolve() for read in private_reads(path, privates)]
    assert found == []


# A module may be longer where it holds one idea; each one here says which.
LONGER = {
    "mlxdist.group": "the Group: one short method per operation, each with its reference docstring",
}


def test_every_module_holds_one_idea_in_under_450_lines_or_says_why():
    sizes = {name: len(path.read_text().splitlines()) for name, path in module_names().items()}
    assert {name: lines for name, lines in sizes.items() if lines > 450 and name not in LONGER} == {}
    assert all(sizes[name] > 450 for name in LONGER), "a module in LONGER no longer needs to be"
