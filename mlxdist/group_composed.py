"""The Group methods of the collectives MLX lacks on every backend:
broadcast, gather, scatter, all_to_all and the object collectives.

Both paths, as the other collectives: an mx.array builds a lazy,
differentiable, compilable result (:mod:`mlxdist._paths.composed_lazy`);
numpy arrays, buffers and CPU DLPack tensors run eagerly
(:mod:`mlxdist._paths.composed_eager`). ``mlxdist.backends.CAPABILITIES``
says which backend composes them from what.
"""

from __future__ import annotations

from typing import Any, Union

import mlx.core as mx
import numpy as np

from mlxdist import objects
from mlxdist._paths import composed_eager, composed_lazy, lazy
from mlxdist.dtypes import code_of_mlx
from mlxdist.errors import InvalidArgumentError, UnsupportedOperationError
from mlxdist.rules import check_root, composed_shape

__all__ = ["ComposedCollectives"]

ArrayLike = Union[np.ndarray, mx.array, Any]
StreamLike = Union[mx.Stream, mx.Device, None]


def _lazy_checks(group: Any, op: str, x: mx.array, root: int, stream: Any, out: Any) -> None:
    if out is not None:
        raise InvalidArgumentError("out= takes numpy results; an mx.array input returns a new lazy mx.array")
    group._live_handle()
    lazy.check_stream(stream)
    code_of_mlx(x.dtype)
    composed_shape(op, tuple(x.shape), group._size, group._rank == root)
    composed_eager.agree(group, op if op == "all_to_all" else f"{op}[root={root}]", x.dtype, tuple(x.shape))


def _available(group: Any, op: str) -> None:
    if group._size > 1 and "send" not in group._caps.native and group._caps.status(op) == "unavailable":
        raise UnsupportedOperationError(f"{op}: {group.backend.value} lacks the send/recv it is composed from")


def _eager_only(stream: Any) -> None:
    if stream is not None:
        raise InvalidArgumentError("stream= applies to mx.array inputs; numpy inputs run eagerly")


