"""Shared fixtures: launching real multi-rank jobs with a deadline."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Sequence

import pytest

from mlxdist.launch import LaunchResult, launch

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
    """Run ``tests/workers/<worker>`` as ``n`` ranks; fail the test unless every rank passed.

    Every launch has a deadline after which all ranks are killed.
    """
    out, err = io.StringIO(), io.StringIO()
    result = launch(
        [sys.executable, str(WORKERS / worker), *args],
        n=n,
        backend=backend,
        timeout=timeout,
        env=env,
        capture=True,
        stdout=out,
        stderr=err,
    )
    if expect_ok and not result.ok:
        tail = "".join(result.output[-120:])
        pytest.fail(
            f"{worker} on {n} {backend} ranks failed (codes {result.returncodes}, "
            f"timed out: {result.timed_out}):\n{tail}"
        )
    return result


@pytest.fixture
def ranks():
    """The :func:`run_ranks` helper, as a fixture."""
    return run_ranks
