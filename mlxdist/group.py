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

import numbers
import threading
from typing import Any, Sequence, Union

import mlx.core as mx
import numpy as np

from mlxdist._c import bridge, ffi, lib
from mlxdist._c.gate import WorldState, raise_last
from mlxdist._c.handles import GroupHandle
from mlxdist._paths import eager, fillins, lazy
from mlxdist.backends import Backend, capabilities
from mlxdist.dtypes import DTypeLike, code_of_mlx, parse_dtype
from mlxdist.group_composed import ComposedCollectives
from mlxdist.errors import (
    GroupClosedError,
    InvalidArgumentError,
    UnsupportedOperationError,
)
from mlxdist.rules import INT32_MAX, check_peer, checked_shape

__all__ = ["Group", "ArrayLike"]

ArrayLike = Union[np.ndarray, mx.array]
StreamLike = Union[mx.Stream, mx.Device, None]

# The hot path of the lazy reductions: one bridge call. A failure, a bool
# array the backend cannot reduce, or anything else unusual takes the full
# path (lazy.collective), which raises or composes.
_bridge_collective = bridge.collective
_LAZY_ALL_SUM = lazy.FUNCTIONS["all_sum"]
_LAZY_ALL_MAX = lazy.FUNCTIONS["all_max"]
_LAZY_ALL_MIN = lazy.FUNCTIONS["all_min"]
# The lazy send and recv_like's hot path: a peer this group can reach (an int
# from _peers), then one bridge call; anything else takes the checked path.
_bridge_peer = bridge.peer
_LAZY_SEND = lazy.FUNCTIONS["send"]
_LAZY_RECV_LIKE = lazy.FUNCTIONS["recv_like"]


def _no_out_for_mlx(out: Any) -> None:
    if out is not None:
        raise InvalidArgumentError("out= takes numpy results; an mx.array input returns a new lazy mx.array")


def _numpy_only_stream(stream: Any) -> None:
    if stream is not None:
        raise InvalidArgumentError("stream= applies to mx.array inputs; numpy inputs run eagerly")


