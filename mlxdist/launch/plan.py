"""A launch plan: how a job's ranks are started, built once, then started and watched.

Usage (the launcher, ``mlxdist-generate``, the tests and a server's supervisor all do this)::

    from mlxdist.launch import plan_job

    with plan_job([sys.executable, "worker.py"], n=2, backend="ring", env={"MLXDIST_TIMEOUT": "5"}) as plan:
        job = plan.start(sink=lambda rank, stream, text: print(rank, stream, text))
        result = job.wait(timeout=None)   # no job deadline; returns a LaunchResult
        # or: job.poll(), job.world_failure(), job.end() (terminate every rank)
    result.failed_rank, result.lost_ranks, result.rank_exits, result.exit_code

``plan_job`` resolves the command, picks ports (ring hostfile and the side
channel), finds mpirun (the environment's first) and fixes every rank's
environment; ``plan.start`` runs it (each process in its own session) and
hands every output line, with its rank, to ``sink``.

With ``hosts`` (a hostfile's entries, :mod:`mlxdist.launch.hosts`) each
rank runs on its host through a remote shell (``ssh``): the plan's command
per rank is ``SHELL... HOST 'cd DIR && exec env VARS... python -m
mlxdist.launch.remote --hostfile JSON -- COMMAND...'``, the ring's ports
are ``starting_port + rank`` on each host's first ip, and the side channel
is agreed over the ring (no ``MLXDIST_STORE``, no report file: the ranks'
failure report stays on their hosts). The launcher keeps each such rank's
standard input open; ending the job closes it, which ends the remote rank.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from mlxdist._mpi import LIBNAME_VARIABLE
from mlxdist.errors import InvalidArgumentError, LauncherNotFoundError
from mlxdist.hostfiles import Host, ring_hostfile_text
from mlxdist.launch.hosts import DEFAULT_STARTING_PORT, remote_commands, split_shell
from mlxdist.launch.mpi import MpiRunner, executable, find_mpirun, mpi_failures, mpirun_command
from mlxdist.launch.output import LineSink, pump
from mlxdist.launch.ports import FILES_PER_RANK, PortReservation, max_local_ranks, open_file_limit
from mlxdist.launch.result import LaunchResult

__all__ = ["LaunchPlan", "RunningJob", "plan_job", "plan_local_ring", "plan_mpi", "plan_on_hosts", "KILL_GRACE",
           "FAILURE_GRACE", "BACKENDS"]

BACKENDS = ("ring", "mpi")
# SIGTERM to every rank, then this long for all of them together, then SIGKILL.
KILL_GRACE = 3.0
# Once a rank's watchdog reported that the world failed, the ranks get this long
# to exit by themselves (they raise the typed error and may save state);
# the ones still running then are ended and named.
FAILURE_GRACE = 4.0
# Variables the side channel and the deadline read; mpirun must pass them on.
_RANK_VARIABLES = ("MLXDIST_STORE", "MLXDIST_JOB_TOKEN", "MLXDIST_REPORT", "MLXDIST_TIMEOUT", "MLXDIST_CHECK")
# Where Open MPI 5 (PRRTE) and Open MPI 4 (ORTE) put mpirun's session directory.
_SESSION_DIR_VARIABLES = ("PRTE_MCA_prte_tmpdir_base", "OMPI_MCA_orte_tmpdir_base")
_POLL = 0.1
_IDLE_POLL = 1.0


def check_rank_count(n: object) -> None:
    """Raise InvalidArgumentError unless ``n`` is a rank count this process can start."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise InvalidArgumentError(f"the number of ranks must be an int, got {n!r}")
    if n < 1:
        raise InvalidArgumentError(f"the number of ranks must be >= 1, got {n}")
    limit = max_local_ranks()
    if n > limit:
        raise InvalidArgumentError(
            f"{n} ranks are more than this launcher can start here: each local rank needs "
            f"{FILES_PER_RANK} open files and the limit is {open_file_limit()} "
            f"(`ulimit -n`), so at most {limit}"
        )


