"""mlxdist's exceptions.

Every exception derives from :class:`DistributedError` (a ``RuntimeError``)
and, where one fits, from the matching builtin too, so ``except ValueError``
catches a bad rank as readily as ``except mlxdist.InvalidRankError``. The C
layer reports each failure's kind where it is raised; ``mlxdist._c.gate``
turns kinds into these classes. Only a :class:`CommunicationError` means the
transport failed (and ends the group's world); the others leave it usable.
"""

from __future__ import annotations

__all__ = [
    "DistributedError",
    "BackendUnavailableError",
    "InitializationError",
    "ConfigurationError",
    "UnsupportedOperationError",
    "InvalidArgumentError",
    "InvalidRankError",
    "ShapeError",
    "ArgumentTypeError",
    "DtypeError",
    "AllocationError",
    "CommunicationError",
    "GroupClosedError",
    "LauncherNotFoundError",
    "PeerLostError",
    "DeadlineExceeded",
    "MismatchError",
]


class DistributedError(RuntimeError):
    """Base class of every mlxdist error; carries MLX's message when there is one."""


class BackendUnavailableError(DistributedError):
    """The requested backend is not built into MLX or cannot run here."""


class InitializationError(DistributedError):
    """The backend exists but the group could not be formed (peers, hostfile, launcher)."""


class ConfigurationError(InitializationError, ValueError):
    """The launch configuration (``MLX_RANK``, hostfile, addresses, ports) is invalid; raised before MLX reads it."""


class UnsupportedOperationError(DistributedError, NotImplementedError):
    """The backend does not provide this operation (``split`` on ring, send/recv on NCCL)."""


class InvalidArgumentError(DistributedError, ValueError):
    """An argument has a value the operation cannot take."""


class InvalidRankError(InvalidArgumentError):
    """A source or destination names a rank the group does not have (or this rank)."""


class ShapeError(InvalidArgumentError):
    """An array's shape does not fit the operation."""


class ArgumentTypeError(DistributedError, TypeError):
    """An argument has a type the operation cannot take (a list for an array, a string for a stream or a group)."""


class DtypeError(ArgumentTypeError):
    """An array's dtype is not one the operation or backend can move."""


class AllocationError(DistributedError, MemoryError):
    """MLX could not allocate the memory an array needs."""


class CommunicationError(DistributedError):
    """A peer was lost or the transport failed during an operation; this ends the group's world."""


class GroupClosedError(InvalidArgumentError):
    """The group was closed and can no longer be used."""


class LauncherNotFoundError(BackendUnavailableError, FileNotFoundError):
    """No launcher (``mpirun``) or no rank command was found where it was looked for."""


class PeerLostError(CommunicationError):
    """A rank of the world died, exited or stopped responding; names the rank. The world has failed."""


class DeadlineExceeded(DistributedError, TimeoutError):
    """An operation (or init) outlived its deadline; the world has failed.

    The message names the op, the group, the elapsed time and the ranks that had not reached it.
    """


class MismatchError(DistributedError, ValueError):
    """With the agreement check on: ranks called different operations (op, dtype, shape or peer) at one point.

    The message names each rank's call.
    """