class Group(ComposedCollectives):
    """A group of processes that communicate; obtain one from :func:`mlxdist.init`.

    Attributes:
        backend: The backend, or None for the single-process group of a
            process that no launcher started.
    """

    __slots__ = (
        "_handle",
        "_address",
        "_rank",
        "_size",
        "backend",
        "_caps",
        "_world",
        "_lock",
        "_closed",
        "_composed",
        "_fast",
        "_bool_ok",
        "_peers",
        "__weakref__",
    )

    def __init__(self, handle: GroupHandle, backend: Backend | None, world: WorldState) -> None:
        self._handle = handle
        self.backend = backend
        self._caps = capabilities(backend)
        self._world = world
        self._lock = threading.Lock() if world.concurrent_groups else world.lock
        self._closed = False
        # Whether mx.array reductions may go straight to the bridge: the
        # group is open, its world has not failed and is not checked.
        self._fast = world.lost is None and not world.checked
        world.groups.add(self)
        # The mlx_distributed_group ctx: the bridge's view of this handle.
        self._address = int(ffi.cast("uintptr_t", handle.value.ctx))
        self._rank = lib.mlx_distributed_group_rank(handle.value)
        self._size = lib.mlx_distributed_group_size(handle.value)
        if self._rank < 0 or self._size < 1:
            raise_last("group")
        self._composed = fillins.composed(self._caps, self._size)
        self._bool_ok = "all_sum" not in self._composed[1]
        # The ranks send and recv accept as they are (ints), checked once here.
        self._peers = frozenset(self._reachable())

    def _reachable(self) -> list[int]:
        if "send" not in self._caps.native or self._size == 1:
            return []
        return [
            peer for peer in range(self._size)
            if peer != self._rank
            and (not self._caps.neighbours_only or (peer - self._rank) % self._size in (1, self._size - 1))
        ]

    def rank(self) -> int:
        """This process's rank in the group."""
        return self._rank

    def size(self) -> int:
        """The number of processes in the group."""
        return self._size

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"rank={self._rank}, size={self._size}"
        name = self.backend.value if self.backend else "none"
        return f"Group(backend={name}, {state})"

    # -- lifetime -----------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Release this group's handle. Idempotent; the group is unusable afterwards.

        Returns at once, from any thread: an eager operation running on
        another thread finishes first and releases the handle when it ends.
        Lazy results built before stay valid: each holds its own reference to
        the group. MLX keeps each backend's world alive for the process, so
        other groups (and mx.distributed) are unaffected.
        """
        self._closed = True
        self._fast = False
        if self._lock.acquire(blocking=False):
            try:
                self._handle.close()
            finally:
                self._lock.release()

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _live_handle(self) -> Any:
        if self._closed:
            raise GroupClosedError("the group is closed")
        return self._handle.value

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
        for name, value, low in (("color", color, 0), ("key", key, -1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= INT32_MAX:
                raise InvalidArgumentError(f"split {name} must be an integer in [{low}, {INT32_MAX}], got {value!r}")
        self._live_handle()
        if "split" not in self._caps.native:
            name = self.backend.value if self.backend else "the single-process group"
            raise UnsupportedOperationError(f"split: {name} cannot split groups")
        handle = GroupHandle()
        with self._lock:
            rc = lib.mlx_distributed_group_split(handle.out, self._live_handle(), int(color), int(key))
        if rc:
            raise_last("split")
        return Group(handle, self.backend, self._world)

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
            ArgumentTypeError, DtypeError, ShapeError, InvalidArgumentError, GroupClosedError,
            CommunicationError: see :mod:`mlxdist.errors`.
        """
        if type(x) is mx.array and self._fast and stream is None and out is None:
            result = _bridge_collective(_LAZY_ALL_SUM, x, self._address, None, self._bool_ok)
            if result is not None and result is not NotImplemented:
                return result
        elif type(x) is np.ndarray and stream is None:
            return eager.collective(self, "all_sum", x, out)
        return self._collective("all_sum", x, stream, out)

    def all_max(self, x: ArrayLike, *, stream: StreamLike = None, out: np.ndarray | None = None) -> ArrayLike:
        """Element-wise maximum over all ranks; arguments as :meth:`all_sum`."""
        if type(x) is mx.array and self._fast and stream is None and out is None:
            result = _bridge_collective(_LAZY_ALL_MAX, x, self._address, None, self._bool_ok)
            if result is not None and result is not NotImplemented:
                return result
        elif type(x) is np.ndarray and stream is None:
            return eager.collective(self, "all_max", x, out)
        return self._collective("all_max", x, stream, out)

    def all_min(self, x: ArrayLike, *, stream: StreamLike = None, out: np.ndarray | None = None) -> ArrayLike:
        """Element-wise minimum over all ranks; arguments as :meth:`all_sum`."""
        if type(x) is mx.array and self._fast and stream is None and out is None:
            result = _bridge_collective(_LAZY_ALL_MIN, x, self._address, None, self._bool_ok)
            if result is not None and result is not NotImplemented:
                return result
        elif type(x) is np.ndarray and stream is None:
            return eager.collective(self, "all_min", x, out)
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
            ArgumentTypeError, DtypeError, ShapeError, GroupClosedError, CommunicationError.
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
            ArgumentTypeError, DtypeError, GroupClosedError, CommunicationError.
        """
        return self._collective("sum_scatter", x, stream, out)

    def _collective(self, op: str, x: ArrayLike, stream: StreamLike, out: np.ndarray | None) -> ArrayLike:
        if type(x) is mx.array:
            if out is not None:
                _no_out_for_mlx(out)
            return lazy.collective(self, op, x, stream)
        if stream is not None:
            _numpy_only_stream(stream)
        return eager.collective(self, op, x, out)

    def barrier(self) -> None:
        """Block until every rank of the group has reached the barrier (eager).

        Raises:
            GroupClosedError, CommunicationError.
        """
        eager.collective(self, "all_sum", np.zeros(1, np.int32), None)

    # -- point to point -----------------------------------------------------

    def _peer(self, peer: Any, verb: str, name: str) -> int:
        self._live_handle()
        if "send" not in self._caps.native and self._size > 1:
            raise UnsupportedOperationError(f"{self.backend.value} has no send/recv")  # type: ignore[union-attr]
        return check_peer(peer, self._rank, self._size, self._caps.neighbours_only, verb, name)

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
            ArgumentTypeError, DtypeError, GroupClosedError, CommunicationError.
        """
        if type(x) is mx.array and self._fast and stream is None and type(dst) is int and dst in self._peers:
            result = _bridge_peer(_LAZY_SEND, x, dst, self._address, None)
            if result is not None:
                return result
        if type(dst) is not int or dst not in self._peers:
            dst = self._peer(dst, "send to", "dst")
        if type(x) is mx.array:
            return lazy.send(self, x, dst, stream)
        _numpy_only_stream(stream)
        eager.send(self, x, dst)
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
            GroupClosedError, CommunicationError.
        """
        src = self._peer(src, "receive from", "src")
        dims = checked_shape(shape)
        code, as_mlx = parse_dtype(dtype)
        if as_mlx:
            _no_out_for_mlx(out)
            return lazy.recv(self, dims, code, src, stream)
        _numpy_only_stream(stream)
        return eager.recv(self, dims, code, src, out)

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
            As :meth:`recv`.
        """
        if type(x) is mx.array and self._fast and stream is None and out is None and type(src) is int and src in self._peers:
            result = _bridge_peer(_LAZY_RECV_LIKE, x, src, self._address, None)
            if result is not None:
                return result
        if type(src) is not int or src not in self._peers:
            src = self._peer(src, "receive from", "src")
        if type(x) is mx.array:
            if out is not None:
                _no_out_for_mlx(out)
            code_of_mlx(x.dtype)
            return lazy.recv_like(self, x, src, stream)
        _numpy_only_stream(stream)
        return eager.recv_like(self, x, src, out)
