"""Registered buffers: numpy arrays viewing MLX memory, and the eager path's
bridging of numpy memory to cmlx's ``mlx_array`` handles.

MLX's own constructors cannot adopt memory MLX did not allocate on its CPU
build (they copy). Registered buffers (:func:`empty`, :func:`zeros`,
:func:`asarray`) are numpy arrays viewing MLX-allocated memory, as
``MPI_Alloc_mem`` or ``ncclMemAlloc`` give: a collective reads them with no
copy in and can write into them. The eager collectives also view any other
C-contiguous, aligned numpy memory in place (``mlxdist_array_wrap``), since
they hand it only to the backend for the length of the call; memory that
cannot be viewed costs one copy in. Results are MLX buffers that numpy views
without a copy; released large ones are kept for reuse (:func:`set_cache_limit`),
and small ones are handed out again once no one holds them (:class:`ReusePool`).
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
import threading
import weakref
from collections import defaultdict
from typing import Any, Hashable, Sequence

import mlx.core as mx
import numpy as np

from mlxdist._c import ffi, lib
from mlxdist._c.gate import raise_last
from mlxdist._c.handles import ArrayHandle
from mlxdist.dtypes import DTypeLike, code_of_numpy, parse_dtype, storage_dtype
from mlxdist.errors import ArgumentTypeError, DtypeError, InvalidArgumentError, ShapeError
from mlxdist.rules import INT32_MAX, checked_shape

__all__ = [
    "MlxBuffer",
    "empty",
    "zeros",
    "asarray",
    "is_registered",
    "registered_buffer",
    "operand",
    "set_cache_limit",
    "reusable",
]

MIN_BYTES = 1 << 20
# Eager calls make buffers for their operands and results, so every
# microsecond here shows up in small collectives: cffi's uintptr_t type and
# numpy's type strings are looked up once.
_UINTPTR = ffi.typeof("uintptr_t")


@functools.lru_cache(maxsize=None)
def _typestr(storage: np.dtype) -> str:
    """numpy's type string of ``storage`` (``dtype.str`` builds a new string on every access)."""
    return storage.str


