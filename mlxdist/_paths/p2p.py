"""broadcast, gather, scatter and all_to_all: their argument checks and the
choice of path (:mod:`.p2p_lazy` for mx.arrays, :mod:`.p2p_eager` for numpy
arrays, buffers and CPU DLPack tensors). MLX has none of the four; both paths
build them from send/recv (or an all_gather), which
``mlxdist.backends.CAPABILITIES`` says each backend has.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from mlxdist._paths import lazy, p2p_eager, p2p_lazy
from mlxdist.dtypes import code_of_mlx
from mlxdist.errors import InvalidArgumentError, UnsupportedOperationError
from mlxdist.group_record import GroupRecord
from mlxdist.rules import check_root, composed_shape

__all__ = ["rooted", "all_to_all"]


def _lazy_checks(group: GroupRecord, op: str, x: mx.array, root: int, stream: Any, out: Any) -> None:
    if out is not None:
        raise InvalidArgumentError("out= takes numpy results; an mx.array input returns a new lazy mx.array")
    group.live_handle()
    lazy.check_stream(stream)
    code_of_mlx(x.dtype)
    composed_shape(op, tuple(x.shape), group.size, group.rank == root)
    p2p_eager.agree(group, op if op == "all_to_all" else f"{op}[root={root}]", x.dtype, tuple(x.shape))


def _available(group: GroupRecord, op: str) -> None:
    if group.size > 1 and "send" not in group.caps.native and group.caps.status(op) == "unavailable":
        raise UnsupportedOperationError(f"{op}: {group.backend.value} lacks the send/recv it is composed from")  # type: ignore[union-attr]


def _eager_only(stream: Any) -> None:
    if stream is not None:
        raise InvalidArgumentError("stream= applies to mx.array inputs; numpy inputs run eagerly")


def rooted(group: GroupRecord, op: str, x: Any, root: Any, stream: Any, out: Any) -> Any:
    """broadcast, gather or scatter of ``x`` from or to ``root``, on the path ``x``'s kind picks.

    Raises:
        InvalidRankError, UnsupportedOperationError, ArgumentTypeError,
        DtypeError, ShapeError, InvalidArgumentError, GroupClosedError,
        CommunicationError, MismatchError: see :class:`mlxdist.Group`'s methods.
    """
    root = check_root(root, group.size)
    _available(group, op)
    if type(x) is mx.array:
        _lazy_checks(group, op, x, root, stream, out)
        return getattr(p2p_lazy, op)(group, x, root, stream)
    _eager_only(stream)
    return getattr(p2p_eager, op)(group, x, root, out)


def all_to_all(group: GroupRecord, x: Any, stream: Any, out: Any) -> Any:
    """all_to_all of ``x`` on the path its kind picks.

    Raises:
        As :func:`rooted`, but no root.
    """
    _available(group, "all_to_all")
    if type(x) is mx.array:
        _lazy_checks(group, "all_to_all", x, 0, stream, out)
        return p2p_lazy.all_to_all(group, x, stream)
    _eager_only(stream)
    return p2p_eager.all_to_all(group, x, out)
