"""Shared fixtures: launching real multi-rank jobs with a deadline (tests/support).

Under CI (the environment variable ``CI`` set, as .ci/run's runner sets it) a skipped
test is a failure: every test must run there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import pytest

from mlxdist.launch import LaunchResult
from support import launch_ranks

WORKERS = Path(__file__).parent / "workers"
BACKENDS = ("ring", "mpi")


def run_ranks(
    worker: str,
    n: int,
    backend: str,
    args: Sequence[str] = (),
    timeout: float = 240.0,
    expect_ok: bool = True,
    env: dict[str, str] | None = None,
) -> LaunchResult:
    """Run the script ``tests/workers/<worker>`` as ``n`` ranks (see
    :func:`support.launch_ranks`); fail the test unless every rank passed."""
    return launch_ranks([sys.executable, str(WORKERS / worker), *args], n, backend, timeout, expect_ok, env)


@pytest.fixture
def ranks():
    """The :func:`run_ranks` helper, as a fixture."""
    return run_ranks


def _fail_a_skip_under_ci(report) -> None:
    if report.skipped and os.environ.get("CI") and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where every test must run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI, a skip (a skipif, pytest.skip) fails the test, naming its reason."""
    outcome = yield
    _fail_a_skip_under_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Under CI, a module that skips itself (a module-level importorskip) fails its collection."""
    outcome = yield
    _fail_a_skip_under_ci(outcome.get_result())


# Two test workers (pytest-xdist; pyproject's addopts: -n 2) each take whole units: a module, or the
# modules reading the launches shared per (ranks, backend) (support/shared.py), so a module's fixtures
# (checkpoints, references, servers) are made once and each shared launch still runs once. (Grouping
# by scheduler, not by xdist_group marks: pytest 9.2's node ids ignore the marks, pytest-xdist#1386.)
SHARED_LAUNCH_UNIT = "shared launches"
SHARED_LAUNCH_MODULES = frozenset(
    {"test_collectives", "test_errors", "test_gradients", "test_lazy", "test_misuse", "test_nn_layers"})
# The longest units first (about 120 s to 15 s on a 2-core machine, in this order), so the two
# workers split them and the short ones fill in at the end; the rest keep their collection order.
LONGEST_FIRST = ("test_survive", SHARED_LAUNCH_UNIT, "test_serve", "test_faults", "test_lm", "test_soak",
                 "test_lm_layouts", "test_prompt_cache", "test_launch", "test_mismatch", "test_interrupt",
                 "test_survive_hosts", "test_init_and_channel", "test_mlxc_build", "test_bench", "test_mpi_setup")


def unit_of(nodeid: str) -> str:
    """The work unit of a test's node id: its module's name, or the shared launches' unit."""
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
    return SHARED_LAUNCH_UNIT if module in SHARED_LAUNCH_MODULES else module


def pytest_collection_modifyitems(config, items):
    """The longest units first (a stable sort: each module keeps its own order)."""
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(unit_of(item.nodeid), len(rank)))


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scope scheduling, a scope being :func:`unit_of` a test."""
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return UnitScheduling(config, log)
