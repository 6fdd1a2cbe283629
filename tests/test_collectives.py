"""The shared battery (tests/battery.py) on a size-1 world and on 2 and 4 real ranks."""

from __future__ import annotations

import pytest

import mlxdist
from battery import run_battery
from conftest import run_ranks


def test_battery_on_size_one_world():
    group = mlxdist.init()
    assert (group.size, group.rank, group.backend) == (1, 0, None)
    battery = run_battery(group, large_elements=1 << 20)
    assert battery.checks > 500
    assert not battery.failures, "\n".join(battery.failures[:20])


@pytest.mark.parametrize("backend", ["ring", "mpi"])
@pytest.mark.parametrize("n", [2, 4])
def test_battery_on_ranks(backend, n):
    depth = "thorough" if n == 2 else "core"
    result = run_ranks("battery_worker.py", n, backend, args=[backend, str(n), depth], timeout=300)
    summaries = [line for line in result.output if "checks," in line]
    assert len(summaries) == n
    assert all(" 0 failures" in line for line in summaries)
