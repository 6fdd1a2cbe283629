"""Backends: names, availability and how ``Backend.ANY`` is resolved.

MLX's own ``init("any")`` tries ring, then MPI. mlxdist instead reads the
launch environment, so a process started by mpirun never waits on a ring
hostfile and a process started by nothing never starts MPI.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Mapping, Union

from mlxdist._c import lib
from mlxdist._mpi import select_library
from mlxdist.errors import ArgumentTypeError, InvalidArgumentError
from mlxdist.rules import SAME_SHAPE

__all__ = [
    "Backend",
    "BackendLike",
    "Capabilities",
    "CAPABILITIES",
    "OPERATIONS",
    "FILL_INS",
    "as_backend",
    "capabilities",
    "is_available",
    "detect_backend",
    "applies",
    "composed",
    "scatter_missing",
    "bool_as_bytes",
]


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

OPERATIONS = (
    "all_sum",
    "all_max",
    "all_min",
    "all_gather",
    "sum_scatter",
    "broadcast",
    "gather",
    "scatter",
    "all_to_all",
    "send",
    "recv",
    "split",
)
# What mlxdist computes where a backend lacks an operation, from which
# operations (all of them needed). MLX 0.32 has no broadcast, gather, scatter
# or all_to_all on any backend: they are composed from send/recv trees
# (mlxdist._paths.trees); all_to_all's lazy form and ring's beyond two ranks
# keep their blocks of an all_gather.
FILL_INS: dict[str, tuple[str, ...]] = {
    "sum_scatter": ("all_sum",),
    "broadcast": ("send", "recv"),
    "gather": ("send", "recv"),
    "scatter": ("send", "recv"),
    "all_to_all": ("all_gather", "send", "recv"),
}


@dataclass(frozen=True)
class Capabilities:
    """What MLX 0.32 provides on one backend.

    Attributes:
        native: The operations MLX implements.
        neighbours_only: send/recv reach only rank +- 1.
        bool_reductions: reductions of bool arrays work (MPI has no
            arithmetic on MPI_C_BOOL: mlxdist reduces their bytes as uint8).
    """

    native: frozenset[str]
    neighbours_only: bool = False
    bool_reductions: bool = True

    def status(self, op: str) -> str:
        """"native", "mlxdist" (filled in) or "unavailable" for an operation."""
        if op in self.native:
            return "native"
        if op in FILL_INS and set(FILL_INS[op]) <= self.native:
            return "mlxdist"
        return "unavailable"


_REDUCTIONS = frozenset({"all_sum", "all_max", "all_min", "all_gather"})
# The one table of backend facts; linkcheck, the bench, the groups and the
# README's table (checked by a test) all read it.
CAPABILITIES: dict[Backend, Capabilities] = {
    Backend.RING: Capabilities(_REDUCTIONS | {"send", "recv"}, neighbours_only=True),
    Backend.MPI: Capabilities(_REDUCTIONS | {"send", "recv", "split"}, bool_reductions=False),
    Backend.JACCL: Capabilities(_REDUCTIONS | {"send", "recv", "sum_scatter"}),
    Backend.NCCL: Capabilities(_REDUCTIONS | {"split", "sum_scatter"}),
}
# The group of a process no launcher started: collectives return their input.
SINGLE_PROCESS = Capabilities(_REDUCTIONS | {"sum_scatter", "broadcast", "gather", "scatter", "all_to_all"})


def capabilities(backend: Backend | None) -> Capabilities:
    """The capabilities of a group's backend (None: the single-process group)."""
    return SINGLE_PROCESS if backend is None else CAPABILITIES[backend]


_MPI_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def as_backend(backend: BackendLike) -> Backend:
    """Parse a backend name or member.

    Raises:
        ArgumentTypeError: neither a Backend nor a string (a TypeError).
        InvalidArgumentError: not a backend name (a ValueError).
    """
    if isinstance(backend, Backend):
        return backend
    names = ", ".join(b.value for b in Backend)
    if not isinstance(backend, str):
        raise ArgumentTypeError(f"backend must be a Backend or one of {names}, got {backend!r}")
    try:
        return Backend(backend.lower())
    except ValueError:
        raise InvalidArgumentError(f"unknown backend {backend!r}; expected one of {names}") from None


def is_available(backend: BackendLike = Backend.ANY) -> bool:
    """Whether MLX was built with ``backend`` and can load it here.

    Args:
        backend: A :class:`Backend` or its name; ``ANY`` asks whether any is.

    Returns:
        True if the backend can be initialised in this process.

    Raises:
        ArgumentTypeError: neither a Backend nor a string.
        InvalidArgumentError: unknown backend name.
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

    Raises:
        ArgumentTypeError: ``environ`` is not a mapping.
    """
    env = os.environ if environ is None else environ
    if not isinstance(env, Mapping):
        raise ArgumentTypeError(f"environ must be a mapping of variables or None, got {type(environ).__name__}")
    if "MLX_RANK" in env and ("MLX_IBV_DEVICES" in env or "MLX_JACCL_COORDINATOR" in env):
        return Backend.JACCL
    if "MLX_RANK" in env and "MLX_WORLD_SIZE" in env and "NCCL_HOST_IP" in env:
        return Backend.NCCL
    if "MLX_RANK" in env and "MLX_HOSTFILE" in env:
        return Backend.RING
    if any(v in env for v in _MPI_VARIABLES):
        return Backend.MPI
    return None


def scatter_missing(op: str, caps: Capabilities) -> bool:
    """Whether ``op`` is sum_scatter and the backend lacks it (it is composed from all_sum)."""
    return op == "sum_scatter" and "sum_scatter" not in caps.native


def bool_as_bytes(op: str, caps: Capabilities, is_bool: bool) -> bool:
    """Whether a reduction of bool arrays runs on their bytes (the backend cannot reduce bools)."""
    return is_bool and not caps.bool_reductions and op in SAME_SHAPE


def applies(op: str, caps: Capabilities, is_bool: bool) -> bool:
    """Whether ``op`` on this backend (for this dtype) must be composed."""
    return scatter_missing(op, caps) or bool_as_bytes(op, caps, is_bool)


def composed(caps: Capabilities, size: int) -> tuple[frozenset[str], frozenset[str]]:
    """The operations a group of ``size`` ranks composes, decided once per group.

    Returns:
        (those composed whatever the dtype, those composed for bool arrays);
        both empty on a single-process group, where collectives return their
        input.
    """
    if size == 1:
        return frozenset(), frozenset()
    return (
        frozenset(op for op in OPERATIONS if applies(op, caps, False)),
        frozenset(op for op in OPERATIONS if applies(op, caps, True)),
    )
