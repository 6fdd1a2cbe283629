"""mlxdist's exceptions and the one path that turns C return codes into them.

Every exception derives from :class:`DistributedError` (a ``RuntimeError``)
and, where one fits, from the matching builtin too, so ``except ValueError``
catches a bad rank as readily as ``except mlxdist.InvalidRankError``.
"""

from __future__ import annotations

import re

__all__ = [
    "DistributedError",
    "BackendUnavailableError",
    "InitializationError",
    "UnsupportedOperationError",
    "TransformError",
    "InvalidArgumentError",
    "InvalidRankError",
    "ShapeError",
    "DtypeError",
    "CommunicationError",
    "GroupClosedError",
    "LauncherNotFoundError",
    "check",
    "error_from_message",
]


class DistributedError(RuntimeError):
    """Base class of every mlxdist error; carries MLX's message when there is one."""


class BackendUnavailableError(DistributedError):
    """The requested backend is not built into MLX or cannot run here."""


class InitializationError(DistributedError):
    """The backend exists but the group could not be formed (peers, hostfile, launcher)."""


class UnsupportedOperationError(DistributedError, NotImplementedError):
    """The backend does not provide this operation (e.g. ``split`` on ring)."""


class TransformError(UnsupportedOperationError):
    """A collective was called inside ``mx.compile`` or ``mx.vmap``.

    Collectives are eager: they run when called, so they cannot be traced into
    a compiled or vectorised graph.
    """


class InvalidArgumentError(DistributedError, ValueError):
    """An argument has a value the operation cannot take."""


class InvalidRankError(InvalidArgumentError):
    """A source or destination names a rank the group does not have (or this rank)."""


class ShapeError(InvalidArgumentError):
    """An array's shape does not fit the operation."""


class DtypeError(DistributedError, TypeError):
    """An array's dtype is not one the operation or backend can move."""


class CommunicationError(DistributedError):
    """A peer was lost or the transport failed during an operation."""


class GroupClosedError(InvalidArgumentError):
    """The group was closed and can no longer be used."""


class LauncherNotFoundError(BackendUnavailableError, FileNotFoundError):
    """No launcher (``mpirun``) or no rank command was found where it was looked for."""


# MLX's own messages, most specific first. Anything else falls back to the
# caller's default class.
_MESSAGE_CLASSES: list[tuple[re.Pattern[str], type[DistributedError]]] = [
    (re.compile(r"not supported|not yet implemented|not implemented", re.I), UnsupportedOperationError),
    (re.compile(r"only valid values for backend|unknown backend", re.I), BackendUnavailableError),
    (re.compile(r"invalid (destination|source|dst|src)|rank cannot be|neighbou?r", re.I), InvalidRankError),
    (re.compile(r"invalid shape|shape|divisible|dimension", re.I), ShapeError),
    (re.compile(r"dtype|type", re.I), DtypeError),
    (re.compile(r"peer|connection|socket|errno|mpi_", re.I), CommunicationError),
    (re.compile(r"couldn't (initialize|connect)|accept failed|hostfile", re.I), InitializationError),
]


def error_from_message(
    message: str, default: type[DistributedError] = DistributedError
) -> DistributedError:
    """Build the exception matching one of MLX's error messages.

    Args:
        message: The message MLX (or cmlx) reported.
        default: The class to use when no known pattern matches.

    Returns:
        An instance of the most specific matching :class:`DistributedError` subclass.
    """
    for pattern, cls in _MESSAGE_CLASSES:
        if pattern.search(message):
            return cls(message)
    return default(message)


def check(rc: int, what: str, default: type[DistributedError] = DistributedError) -> None:
    """Raise the typed exception for a failed C call; do nothing on success.

    Args:
        rc: The return code of an mlx-c style function (0 success, 1 failure).
        what: The operation, for the message (e.g. ``"all_sum"``).
        default: The class used when MLX's message matches no known pattern.

    Raises:
        DistributedError: a subclass chosen from the message the C layer
            reported on this thread.
    """
    if rc == 0:
        return
    from mlxdist._ffi import last_error

    message = last_error() or "unknown error"
    raise error_from_message(f"{what}: {message}", default)