def _resolve_command(command: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """The command with its program as a path, so no launcher reads it as an option."""
    program = command[0]
    if os.sep in program:
        if not executable(program):
            raise LauncherNotFoundError(f"command not found: {program!r} is not an executable file")
        return [os.path.abspath(program), *command[1:]]
    search_path = environ.get("PATH", os.defpath)
    found = shutil.which(program, path=search_path)
    if found is None:
        raise LauncherNotFoundError(f"command not found: {program!r} (looked on PATH: {search_path})")
    return [os.path.abspath(found), *command[1:]]


@dataclass
class LaunchPlan:
    """Everything needed to start one job, fixed before any process starts.

    Attributes:
        backend: ``"ring"`` or ``"mpi"``.
        n: Number of ranks.
        commands: One command line per process (one per rank for ring; mpirun's for MPI).
        envs: The environment of each process.
        ranks: The rank of each process (None: mpirun, whose output is tagged by rank).
        hostfile: For local ring ranks, the path of MLX's ring hostfile
            (``MLX_HOSTFILE``); for ranks on hosts, its JSON text (written on
            each host); None for MPI.
        store: The side channel's ``host:port`` (``MLXDIST_STORE``); empty for
            ranks on hosts (agreed over the ring).
        report_path: Where the first rank to see the world fail writes its report
            (``MLXDIST_REPORT``; ranks on hosts write none here).
        runner: The mpirun used, for MPI.
        hosts: The host of each rank (its hostfile entry's ``ssh``), None for local ranks.
        addresses: The ring's ``host:port`` of each rank (ring only).
    """

    backend: str
    n: int
    commands: list[list[str]]
    envs: list[dict[str, str]]
    ranks: list[int | None]
    hostfile: str | None
    store: str
    report_path: str
    runner: MpiRunner | None = None
    hosts: list[str] | None = None
    addresses: list[str] = field(default_factory=list)
    _directory: Any = field(default=None, repr=False)
    _ports: PortReservation | None = field(default=None, repr=False)

    def start(self, sink: LineSink | None = None) -> RunningJob:
        """Start every process of the plan.

        Args:
            sink: ``sink(rank, stream, text)`` gets each output line (rank None:
                mpirun's own lines); None discards the output.

        Returns:
            The running job.

        Raises:
            InvalidArgumentError: the processes could not all be started (the ones
                started are ended).
        """
        return RunningJob(self, sink or (lambda rank, stream, text: None))

    def close(self) -> None:
        """Remove the plan's files (hostfile, report) and release its ports; the plan cannot start again."""
        if self._directory is not None:
            self._directory.cleanup()
            self._directory = None
        if self._ports is not None:
            self._ports.close()
            self._ports = None

    def __enter__(self) -> LaunchPlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plan_job(
    command: Sequence[str],
    n: int | None = None,
    backend: str = "ring",
    *,
    env: Mapping[str, str] | None = None,
    mpirun: str | None = None,
    addresses: Sequence[str] | None = None,
    hosts: Sequence[Host] | None = None,
    remote_shell: str | Sequence[str] = "ssh",
    starting_port: int = DEFAULT_STARTING_PORT,
) -> LaunchPlan:
    """Build the plan for ``n`` ranks of ``command``: local ones (ring or MPI), or one on each of ``hosts``.

    One of three modes, each built by its own function: :func:`plan_local_ring`
    (ring ranks on this machine, on fresh loopback ports or the ``addresses``
    given), :func:`plan_mpi` (``mpirun`` places the ranks) and
    :func:`plan_on_hosts` (one ring rank on each host, through a remote shell).
    The command is run as given (its program looked up on PATH first), never
    read as options of the launcher or of mpirun.

    Args:
        command: The program and its arguments.
        n: Number of ranks (>= 1, within the open-file limit; default 2, or the
            number of ``addresses`` or ``hosts``).
        backend: ``"ring"`` or ``"mpi"``.
        env: Extra environment variables for every rank.
        mpirun: For MPI, the launcher to use (default: see :func:`find_mpirun`).
        addresses: For local ring ranks, each rank's ``host:port`` (one per rank);
            default: fresh loopback ports.
        hosts: For ring, one rank on each of these hosts (an mlx.launch hostfile's
            entries, :func:`mlxdist.hostfiles.read_launch_hostfile`), in order. The
            command's paths must be valid there.
        remote_shell: With ``hosts``, the remote shell's command (a string is split
            as a shell would), run as ``SHELL... HOST COMMAND``.
        starting_port: With ``hosts``, rank r's ring port is ``starting_port + r``.

    Returns:
        The plan (a context manager that removes its files).

    Raises:
        InvalidArgumentError: bad ``n``, empty command, unknown backend, addresses
            or hosts that do not match ``n`` or the backend, both of them, a bad
            remote shell or starting port (a ``ValueError``).
        LauncherNotFoundError: the command's program, the remote shell, or for
            MPI an ``mpirun``, was not found (a ``FileNotFoundError``).
    """
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"backend must be 'ring' or 'mpi', got {backend!r}")
    given = [name for name, value in (("addresses", addresses), ("hosts", hosts)) if value is not None]
    if len(given) > 1:
        raise InvalidArgumentError("give either ring addresses or hosts, not both")
    if given and backend != "ring":
        raise InvalidArgumentError(f"{given[0]} are for the ring backend; mpirun places MPI ranks")
    placed = addresses if addresses is not None else hosts
    if placed is not None and n is not None and n != len(placed):
        raise InvalidArgumentError(f"{n} ranks but {len(placed)} {given[0]}")
    if hosts is not None:
        return plan_on_hosts(command, hosts, env=env, remote_shell=remote_shell, starting_port=starting_port)
    if backend == "mpi":
        return plan_mpi(command, 2 if n is None else n, env=env, mpirun=mpirun)
    if addresses is not None:
        return plan_local_ring(command, len(addresses), env=env, addresses=addresses)
    return plan_local_ring(command, 2 if n is None else n, env=env)


