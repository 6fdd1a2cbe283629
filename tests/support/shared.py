"""Launched jobs shared between tests: one launch per (ranks, backend) runs every suite (or
worker script) that needs that configuration, and each test judges its own part of it.

Starting ranks costs seconds per launch (the interpreters, MLX, init; mpirun's own
start-up for MPI), so the suites that run on the same number of ranks and backend
share one launch per pytest session: the worker runs them in the order listed (a
barrier after each) and prints one summary line per suite and rank. The order puts
first the suites that cannot leave the world failed (every suite here leaves it usable;
the thread cases come last, as they did in their own launch).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mlxdist.launch import LaunchResult
from support.checks import RankRun, SuiteResult, launch_ranks, launch_suites

__all__ = ["SHARED", "SHARED_WORKERS", "shared_run", "suite_results", "shared_workers", "worker_output"]

_TWO_RANKS = ("suites.battery:run", "suites.composed:run", "suites.lazy:run", "suites.errors:run", "suites.misuse:run",
              "suites.threads:close_while_blocked")
# (ranks, backend): (suites in order, worker options). The battery's depth is
# "thorough" on 2 ranks and "core" on more; the composed suite's objects go up to
# 64 MiB on 2 ranks and 4 MiB on more (each rank holds size copies). Rings of more
# than 2 ranks run 3 (MLX's ring transport spins while it waits: a 1 KiB all_sum
# takes ~16 ms on 3 ranks and ~110 ms on 4 on two cores), and 4 only for the
# refusals that need 4 (a send past a neighbour).
SHARED: dict[tuple[int, str], tuple[tuple[str, ...], dict[str, str]]] = {
    (2, "ring"): (_TWO_RANKS, {"depth": "thorough", "object_mib": "64"}),
    (2, "mpi"): (_TWO_RANKS + ("suites.threads:split_threads",), {"depth": "thorough", "object_mib": "64"}),
    (3, "ring"): (("suites.battery:run", "suites.composed:run", "suites.lazy:run"), {"depth": "core", "object_mib": "4"}),
    (3, "mpi"): (("suites.composed:run",), {"object_mib": "4"}),
    (4, "ring"): (("suites.battery:run",), {"depth": "misuse"}),
    (4, "mpi"): (("suites.battery:run", "suites.composed:run", "suites.lazy:run"), {"depth": "core", "object_mib": "4"}),
}
# Every suite's own deadline added up, as when each had its own launch.
_TIMEOUT = 780.0
_runs: dict[tuple[int, str], RankRun] = {}


def shared_run(n: int, backend: str) -> RankRun:
    """The session's launch of every suite registered for ``(n, backend)`` (launched on first use)."""
    key = (n, backend)
    if key not in _runs:
        suites, options = SHARED[key]
        _runs[key] = launch_suites(suites, n, backend, options, _TIMEOUT)
    return _runs[key]


def suite_results(suite: str, n: int, backend: str) -> tuple[list[SuiteResult], RankRun]:
    """``suite``'s per-rank summaries in the shared launch; fails the calling test unless
    every rank ran it without a failed check.

    A launch that ended badly fails the test too, unless another suite's failure
    (named in its own test) explains it.
    """
    import pytest

    if suite not in SHARED[(n, backend)][0]:
        raise KeyError(f"{suite} is not registered for {n} {backend} ranks in support.shared.SHARED")
    run = shared_run(n, backend)
    mine = run.of(suite)
    fails = [line for line in run.output if f"FAIL {suite} " in line]
    if len(mine) != n or any(r.failures for r in mine):
        tail = "".join(fails[:40] or run.output[-120:])
        pytest.fail(f"{suite} on {n} {backend} ranks (shared launch, codes {run.launch.returncodes}, "
                    f"timed out: {run.launch.timed_out}): {len(mine)} of {n} ranks reported, "
                    f"{sum(r.failures for r in mine)} failed checks:\n{tail}")
    others_failed = any(len(run.of(s)) != n or any(r.failures for r in run.of(s))
                        for s in SHARED[(n, backend)][0] if s != suite)
    if not run.launch.ok and not others_failed:
        pytest.fail(f"the shared launch on {n} {backend} ranks ended badly although every suite passed "
                    f"(codes {run.launch.returncodes}, timed out: {run.launch.timed_out}):\n"
                    + "".join(run.output[-60:]))
    return mine, run


# Worker scripts (tests/workers/) that share a launch per (ranks, backend), run in
# order by tests/workers/chain.py: (script, its arguments).
SHARED_WORKERS: dict[tuple[int, str], tuple[tuple[str, tuple[str, ...]], ...]] = {
    (2, "ring"): (("nn_layers.py", ("ring",)), ("grad_ops.py", ()), ("grad_train.py", ())),
    (2, "mpi"): (("nn_layers.py", ("mpi",)), ("grad_ops.py", ()), ("grad_train.py", ())),
    (3, "ring"): (("nn_layers.py", ("ring",)), ("grad_ops.py", ())),
    (4, "mpi"): (("nn_layers.py", ("mpi",)), ("grad_train.py", ())),
}
# The scripts' own deadlines added up, as when each had its own launch.
_WORKERS_TIMEOUT = 540.0
_worker_runs: dict[tuple[int, str], LaunchResult] = {}
_CHAIN = re.compile(r"CHAIN (\S+) rank=(\d+) status=(-?\d+)")


def shared_workers(n: int, backend: str) -> LaunchResult:
    """The session's launch of every worker script registered for ``(n, backend)``."""
    key = (n, backend)
    if key not in _worker_runs:
        command = [sys.executable, str(Path(__file__).resolve().parent.parent / "workers" / "chain.py")]
        for i, (script, args) in enumerate(SHARED_WORKERS[key]):
            command += (["--"] if i else []) + [script, *args]
        _worker_runs[key] = launch_ranks(command, n, backend, _WORKERS_TIMEOUT, expect_ok=False)
    return _worker_runs[key]


def worker_output(script: str, n: int, backend: str) -> list[str]:
    """The output of the shared launch that ran ``script``; fails the calling test unless
    ``script`` ended with status 0 on every rank (and the launch ended well, unless
    another script's failure, named in its own test, explains it)."""
    import pytest

    if script not in [s for s, _ in SHARED_WORKERS[(n, backend)]]:
        raise KeyError(f"{script} is not registered for {n} {backend} ranks in support.shared.SHARED_WORKERS")
    result = shared_workers(n, backend)
    statuses: dict[str, dict[int, int]] = {}
    for line in result.output:
        match = _CHAIN.search(line)
        if match:
            statuses.setdefault(match.group(1), {})[int(match.group(2))] = int(match.group(3))
    mine = statuses.get(script, {})
    if sorted(mine) != list(range(n)) or any(mine.values()):
        pytest.fail(f"{script} on {n} {backend} ranks (shared launch, codes {result.returncodes}, timed out: "
                    f"{result.timed_out}): statuses {mine}:\n" + "".join(result.output[-120:]))
    if not result.ok and all(not any(s.values()) and len(s) == n for s in statuses.values()) \
            and len(statuses) == len(SHARED_WORKERS[(n, backend)]):
        pytest.fail(f"the shared launch on {n} {backend} ranks ended badly although every script passed "
                    f"(codes {result.returncodes}, timed out: {result.timed_out}):\n" + "".join(result.output[-60:]))
    return result.output
