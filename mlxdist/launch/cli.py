"""The command line: ``python -m mlxdist.launch [-n N] [--backend B] [--timeout S] -- CMD...``."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Sequence

from mlxdist.errors import LauncherNotFoundError
from mlxdist.launch.job import STOP_GRACE
from mlxdist.launch.ports import max_local_ranks, open_file_limit
from mlxdist.launch.run import launch

__all__ = ["main", "build_parser", "timeout_seconds"]


def timeout_seconds(text: str) -> float:
    """argparse type: a positive, finite number of seconds."""
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
            f"{open_file_limit()}, allows {limit} local ranks), got {value}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """The launcher's options (the command after ``--`` is not one of them).

    Returns:
        The parser of ``python -m mlxdist.launch``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m mlxdist.launch",
        usage="%(prog)s [-n N] [--backend {ring,mpi}] [--timeout S] [--stop-grace S] [--mpirun PATH] -- CMD "
              "[ARGS...]",
        description="Run a command as N local ranks (ring over loopback, or mpirun).",
    )
    parser.add_argument("-n", "--nranks", type=_rank_count, default=2, help="number of ranks (default 2)")
    parser.add_argument("--backend", choices=("ring", "mpi"), default="ring")
    parser.add_argument(
        "--timeout", type=timeout_seconds, default=None,
        help="job deadline: seconds before all ranks are killed (default: none; a failed operation "
             "is caught by the per-operation deadline, MLXDIST_TIMEOUT)",
    )
    parser.add_argument(
        "--stop-grace", type=timeout_seconds, default=STOP_GRACE, metavar="S",
        help=f"a SIGTERM to the launcher is passed on to every rank (MPI: as SIGUSR2, which mpirun forwards and "
             f"mlxdist.init() turns into a SIGTERM); the job then has S seconds "
             f"to end by itself (mlxdist-serve drains) before the ranks still running are ended; a second "
             f"SIGTERM ends them at once (default {STOP_GRACE:g})",
    )
    parser.add_argument(
        "--mpirun",
        metavar="PATH",
        help="the MPI launcher (default: this Python environment's bin/mpirun, then PATH's)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status.

    Everything after the first ``--`` is the command, never an option.

    Args:
        argv: The arguments (``sys.argv[1:]`` by default).

    Returns:
        The job's exit status (see :attr:`LaunchResult.exit_code`), 127 when a
        program was not found.
    """
    parser = build_parser()
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
            command, n=args.nranks, backend=args.backend, timeout=args.timeout, mpirun=args.mpirun,
            stop_grace=args.stop_grace,
        )
    except LauncherNotFoundError as exc:
        print(f"mlxdist.launch: {exc}", file=sys.stderr)
        return 127
    return result.exit_code