class BufferPool:
    """Released buffers by (shape, dtype), at most ``limit`` bytes in all.

    Args:
        limit: The most bytes kept; 0 keeps nothing.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._free: dict[Hashable, list[tuple[ArrayHandle, int]]] = defaultdict(list)
        self._lock = threading.Lock()

    def take(self, key: Hashable) -> ArrayHandle | None:
        """A released buffer for ``key``, or None."""
        with self._lock:
            entries = self._free.get(key)
            if not entries:
                return None
            handle, nbytes = entries.pop()
            self.held -= nbytes
            return handle

    def give(self, key: Hashable, handle: ArrayHandle, nbytes: int) -> None:
        """Keep a released buffer if it fits under the limit (else it is freed)."""
        with self._lock:
            if self.held + nbytes <= self.limit:
                self._free[key].append((handle, nbytes))
                self.held += nbytes

    def clear(self) -> None:
        """Free every kept buffer."""
        with self._lock:
            self._free.clear()
            self.held = 0


pool = BufferPool(512 << 20)

# How many references an array of a ReusePool's list has while the pool's own
# loop looks at it and no one else holds it (the list, the loop variable and
# getrefcount's argument), measured with the same loop.
for _probe in [np.empty(0)]:
    _IDLE = sys.getrefcount(_probe)
del _probe


class ReusePool:
    """Small registered arrays reused once no one else holds them.

    The eager path's results and staged inputs come from here: an array is
    handed out again only when nothing but the pool references it (no result
    the caller kept, no view, slice or buffer export of one), so a reused
    array never aliases memory the caller can still see.

    Args:
        per_key: The most arrays kept per (shape, dtype).
        max_bytes: The most bytes kept in all (also bounded by the cache
            limit, :func:`set_cache_limit`).
    """

    def __init__(self, per_key: int = 4, max_bytes: int = 16 << 20) -> None:
        self.per_key = per_key
        self.max_bytes = max_bytes
        self.held = 0
        self._arrays: dict[tuple[tuple[int, ...], int], list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], code: int) -> np.ndarray:
        """A registered array of ``shape`` and ``code`` that no one else holds.

        Args:
            shape: The array's shape (each dimension within MLX's limit).
            code: Its ``mlx_dtype``.

        Returns:
            A kept array no one holds, or a new one (kept if there is room).

        Raises:
            AllocationError: MLX cannot allocate it.
        """
        key = (shape, code)
        with self._lock:
            arrays = self._arrays.get(key)
            if arrays is not None:
                for array in arrays:
                    if sys.getrefcount(array) <= _IDLE:
                        return array
        array = MlxBuffer.allocate(shape, code).numpy()
        with self._lock:
            arrays = self._arrays.setdefault(key, [])
            if len(arrays) < self.per_key and self.held + array.nbytes <= min(self.max_bytes, pool.limit):
                arrays.append(array)
                self.held += array.nbytes
        return array

    def clear(self) -> None:
        """Forget every kept array (those still held stay valid)."""
        with self._lock:
            self._arrays.clear()
            self.held = 0


reusable = ReusePool()


class MlxBuffer:
    """An evaluated MLX array that numpy can view without a copy.

    The numpy views made from it keep it (and so the MLX memory) alive.
    """

    __slots__ = (
        "handle",
        "value",
        "ptr",
        "shape",
        "code",
        "storage",
        "nbytes",
        "owner",
        "__weakref__",
    )

    def __init__(
        self, handle: ArrayHandle, shape: tuple[int, ...], code: int, owner: Any = None
    ) -> None:
        self.handle = handle
        # For a wrapped buffer, the object owning the memory, kept alive here.
        self.owner = owner
        # The handle struct, for C calls; the handle keeps its object alive.
        self.value = value = handle.value
        self.shape = shape
        self.code = code
        self.storage = storage = storage_dtype(code)
        self.nbytes = storage.itemsize * math.prod(shape)
        self.ptr = int(ffi.cast(_UINTPTR, lib.mlxdist_array_data(value)))

    @property
    def __array_interface__(self) -> dict[str, Any]:
        """numpy's view of the buffer; made on demand, since the operands an
        eager call wraps are never viewed."""
        # numpy needs a non-null address even for an empty array.
        return {"version": 3, "shape": self.shape, "typestr": _typestr(self.storage), "data": (self.ptr or 1, False)}

    @classmethod
    def allocate(cls, shape: tuple[int, ...], code: int) -> "MlxBuffer":
        """Uninitialised MLX memory of the given shape and ``mlx_dtype``.

        Large buffers come from, and return to, the pool of released ones.
        """
        large = storage_dtype(code).itemsize * math.prod(shape) >= MIN_BYTES
        key = (shape, code)
        handle = pool.take(key) if large else None
        if handle is None:
            handle = ArrayHandle()
            if lib.mlxdist_array_alloc(handle.out, shape, len(shape), code):
                raise_last(f"allocate {shape} of {storage_dtype(code)}")
        buf = cls(handle, shape, code)
        if large:
            weakref.finalize(buf, pool.give, key, handle, buf.nbytes)
        return buf

    @classmethod
    def copy_of(cls, data: np.ndarray, code: int) -> "MlxBuffer":
        """MLX memory holding a copy of a C-contiguous numpy array's bytes."""
        shape = data.shape
        if shape and max(shape) > INT32_MAX:
            raise ShapeError(f"a dimension of shape {shape} exceeds MLX's 32-bit limit")
        if data.nbytes >= MIN_BYTES:
            buf = cls.allocate(shape, code)
            ffi.memmove(ffi.cast("void*", buf.ptr), ffi.from_buffer(data), buf.nbytes)
            return buf
        handle = ArrayHandle()
        handle.out[0] = lib.mlx_array_new_data(ffi.from_buffer(data), shape, len(shape), code)
        if handle.value.ctx == ffi.NULL:
            raise_last("copy into MLX memory")
        return cls(handle, shape, code)

    @classmethod
    def wrap(cls, data: np.ndarray, code: int) -> "MlxBuffer | None":
        """An MLX array over a C-contiguous, aligned numpy array's memory, no copy.

        Only for the direct collectives, during one call. None where this MLX
        build cannot view foreign memory (the caller copies instead).
        """
        global _can_wrap
        if not _can_wrap:
            return None
        shape = data.shape
        if shape and max(shape) > INT32_MAX:
            raise ShapeError(f"a dimension of shape {shape} exceeds MLX's 32-bit limit")
        handle = ArrayHandle()
        if lib.mlxdist_array_wrap(handle.out, ffi.from_buffer(data), shape, len(shape), code):
            _can_wrap = False
            return None
        return cls(handle, shape, code, owner=data)

    def numpy(self) -> np.ndarray:
        """A numpy view of the buffer (bfloat16 shows as its uint16 bits)."""
        return np.asarray(self)


# Whether this MLX build lets the direct path view foreign memory (see
# mlxdist_array_wrap); cleared by the first refusal.
_can_wrap = True


def registered_buffer(a: np.ndarray) -> MlxBuffer | None:
    """The buffer behind ``a`` when ``a`` is a whole registered buffer."""
    base = a.base
    if type(base) is MlxBuffer:
        # A direct view of the buffer spans all of it; only an in-place
        # change of shape or dtype could make it disagree.
        if a.shape == base.shape and a.dtype == base.storage and a.flags.c_contiguous:
            return base if base.owner is None else None
        return None
    while isinstance(base, np.ndarray):
        base = base.base
    if (
        type(base) is MlxBuffer
        and base.owner is None
        and a.shape == base.shape
        and a.dtype == base.storage
        and a.flags.c_contiguous
        and a.__array_interface__["data"][0] == base.ptr
    ):
        return base
    return None


