"""Fault trials: start ranks directly (no launcher killing the survivors), inject a
fault, and measure what the survivors see. Used by test_faults.py and
benchmarks/faults.py."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlxdist.launch import free_ports

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


def _env(extra: dict[str, str], store_port: int) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("MLX_RANK", "MLX_HOSTFILE", "MLXDIST_REPORT", "MLXDIST_TIMEOUT", "MLXDIST_CHECK"):
        env.pop(key, None)
    env.update(PYTHONUNBUFFERED="1", MLXDIST_STORE=f"127.0.0.1:{store_port}",
               MLXDIST_JOB_TOKEN=secrets.token_hex(16))
    env.update(extra)
    return env


def mpirun_prefix(n: int) -> list[str]:
    """``mpirun -np n`` with the options a local, oversubscribed, root run needs."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise FileNotFoundError("mpirun not found")
    args = [mpirun, "-np", str(n), "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        args.append("--allow-run-as-root")
    if os.environ.get("MLX_MPI_LIBNAME"):
        args += ["-x", "MLX_MPI_LIBNAME"]
    return args


def start(backend: str, n: int, argv: list[str], tmp: str, extra_env: dict[str, str] | None = None
          ) -> tuple[list[subprocess.Popen], list[Path]]:
    """Start ``argv`` as n ranks (each ring rank, or mpirun, in its own session).

    Returns:
        The processes and the files their output goes to.
    """
    ports = free_ports(n + 1)  # one call: distinct ports for the ranks and the store
    env = _env(extra_env or {}, ports[-1])
    procs, logs = [], []
    if backend == "mpi":
        log = Path(tmp, "mpirun.log")
        procs.append(subprocess.Popen(mpirun_prefix(n) + argv, env=env, stdin=subprocess.DEVNULL,
                                      stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True))
        logs.append(log)
        return procs, logs
    hostfile = Path(tmp, "hosts.json")
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports[:n]]))
    for r in range(n):
        log = Path(tmp, f"rank{r}.log")
        procs.append(subprocess.Popen(argv, env=dict(env, MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile)),
                                      stdin=subprocess.DEVNULL, stdout=log.open("w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
        logs.append(log)
    return procs, logs


def stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGKILL every process group still running (stopped ones included)."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


_RESULT = re.compile(r"RESULT (\d+) (\w+) ([\d.]+) (.*)")
_FAULT = re.compile(r"FAULT ([\d.]+)")


def run_trial(backend: str, n: int, fault: str, op: str, elements: int, timeout: float, seed: int = 0) -> Trial:
    """One trial: every rank loops ``op``; the last rank suffers ``fault``.

    The trial ends when every survivor exited (ring: the victim is then
    killed) or after :data:`HANG_LIMIT` seconds (``hung``).
    """
    trial = Trial(backend, n, fault, op, elements, timeout)
    argv = [sys.executable, str(WORKER), fault, op, str(elements), str(timeout), str(n - 1), str(seed)]
    with tempfile.TemporaryDirectory(prefix="mlxdist-fault-") as tmp:
        procs, logs = start(backend, n, argv, tmp)
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
            stop_all(procs)
        trial.returncodes = [p.returncode for p in procs]
        trial.output = "".join(log.read_text(errors="replace") for log in logs)
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
    with tempfile.TemporaryDirectory(prefix="mlxdist-job-") as tmp:
        procs, logs = start(backend, n, argv, tmp, extra_env)
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
            stop_all(procs)
        output = "".join(log.read_text(errors="replace") for log in logs)
    return Job(hung, elapsed, [p.returncode for p in procs], output)
