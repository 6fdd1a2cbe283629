"""Backends: names, availability and how ``Backend.ANY`` is resolved.

MLX's own ``init("any")`` tries ring, then MPI. mlxdist instead reads the
launch environment, so a process started by mpirun never waits on a ring
hostfile and a process started by nothing never starts MPI.
"""

from __future__ import annotations

import enum
import os
from typing import Mapping, Union

from mlxdist._ffi import lib
from mlxdist._mpi import select_library

__all__ = ["Backend", "BackendLike", "is_available", "detect_backend", "NATIVE_OPERATIONS"]


class Backend(str, enum.Enum):
    """A communication backend of MLX's distributed engine."""

    ANY = "any"
    RING = "ring"
    MPI = "mpi"
    JACCL = "jaccl"
    NCCL = "nccl"

    def __str__(self) -> str:
        return self.value


BackendLike = Union[Backend, str]

# Operations each backend provides natively in MLX 0.32 (see the README table).
# mlxdist fills sum_scatter in from all_sum where it is missing.
NATIVE_OPERATIONS: dict[Backend, frozenset[str]] = {
    Backend.RING: frozenset({"all_sum", "all_max", "all_min", "all_gather", "send", "recv"}),
    Backend.MPI: frozenset({"all_sum", "all_max", "all_min", "all_gather", "send", "recv", "split"}),
    Backend.JACCL: frozenset(
        {"all_sum", "all_max", "all_min", "all_gather", "send", "recv", "sum_scatter"}
    ),
    Backend.NCCL: frozenset({"all_sum", "all_max", "all_min", "all_gather", "split", "sum_scatter"}),
}

_MPI_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def as_backend(backend: BackendLike) -> Backend:
    """Parse a backend name or member.

    Raises:
        ValueError: unknown name.
    """
    if isinstance(backend, Backend):
        return backend
    try:
        return Backend(str(backend).lower())
    except ValueError:
        names = ", ".join(b.value for b in Backend)
        raise ValueError(f"unknown backend {backend!r}; expected one of {names}") from None


def is_available(backend: BackendLike = Backend.ANY) -> bool:
    """Whether MLX was built with ``backend`` and can load it here.

    Args:
        backend: A :class:`Backend` or its name; ``ANY`` asks whether any is.

    Returns:
        True if the backend can be initialised in this process.

    Raises:
        ValueError: unknown backend name.
    """
    chosen = as_backend(backend)
    if chosen in (Backend.MPI, Backend.ANY):
        select_library()  # MLX reads MLX_MPI_LIBNAME once, on first use
    return bool(lib.mlx_distributed_is_available(chosen.value.encode()))


def detect_backend(environ: Mapping[str, str] | None = None) -> Backend | None:
    """The backend the launch environment asks for, or None when nothing launched us.

    jaccl's and NCCL's variables name their backend; ``MLX_HOSTFILE`` with
    ``MLX_RANK`` means ring (mlx.launch, mlxdist.launch); mpirun's variables
    (Open MPI, MPICH/PMI) mean MPI.

    Args:
        environ: The environment to read (``os.environ`` by default).

    Returns:
        The backend, or None for a process that was not launched as a rank.
    """
    env = os.environ if environ is None else environ
    if "MLX_RANK" in env and ("MLX_IBV_DEVICES" in env or "MLX_JACCL_COORDINATOR" in env):
        return Backend.JACCL
    if "MLX_RANK" in env and "MLX_WORLD_SIZE" in env and "NCCL_HOST_IP" in env:
        return Backend.NCCL
    if "MLX_RANK" in env and "MLX_HOSTFILE" in env:
        return Backend.RING
    if any(v in env for v in _MPI_VARIABLES):
        return Backend.MPI
    return None
