"""Start N local ranks with a deadline: ``python -m mlxdist.launch -n N -- CMD...``.

For ring it picks free loopback ports, writes the hostfile and sets
``MLX_RANK``/``MLX_HOSTFILE`` for each rank; for MPI it runs ``mpirun``. Each
output line is prefixed with its rank. When a rank fails, or the deadline
passes, every rank is killed, and the exit status is non-zero if any rank
failed. (``mlx.launch`` exits 0 when a rank fails.) For several machines use
``mlx.launch`` with a hostfile, or ``mpirun``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Sequence

__all__ = ["LaunchResult", "launch", "free_ports", "main"]

TIMEOUT_EXIT = 124


@dataclass
class LaunchResult:
    """How a launch ended.

    Attributes:
        returncodes: Each rank's exit code (for MPI, mpirun's only), None if killed
            before it exited by itself.
        timed_out: Whether the deadline passed.
        failed_rank: The first rank seen failing, if any.
    """

    returncodes: list[int | None]
    timed_out: bool = False
    failed_rank: int | None = None
    output: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every rank exited 0 before the deadline."""
        return not self.timed_out and all(rc == 0 for rc in self.returncodes)

    @property
    def exit_code(self) -> int:
        """A process exit code summarising the launch (0, the failure's code, or 124)."""
        if self.timed_out:
            return TIMEOUT_EXIT
        first = [] if self.failed_rank is None else [self.returncodes[self.failed_rank]]
        for rc in first + self.returncodes:
            if rc:
                return rc if 0 < rc < 256 else 1
        return 0 if self.ok else 1


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports on ``host`` that were free a moment ago (bound together, then released).

    Args:
        count: How many distinct ports.
        host: The address to bind.

    Returns:
        The port numbers.
    """
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# Open MPI's --tag-output marks every chunk a rank writes, even mid-line:
# "[jobid,rank]<stdout>:".
_MPI_TAG = re.compile(r"\[\d+,(\d+)\]<std(?:out|err)>:")


class _LineSink:
    """Writes whole lines, each prefixed with its rank, to a text stream."""

    def __init__(self, sink: IO[str], capture: list[str] | None) -> None:
        self.sink = sink
        self.capture = capture
        self.lock = threading.Lock()

    def line(self, prefix: str, text: str) -> None:
        line = f"{prefix}{text.rstrip(chr(10))}\n"
        with self.lock:
            self.sink.write(line)
            self.sink.flush()
            if self.capture is not None:
                self.capture.append(line)


def _pump(stream: IO[bytes], sink: _LineSink, prefix: str, tagged: bool) -> None:
    """Copy a child's output line by line; ``tagged`` output (mpirun) is split by rank."""
    partial: dict[str, str] = {}
    current = prefix
    for raw in iter(stream.readline, b""):
        text = raw.decode("utf-8", "replace")
        if not tagged:
            sink.line(prefix, text)
            continue
        pieces = _MPI_TAG.split(text)
        # pieces: [untagged, rank, text, rank, text, ...]
        segments = [(current, pieces[0])] + [
            (f"[{pieces[i]}] ", pieces[i + 1]) for i in range(1, len(pieces), 2)
        ]
        for who, piece in segments:
            if not piece:
                continue
            current = who
            pending = partial.pop(who, "") + piece
            *lines, rest = pending.split("\n")
            for line in lines:
                sink.line(who, line)
            if rest:
                partial[who] = rest
    for who, rest in partial.items():
        sink.line(who, rest)
    stream.close()


