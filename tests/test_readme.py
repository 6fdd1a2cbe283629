"""The README's "Backends and operations" table states mlxdist.backends.CAPABILITIES.

The fact lives in the capability table; this test keeps the README's copy of
it honest: every backend column, every operation and every qualifier.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mlxdist.backends import CAPABILITIES, FILL_INS, OPERATIONS, Backend

README = Path(__file__).resolve().parent.parent / "README.md"
# Operations the README names beside the table's: recv_like is a receive.
ALIASES = {"recv_like": "recv"}
STATUS = re.compile(r"^(native|mlxdist|unavailable)\b(.*)$")


def readme_table() -> tuple[list[str], list[tuple[list[str], list[str]]]]:
    """The table under "## Backends and operations": its backend columns and
    its rows as (operation names, cells)."""
    text = README.read_text()
    section = text.split("## Backends and operations", 1)[1].split("\n## ", 1)[0]
    lines = [line.strip() for line in section.splitlines() if line.strip().startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    header, rows = cells[0], [row for row in cells[2:]]
    assert header[0] == "operation" and set(cells[1]) <= {"---", ":---", "---:", ":---:"}
    return header[1:], [([o.strip() for o in re.split(r"[,/]", row[0])], row[1:]) for row in rows]


def test_columns_are_the_backends_of_the_table():
    backends, _ = readme_table()
    assert backends == [b.value for b in CAPABILITIES]


def test_every_operation_appears_once():
    _, rows = readme_table()
    named = [ALIASES.get(op, op) for ops, _ in rows for op in ops]
    for op in named:
        assert op in OPERATIONS, f"the README names {op!r}, which backends.OPERATIONS lacks"
    assert sorted(set(named)) == sorted(OPERATIONS)
    assert len([op for ops, _ in rows for op in ops if op not in ALIASES]) == len(OPERATIONS)


@pytest.mark.parametrize("backend", list(CAPABILITIES), ids=lambda b: b.value)
def test_cells_state_the_capabilities(backend: Backend):
    backends, rows = readme_table()
    caps = CAPABILITIES[backend]
    for ops, cells in rows:
        cell = cells[backends.index(backend.value)]
        match = STATUS.match(cell)
        assert match, f"{ops} on {backend.value}: {cell!r} names no status"
        status, rest = match.group(1), match.group(2).strip()
        for op in ops:
            assert status == caps.status(ALIASES.get(op, op)), f"{op} on {backend.value}: README {status!r}"
        # Every qualifier is a fact of the table too; an unknown one fails.
        if rest == ", neighbours only":
            assert caps.neighbours_only and {ALIASES.get(op, op) for op in ops} <= {"send", "recv"}
        elif rest.startswith("(bool: mlxdist"):
            assert not caps.bool_reductions and set(ops) <= {"all_sum", "all_max", "all_min"}
        elif rest.startswith("(from "):
            assert all(", ".join(FILL_INS.get(op, ())) == rest[len("(from ") : -1] for op in ops), rest
        else:
            assert rest == "", f"{ops} on {backend.value}: unchecked qualifier {rest!r}"
        if status == "native" and {ALIASES.get(op, op) for op in ops} <= {"send", "recv"}:
            assert (rest == ", neighbours only") == caps.neighbours_only
        if status == "native" and set(ops) & {"all_sum", "all_max", "all_min"}:
            assert rest.startswith("(bool: mlxdist") == (not caps.bool_reductions)
