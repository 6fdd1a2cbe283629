"""The bad-input battery (tests/suites/misuse.py) on the size-1 world and on 2
ranks of ring and MPI (in the launch shared per ranks and backend, tests/support/shared.py)."""

from __future__ import annotations

import re

import pytest

import mlxdist
from conftest import BACKENDS
from suites import misuse
from support import run_here
from support.shared import suite_results

SUITE = "suites.misuse:run"
CASES = re.compile(r"MISUSE rank=(\d+) size=(\d+) cases=(\d+)")


def test_misuse_on_the_size_one_world(capsys):
    checks = run_here(misuse.run, mlxdist.init())
    assert not checks.failures, "\n".join(checks.failures[:30])
    cases = int(CASES.search(capsys.readouterr().out).group(3))
    assert cases >= 400 and checks.count > 1500


@pytest.mark.parametrize("backend", BACKENDS)
def test_misuse_on_two_ranks(backend):
    # The launch shared per (ranks, backend) (support.shared): the misuse battery, then
    # the thread cases (two split groups on two threads where the backend can split).
    # Each with the least number of checks its ranks make (rank 1 of close_while_blocked only joins late).
    threads = {"suites.threads:close_while_blocked": [7, 1]}
    if backend == "mpi":
        threads["suites.threads:split_threads"] = [6, 6]
    for suite, least in threads.items():
        results, _ = suite_results(suite, 2, backend)
        assert [r.checks >= n and r.failures == 0 for r, n in zip(results, least)] == [True, True], (suite, results)
    mine, run = suite_results(SUITE, 2, backend)
    cases = sorted((int(r), int(n)) for line in run.output for r, _, n in CASES.findall(line))
    assert [r for r, _ in cases] == [0, 1], cases
    assert all(n >= 440 for _, n in cases), cases
    assert all(r.checks > 1500 and r.failures == 0 for r in mine)
