"""``Group``: a communicator over MLX's distributed engine.

Collectives are eager and synchronous: when a call returns, the result is
complete. Any thread may use a group; operations of one world (a group and
every group split from it) are serialized by one lock, because each rank must
issue its collectives in the same order and the backends are not re-entrant.
"""

from __future__ import annotations

import threading
from typing import Any, Literal, Sequence

import mlx.core as mx
import numpy as np

from mlxdist import deadline  # issue 12 hook
from mlxdist._ffi import lib
from mlxdist._handles import ArrayHandle, GroupHandle, thread_stream
from mlxdist.arrays import (
    ArrayLike,
    DTypeLike,
    MlxBuffer,
    as_operand,
    checked_shape,
    code_of,
    dtype_code,
    registered_buffer,
    storage_dtype,
    to_kind,
)
from mlxdist.backends import NATIVE_OPERATIONS, Backend
from mlxdist.errors import (
    CommunicationError,
    DistributedError,
    DtypeError,
    GroupClosedError,
    InvalidArgumentError,
    InvalidRankError,
    ShapeError,
    UnsupportedOperationError,
    check,
)

__all__ = ["Group", "Engine", "WorldState"]

Engine = Literal["direct", "graph"]

_OPS = {
    "all_sum": lib.MLXDIST_ALL_SUM,
    "all_max": lib.MLXDIST_ALL_MAX,
    "all_min": lib.MLXDIST_ALL_MIN,
    "all_gather": lib.MLXDIST_ALL_GATHER,
    "sum_scatter": lib.MLXDIST_SUM_SCATTER,
}
_GRAPH_OPS = {
    "all_sum": lib.mlx_distributed_all_sum,
    "all_max": lib.mlx_distributed_all_max,
    "all_min": lib.mlx_distributed_all_min,
    "all_gather": lib.mlx_distributed_all_gather,
    "sum_scatter": lib.mlx_distributed_sum_scatter,
}


class WorldState:
    """What the groups of one world share: the lock serializing their operations
    and, once a peer is lost, the failure that ended the world."""

    __slots__ = ("lock", "lost")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lost: str | None = None


