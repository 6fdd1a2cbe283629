"""Jobs watched from outside: ranks started through the launch plan (as the launcher
does, but nothing ends the survivors early), a fault injected, and what the
survivors saw, when. The tests of failure handling and the fault benchmark both
run their trials through this module; the trial's rank is
:mod:`mlxdist.bench.fault_rank` unless another worker is given."""

from __future__ import annotations

import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from mlxdist.launch.plan import plan_job

__all__ = ["Trial", "Job", "run_trial", "run_trials", "names_failure", "run_job", "run_jobs", "FAULT_WORKER",
           "HANG_LIMIT", "LARGE", "SMALL"]

# The rank of a fault trial, by default: see mlxdist.bench.fault_rank.
FAULT_WORKER = (sys.executable, "-m", "mlxdist.bench.fault_rank")
# A trial that has not ended by then is a hang: everything is killed.
HANG_LIMIT = 40.0
LARGE = 2 * 1024 * 1024  # float32 elements: 8 MiB
SMALL = 256


@dataclass
class Trial:
    """What one fault trial showed."""

    backend: str
    n: int
    fault: str
    op: str
    elements: int
    timeout: float
    hung: bool = False
    fault_time: float | None = None
    end_time: float | None = None
    results: dict[int, tuple[str, float, str]] = field(default_factory=dict)
    returncodes: list[int | None] = field(default_factory=list)
    output: str = ""

    @property
    def victim(self) -> int:
        return self.n - 1

    def error_delay(self, rank: int) -> float | None:
        """Seconds from the fault to the typed error on ``rank``."""
        if rank not in self.results or self.fault_time is None:
            return None
        return self.results[rank][1] - self.fault_time

    def job_delay(self) -> float | None:
        """Seconds from the fault to the end of the job (every survivor gone)."""
        if self.fault_time is None or self.end_time is None:
            return None
        return self.end_time - self.fault_time


class _Started:
    """A job started through the launch plan, its output kept line by line (no prefixes)."""

    def __init__(self, backend: str, n: int, argv: list[str], extra_env: dict[str, str] | None) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.plan = plan_job(argv, n=n, backend=backend, env=extra_env)
        try:
            self.job = self.plan.start(self._line)
        except BaseException:
            self.plan.close()
            raise

    def _line(self, rank: int | None, stream: str, text: str) -> None:
        with self._lock:
            self.lines.append(text)

    def stop(self) -> str:
        """SIGKILL everything still running (stopped processes included); the output."""
        self.job.end(grace=0.0)
        self.plan.close()
        with self._lock:
            return "".join(line + "\n" for line in self.lines)


_RESULT = re.compile(r"RESULT (\d+) (\w+) ([\d.]+) (.*)")
_FAULT = re.compile(r"FAULT ([\d.]+)")


def run_trial(backend: str, n: int, fault: str, op: str, elements: int, timeout: float, seed: int = 0, *,
              worker: Sequence[str] = FAULT_WORKER, hang_limit: float = HANG_LIMIT) -> Trial:
    """One trial: every rank loops ``op``; the last rank suffers ``fault``.

    The trial ends when every survivor exited (ring: the victim is then
    killed) or after ``hang_limit`` seconds (``hung``).

    Args:
        backend: ``"ring"`` or ``"mpi"``.
        n: Number of ranks.
        fault: What the victim does (see :mod:`mlxdist.bench.fault_rank`).
        op: The operation every rank loops.
        elements: float32 elements per operation.
        timeout: The ranks' deadline, seconds.
        seed: Picks when the fault strikes.
        worker: The rank's command, given the fault worker's arguments.
        hang_limit: Seconds before everything is killed.

    Returns:
        What the trial showed.
    """
    return run_trials([(backend, n, fault, op, elements, timeout, seed)], worker=worker, hang_limit=hang_limit)[0]


