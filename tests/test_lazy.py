"""The lazy path against mx.distributed (tests/suites/lazy.py): size 1 in this
process, 2 ranks of ring and MPI, 3 of ring and 4 of MPI launched."""

from __future__ import annotations

import pytest

import mlxdist
from suites import lazy
from support import run_here
from support.shared import suite_results

SUITE = "suites.lazy:run"


def test_lazy_path_on_size_one_world():
    checks = run_here(lazy.run, mlxdist.init())
    assert checks.count > 100
    assert not checks.failures, "\n".join(checks.failures[:20])


@pytest.mark.parametrize(("backend", "n"), [("ring", 2), ("mpi", 2), ("ring", 3), ("mpi", 4)])
def test_lazy_path_on_ranks(backend, n):
    results, _ = suite_results(SUITE, n, backend)  # the launch shared per (n, backend)
    assert [r.rank for r in results] == list(range(n))
    assert all(r.checks > 200 and r.failures == 0 for r in results), results
