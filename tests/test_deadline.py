"""Deadline settings, the error classes, and a per-group deadline on live ranks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import mlxdist
from mlxdist.bench.trials import run_job
from mlxdist import deadline

WORKER = str(Path(__file__).parent / "workers" / "slow_peer.py")


def test_error_classes():
    assert issubclass(mlxdist.DeadlineExceeded, TimeoutError)
    assert issubclass(mlxdist.DeadlineExceeded, mlxdist.DistributedError)
    assert issubclass(mlxdist.PeerLostError, mlxdist.CommunicationError)
    assert issubclass(mlxdist.MismatchError, ValueError)
    assert issubclass(mlxdist.MismatchError, mlxdist.DistributedError)


@pytest.mark.parametrize(
    "timeout,env,expected",
    [
        (deadline.UNSET, {}, deadline.DEFAULT_TIMEOUT),
        (deadline.UNSET, {"MLXDIST_TIMEOUT": "12.5"}, 12.5),
        (deadline.UNSET, {"MLXDIST_TIMEOUT": "none"}, None),
        (None, {"MLXDIST_TIMEOUT": "12.5"}, None),
        (7, {"MLXDIST_TIMEOUT": "12.5"}, 7.0),
    ],
)
def test_timeout_resolution(timeout, env, expected):
    assert deadline.settings_from(timeout, None, env).timeout == expected


@pytest.mark.parametrize("bad", [0, -1, "soon", float("nan")])
def test_bad_timeouts_are_refused(bad):
    with pytest.raises(ValueError, match="timeout"):
        deadline.settings_from(bad, None, {})
    with pytest.raises(ValueError, match="MLXDIST_TIMEOUT"):
        deadline.settings_from(deadline.UNSET, None, {"MLXDIST_TIMEOUT": str(bad)})


@pytest.mark.parametrize("env,expected", [({}, False), ({"MLXDIST_CHECK": "1"}, True), ({"MLXDIST_CHECK": "0"}, False)])
def test_check_resolution(env, expected):
    assert deadline.settings_from(deadline.UNSET, None, env).check is expected
    assert deadline.settings_from(deadline.UNSET, True, env).check is True


def test_single_process_groups_have_no_deadlines():
    group = mlxdist.init()
    with pytest.raises(mlxdist.InitializationError, match="single-process"):
        mlxdist.set_timeout(1.0, group)
    with pytest.raises(mlxdist.InitializationError, match="single-process"):
        mlxdist.on_failure(print, group)


def test_group_deadline_on_ring_keeps_the_process_usable():
    job = run_job("ring", 2, [sys.executable, WORKER], 30, {"MLXDIST_TIMEOUT": "none"})
    assert not job.hung and job.returncodes == [0, 0], job.output
    first, again, saved = job.lines("RESULT"), job.lines("AGAIN"), job.lines("SAVED")
    kind, seconds, message = first[0].split(" ", 2)
    assert kind == "DeadlineExceeded" and 0.9 < float(seconds) < 2.5, first[0]
    assert "ranks not arrived: [1]" in message, message
    # Later calls fail at once, with the same class, on both ranks: refused before they
    # reach the backend, naming the failure that ended the world (not a wait of their own).
    for rank in (0, 1):
        kind, _, message = again[rank].split(" ", 2)
        assert kind == "DeadlineExceeded", again[rank]
        assert "this world already failed: all_sum #2" in message and "within 1 s" in message, message
    assert first[1].startswith("DeadlineExceeded"), first[1]
    assert sorted(saved) == [0, 1]
    # on_failure: once per rank, off the main thread (the watchdog's), before the blocked call raised;
    # a callback given after the failure runs at once.
    lines = job.output.splitlines()
    for rank in (0, 1):
        called = [line for line in lines if f"CALLBACK {rank} " in line]
        assert len(called) == 1 and "DeadlineExceeded" in called[0] and "MainThread" not in called[0], job.output
        assert lines.index(called[0]) < lines.index(next(x for x in lines if f"RESULT {rank} " in x)), job.output
    assert {rank: kind for rank, kind in job.lines("LATE").items()} == {0: "DeadlineExceeded", 1: "DeadlineExceeded"}


def test_group_deadline_on_mpi_ends_the_job_naming_the_late_rank():
    job = run_job("mpi", 2, [sys.executable, WORKER], 30, {"MLXDIST_TIMEOUT": "none"})
    assert not job.hung and job.returncodes[0] not in (0, None), job.output
    assert "mlxdist: rank 0: all_sum" in job.output and "ranks not arrived: [1]" in job.output, job.output
    # The call cannot be interrupted on MPI and the rank is ended, but its on_failure callback ran first.
    assert "CALLBACK 0 DeadlineExceeded" in job.output, job.output