def run_trials(specs: list[tuple[str, int, str, str, int, float, int]], at_once: int = 1, *,
               worker: Sequence[str] = FAULT_WORKER, hang_limit: float = HANG_LIMIT) -> list[Trial]:
    """Trials ``(backend, n, fault, op, elements, timeout, seed)`` (see :func:`run_trial`),
    ``at_once`` of them side by side, each under its own hang limit.

    Args:
        specs: The trials.
        at_once: How many run side by side.
        worker: The rank's command (see :func:`run_trial`).
        hang_limit: Seconds before a trial is killed.

    Returns:
        The trials, in the order of ``specs``.
    """
    trials: list[Trial | None] = [None] * len(specs)
    pending = list(range(len(specs)))
    running: dict[int, tuple[Trial, _Started, float]] = {}
    try:
        while pending or running:
            while pending and len(running) < at_once:
                index = pending.pop(0)
                backend, n, fault, op, elements, timeout, seed = specs[index]
                trial = Trial(backend, n, fault, op, elements, timeout)
                argv = [*worker, fault, op, str(elements), str(timeout), str(n - 1), str(seed)]
                running[index] = (trial, _Started(backend, n, argv, None), time.monotonic() + hang_limit)
            for index, (trial, started, limit) in list(running.items()):
                procs = started.job.procs
                survivors = procs if trial.backend == "mpi" else procs[:-1]
                trial.hung = time.monotonic() > limit
                if trial.hung or all(p.poll() is not None for p in survivors):
                    trial.end_time = time.time()
                    trial.output = started.stop()
                    trial.returncodes = [p.returncode for p in procs]
                    _read(trial)
                    trials[index] = trial
                    del running[index]
            time.sleep(0.01)
    finally:
        for _, started, _ in running.values():
            started.stop()
    return [trial for trial in trials if trial is not None]


def _read(trial: Trial) -> None:
    for line in trial.output.splitlines():
        if m := _FAULT.search(line):
            trial.fault_time = float(m.group(1))
        if m := _RESULT.search(line):
            trial.results[int(m.group(1))] = (m.group(2), float(m.group(3)), m.group(4))


def names_failure(trial: Trial) -> bool:
    """Whether the output names the victim (rank and cause) and the op, as the
    watchdog's report or a survivor's typed error does."""
    v = trial.victim
    rank_named = re.compile(
        rf"rank {v} (was lost|exited)|ranks not (arrived|responding): \[[^\]]*\b{v}\b"
    )
    op = "eval" if trial.op == "lazy" else ("send|recv" if trial.op == "sendrecv" else trial.op)
    for line in trial.output.splitlines():
        if ("mlxdist: rank" in line or "RESULT" in line) and rank_named.search(line) and re.search(op, line):
            return True
    return False


@dataclass
class Job:
    """How a job without injected faults ended."""

    hung: bool
    elapsed: float
    returncodes: list[int | None]
    output: str

    def lines(self, tag: str) -> dict[int, str]:
        """``{rank: rest of line}`` for the lines ``<tag> <rank> ...``."""
        out = {}
        for line in self.output.splitlines():
            m = re.search(rf"{tag} (\d+) ?(.*)", line)
            if m:
                out[int(m.group(1))] = m.group(2)
        return out


def run_job(backend: str, n: int, argv: list[str], limit: float = HANG_LIMIT,
            extra_env: dict[str, str] | None = None) -> Job:
    """Run ``argv`` as n ranks until all exit, or kill them all after ``limit`` s (``hung``).

    Args:
        backend: ``"ring"`` or ``"mpi"``.
        n: Number of ranks.
        argv: The ranks' command.
        limit: Seconds before the job is killed.
        extra_env: Extra variables for every rank.

    Returns:
        How the job ended.
    """
    return run_jobs([(backend, n, argv)], limit, extra_env)[0]


def run_jobs(specs: list[tuple[str, int, list[str]]], limit: float = HANG_LIMIT,
             extra_env: dict[str, str] | None = None, at_once: int = 1) -> list[Job]:
    """Run jobs ``(backend, n, argv)``, ``at_once`` of them at a time, each until all its
    ranks exit or ``limit`` s after its start (then it is killed: ``hung``).

    Jobs that mostly wait (for a deadline, or a typed error raised before anything is
    sent) can run side by side; each job has its own ranks, ports, side channel and limit.

    Args:
        specs: The jobs.
        limit: Seconds before a job is killed.
        extra_env: Extra variables for every rank.
        at_once: How many run side by side.

    Returns:
        The jobs' outcomes, in the order of ``specs``.
    """
    jobs: list[Job | None] = [None] * len(specs)
    pending = list(range(len(specs)))
    running: dict[int, tuple[_Started, float]] = {}
    try:
        while pending or running:
            while pending and len(running) < at_once:
                index = pending.pop(0)
                backend, n, argv = specs[index]
                running[index] = (_Started(backend, n, argv, extra_env), time.monotonic())
            for index, (started, t0) in list(running.items()):
                procs = started.job.procs
                hung = time.monotonic() - t0 > limit
                if hung or all(p.poll() is not None for p in procs):
                    elapsed = time.monotonic() - t0
                    output = started.stop()
                    jobs[index] = Job(hung, elapsed, [p.returncode for p in procs], output)
                    del running[index]
            time.sleep(0.01)
    finally:
        for started, _ in running.values():
            started.stop()
    return [job for job in jobs if job is not None]