class ComposedCollectives:
    """broadcast, gather, scatter, all_to_all and the object collectives of a :class:`mlxdist.Group`."""

    # The lazy forms' custom functions, made once per (op, root, stream).
    __slots__ = ("_lazy_functions",)
    _rank: int
    _size: int

    def _rooted(self, op: str, x: Any, root: Any, stream: Any, out: Any) -> Any:
        root = check_root(root, self._size)
        _available(self, op)
        if type(x) is mx.array:
            _lazy_checks(self, op, x, root, stream, out)
            return getattr(composed_lazy, op)(self, x, root, stream)
        _eager_only(stream)
        return getattr(composed_eager, op)(self, x, root, out)

    def broadcast(self, x: ArrayLike, root: int = 0, *, stream: StreamLike = None, out: Any = None) -> ArrayLike:
        """The root's ``x`` on every rank.

        Composed from send/recv along a tree (MLX has no broadcast): a
        binomial tree on MPI, the two ring directions on ring.

        Args:
            x: On the root, the data; on the other ranks an array of the same
                shape and dtype (a template: its values are not read). An
                mx.array gives a lazy result (its gradient sums every rank's
                cotangent onto the root); numpy arrays, buffers (bytes,
                memoryview, array.array) and CPU DLPack tensors run eagerly.
            root: The rank whose data every rank receives.
            stream: For mx.arrays, as :meth:`all_sum`.
            out: For eager inputs: a numpy array, writable buffer or CPU DLPack
                tensor of ``x``'s shape and dtype to receive into.

        Returns:
            The root's data, of ``x``'s kind (numpy for eager inputs). On the
            eager path the root returns ``x`` itself (or ``out``).

        Raises:
            InvalidRankError: root not a rank of the group.
            ArgumentTypeError, DtypeError, ShapeError, InvalidArgumentError: see :mod:`mlxdist.errors`.
            GroupClosedError, CommunicationError: see :mod:`mlxdist.errors`.
            MismatchError: with the check on, another root, dtype or shape on another rank.
        """
        return self._rooted("broadcast", x, root, stream, out)

    def gather(self, x: ArrayLike, root: int = 0, *, stream: StreamLike = None, out: Any = None) -> ArrayLike:
        """Every rank's ``x`` concatenated along axis 0 in rank order, on the root.

        The other ranks get an array of no rows, ``(0,) + x.shape[1:]`` (as
        MPI_Gather's receive buffer, only the root's result holds data; a
        lazy result still has one shape per rank). A scalar part is one row,
        as in :meth:`all_gather`; a size-1 group returns ``x`` as it is.

        Args:
            x: This rank's part, the same shape and dtype on every rank.
            root: The rank that receives.
            stream: For mx.arrays, as :meth:`all_sum`.
            out: For eager inputs: an array of this rank's result shape.

        Returns:
            The gathered array on the root; an empty one elsewhere. Its
            gradient (lazy path) scatters the root's cotangent back.

        Raises:
            InvalidRankError, ArgumentTypeError, DtypeError, ShapeError: see :mod:`mlxdist.errors`.
            InvalidArgumentError, GroupClosedError, CommunicationError, MismatchError: see :mod:`mlxdist.errors`.
        """
        return self._rooted("gather", x, root, stream, out)

    def scatter(self, x: ArrayLike, root: int = 0, *, stream: StreamLike = None, out: Any = None) -> ArrayLike:
        """Rank ``r`` receives rows ``[r * m, (r + 1) * m)`` of the root's ``x``, ``m = x.shape[0] // size``.

        Args:
            x: On the root, the data; on the other ranks an array of the same
                shape and dtype (a template: its values are not read).
            root: The rank that sends.
            stream: For mx.arrays, as :meth:`all_sum`.
            out: For eager inputs: an array of the scattered shape.

        Returns:
            This rank's rows. Its gradient (lazy path) gathers the cotangents
            onto the root (zeros on the other ranks).

        Raises:
            ShapeError: a scalar, or axis 0 not divisible by the size.
            InvalidRankError, ArgumentTypeError, DtypeError, InvalidArgumentError: see :mod:`mlxdist.errors`.
            GroupClosedError, CommunicationError, MismatchError: see :mod:`mlxdist.errors`.
        """
        return self._rooted("scatter", x, root, stream, out)

    def all_to_all(self, x: ArrayLike, *, stream: StreamLike = None, out: Any = None) -> ArrayLike:
        """Split ``x`` along axis 0 into ``size`` blocks, send block ``j`` to rank ``j``,
        and concatenate the blocks received in rank order.

        Eagerly a pairwise exchange where any rank reaches any other (MPI,
        and two ranks of ring) for inputs over 64 KiB; otherwise (and
        lazily) an all_gather of which each rank keeps its blocks.

        Args:
            x: An array whose axis 0 is divisible by the size, the same shape
                and dtype on every rank.
            stream: For mx.arrays, as :meth:`all_sum`.
            out: For eager inputs: an array of ``x``'s shape (``x`` itself
                allowed: it is read before it is overwritten).

        Returns:
            The received blocks, of ``x``'s shape. Its gradient is all_to_all.

        Raises:
            ShapeError: a scalar, or axis 0 not divisible by the size.
            ArgumentTypeError, DtypeError, InvalidArgumentError, GroupClosedError: see :mod:`mlxdist.errors`.
            CommunicationError, MismatchError: see :mod:`mlxdist.errors`.
        """
        _available(self, "all_to_all")
        if type(x) is mx.array:
            _lazy_checks(self, "all_to_all", x, 0, stream, out)
            return composed_lazy.all_to_all(self, x, stream)
        _eager_only(stream)
        return composed_eager.all_to_all(self, x, out)

    def broadcast_object(self, obj: Any, root: int = 0, *, pickle: bool = False) -> Any:
        """The root's ``obj`` on every rank: a JSON value or bytes (see :mod:`mlxdist.objects`).

        Args:
            obj: On the root, the object; ignored elsewhere.
            root: The rank whose object every rank receives.
            pickle: Pickle what JSON cannot carry (every rank passes the same).

        Returns:
            The root's object (the root gets ``obj`` itself).

        Raises:
            ArgumentTypeError: the root's object is not a JSON value or bytes
                (raised on every rank), or pickle is not a bool.
            InvalidRankError, GroupClosedError, CommunicationError, DeadlineExceeded: see :mod:`mlxdist.errors`.
            MismatchError: see :mod:`mlxdist.errors`.
        """
        return objects.broadcast_object(self, obj, root, pickle)

    def all_gather_object(self, obj: Any, *, pickle: bool = False) -> list[Any]:
        """Every rank's ``obj``, in rank order: JSON values or bytes (see :mod:`mlxdist.objects`).

        Args:
            obj: This rank's object.
            pickle: Pickle what JSON cannot carry (every rank passes the same).

        Returns:
            A list of ``size`` objects (this rank's is ``obj`` itself).

        Raises:
            ArgumentTypeError: some rank's object is not a JSON value or bytes
                (raised on every rank, naming the ranks), or pickle is not a bool.
            GroupClosedError, CommunicationError, DeadlineExceeded, MismatchError: see :mod:`mlxdist.errors`.
        """
        return objects.all_gather_object(self, obj, pickle)