def _kill_tree(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _mpirun_command(n: int, command: Sequence[str]) -> list[str]:
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise FileNotFoundError(
            "mpirun not found: install an MPI (e.g. apt-get install openmpi-bin libopenmpi-dev)"
        )
    args = [mpirun, "-np", str(n)]
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        args += ["--oversubscribe", "--tag-output", "--bind-to", "none"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.append("--allow-run-as-root")
    return args + list(command)


def launch(
    command: Sequence[str],
    n: int = 2,
    backend: str = "ring",
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
    capture: bool = False,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> LaunchResult:
    """Run ``command`` as ``n`` local ranks and wait, with a deadline.

    Args:
        command: The program and its arguments (e.g. ``[sys.executable, "x.py"]``).
        n: Number of ranks (>= 1).
        backend: ``"ring"`` or ``"mpi"``.
        timeout: Seconds before every rank is killed.
        env: Extra environment variables for every rank.
        capture: Also keep the prefixed output lines in the result.
        stdout: Where rank stdout lines go (``sys.stdout`` by default).
        stderr: Where rank stderr lines go (``sys.stderr`` by default).

    Returns:
        A :class:`LaunchResult`.

    Raises:
        ValueError: n < 1, empty command or unknown backend.
        FileNotFoundError: backend ``mpi`` without an ``mpirun``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not command:
        raise ValueError("empty command")
    if backend not in ("ring", "mpi"):
        raise ValueError(f"backend must be 'ring' or 'mpi', got {backend!r}")
    lines: list[str] | None = [] if capture else None
    out_sink = _LineSink(stdout or sys.stdout, lines)
    err_sink = _LineSink(stderr or sys.stderr, lines)
    base_env = dict(os.environ)
    for key in ("MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE"):
        base_env.pop(key, None)
    base_env.update(env or {})
    base_env.setdefault("PYTHONUNBUFFERED", "1")

    with tempfile.TemporaryDirectory(prefix="mlxdist-launch-") as tmp:
        # The ranks' side channel (deadlines, peer loss): rank 0 listens on
        # loopback, connections must present the job token; the first rank
        # to end the job writes the report read below.
        report_path = os.path.join(tmp, "failure.json")
        base_env.setdefault("MLXDIST_STORE", f"127.0.0.1:{free_ports(1)[0]}")
        base_env.setdefault("MLXDIST_JOB_TOKEN", secrets.token_hex(16))
        base_env.setdefault("MLXDIST_REPORT", report_path)
        if backend == "mpi":
            commands = [_mpirun_command(n, command)]
            envs = [base_env]
            prefixes = [""]
        else:
            hostfile = os.path.join(tmp, "hosts.json")
            with open(hostfile, "w") as f:
                json.dump([[f"127.0.0.1:{p}"] for p in free_ports(n)], f)
            commands = [list(command)] * n
            envs = [dict(base_env, MLX_RANK=str(r), MLX_HOSTFILE=hostfile) for r in range(n)]
            prefixes = [f"[{r}] " for r in range(n)]

        procs: list[subprocess.Popen] = []
        pumps: list[threading.Thread] = []
        for cmd, proc_env, prefix in zip(commands, envs, prefixes):
            proc = subprocess.Popen(
                cmd,
                env=proc_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            procs.append(proc)
            for stream, sink in ((proc.stdout, out_sink), (proc.stderr, err_sink)):
                t = threading.Thread(
                    target=_pump, args=(stream, sink, prefix, backend == "mpi"), daemon=True
                )
                t.start()
                pumps.append(t)

        result = LaunchResult(returncodes=[None] * len(procs))
        deadline = time.monotonic() + timeout
        try:
            while True:
                codes = [p.poll() for p in procs]
                failed = [i for i, rc in enumerate(codes) if rc not in (None, 0)]
                if failed:
                    result.failed_rank = failed[0]
                    break
                if all(rc is not None for rc in codes):
                    break
                if time.monotonic() > deadline:
                    result.timed_out = True
                    break
                time.sleep(0.02)
        finally:
            for p in procs:
                _kill_tree(p)
            for t in pumps:
                t.join(timeout=5)
        result.returncodes = [p.returncode for p in procs]
        if result.timed_out:
            err_sink.line("", f"mlxdist.launch: deadline of {timeout:g} s passed; killed all ranks")
        elif result.failed_rank is not None:
            who = "mpirun" if backend == "mpi" else f"rank {result.failed_rank}"
            err_sink.line(
                "",
                f"mlxdist.launch: {who} exited with "
                f"{result.returncodes[result.failed_rank]}; killed the others",
            )
        _report_first_failure(report_path, err_sink)
        if lines is not None:
            result.output = lines
        return result


def _report_first_failure(path: str, sink: _LineSink) -> None:
    """Name the rank and op of the job's first failure, as a rank's watchdog recorded it."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return
    sink.line(
        "",
        f"mlxdist.launch: first failure, reported by rank {report.get('rank')}: "
        f"{report.get('op')} #{report.get('seq')}: {report.get('message')}",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m mlxdist.launch",
        description="Run a command as N local ranks (ring over loopback, or mpirun).",
    )
    parser.add_argument("-n", "--nranks", type=int, default=2, help="number of ranks (default 2)")
    parser.add_argument("--backend", choices=("ring", "mpi"), default="ring")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before all ranks are killed")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    if args.nranks < 1:
        parser.error("-n must be >= 1")
    try:
        result = launch(command, n=args.nranks, backend=args.backend, timeout=args.timeout)
    except FileNotFoundError as exc:
        print(f"mlxdist.launch: {exc}", file=sys.stderr)
        return 127
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
