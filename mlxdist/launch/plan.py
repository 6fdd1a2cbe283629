"""A launch plan: how a job's ranks are started, built once (then started and watched
by :mod:`mlxdist.launch.job`).

Usage (the launcher, ``mlxdist-generate``, the tests and a server's supervisor all do this)::

    from mlxdist.launch import plan_job

    with plan_job([sys.executable, "worker.py"], n=2, backend="ring", env={"MLXDIST_TIMEOUT": "5"}) as plan:
        job = plan.start(sink=lambda rank, stream, text: print(rank, stream, text))
        result = job.wait(timeout=None)   # no job deadline; returns a LaunchResult
        # or: job.poll(), job.world_failure(), job.end() (terminate every rank)
    result.failed_rank, result.lost_ranks, result.rank_exits, result.exit_code

``plan_job`` picks the mode's builder: :func:`plan_local_ring`, :func:`plan_mpi`
or :func:`plan_on_hosts`. Each resolves the command, picks ports (ring hostfile
and the side channel), finds mpirun (the environment's first) and fixes every
rank's environment; ``plan.start`` runs it (each process in its own session)
and hands every output line, with its rank, to ``sink``.

With ``hosts`` (an mlx.launch hostfile's entries, :mod:`mlxdist.hostfiles`) each
rank runs on its host through a remote shell (``ssh``): the plan's command
per rank is ``SHELL... HOST 'cd DIR && exec env VARS... python -m
mlxdist.launch.remote --hostfile JSON -- COMMAND...'``, the ring's ports
are ``starting_port + rank`` on each host's first ip, and the side channel
is agreed over the ring (no ``MLXDIST_STORE``, no report file: the ranks'
failure report stays on their hosts). The launcher keeps each such rank's
standard input open; ending the job closes it, which ends the remote rank.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from mlxdist._mpi import LIBNAME_VARIABLE, STOP_SIGNAL_VARIABLE
from mlxdist.errors import InvalidArgumentError, LauncherNotFoundError
from mlxdist.hostfiles import Host, ring_hostfile_text
from mlxdist.launch.hosts import DEFAULT_STARTING_PORT, remote_commands, split_shell
from mlxdist.launch.job import ENDING_VARIABLE, MPI_STOP_SIGNAL, RunningJob
from mlxdist.launch.mpi import MpiRunner, executable, find_mpirun, mpirun_command
from mlxdist.launch.output import LineSink
from mlxdist.launch.ports import FILES_PER_RANK, PortReservation, max_local_ranks, open_file_limit

__all__ = ["LaunchPlan", "plan_job", "plan_local_ring", "plan_mpi", "plan_on_hosts", "BACKENDS"]

BACKENDS = ("ring", "mpi")
# Variables the side channel and the deadline read; mpirun must pass them on.
_RANK_VARIABLES = ("MLXDIST_STORE", "MLXDIST_JOB_TOKEN", "MLXDIST_REPORT", ENDING_VARIABLE, "MLXDIST_TIMEOUT",
                   "MLXDIST_CHECK")
# Where Open MPI 5 (PRRTE) and Open MPI 4 (ORTE) put mpirun's session directory.
_SESSION_DIR_VARIABLES = ("PRTE_MCA_prte_tmpdir_base", "OMPI_MCA_orte_tmpdir_base")


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
        ending_path: Where the launcher writes why it ends the job before it
            signals the ranks (``MLXDIST_ENDING``, :func:`mlxdist.launch.job.launcher_ending`);
            empty for ranks on hosts (they cannot read it).
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
    ending_path: str = ""
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
        # mpirun ends its ranks on SIGTERM: a stop passed on to the job goes as this signal (forwarded).
        base_env[STOP_SIGNAL_VARIABLE] = MPI_STOP_SIGNAL.name
        pass_env = [LIBNAME_VARIABLE] if base_env.get(LIBNAME_VARIABLE) else []
        pass_env += [k for k in (*_RANK_VARIABLES, STOP_SIGNAL_VARIABLE) if k in base_env]
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
        variables), then ``env``, then the side channel, job token, report path and
        ending notice's path unless ``env`` set them."""
        base_env = dict(os.environ)
        for key in ("MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE", "MLXDIST_REPORT", ENDING_VARIABLE):
            base_env.pop(key, None)
        base_env.update(env or {})
        base_env.setdefault("PYTHONUNBUFFERED", "1")
        base_env.setdefault("MLXDIST_STORE", f"127.0.0.1:{self.ports[-1]}")
        base_env.setdefault("MLXDIST_JOB_TOKEN", secrets.token_hex(16))
        base_env.setdefault("MLXDIST_REPORT", self.report_path)
        base_env.setdefault(ENDING_VARIABLE, os.path.join(self.directory.name, "ending"))
        return base_env

    def plan(self, **fields: Any) -> LaunchPlan:
        """The plan holding these files and ports, built from ``fields`` and the job's."""
        store = fields["envs"][0]["MLXDIST_STORE"]
        report = fields["envs"][0]["MLXDIST_REPORT"]
        ending = fields["envs"][0][ENDING_VARIABLE]
        return LaunchPlan(n=self.n, store=store, report_path=report, ending_path=ending, _directory=self.directory,
                          _ports=self._reservation, **fields)