def plan_on_hosts(
    command: Sequence[str],
    hosts: Sequence[Host],
    *,
    env: Mapping[str, str] | None = None,
    remote_shell: str | Sequence[str] = "ssh",
    starting_port: int = DEFAULT_STARTING_PORT,
) -> LaunchPlan:
    """One ring rank on each of ``hosts``, started through a remote shell (see the module docstring).

    Args:
        command: The program and its arguments (paths as they are on the hosts).
        hosts: Where the ranks run, one each, in rank order.
        env: The ranks' own variables.
        remote_shell: The remote shell's command, run as ``SHELL... HOST COMMAND``.
        starting_port: Rank r's ring port is ``starting_port + r`` on its host's first ip.

    Returns:
        The plan: no side channel address or report file here (both are agreed
        and kept on the hosts).

    Raises:
        InvalidArgumentError: empty command or hosts, a bad remote shell or starting port.
        LauncherNotFoundError: the remote shell was not found.
    """
    if not hosts or not all(isinstance(h, Host) for h in hosts):
        raise InvalidArgumentError(f"hosts must be a non-empty list of Host (read_launch_hostfile), got {hosts!r}")
    _check_command(command)
    shell = _resolve_command(split_shell(remote_shell), os.environ)
    commands, addresses, ring = remote_commands(command, hosts, shell, starting_port, env or {})
    directory = tempfile.TemporaryDirectory(prefix="mlxdist-launch-")
    return LaunchPlan(backend="ring", n=len(hosts), commands=commands, envs=[dict(os.environ) for _ in hosts],
                      ranks=list(range(len(hosts))), hostfile=ring, store="",
                      report_path=os.path.join(directory.name, "failure.json"), hosts=[h.ssh for h in hosts],
                      addresses=addresses, _directory=directory)


