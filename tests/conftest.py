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
