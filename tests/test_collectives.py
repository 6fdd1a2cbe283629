"""The battery (tests/suites/battery.py) on a size-1 world and on 2 and 4 real ranks."""

from __future__ import annotations

import pytest

import mlxdist
from conftest import BACKENDS
from suites import battery
from support import run_here, run_on_ranks

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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_battery_on_ranks(backend, n):
    # 64 MiB objects on 2 ranks (and in process); 4 MiB on more, where each rank holds size copies.
    objects = {"object_mib": "64" if n == 2 else "4"}
    if n == 3:
        run = run_on_ranks([COMPOSED], n, backend, objects, timeout=300)
        assert all(r.checks > 300 and r.failures == 0 for r in run.of(COMPOSED)), run.of(COMPOSED)
        return
    depth = "thorough" if n == 2 else "core"
    run = run_on_ranks([SUITE, COMPOSED], n, backend, {"depth": depth, **objects}, timeout=300)
    assert all(r.checks > 300 and r.failures == 0 for r in run.of(COMPOSED)), run.of(COMPOSED)
    results = run.of(SUITE)
    assert [r.rank for r in results] == list(range(n))
    least = 900 if depth == "thorough" else 300
    assert all(r.checks > least and r.failures == 0 for r in results), results
