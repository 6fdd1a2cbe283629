"""``launch()``: run a command as N local ranks and wait for the job to end."""

from __future__ import annotations

import math
import signal
import sys
import threading
from contextlib import contextmanager
from typing import IO, Any, Iterator, Sequence

from mlxdist.errors import InvalidArgumentError
from mlxdist.launch.job import STOP_GRACE, RunningJob
from mlxdist.launch.output import PrefixedWriter
from mlxdist.launch.plan import plan_job
from mlxdist.launch.result import LaunchResult, report_lines

__all__ = ["launch", "check_timeout"]


def check_timeout(timeout: object, name: str = "timeout") -> None:
    """Raise InvalidArgumentError unless ``timeout`` is None or a positive, finite number.

    Args:
        timeout: The value.
        name: What the error calls it.

    Raises:
        InvalidArgumentError: it is neither.
    """
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidArgumentError(f"{name} must be a number of seconds or None, got {timeout!r}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise InvalidArgumentError(
            f"{name} must be a positive, finite number of seconds (or None), got {timeout!r}"
        )


@contextmanager
def _passing_on_sigterm(job: RunningJob, grace: float) -> Iterator[None]:
    """While it runs, a SIGTERM to this process is passed on to the job (on the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def pass_on(signum: int, frame: Any) -> None:
        job.pass_on_stop(grace)

    previous = signal.signal(signal.SIGTERM, pass_on)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def launch(
    command: Sequence[str],
    n: int = 2,
    backend: str = "ring",
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    capture: bool = False,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    mpirun: str | None = None,
    stop_grace: float = STOP_GRACE,
) -> LaunchResult:
    """Run ``command`` as ``n`` local ranks and wait for the job to end.

    The job ends when every rank exited, when one fails (the others are then
    ended), when a rank's watchdog reported that the world failed and some
    rank has not ended a few seconds later (a stopped or stalled rank: it is
    ended and named), or at the job deadline ``timeout`` if one is given.
    Detecting a failed operation is the per-operation deadline's job
    (``MLXDIST_TIMEOUT``), so by default there is no job deadline. See
    :func:`mlxdist.launch.plan_job` for how the ranks are started.

    Called on the main thread, a SIGTERM to this process while the job runs is
    passed on to every rank (for MPI, to mpirun) and the job gets ``stop_grace``
    seconds to end by itself (mlxdist-serve drains); then, or at a second
    SIGTERM, the ranks still running are ended
    (:meth:`~mlxdist.launch.RunningJob.pass_on_stop`). Ctrl-C ends every rank at once.

    Args:
        command: The program and its arguments (e.g. ``[sys.executable, "x.py"]``).
        n: Number of ranks (>= 1, and within the open-file limit).
        backend: ``"ring"`` or ``"mpi"``.
        timeout: Seconds (positive, finite) before every rank is killed; None
            (the default): no job deadline.
        env: Extra environment variables for every rank.
        capture: Also keep the prefixed output lines in the result.
        stdout: Where rank stdout lines go (``sys.stdout`` by default).
        stderr: Where rank stderr lines go (``sys.stderr`` by default).
        mpirun: The MPI launcher to use (default: see :func:`find_mpirun`).
        stop_grace: Seconds (positive, finite) the job gets to end after a
            SIGTERM passed on to it.

    Returns:
        A :class:`LaunchResult`.

    Raises:
        InvalidArgumentError: bad ``n``, ``timeout`` or ``stop_grace``, empty command or unknown
            backend (a ``ValueError``).
        LauncherNotFoundError: the command's program, or for MPI an ``mpirun``,
            was not found (a ``FileNotFoundError``).
    """
    check_timeout(timeout)
    if stop_grace is None:
        raise InvalidArgumentError("stop_grace must be a number of seconds, got None")
    check_timeout(stop_grace, "stop_grace")
    lines: list[str] | None = [] if capture else None
    writer = PrefixedWriter(stdout or sys.stdout, stderr or sys.stderr, lines)
    with plan_job(command, n=n, backend=backend, env=env, mpirun=mpirun) as plan:
        job = plan.start(writer)
        with _passing_on_sigterm(job, stop_grace):
            result = job.wait(timeout)
    for line in report_lines(result, timeout, backend):
        writer(None, "stderr", line)
    if lines is not None:
        result.output = lines
    return result
