"""Ranks calling different things at the same point (the commonest SPMD bug).

Check on (``init(check=True)``): every rank raises MismatchError naming what
each rank called, before anything reaches the backend. Check off: what the
backends do is documented (README); here, that it never hangs: every rank
finishes, raises a typed error, or (MPI) the job ends non-zero with the
watchdog's report, within the deadline plus a margin.

Each case is its own job (a mismatch ends its world); the jobs of one kind (check
on, check off) run side by side, a few at a time (mlxdist.bench.trials.run_jobs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mlxdist.bench.trials import Job, run_jobs

WORKER = str(Path(__file__).parent / "workers" / "mismatch.py")
CASES = ("op", "shape", "dtype", "gather", "recv_larger", "both_send", "collective_vs_send")
LAZY_CASES = ("op", "shape", "dtype", "recv_larger")
# broadcast with another root, scatter with another shape: (backend, case, kind).
COMPOSED_CASES = (("ring", "root", "numpy"), ("mpi", "scatter_shape", "mlx"))
BACKENDS = ("ring", "mpi")
# Check off: the per-operation deadline is what ends a mismatch, so it is short.
TIMEOUT = 3.0
# Check on: the mismatch is named before anything is sent, whatever the deadline; a
# longer one keeps the ranks' start-up skew on a loaded machine from ending the job first.
CHECKED_TIMEOUT = 20.0
# Startup of the ranks (mpirun's included) plus the deadline plus a margin.
LIMIT = 25.0
CHECKED_LIMIT = 60.0
# The jobs of one kind run side by side, this many at a time: each mostly waits
# (for a deadline, or for the other rank to reach the check).
AT_ONCE = 4
_jobs: dict[tuple, Job] = {}


def _checked_specs() -> dict[tuple, tuple[str, int, list[str]]]:
    specs: dict[tuple, tuple[str, int, list[str]]] = {}
    for kind, cases in (("numpy", CASES), ("mlx", LAZY_CASES)):
        for backend in BACKENDS:
            for case in cases:
                specs[("on", kind, backend, case, 2)] = (
                    backend, 2, [sys.executable, WORKER, case, str(CHECKED_TIMEOUT), "1", kind])
    for backend, case, kind in COMPOSED_CASES:
        specs[("on", kind, backend, case, 2)] = (
            backend, 2, [sys.executable, WORKER, case, str(CHECKED_TIMEOUT), "1", kind])
    specs[("on", "numpy", "ring", "shape", 3)] = (
        "ring", 3, [sys.executable, WORKER, "shape", str(CHECKED_TIMEOUT), "1"])
    return specs


def _unchecked_specs() -> dict[tuple, tuple[str, int, list[str]]]:
    return {("off", backend, case): (backend, 2, [sys.executable, WORKER, case, str(TIMEOUT), "0"])
            for backend in BACKENDS for case in CASES}


def job(key: tuple) -> Job:
    """The job of ``key``; the first call runs every job of its kind (check on, or off)."""
    if key not in _jobs:
        specs = _checked_specs() if key[0] == "on" else _unchecked_specs()
        limit = CHECKED_LIMIT if key[0] == "on" else LIMIT
        _jobs.update(zip(specs, run_jobs(list(specs.values()), limit, at_once=AT_ONCE)))
    return _jobs[key]
EXPECTED_CALLS = {
    "op": ("all_sum(float32, shape (4,))", "all_max(float32, shape (4,))"),
    "shape": ("all_sum(float32, shape (4,))", "all_sum(float32, shape (8,))"),
    "dtype": ("all_sum(float32, shape (4,))", "all_sum(float64, shape (4,))"),
    "gather": ("all_sum(float32, shape (4,))", "all_gather(float32, shape (4,))"),
    "recv_larger": ("send(float32, shape (4,), to 1)", "recv(float32, shape (8,), from 0)"),
    "both_send": ("send(float32, shape (4,), to 1)", "send(float32, shape (4,), to 0)"),
    "collective_vs_send": ("all_sum(float32, shape (4,))", "send(float32, shape (4,), to 0)"),
    "root": ("broadcast[root=0](float32, shape (4,))", "broadcast[root=1](float32, shape (4,))"),
    "scatter_shape": ("scatter[root=0](float32, shape (4,))", "scatter[root=0](float32, shape (8,))"),
}


def assert_both_named(backend: str, case: str, kind: str) -> None:
    """Both ranks of a checked 2-rank job raise MismatchError naming both calls."""
    done = job(("on", kind, backend, case, 2))
    assert not done.hung, done.output
    results = done.lines("RESULT")
    assert sorted(results) == [0, 1], done.output
    first, second = EXPECTED_CALLS[case]
    for rank, line in results.items():
        assert line.startswith("MismatchError "), line
        assert f"rank 0 called {first}" in line and f"rank 1 called {second}" in line, line


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_check_on_names_both_calls_on_every_rank(backend, case):
    assert_both_named(backend, case, "numpy")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LAZY_CASES)
def test_check_on_lazy_builds(backend, case):
    """mx.arrays: the check runs when the operation is built, before anything is sent."""
    assert_both_named(backend, case, "mlx")


@pytest.mark.parametrize(("backend", "case", "kind"), COMPOSED_CASES)
def test_check_on_composed_collectives(backend, case, kind):
    """broadcast/gather/scatter are checked as one call with their root: another root or shape is named."""
    assert_both_named(backend, case, kind)


def test_check_on_three_ranks():
    """One rank of three differs: all three raise, naming every rank's call."""
    done = job(("on", "numpy", "ring", "shape", 3))
    assert not done.hung, done.output
    results = done.lines("RESULT")
    assert sorted(results) == [0, 1, 2], done.output
    for line in results.values():
        assert line.startswith("MismatchError") and "rank 2 called all_sum(float32, shape (8,))" in line, line


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_check_off_never_hangs(backend, case):
    outcome = job(("off", backend, case))
    assert not outcome.hung, f"hang:\n{outcome.output}"
    results, done = outcome.lines("RESULT"), outcome.lines("DONE")
    typed = ("DeadlineExceeded", "PeerLostError", "CommunicationError", "MismatchError")
    for line in results.values():
        assert line.split()[0] in typed, line
    if backend == "ring":
        # Each rank either returned (the documented wrong answer) or raised typed.
        assert sorted(set(results) | set(done)) == [0, 1], outcome.output
    else:
        # MPI: the same, or the job ended non-zero (MPI's own abort on a
        # truncated message, or the watchdog's report naming the rank and op).
        ended = outcome.returncodes[0] not in (0, None)
        assert sorted(set(results) | set(done)) == [0, 1] or ended, outcome.output
        if ended and not results:
            assert "mlxdist: rank" in outcome.output or "MPI_ERR" in outcome.output or "MPI_Abort" in outcome.output, outcome.output