def _copy_in(data: np.ndarray, code: int, wrap: bool = False) -> MlxBuffer:
    """``data`` as an MLX buffer: viewed in place when ``wrap`` allows, else copied."""
    flags = data.flags
    if wrap and flags.c_contiguous and flags.aligned:
        buf = MlxBuffer.wrap(data, code)
        if buf is not None:
            return buf
    if not flags.c_contiguous:
        data = data.copy(order="C")  # (np.ascontiguousarray would make a scalar 1-d)
    return MlxBuffer.copy_of(data, code)


def operand(x: Any) -> MlxBuffer:
    """The MLX buffer an eager collective reads for the numpy array ``x``.

    A registered buffer is used as is; other C-contiguous, aligned memory is
    viewed in place where this MLX build allows; anything else is copied once.

    Raises:
        DtypeError: the dtype or byte order cannot be communicated.
    """
    buf = registered_buffer(x)
    if buf is not None:
        return buf
    return _copy_in(x, code_of_numpy(x.dtype), wrap=True)


def empty(shape: Sequence[int] | int, dtype: DTypeLike = np.float32) -> np.ndarray:
    """A registered buffer: a numpy array viewing uninitialised MLX memory.

    Collectives read a registered buffer without copying it and can write
    into it (``out=`` or in place). The array keeps the MLX memory alive.

    Args:
        shape: The array's shape.
        dtype: A numpy dtype (bfloat16 is not representable in numpy).

    Returns:
        A writable, C-contiguous numpy array.

    Raises:
        ShapeError: invalid shape.
        DtypeError: dtype MLX cannot move.
        AllocationError: MLX cannot allocate it (a MemoryError).
    """
    code, is_mlx = parse_dtype(dtype)
    if is_mlx:
        raise DtypeError("registered buffers are numpy arrays: pass a numpy dtype")
    return MlxBuffer.allocate(checked_shape(shape), code).numpy()


def zeros(shape: Sequence[int] | int, dtype: DTypeLike = np.float32) -> np.ndarray:
    """Like :func:`empty`, filled with zeros.

    Args:
        shape: The array's shape.
        dtype: A numpy dtype.

    Returns:
        A registered buffer of zeros.

    Raises:
        ShapeError: invalid shape.
        DtypeError: dtype MLX cannot move.
        AllocationError: MLX cannot allocate it (a MemoryError).
    """
    out = empty(shape, dtype)
    out.fill(0)
    return out


def asarray(x: Any) -> np.ndarray:
    """``x`` as a registered buffer: returned as is if it already is one, else copied.

    Args:
        x: A numpy array, an mlx array (not bfloat16) or anything numpy accepts.

    Returns:
        A registered buffer with ``x``'s values, shape and dtype.

    Raises:
        DtypeError: dtype MLX cannot move.
    """
    if isinstance(x, np.ndarray) and registered_buffer(x) is not None:
        return x
    if isinstance(x, mx.array):
        if x.dtype == mx.bfloat16:
            raise DtypeError("numpy has no bfloat16: keep bfloat16 data in mlx arrays")
        x = np.asarray(x)
    x = np.asarray(x)
    if x.dtype == object:
        raise DtypeError(f"cannot make a registered buffer of {type(x).__name__} values")
    return _copy_in(x, code_of_numpy(x.dtype)).numpy()


def is_registered(x: Any) -> bool:
    """Whether ``x`` is a whole registered buffer (collectives read it with no copy).

    Args:
        x: Any object.

    Returns:
        True for arrays made by :func:`empty`, :func:`zeros`, :func:`asarray`
        or returned by a collective, viewed whole.
    """
    return isinstance(x, np.ndarray) and registered_buffer(x) is not None


def set_cache_limit(limit: int) -> int:
    """Set how many bytes of released result buffers mlxdist keeps for reuse.

    Args:
        limit: The byte limit (default 512 MiB); 0 frees them all and keeps none.

    Returns:
        The previous limit.

    Raises:
        ArgumentTypeError: not an integer (bools included; a TypeError).
        InvalidArgumentError: a negative limit (a ValueError).
    """
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral):
        raise ArgumentTypeError(f"cache limit must be an integer number of bytes, got {limit!r}")
    if limit < 0:
        raise InvalidArgumentError(f"cache limit must be >= 0, got {limit}")
    previous, pool.limit = pool.limit, int(limit)
    if pool.held > pool.limit:
        pool.clear()
    if reusable.held > pool.limit:
        reusable.clear()
    return previous
