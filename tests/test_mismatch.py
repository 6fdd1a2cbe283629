"""Ranks calling different things at the same point (the commonest SPMD bug).

Check on (``init(check=True)``): every rank raises MismatchError naming what
each rank called, before anything reaches the backend. Check off: what the
backends do is documented (README); here, that it never hangs: every rank
finishes, raises a typed error, or (MPI) the job ends non-zero with the
watchdog's report, within the deadline plus a margin.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from faultrun import run_job

WORKER = str(Path(__file__).parent / "workers" / "mismatch.py")
CASES = ("op", "shape", "dtype", "gather", "recv_larger", "both_send", "collective_vs_send")
TIMEOUT = 3.0
# Startup of the ranks (mpirun's included) plus the deadline plus a margin.
LIMIT = 25.0
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
    job = run_job(backend, 2, [sys.executable, WORKER, case, str(TIMEOUT), "1", kind], LIMIT)
    assert not job.hung, job.output
    results = job.lines("RESULT")
    assert sorted(results) == [0, 1], job.output
    first, second = EXPECTED_CALLS[case]
    for rank, line in results.items():
        assert line.startswith("MismatchError "), line
        assert f"rank 0 called {first}" in line and f"rank 1 called {second}" in line, line


@pytest.mark.parametrize("backend", ("ring", "mpi"))
@pytest.mark.parametrize("case", CASES)
def test_check_on_names_both_calls_on_every_rank(backend, case):
    assert_both_named(backend, case, "numpy")


@pytest.mark.parametrize("backend", ("ring", "mpi"))
@pytest.mark.parametrize("case", ("op", "shape", "dtype", "recv_larger"))
def test_check_on_lazy_builds(backend, case):
    """mx.arrays: the check runs when the operation is built, before anything is sent."""
    assert_both_named(backend, case, "mlx")


@pytest.mark.parametrize(("backend", "case", "kind"), [("ring", "root", "numpy"), ("mpi", "scatter_shape", "mlx")])
def test_check_on_composed_collectives(backend, case, kind):
    """broadcast/gather/scatter are checked as one call with their root: another root or shape is named."""
    assert_both_named(backend, case, kind)


def test_check_on_three_ranks():
    """One rank of three differs: all three raise, naming every rank's call."""
    job = run_job("ring", 3, [sys.executable, WORKER, "shape", str(TIMEOUT), "1"], LIMIT)
    assert not job.hung, job.output
    results = job.lines("RESULT")
    assert sorted(results) == [0, 1, 2], job.output
    for line in results.values():
        assert line.startswith("MismatchError") and "rank 2 called all_sum(float32, shape (8,))" in line, line


@pytest.mark.parametrize("backend", ("ring", "mpi"))
@pytest.mark.parametrize("case", CASES)
def test_check_off_never_hangs(backend, case):
    job = run_job(backend, 2, [sys.executable, WORKER, case, str(TIMEOUT), "0"], LIMIT)
    assert not job.hung, f"hang:\n{job.output}"
    results, done = job.lines("RESULT"), job.lines("DONE")
    typed = ("DeadlineExceeded", "PeerLostError", "CommunicationError", "MismatchError")
    for line in results.values():
        assert line.split()[0] in typed, line
    if backend == "ring":
        # Each rank either returned (the documented wrong answer) or raised typed.
        assert sorted(set(results) | set(done)) == [0, 1], job.output
    else:
        # MPI: the same, or the job ended non-zero (MPI's own abort on a
        # truncated message, or the watchdog's report naming the rank and op).
        ended = job.returncodes[0] not in (0, None)
        assert sorted(set(results) | set(done)) == [0, 1] or ended, job.output
        if ended and not results:
            assert "mlxdist: rank" in job.output or "MPI_ERR" in job.output or "MPI_Abort" in job.output, job.output