def plan_mpi(
    command: Sequence[str], n: int = 2, *, env: Mapping[str, str] | None = None, mpirun: str | None = None
) -> LaunchPlan:
    """``n`` MPI ranks of ``command`` through ``mpirun``.

    The mpirun is found by :func:`find_mpirun` (this Python environment's
    first); when it has a libmpi beside it and ``MLX_MPI_LIBNAME`` is not set,
    the ranks get ``MLX_MPI_LIBNAME`` naming it. The ranks get the side
    channel's address, a fresh job token and the report path unless ``env``
    sets them, and mpirun passes them on.

    Args:
        command: The program and its arguments.
        n: Number of ranks.
        env: Extra environment variables for every rank.
        mpirun: The MPI launcher to use.

    Returns:
        The plan: one process, mpirun.

    Raises:
        InvalidArgumentError: bad ``n`` or empty command.
        LauncherNotFoundError: the command's program or an mpirun was not found.
    """
    _check_command(command)
    with _JobFiles(n, ports=1) as files:
        base_env = files.environment(env)
        resolved = _resolve_command(command, base_env)
        runner = find_mpirun(mpirun, base_env)
        # mpirun's session directory (its PMIx rendezvous files) in the plan's own directory:
        # Open MPI names it after mpirun's pid under /tmp, and one left by a killed mpirun
        # makes a later mpirun given the same pid fail to start ("The PMIx server's
        # listener thread failed to start", exit 213).
        for name in _SESSION_DIR_VARIABLES:
            base_env.setdefault(name, files.directory.name)
        if runner.libmpi is not None and not base_env.get(LIBNAME_VARIABLE):
            base_env[LIBNAME_VARIABLE] = runner.libmpi
        pass_env = [LIBNAME_VARIABLE] if base_env.get(LIBNAME_VARIABLE) else []
        pass_env += [k for k in _RANK_VARIABLES if k in base_env]
        return files.plan(backend="mpi", commands=[mpirun_command(runner, n, resolved, pass_env)],
                          envs=[base_env], ranks=[None], hostfile=None, runner=runner)


def plan_local_ring(
    command: Sequence[str], n: int = 2, *, env: Mapping[str, str] | None = None,
    addresses: Sequence[str] | None = None,
) -> LaunchPlan:
    """``n`` ring ranks of ``command`` on this machine.

    The plan writes MLX's ring hostfile (``MLX_HOSTFILE``) and gives each rank
    its ``MLX_RANK``, the side channel's address, a fresh job token and the
    report path (unless ``env`` sets them).

    Args:
        command: The program and its arguments.
        n: Number of ranks.
        env: Extra environment variables for every rank.
        addresses: Each rank's ``host:port`` (``n`` of them); default: fresh
            loopback ports, held until the plan closes.

    Returns:
        The plan: one process per rank.

    Raises:
        InvalidArgumentError: bad ``n``, empty command, or not ``n`` addresses.
        LauncherNotFoundError: the command's program was not found.
    """
    _check_command(command)
    if addresses is not None and len(addresses) != n:
        raise InvalidArgumentError(f"{n} ranks but {len(addresses)} addresses")
    with _JobFiles(n, ports=1 if addresses is not None else n + 1) as files:
        base_env = files.environment(env)
        resolved = _resolve_command(command, base_env)
        ring = list(addresses) if addresses is not None else [f"127.0.0.1:{p}" for p in files.ports[:n]]
        path = os.path.join(files.directory.name, "hosts.json")
        with open(path, "w") as f:
            f.write(ring_hostfile_text(ring))
        envs = [dict(base_env, MLX_RANK=str(r), MLX_HOSTFILE=path) for r in range(n)]
        return files.plan(backend="ring", commands=[resolved] * n, envs=envs, ranks=list(range(n)),
                          hostfile=path, addresses=ring)


def _check_command(command: Sequence[str]) -> None:
    if not command:
        raise InvalidArgumentError("empty command")


