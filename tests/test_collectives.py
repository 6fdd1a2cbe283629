"""The battery (tests/suites/battery.py) on a size-1 world and on 2, 3 (ring) and 4 (MPI) real
ranks, its refusals on 4 ring ranks (in the launches shared per ranks and backend,
tests/support/shared.py)."""

from __future__ import annotations

import pytest

import mlxdist
from suites import battery
from support import run_here
from support.shared import SHARED, suite_results

SUITE = "suites.battery:run"
# broadcast, gather, scatter, all_to_all and the object collectives: in the
# battery's jobs, and alone on 3 ranks (trees and rounds of an odd size).
COMPOSED = "suites.composed:run"


def test_battery_on_size_one_world():
    group = mlxdist.init()
    assert (group.size(), group.rank(), group.backend) == (1, 0, None)
    checks = run_here(battery.run, group, large=str(1 << 20))
    assert checks.count > 500
    assert not checks.failures, "\n".join(checks.failures[:20])


@pytest.mark.parametrize(("backend", "n"), [("ring", 2), ("mpi", 2), ("ring", 3), ("mpi", 4)])
def test_battery_on_ranks(backend, n):
    # In the launch this (ranks, backend) shares with the other suites (support.shared).
    depth = SHARED[(n, backend)][1]["depth"]
    assert depth == ("thorough" if n == 2 else "core")
    results, _ = suite_results(SUITE, n, backend)
    assert [r.rank for r in results] == list(range(n))
    least = 900 if depth == "thorough" else 300
    assert all(r.checks > least and r.failures == 0 for r in results), results


def test_battery_refusals_on_four_ring_ranks():
    # A ring sends only to a neighbour: with 4 ranks, rank + 2 is none.
    assert SHARED[(4, "ring")][1]["depth"] == "misuse"
    results, _ = suite_results(SUITE, 4, "ring")
    assert [r.rank for r in results] == list(range(4))
    assert all(r.checks > 40 and r.failures == 0 for r in results), results


@pytest.mark.parametrize(("backend", "n"), [("ring", 2), ("mpi", 2), ("ring", 3), ("mpi", 3), ("mpi", 4)])
def test_composed_on_ranks(backend, n):
    # Beside the battery on 2 and 4 ranks; alone on 3 (trees and rounds of an odd size).
    composed, _ = suite_results(COMPOSED, n, backend)
    assert [r.rank for r in composed] == list(range(n))
    assert all(r.checks > 300 for r in composed), composed
