"""``launch()``: run a command as N local ranks and wait for the job to end."""

from __future__ import annotations

import math
import sys
from typing import IO, Sequence

from mlxdist.errors import InvalidArgumentError
from mlxdist.launch.output import PrefixedWriter
from mlxdist.launch.plan import plan_job
from mlxdist.launch.result import LaunchResult, report_lines

__all__ = ["launch", "check_timeout"]


def check_timeout(timeout: object) -> None:
    """Raise InvalidArgumentError unless ``timeout`` is None or a positive, finite number."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidArgumentError(f"timeout must be a number of seconds or None, got {timeout!r}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise InvalidArgumentError(
            f"timeout must be a positive, finite number of seconds (or None), got {timeout!r}"
        )


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
) -> LaunchResult:
    """Run ``command`` as ``n`` local ranks and wait for the job to end.

    The job ends when every rank exited, when one fails (the others are then
    ended), when a rank's watchdog reported that the world failed and some
    rank has not ended a few seconds later (a stopped or stalled rank: it is
    ended and named), or at the job deadline ``timeout`` if one is given.
    Detecting a failed operation is the per-operation deadline's job
    (``MLXDIST_TIMEOUT``), so by default there is no job deadline. See
    :func:`mlxdist.launch.plan_job` for how the ranks are started.

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

    Returns:
        A :class:`LaunchResult`.

    Raises:
        InvalidArgumentError: bad ``n`` or ``timeout``, empty command or unknown
            backend (a ``ValueError``).
        LauncherNotFoundError: the command's program, or for MPI an ``mpirun``,
            was not found (a ``FileNotFoundError``).
    """
    check_timeout(timeout)
    lines: list[str] | None = [] if capture else None
    writer = PrefixedWriter(stdout or sys.stdout, stderr or sys.stderr, lines)
    with plan_job(command, n=n, backend=backend, env=env, mpirun=mpirun) as plan:
        job = plan.start(writer)
        result = job.wait(timeout)
    for line in report_lines(result, timeout, backend):
        writer(None, "stderr", line)
    if lines is not None:
        result.output = lines
    return result