class _JobFiles:
    """A local job's directory (hostfile, report, mpirun's session) and ports (every
    one in one draw, the side channel's last), held by the plan built inside the
    ``with``; released if building it fails."""

    def __init__(self, n: int, ports: int) -> None:
        check_rank_count(n)
        self.n = n
        self._count = ports
        self.directory: Any = None
        self._reservation: PortReservation | None = None

    def __enter__(self) -> _JobFiles:
        self.directory = tempfile.TemporaryDirectory(prefix="mlxdist-launch-")
        try:
            self._reservation = PortReservation(self._count)
        except BaseException:
            self.directory.cleanup()
            raise
        return self

    def __exit__(self, kind: Any, *exc: object) -> None:
        if kind is not None:
            self.directory.cleanup()
            if self._reservation is not None:
                self._reservation.close()

    @property
    def ports(self) -> list[int]:
        """The reserved ports (the side channel's last)."""
        assert self._reservation is not None
        return self._reservation.ports

    @property
    def report_path(self) -> str:
        """Where the first rank to see the world fail writes its report."""
        return os.path.join(self.directory.name, "failure.json")

    def environment(self, env: Mapping[str, str] | None) -> dict[str, str]:
        """Every rank's environment: this process's (less another launcher's rank
        variables), then ``env``, then the side channel, job token and report path
        unless ``env`` set them."""
        base_env = dict(os.environ)
        for key in ("MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE", "MLXDIST_REPORT"):
            base_env.pop(key, None)
        base_env.update(env or {})
        base_env.setdefault("PYTHONUNBUFFERED", "1")
        base_env.setdefault("MLXDIST_STORE", f"127.0.0.1:{self.ports[-1]}")
        base_env.setdefault("MLXDIST_JOB_TOKEN", secrets.token_hex(16))
        base_env.setdefault("MLXDIST_REPORT", self.report_path)
        return base_env

    def plan(self, **fields: Any) -> LaunchPlan:
        """The plan holding these files and ports, built from ``fields`` and the job's."""
        store = fields["envs"][0]["MLXDIST_STORE"]
        report = fields["envs"][0]["MLXDIST_REPORT"]
        return LaunchPlan(n=self.n, store=store, report_path=report, _directory=self.directory,
                          _ports=self._reservation, **fields)


