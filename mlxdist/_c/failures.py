"""The C layer's errors as typed exceptions: the kind table, :func:`raise_last`, :func:`check`.

The C layer records each failure's message and kind on the calling thread
(``mlxdist_last_error``/``_kind``); :func:`raise_last` turns them into the
exception class of that kind.
"""

from __future__ import annotations

from typing import NoReturn

from mlxdist._c import last_error, lib
from mlxdist.errors import (
    AllocationError,
    CommunicationError,
    DistributedError,
    DtypeError,
    InitializationError,
    InvalidArgumentError,
    InvalidRankError,
    ShapeError,
    UnsupportedOperationError,
)

__all__ = ["KIND_CLASSES", "raise_last", "check"]

KIND_CLASSES: dict[int, type[DistributedError]] = {
    lib.MLXDIST_ERROR_ARGUMENT: InvalidArgumentError,
    lib.MLXDIST_ERROR_SHAPE: ShapeError,
    lib.MLXDIST_ERROR_DTYPE: DtypeError,
    lib.MLXDIST_ERROR_RANK: InvalidRankError,
    lib.MLXDIST_ERROR_UNSUPPORTED: UnsupportedOperationError,
    lib.MLXDIST_ERROR_COMMUNICATION: CommunicationError,
    lib.MLXDIST_ERROR_INIT: InitializationError,
    lib.MLXDIST_ERROR_MEMORY: AllocationError,
}
"""The exception class of each error kind the C layer reports (a new kind: a row here and in cmlx)."""


def raise_last(what: str, default: type[DistributedError] = DistributedError) -> NoReturn:
    """Raise the error the C layer reported last on this thread.

    Args:
        what: The operation, prefixed to the message.
        default: The class for errors of unknown kind (a real mlx-c's).

    Raises:
        DistributedError: the subclass of the reported kind.
    """
    cls = KIND_CLASSES.get(lib.mlxdist_last_error_kind(), default)
    raise cls(f"{what}: {last_error() or 'unknown error'}")


def check(rc: int, what: str, default: type[DistributedError] = DistributedError) -> None:
    """Raise (as :func:`raise_last`) when an mlx-c style return code is not 0.

    Args:
        rc: The return code.
        what: The operation, for the message.
        default: The class for errors of unknown kind.

    Raises:
        DistributedError: ``rc`` is not 0.
    """
    if rc:
        raise_last(what, default)