def result_shape(op: str, shape: tuple[int, ...], size: int) -> tuple[int, ...]:
    """The shape a collective returns for an input of ``shape`` on ``size`` ranks.

    Raises:
        ShapeError: sum_scatter of a scalar or of an axis 0 not divisible by size.
    """
    if op == "all_gather":
        return (size * shape[0],) + shape[1:] if shape else (size,)
    if op == "sum_scatter":
        if not shape or shape[0] % size:
            raise ShapeError(
                f"sum_scatter needs an array of at least one dimension whose axis 0 is "
                f"divisible by the group size {size}; got shape {shape}"
            )
        return (shape[0] // size,) + shape[1:]
    return shape


class Group:
    """A group of processes that communicate; obtain one from :func:`mlxdist.init`.

    Attributes:
        rank: This process's rank in the group.
        size: The number of processes in the group.
        backend: The backend, or None for the single-process group of a
            process that no launcher started.
    """

    __slots__ = (
        "_handle",
        "rank",
        "size",
        "backend",
        "engine",
        "_world",
        "_native_scatter",
        "__weakref__",
    )

    def __init__(
        self,
        handle: GroupHandle,
        backend: Backend | None,
        world: WorldState,
        engine: Engine = "direct",
    ) -> None:
        if engine not in ("direct", "graph"):
            raise ValueError(f"engine must be 'direct' or 'graph', got {engine!r}")
        self._handle = handle
        self.backend = backend
        self.engine: Engine = engine
        self._world = world
        self._native_scatter = "sum_scatter" in NATIVE_OPERATIONS.get(backend, frozenset())  # type: ignore[arg-type]
        self.rank = lib.mlx_distributed_group_rank(handle.value)
        self.size = lib.mlx_distributed_group_size(handle.value)
        if self.rank < 0 or self.size < 1:
            check(1, "group")

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"rank={self.rank}, size={self.size}"
        name = self.backend.value if self.backend else "none"
        return f"Group(backend={name}, {state})"

    # -- lifetime -----------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._handle.closed

    def close(self) -> None:
        """Release this group's handle. Idempotent; the group is unusable afterwards.

        MLX keeps each backend's world alive for the process, so other groups
        (and mx.distributed) are unaffected.
        """
        with self._world.lock:
            self._handle.close()

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _live_handle(self) -> Any:
        if self._handle.closed:
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
            InvalidArgumentError: color < 0 or key < -1.
            UnsupportedOperationError: the backend cannot split (ring, jaccl,
                the single-process group).
            GroupClosedError: the group is closed.
        """
        color, key = int(color), int(key)
        if color < 0:
            raise InvalidArgumentError(f"split color must be >= 0, got {color}")
        if key < -1:
            raise InvalidArgumentError(f"split key must be >= 0 or -1, got {key}")
        handle = GroupHandle()
        with self._world.lock:
            rc = lib.mlx_distributed_group_split(handle.out, self._live_handle(), color, key)
        if rc:
            self._failed("split", UnsupportedOperationError)
        return Group(handle, self.backend, self._world, self.engine)

    # -- collectives --------------------------------------------------------

    def all_sum(self, x: ArrayLike, *, out: np.ndarray | None = None) -> ArrayLike:
        """Element-wise sum over all ranks.

        Args:
            x: A numpy or mlx array, the same shape and dtype on every rank.
            out: Optional numpy array for the result; a registered buffer
                (``x`` itself included) is written with no copy.

        Returns:
            The sum, of ``x``'s kind (numpy or mlx), shape and dtype.

        Raises:
            DtypeError, ShapeError, GroupClosedError, TransformError,
            CommunicationError: see :mod:`mlxdist.errors`.
        """
        return self._collective("all_sum", x, out)

    def all_max(self, x: ArrayLike, *, out: np.ndarray | None = None) -> ArrayLike:
        """Element-wise maximum over all ranks; arguments as :meth:`all_sum`."""
        return self._collective("all_max", x, out)

    def all_min(self, x: ArrayLike, *, out: np.ndarray | None = None) -> ArrayLike:
        """Element-wise minimum over all ranks; arguments as :meth:`all_sum`."""
        return self._collective("all_min", x, out)

    def all_gather(self, x: ArrayLike, *, out: np.ndarray | None = None) -> ArrayLike:
        """Concatenate every rank's ``x`` along axis 0, in rank order.

        A scalar becomes a vector of ``size`` elements.

        Args:
            x: A numpy or mlx array, the same shape and dtype on every rank.
            out: Optional numpy array of the gathered shape.

        Returns:
            The gathered array, of ``x``'s kind.

        Raises:
            DtypeError, ShapeError, GroupClosedError, TransformError,
            CommunicationError: see :mod:`mlxdist.errors`.
        """
        return self._collective("all_gather", x, out)

    def sum_scatter(self, x: ArrayLike, *, out: np.ndarray | None = None) -> ArrayLike:
        """Sum over all ranks, then keep this rank's slice of axis 0.

        Rank ``r`` receives rows ``[r * n, (r + 1) * n)`` of the sum, with
        ``n = x.shape[0] // size``. On backends without a native reduce-scatter
        (ring, MPI) mlxdist computes it from an all_sum.

        Args:
            x: An array with ``ndim >= 1`` and ``x.shape[0] % size == 0``.
            out: Optional numpy array of the scattered shape.

        Returns:
            This rank's slice of the sum, of ``x``'s kind.

        Raises:
            ShapeError: scalar input or axis 0 not divisible by the size.
            DtypeError, GroupClosedError, TransformError, CommunicationError.
        """
        return self._collective("sum_scatter", x, out)

    def barrier(self) -> None:
        """Block until every rank of the group has reached the barrier.

        Raises:
            GroupClosedError, CommunicationError.
        """
        self.all_sum(np.zeros(1, np.int32))

    def send(self, x: ArrayLike, dst: int) -> None:
        """Send ``x`` to rank ``dst``, which must post a matching receive.

        On ring only the two neighbours (``rank ± 1`` modulo size) are reachable.

        Args:
            x: A numpy or mlx array.
            dst: The destination rank.

        Raises:
            InvalidRankError: dst out of range, this rank, or a size-1 group.
            UnsupportedOperationError: ring and dst not a neighbour.
            DtypeError, GroupClosedError, CommunicationError.
        """
        self._check_peer(dst, "send to", "dst")
        src, _ = as_operand(x, wrap=self.engine == "direct")
        if self.engine == "graph":
            self._graph_call("send", lib.mlx_distributed_send, src, dst)
        else:
            self._run("send", lib.mlxdist_send, src.value, dst)

    def recv(
        self,
        shape: Sequence[int] | int,
        dtype: DTypeLike,
        src: int,
        *,
        out: np.ndarray | None = None,
    ) -> ArrayLike:
        """Receive an array of ``shape`` and ``dtype`` sent by rank ``src``.

        Args:
            shape: The shape the sender sends.
            dtype: A numpy dtype (numpy result) or an mlx dtype (mlx result).
            src: The source rank.
            out: Optional numpy array to receive into.

        Returns:
            The received array.

        Raises:
            InvalidRankError: src out of range, this rank, or a size-1 group.
            ShapeError, DtypeError: invalid shape or dtype.
            UnsupportedOperationError: ring and src not a neighbour.
            GroupClosedError, CommunicationError.
        """
        self._check_peer(src, "receive from", "src")
        dims = checked_shape(shape)
        code, as_mlx = dtype_code(dtype)
        return self._receive(dims, code, as_mlx, src, out)

    def recv_like(self, x: ArrayLike, src: int, *, out: np.ndarray | None = None) -> ArrayLike:
        """Receive an array with ``x``'s shape and dtype (and kind) from ``src``.

        Args:
            x: A numpy or mlx array used as a template.
            src: The source rank.
            out: Optional numpy array to receive into.

        Returns:
            The received array, of ``x``'s kind.

        Raises:
            As :meth:`recv`.
        """
        if isinstance(x, np.ndarray):
            return self.recv(x.shape, x.dtype, src, out=out)
        if hasattr(x, "dtype") and hasattr(x, "shape"):
            return self.recv(x.shape, x.dtype, src, out=out)
        raise TypeError(f"expected a numpy.ndarray or mlx.core.array, got {type(x).__name__}")

    # -- implementation -----------------------------------------------------

    def _check_peer(self, peer: int, verb: str, name: str) -> None:
        self._live_handle()
        if self.size == 1:
            raise InvalidRankError(f"cannot {verb} a peer in a group of size 1")
        if not isinstance(peer, (int, np.integer)) or not 0 <= peer < self.size:
            raise InvalidRankError(f"{name}={peer!r} is not a rank of a group of size {self.size}")
        if peer == self.rank:
            raise InvalidRankError(f"{name}={peer} is this rank: cannot {verb} itself")
        if self.backend is Backend.RING and (peer - self.rank) % self.size not in (1, self.size - 1):
            raise UnsupportedOperationError(
                f"ring can only {verb} its neighbours "
                f"({(self.rank - 1) % self.size} and {(self.rank + 1) % self.size}), not {peer}"
            )

    def _collective(self, op: str, x: ArrayLike, out: np.ndarray | None) -> ArrayLike:
        # The hot case first: a reduction from one whole registered buffer into
        # another (or itself). Every microsecond here shows up about threefold
        # in small collectives: the ranks wait on each other's Python.
        if type(out) is np.ndarray and type(x) is np.ndarray and op in _SAME_SHAPE:
            xb, ob = x.base, out.base
            if (
                type(xb) is MlxBuffer
                and type(ob) is MlxBuffer
                and xb.owner is None
                and ob.owner is None
                and x.shape == xb.shape == ob.shape == out.shape
                and x.dtype == xb.storage == ob.storage == out.dtype
                and self.engine == "direct"
                and self.size > 1
                and (xb.code != lib.MLX_BOOL or self.backend is not Backend.MPI)
                and (ob is xb or not _overlap(ob, xb))
                and out.flags.writeable
            ):
                self._run(op, lib.mlxdist_collective, ob.value, xb.value, _OPS[op])
                return out
        if self.size == 1:
            self._live_handle()
            return self._local(op, x, out)
        if self.backend is Backend.MPI and op != "all_gather" and _is_bool(x):
            return self._bool_via_uint8(op, x, out)
        direct = self.engine == "direct"
        src, as_mlx = as_operand(x, wrap=direct)
        shape = src.shape if op in _SAME_SHAPE else result_shape(op, src.shape, self.size)
        dest = None if out is None else _out_buffer(out, shape, src.code, direct)
        if dest is not None and dest.ptr != src.ptr and _overlap(dest, src):
            dest = None  # partly overlapping: compute aside, then copy
        if op == "sum_scatter" and not self._native_scatter:
            total = self._reduce_buffer("all_sum", src, src.shape, None)
            rows = shape[0]
            part = total.numpy()[self.rank * rows : (self.rank + 1) * rows]
            return _deliver(part, None, out, as_mlx)
        result = self._reduce_buffer(op, src, shape, dest)
        if out is None:
            return to_kind(np.asarray(result), as_mlx, result.code)
        return _deliver(result, dest, out, as_mlx)

    def _local(self, op: str, x: ArrayLike, out: np.ndarray | None) -> ArrayLike:
        """A collective on one process: the input itself, left lazy for mlx arrays
        (as MLX does); with ``out``, a copy into it."""
        if isinstance(x, np.generic):
            x = np.asarray(x)
        if not isinstance(x, (np.ndarray, mx.array)):
            raise TypeError(f"expected a numpy.ndarray or mlx.core.array, got {type(x).__name__}")
        code, _ = dtype_code(x.dtype)
        shape = result_shape(op, tuple(x.shape), 1)
        if out is None:
            return x
        _out_buffer(out, shape, code, False)  # validates out
        np.copyto(out, x if isinstance(x, np.ndarray) else as_operand(x)[0].numpy())
        return out

    def _bool_via_uint8(self, op: str, x: ArrayLike, out: np.ndarray | None) -> ArrayLike:
        """MPI defines no arithmetic on MPI_C_BOOL (an abort, not an error): reduce
        the bytes as uint8, where max is OR (bool sum, as on ring) and min is AND."""
        if out is not None and (not isinstance(out, np.ndarray) or out.dtype != np.bool_):
            raise DtypeError("out must be a numpy bool array for a bool reduction")
        as_bytes = out.view(np.uint8) if out is not None else None
        wire_op = "all_max" if op == "all_sum" else op
        numpy_in = isinstance(x, np.ndarray)
        result = self._collective(wire_op, x.view(np.uint8) if numpy_in else x.astype(mx.uint8), as_bytes)
        if out is not None:
            return out
        return result.view(np.bool_) if numpy_in else result.astype(mx.bool_)

    def _run(self, what: str, func: Any, *args: Any) -> None:
        """Call ``func(*args, group, stream)`` under the world's lock; raise on failure.

        A lost peer ends the world: MLX's transports do not recover, so later
        operations fail at once instead of waiting on a dead connection.
        """
        world = self._world
        # issue 12 hook: deadline, peer loss and agreement check around the C call.
        with world.lock, deadline.guard(what, self, world, args):
            ptr = self._handle._ptr
            if ptr is None or world.lost is not None:
                self._live_handle()
                raise CommunicationError(
                    f"{what}: this group's world already failed ({world.lost}); start the job again"
                )
            rc = func(*args, ptr[0], thread_stream())
            if rc:  # issue 12: raised inside the guard, which types it
                self._failed(what, CommunicationError)

    def _failed(self, what: str, default: type[DistributedError]) -> None:
        try:
            check(1, what, default)
        except CommunicationError as exc:
            self._world.lost = str(exc)
            raise

    def _reduce_buffer(
        self, op: str, src: MlxBuffer, shape: tuple[int, ...], dest: MlxBuffer | None
    ) -> MlxBuffer:
        if self.engine == "graph":
            return self._graph_call(op, _GRAPH_OPS[op], src)
        result = dest or MlxBuffer.allocate(shape, src.code)
        self._run(op, lib.mlxdist_collective, result.value, src.value, _OPS[op])
        return result

    def _receive(
        self, shape: tuple[int, ...], code: int, as_mlx: bool, src: int, out: np.ndarray | None
    ) -> ArrayLike:
        dest = None if out is None else _out_buffer(out, shape, code, self.engine == "direct")
        if self.engine == "graph":
            res = ArrayHandle()
            self._run("recv", _lazy_recv_then_eval, res, list(shape), code, src)
            result = MlxBuffer.adopt(res)
        else:
            result = dest or MlxBuffer.allocate(shape, code)
            self._run("recv", lib.mlxdist_recv, result.value, src)
        return _deliver(result, dest, out, as_mlx)

    def _graph_call(self, op: str, func: Any, src: MlxBuffer, *args: Any) -> MlxBuffer:
        """mlx-c's path: build the lazy op, then evaluate it."""
        res = ArrayHandle()
        self._run(op, _lazy_then_eval, func, res, src.value, *args)
        return MlxBuffer.adopt(res)


def _lazy_then_eval(func: Any, res: ArrayHandle, *args: Any) -> int:
    return func(res.out, *args) or lib.mlx_array_eval(res.value)


def _lazy_recv_then_eval(res: ArrayHandle, dims: list[int], code: int, src: int, group: Any, stream: Any) -> int:
    return lib.mlx_distributed_recv(res.out, dims, len(dims), code, src, group, stream) or lib.mlx_array_eval(
        res.value
    )


_SAME_SHAPE = frozenset({"all_sum", "all_max", "all_min"})


def _overlap(a: MlxBuffer, b: MlxBuffer) -> bool:
    return a.ptr < b.ptr + b.nbytes and b.ptr < a.ptr + a.nbytes


def _is_bool(x: Any) -> bool:
    if isinstance(x, (np.ndarray, np.generic)):
        return x.dtype == np.bool_
    return isinstance(x, mx.array) and x.dtype == mx.bool_


def _out_buffer(out: np.ndarray, shape: tuple[int, ...], code: int, wrap: bool) -> MlxBuffer | None:
    """Check ``out``; return a buffer the backend can write straight into, if any:
    a registered buffer, or (``wrap``) a view of a contiguous numpy array."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != shape:
        raise ShapeError(f"out has shape {out.shape}, the result has shape {shape}")
    if out.dtype != storage_dtype(code):
        raise DtypeError(f"out has dtype {out.dtype}, the result has dtype {storage_dtype(code)}")
    flags = out.flags
    if not flags.writeable:
        raise InvalidArgumentError("out is read-only")
    buffer = registered_buffer(out)
    if buffer is None and wrap and flags.c_contiguous and flags.aligned:
        buffer = MlxBuffer.wrap(out, code)
    return buffer


def _deliver(
    result: MlxBuffer | np.ndarray, dest: MlxBuffer | None, out: np.ndarray | None, as_mlx: bool
) -> ArrayLike:
    """Hand a result over: into ``out`` (no copy if it was written in place) or as a view."""
    if out is None:
        if isinstance(result, MlxBuffer):
            return result.to(as_mlx)
        return to_kind(result, as_mlx, code_of(result))
    if result is not dest:
        np.copyto(out, result.numpy() if isinstance(result, MlxBuffer) else result)
    return out