def _signal_running(procs: Sequence[subprocess.Popen], sig: int) -> None:
    """Send ``sig`` to the process group of each process still running."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


class RunningJob:
    """The processes of a started plan, their output readers and how they end.

    Built by :meth:`LaunchPlan.start`.
    """

    def __init__(self, plan: LaunchPlan, sink: LineSink) -> None:
        self.plan = plan
        self.procs: list[subprocess.Popen] = []
        self._threads: list[threading.Thread] = []
        self._untagged: list[str] = []
        self._exited: queue.Queue[int] = queue.Queue()
        tagged = plan.backend == "mpi"
        try:
            for cmd, proc_env, rank in zip(plan.commands, plan.envs, plan.ranks):
                # A remote rank lives while its standard input is open (mlxdist.launch.remote).
                stdin = subprocess.DEVNULL if plan.hosts is None else subprocess.PIPE
                proc = subprocess.Popen(cmd, env=proc_env, stdin=stdin, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=True)
                self.procs.append(proc)
                for stream, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
                    t = threading.Thread(target=pump, args=(stream, sink, name, rank, tagged, self._untagged),
                                         daemon=True)
                    t.start()
                    self._threads.append(t)
                threading.Thread(target=self._wait_for, args=(len(self.procs) - 1, proc), daemon=True).start()
        except (OSError, RuntimeError) as exc:
            self.end()
            raise InvalidArgumentError(
                f"could not start {len(plan.commands)} processes: the launch failed at the "
                f"{len(self.procs) + 1}th ({exc}); start fewer ranks"
            ) from exc

    def _wait_for(self, index: int, proc: subprocess.Popen) -> None:
        proc.wait()
        self._exited.put(index)

    @property
    def pids(self) -> list[int]:
        """The started processes' ids (the ranks for ring; mpirun for MPI)."""
        return [p.pid for p in self.procs]

    def poll(self) -> list[int | None]:
        """Each process's exit status so far (None: still running; negative: signal)."""
        return [p.poll() for p in self.procs]

    def world_failure(self) -> dict[str, Any] | None:
        """The first failure a rank's watchdog reported (rank, op, kind, message,
        ``lost``: the ranks it names as lost or stalled), or None."""
        try:
            with open(self.plan.report_path) as f:
                report = json.load(f)
        except (OSError, ValueError):
            return None
        return report if isinstance(report, dict) else None

    def _world_lost_a_rank(self) -> bool:
        # A mismatch fails the world on every rank alike: each raises and ends by itself.
        if not os.path.exists(self.plan.report_path):
            return False
        report = self.world_failure()
        return report is not None and report.get("kind") != "mismatch"

    def _only_lost_run(self) -> bool:
        # Every rank still running is one the world named lost or stalled: no need to wait.
        lost = set((self.world_failure() or {}).get("lost") or [])
        running = [r for r, p in zip(self.plan.ranks, self.procs) if p.poll() is None]
        return bool(lost) and all(r is not None and r in lost for r in running)

    def wait(self, timeout: float | None = None, end_on_failure: bool = True) -> LaunchResult:
        """Wait for the job to end, then end whatever still runs.

        The job ends when every process exited, when one exits non-zero, at the
        deadline, or (``end_on_failure``) :data:`FAILURE_GRACE` seconds after a
        rank's watchdog reported that the world lost a rank or passed a
        deadline: a rank stopped or stalled is then ended and named.

        Args:
            timeout: Seconds before every rank is ended (None: no job deadline).
            end_on_failure: End the job once its world failed.

        Returns:
            How the job ended.
        """
        result = LaunchResult(returncodes=[None] * len(self.procs))
        deadline = None if timeout is None else time.monotonic() + timeout
        failed_at: float | None = None
        remaining = len(self.procs)
        try:
            while remaining:
                # The report is looked for once a second (often once a rank has
                # exited), so a healthy job's launcher stays asleep.
                step = _POLL if remaining < len(self.procs) or failed_at is not None else _IDLE_POLL
                if deadline is not None:
                    step = min(step, max(0.0, deadline - time.monotonic()))
                try:
                    index = self._exited.get(timeout=step)
                except queue.Empty:
                    result.wakeups += 1
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        result.timed_out = True
                        break
                    if end_on_failure and failed_at is None and self._world_lost_a_rank():
                        failed_at = now
                    if failed_at is not None and (now - failed_at >= FAILURE_GRACE or self._only_lost_run()):
                        result.ended_after_failure = True
                        break
                    continue
                remaining -= 1
                if self.procs[index].returncode != 0:
                    result.failed_rank = self.plan.ranks[index] if self.plan.ranks[index] is not None else index
                    break
        finally:
            still = [r for r, p in zip(self.plan.ranks, self.procs) if p.poll() is None and r is not None]
            self.end()
        result.returncodes = [p.returncode for p in self.procs]
        result.report = self.world_failure()
        lost = [int(r) for r in (result.report or {}).get("lost") or []]
        if result.ended_after_failure and self.plan.backend == "ring":
            lost = sorted(set(lost) | set(still))
        result.lost_ranks = lost
        if self.plan.backend == "mpi":
            result.rank_exits = mpi_failures(self._untagged)
            if result.failed_rank is not None:
                result.failed_rank = next(iter(result.rank_exits), None)
        elif result.failed_rank is not None:
            result.rank_exits = {result.failed_rank: result.returncodes[result.failed_rank] or 0}
        return result

    def end(self, grace: float = KILL_GRACE) -> None:
        """End every process still running: SIGTERM (and SIGCONT, so a stopped
        rank takes it), one shared grace period, then SIGKILL; join the readers.
        A remote rank's standard input is closed first (which ends it on its host)."""
        for p in self.procs:
            if p.stdin is not None:
                try:
                    p.stdin.close()
                except OSError:
                    pass
        live = [p for p in self.procs if p.poll() is None]
        _signal_running(live, signal.SIGTERM)
        _signal_running(live, signal.SIGCONT)
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        _signal_running(live, signal.SIGKILL)
        for p in live:
            p.wait()
        for t in self._threads:
            t.join(timeout=5)
