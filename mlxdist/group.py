"""``Group``: a communicator over MLX's distributed engine.

Every operation takes numpy arrays or mx.arrays, and the input's kind picks
the path:

- mx.array in, a lazy mx.array out (:mod:`mlxdist._paths.lazy`), exactly as
  mx.distributed: nothing is evaluated when the call returns, results are
  differentiable and compile, and ``stream=`` picks the stream.
- numpy in, numpy out, eagerly (:mod:`mlxdist._paths.eager`): when the call
  returns the result is there; ``out=`` and registered buffers avoid copies.

Eager operations run under a lock: one per group where the backend lets
groups communicate concurrently (MPI with MPI_THREAD_MULTIPLE), else one per
world (a group and every group split from it). Lazy ones run when MLX
evaluates them. Either way each rank must issue its operations in the same
order, as with MPI and NCCL.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import mlx.core as mx
import numpy as np

from mlxdist import objects
from mlxdist._c import bridge
from mlxdist._c.gate import WorldState
from mlxdist._c.handles import GroupHandle
from mlxdist._paths import eager, lazy, p2p
from mlxdist.backends import Backend
from mlxdist.dtypes import DTypeLike, code_of_mlx, parse_dtype
from mlxdist.errors import InvalidArgumentError, UnsupportedOperationError
from mlxdist.group_record import GroupRecord, register
from mlxdist.rules import check_peer, check_split, checked_shape

__all__ = ["Group", "ArrayLike"]

ArrayLike = Union[np.ndarray, mx.array]
# The composed collectives also take buffers and CPU DLPack tensors eagerly.
AnyArray = Union[np.ndarray, mx.array, Any]
StreamLike = Union[mx.Stream, mx.Device, None]

# The hot path of the lazy reductions: one bridge call. A failure, a bool
# array the backend cannot reduce, or anything else unusual takes the full
# path (lazy.collective), which raises or composes.
_bridge_collective = bridge.collective
_LAZY_ALL_SUM = lazy.FUNCTIONS["all_sum"]
_LAZY_ALL_MAX = lazy.FUNCTIONS["all_max"]
_LAZY_ALL_MIN = lazy.FUNCTIONS["all_min"]
# The lazy send and recv_like's hot path: a peer this group can reach (an int
# from the record's peers), then one bridge call; anything else takes the checked path.
_bridge_peer = bridge.peer
_LAZY_SEND = lazy.FUNCTIONS["send"]
_LAZY_RECV_LIKE = lazy.FUNCTIONS["recv_like"]


def _no_out_for_mlx(out: Any) -> None:
    if out is not None:
        raise InvalidArgumentError("out= takes numpy results; an mx.array input returns a new lazy mx.array")


def _numpy_only_stream(stream: Any) -> None:
    if stream is not None:
        raise InvalidArgumentError("stream= applies to mx.array inputs; numpy inputs run eagerly")


class Group:
    """A group of processes that communicate; obtain one from :func:`mlxdist.init`.

    Attributes:
        backend: The backend, or None for the single-process group of a
            process that no launcher started.
    """

    # Everything the layers beneath need is in the record, made once here.
    __slots__ = ("_record", "backend", "__weakref__")

    def __init__(self, handle: GroupHandle, backend: Backend | None, world: WorldState) -> None:
        self._record = GroupRecord(handle, backend, world)
        self.backend = backend
        register(self, self._record)

    def rank(self) -> int:
        """This process's rank in the group."""
        return self._record.rank

    def size(self) -> int:
        """The number of processes in the group."""
        return self._record.size

    def __repr__(self) -> str:
        return repr(self._record)

    # -- lifetime -----------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._record.closed

    def close(self) -> None:
        """Release this group's handle. Idempotent; the group is unusable afterwards.

        Returns at once, from any thread: an eager operation running on
        another thread finishes first and releases the handle when it ends.
        Lazy results built before stay valid: each holds its own reference to
        the group. MLX keeps each backend's world alive for the process, so
        other groups (and mx.distributed) are unaffected.
        """
        self._record.close()

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- structure ----------------------------------------------------------

    def split(self, color: int, key: int = -1) -> "Group":
        """Split into subgroups; every rank of this group must call it.

        Args:
            color: Ranks passing the same color (>= 0) form one subgroup.
            key: Orders ranks in the subgroup (smaller first); -1 keeps this
                group's order.

        Returns:
            The subgroup this rank belongs to.

        Raises:
            InvalidArgumentError: color or key not an integer in range.
            UnsupportedOperationError: the backend cannot split (ring, jaccl,
                the single-process group).
            GroupClosedError: the group is closed.
        """
        check_split(color, key)
        return Group(eager.split(self._record, color, key), self.backend, self._record.world)

    # -- collectives --------------------------------------------------------

    def all_sum(self, x: ArrayLike, *, stream: StreamLike = None, out: np.ndarray | None = None) -> ArrayLike:
        """Element-wise sum over all ranks.

        Args:
            x: An mx.array (lazy result) or a numpy array (eager result), the
                same shape and dtype on every rank. A bool "sum" is a logical or.
            stream: For mx.arrays: the stream or device to run on (None: the
                backend's communication stream, as mx.distributed).
            out: For numpy arrays: where to write the result; a registered
                buffer (``x`` itself included) is written with no copy.

        Returns:
            The sum, of ``x``'s kind, shape and dtype.

        Raises:
            ArgumentTypeError, DtypeError, ShapeError, InvalidArgumentError: see :mod:`mlxdist.errors`.
            GroupClosedError, CommunicationError: see :mod:`mlxdist.errors`.
        """
        record = self._record
        if type(x) is mx.array and record.fast and stream is None and out is None:
            result = _bridge_collective(_LAZY_ALL_SUM, x, record.address, None, record.bool_ok)
            if result is not None and result is not NotImplemented:
                return result
        elif type(x) is np.ndarray and stream is None:
            return eager.collective(record, "all_sum", x, out)
        return self._collective("all_sum", x, stream, out)

    def all_max(self, x: ArrayLike, *, stream: StreamLike = None, out: np.ndarray | None = None) -> ArrayLike:
        """Element-wise maximum over all ranks; arguments as :meth:`all_sum`."""
        record = self._record
        if type(x) is mx.array and record.fast and stream is None and out is None:
            result = _bridge_collective(_LAZY_ALL_MAX, x, record.address, None, record.bool_ok)
            if result is not None and result is not NotImplemented:
                return result
        elif type(x) is np.ndarray and stream is None:
            return eager.collective(record, "all_max", x, out)
        return self._collective("all_max", x, stream, out)

    def all_min(self, x: ArrayLike, *, stream: StreamLike = None, out: np.ndarray | None = None) -> ArrayLike:
        """Element-wise minimum over all ranks; arguments as :meth:`all_sum`."""
        record = self._record
        if type(x) is mx.array and record.fast and stream is None and out is None:
            result = _bridge_collective(_LAZY_ALL_MIN, x, record.address, None, record.bool_ok)
            if result is not None and result is not NotImplemented:
                return result
        elif type(x) is np.ndarray and stream is None:
            return eager.collective(record, "all_min", x, out)
        return self._collective("all_min", x, stream, out)

    def all_gather(self, x: ArrayLike, *, stream: StreamLike = None, out: np.ndarray | None = None) -> ArrayLike:
        """Concatenate every rank's ``x`` along axis 0, in rank order.

        A scalar becomes a vector of ``size`` elements; a size-1 group returns
        its input as it is (as MLX's does), so a scalar stays a scalar there.

        Args:
            x: An mx.array or numpy array, the same shape and dtype on every rank.
            stream: For mx.arrays, as :meth:`all_sum`.
            out: For numpy arrays: an array of the gathered shape; it may hold
                ``x`` as this rank's slice (read before it is overwritten).

        Returns:
            The gathered array, of ``x``'s kind.

        Raises:
            ArgumentTypeError, DtypeError, ShapeError, GroupClosedError: see :mod:`mlxdist.errors`.
            CommunicationError: see :mod:`mlxdist.errors`.
        """
        return self._collective("all_gather", x, stream, out)

    def sum_scatter(self, x: ArrayLike, *, stream: StreamLike = None, out: np.ndarray | None = None) -> ArrayLike:
        """Sum over all ranks, then keep this rank's slice of axis 0.

        Rank ``r`` receives rows ``[r * n, (r + 1) * n)`` of the sum, with
        ``n = x.shape[0] // size``. On backends without a native reduce-scatter
        (ring, MPI) mlxdist composes it from an all_sum (lazy and
        differentiable for mx.arrays).

        Args:
            x: An array with ``ndim >= 1`` and ``x.shape[0] % size == 0``.
            stream: For mx.arrays, as :meth:`all_sum`.
            out: For numpy arrays: an array of the scattered shape.

        Returns:
            This rank's slice of the sum, of ``x``'s kind.

        Raises:
            ShapeError: scalar input or axis 0 not divisible by the size.
            ArgumentTypeError, DtypeError, GroupClosedError, CommunicationError: see :mod:`mlxdist.errors`.
        """
        return self._collective("sum_scatter", x, stream, out)

    def _collective(self, op: str, x: ArrayLike, stream: StreamLike, out: np.ndarray | None) -> ArrayLike:
        if type(x) is mx.array:
            if out is not None:
                _no_out_for_mlx(out)
            return lazy.collective(self._record, op, x, stream)
        if stream is not None:
            _numpy_only_stream(stream)
        return eager.collective(self._record, op, x, out)

    def barrier(self) -> None:
        """Block until every rank of the group has reached the barrier (eager).

        Raises:
            GroupClosedError, CommunicationError: see :mod:`mlxdist.errors`.
        """
        eager.collective(self._record, "all_sum", np.zeros(1, np.int32), None)

    # -- point to point -----------------------------------------------------

    def _peer(self, peer: Any, verb: str, name: str) -> int:
        record = self._record
        record.live_handle()
        if "send" not in record.caps.native and record.size > 1:
            raise UnsupportedOperationError(f"{self.backend.value} has no send/recv")  # type: ignore[union-attr]
        return check_peer(peer, record.rank, record.size, record.caps.neighbours_only, verb, name)

    def send(self, x: ArrayLike, dst: int, *, stream: StreamLike = None) -> mx.array | None:
        """Send ``x`` to rank ``dst``, which must post a matching receive.

        On ring only the two neighbours (``rank +- 1`` modulo size) are reachable.

        Args:
            x: An mx.array (a lazy send) or a numpy array (sent when the call returns).
            dst: The destination rank.
            stream: For mx.arrays, as :meth:`all_sum`.

        Returns:
            For an mx.array, a lazy array that sends when evaluated: use it as
            a dependency (``x = send(x, dst)``), as with mx.distributed. For
            numpy, None.

        Raises:
            InvalidRankError: dst not an integer rank, this rank, or a size-1 group.
            UnsupportedOperationError: ring and dst not a neighbour.
            ArgumentTypeError, DtypeError, GroupClosedError, CommunicationError: see :mod:`mlxdist.errors`.
        """
        record = self._record
        if type(x) is mx.array and record.fast and stream is None and type(dst) is int and dst in record.peers:
            result = _bridge_peer(_LAZY_SEND, x, dst, record.address, None)
            if result is not None:
                return result
        if type(dst) is not int or dst not in record.peers:
            dst = self._peer(dst, "send to", "dst")
        if type(x) is mx.array:
            return lazy.send(record, x, dst, stream)
        _numpy_only_stream(stream)
        eager.send(record, x, dst)
        return None

    def recv(
        self,
        shape: Sequence[int] | int,
        dtype: DTypeLike,
        src: int,
        *,
        stream: StreamLike = None,
        out: np.ndarray | None = None,
    ) -> ArrayLike:
        """Receive an array of ``shape`` and ``dtype`` sent by rank ``src``.

        Args:
            shape: The shape the sender sends.
            dtype: An mlx dtype (a lazy mx.array result) or a numpy dtype (an
                eager numpy result).
            src: The source rank.
            stream: For mlx dtypes, as :meth:`all_sum`.
            out: For numpy dtypes: an array to receive into.

        Returns:
            The received array.

        Raises:
            InvalidRankError: src not an integer rank, this rank, or a size-1 group.
            ShapeError, DtypeError: invalid shape or dtype (None included).
            UnsupportedOperationError: ring and src not a neighbour.
            GroupClosedError, CommunicationError: see :mod:`mlxdist.errors`.
        """
        src = self._peer(src, "receive from", "src")
        dims = checked_shape(shape)
        code, as_mlx = parse_dtype(dtype)
        if as_mlx:
            _no_out_for_mlx(out)
            return lazy.recv(self._record, dims, code, src, stream)
        _numpy_only_stream(stream)
        return eager.recv(self._record, dims, code, src, out)

    def recv_like(
        self, x: ArrayLike, src: int, *, stream: StreamLike = None, out: np.ndarray | None = None
    ) -> ArrayLike:
        """Receive an array with ``x``'s shape, dtype and kind from ``src``.

        Args:
            x: An mx.array or numpy array used as a template.
            src: The source rank.
            stream: For mx.arrays, as :meth:`all_sum`.
            out: For numpy templates: an array to receive into.

        Returns:
            The received array, of ``x``'s kind (lazy for mx.arrays).

        Raises:
            InvalidRankError: src not an integer rank, this rank, or a size-1 group.
            ShapeError, DtypeError, UnsupportedOperationError, GroupClosedError, CommunicationError: as :meth:`recv`.
        """
        record = self._record
        if type(x) is mx.array and record.fast and stream is None and out is None and type(src) is int and src in record.peers:
            result = _bridge_peer(_LAZY_RECV_LIKE, x, src, record.address, None)
            if result is not None:
                return result
        if type(src) is not int or src not in record.peers:
            src = self._peer(src, "receive from", "src")
        if type(x) is mx.array:
            if out is not None:
                _no_out_for_mlx(out)
            code_of_mlx(x.dtype)
            return lazy.recv_like(record, x, src, stream)
        _numpy_only_stream(stream)
        return eager.recv_like(record, x, src, out)

    # -- composed from send/recv (MLX has none of these) --------------------

    def broadcast(self, x: AnyArray, root: int = 0, *, stream: StreamLike = None, out: Any = None) -> AnyArray:
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
        return p2p.rooted(self._record, "broadcast", x, root, stream, out)

    def gather(self, x: AnyArray, root: int = 0, *, stream: StreamLike = None, out: Any = None) -> AnyArray:
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
        return p2p.rooted(self._record, "gather", x, root, stream, out)

    def scatter(self, x: AnyArray, root: int = 0, *, stream: StreamLike = None, out: Any = None) -> AnyArray:
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
        return p2p.rooted(self._record, "scatter", x, root, stream, out)

    def all_to_all(self, x: AnyArray, *, stream: StreamLike = None, out: Any = None) -> AnyArray:
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
        return p2p.all_to_all(self._record, x, stream, out)

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
        return objects.broadcast_object(self, self._record, obj, root, pickle)

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
        return objects.all_gather_object(self, self._record, obj, pickle)
