"""Fault trials: start ranks through the launch plan (as the launcher does, but
watched here: nothing ends the survivors early), inject a fault, and measure
what the survivors see. Used by test_faults.py and benchmarks/faults.py."""

from __future__ import annotations

import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlxdist.launch import plan_job

WORKER = Path(__file__).parent / "workers" / "fault.py"
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


def run_trial(backend: str, n: int, fault: str, op: str, elements: int, timeout: float, seed: int = 0) -> Trial:
    """One trial: every rank loops ``op``; the last rank suffers ``fault``.

    The trial ends when every survivor exited (ring: the victim is then
    killed) or after :data:`HANG_LIMIT` seconds (``hung``).
    """
    trial = Trial(backend, n, fault, op, elements, timeout)
    argv = [sys.executable, str(WORKER), fault, op, str(elements), str(timeout), str(n - 1), str(seed)]
    started = _Started(backend, n, argv, None)
    procs = started.job.procs
    survivors = procs if backend == "mpi" else procs[:-1]
    limit = time.monotonic() + HANG_LIMIT
    try:
        while any(p.poll() is None for p in survivors):
            if time.monotonic() > limit:
                trial.hung = True
                break
            time.sleep(0.01)
        trial.end_time = time.time()
    finally:
        trial.output = started.stop()
    trial.returncodes = [p.returncode for p in procs]
    for line in trial.output.splitlines():
        if m := _FAULT.search(line):
            trial.fault_time = float(m.group(1))
        if m := _RESULT.search(line):
            trial.results[int(m.group(1))] = (m.group(2), float(m.group(3)), m.group(4))
    return trial


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
    """Run ``argv`` as n ranks until all exit, or kill them all after ``limit`` s (``hung``)."""
    started = _Started(backend, n, argv, extra_env)
    procs = started.job.procs
    t0 = time.monotonic()
    hung = False
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() - t0 > limit:
                hung = True
                break
            time.sleep(0.01)
        elapsed = time.monotonic() - t0
    finally:
        output = started.stop()
    return Job(hung, elapsed, [p.returncode for p in procs], output)
