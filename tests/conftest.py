"""Shared fixtures: launching real multi-rank jobs with a deadline (tests/support)."""

from __future__ import annotations

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
