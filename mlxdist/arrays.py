"""Bridging numpy and mlx arrays to cmlx's ``mlx_array`` handles.

MLX's own constructors cannot adopt memory MLX did not allocate on its CPU
build (they copy). Registered buffers (:func:`empty`, :func:`zeros`,
:func:`asarray`) are numpy arrays viewing MLX-allocated memory, as
``MPI_Alloc_mem`` or ``ncclMemAlloc`` give: a collective reads them with no
copy in and can write into them. The direct collectives also view any other
C-contiguous, aligned numpy memory in place (``mlxdist_array_wrap``), since
they hand it only to the backend for the length of the call; the graph path,
and memory that cannot be viewed, cost one copy in. Results are MLX buffers
that numpy views without a copy.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Sequence, Union

import mlx.core as mx
import numpy as np

from mlxdist._ffi import ffi, lib
from mlxdist._handles import ArrayHandle
from mlxdist._pool import MIN_BYTES, pool
from mlxdist.errors import DtypeError, ShapeError, TransformError, check

__all__ = [
    "ArrayLike",
    "DTypeLike",
    "MlxBuffer",
    "empty",
    "zeros",
    "asarray",
    "is_registered",
]

ArrayLike = Union[np.ndarray, mx.array]
DTypeLike = Union[np.dtype, type, str, mx.Dtype]

_INT32_MAX = 2**31 - 1

_NUMPY_DTYPES: dict[np.dtype, int] = {
    np.dtype(np.bool_): lib.MLX_BOOL,
    np.dtype(np.uint8): lib.MLX_UINT8,
    np.dtype(np.uint16): lib.MLX_UINT16,
    np.dtype(np.uint32): lib.MLX_UINT32,
    np.dtype(np.uint64): lib.MLX_UINT64,
    np.dtype(np.int8): lib.MLX_INT8,
    np.dtype(np.int16): lib.MLX_INT16,
    np.dtype(np.int32): lib.MLX_INT32,
    np.dtype(np.int64): lib.MLX_INT64,
    np.dtype(np.float16): lib.MLX_FLOAT16,
    np.dtype(np.float32): lib.MLX_FLOAT32,
    np.dtype(np.float64): lib.MLX_FLOAT64,
    np.dtype(np.complex64): lib.MLX_COMPLEX64,
}
_MLX_DTYPES: dict[mx.Dtype, int] = {
    mx.bool_: lib.MLX_BOOL,
    mx.uint8: lib.MLX_UINT8,
    mx.uint16: lib.MLX_UINT16,
    mx.uint32: lib.MLX_UINT32,
    mx.uint64: lib.MLX_UINT64,
    mx.int8: lib.MLX_INT8,
    mx.int16: lib.MLX_INT16,
    mx.int32: lib.MLX_INT32,
    mx.int64: lib.MLX_INT64,
    mx.float16: lib.MLX_FLOAT16,
    mx.float32: lib.MLX_FLOAT32,
    mx.float64: lib.MLX_FLOAT64,
    mx.bfloat16: lib.MLX_BFLOAT16,
    mx.complex64: lib.MLX_COMPLEX64,
}
# numpy has no bfloat16: its bits travel in uint16 storage.
_STORAGE: dict[int, np.dtype] = {c: d for d, c in _NUMPY_DTYPES.items()}
_STORAGE[lib.MLX_BFLOAT16] = np.dtype(np.uint16)
_MLX_OF: dict[int, mx.Dtype] = {c: d for d, c in _MLX_DTYPES.items()}


def _numpy_code(dtype: np.dtype) -> int:
    if not dtype.isnative:
        raise DtypeError(
            f"array has non-native byte order ({dtype.str}); convert it with "
            "a.astype(a.dtype.newbyteorder('='))"
        )
    code = _NUMPY_DTYPES.get(dtype)
    if code is None:
        raise DtypeError(
            f"dtype {dtype} cannot be communicated; supported: "
            + ", ".join(sorted(str(d) for d in _NUMPY_DTYPES))
            + " (bfloat16 through mlx arrays)"
        )
    return code


def dtype_code(dtype: DTypeLike) -> tuple[int, bool]:
    """The ``mlx_dtype`` of a numpy or mlx dtype, and whether it was an mlx one.

    Raises:
        DtypeError: the dtype is not one MLX moves.
    """
    if isinstance(dtype, mx.Dtype):
        return _MLX_DTYPES[dtype], True
    try:
        np_dtype = np.dtype(dtype)
    except TypeError as exc:
        raise DtypeError(f"not a dtype: {dtype!r}") from exc
    return _numpy_code(np_dtype), False


def checked_shape(shape: Sequence[int] | int) -> tuple[int, ...]:
    """Validate a shape given by the user.

    Raises:
        ShapeError: a dimension is negative, not an integer or too large.
    """
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    try:
        dims = tuple(int(d) for d in shape)
        if any(d != s for d, s in zip(dims, shape)):
            raise ValueError
    except (TypeError, ValueError) as exc:
        raise ShapeError(f"shape must be a sequence of integers, got {shape!r}") from exc
    for d in dims:
        if d < 0 or d > _INT32_MAX:
            raise ShapeError(f"invalid dimension {d} in shape {dims}")
    return dims


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
        "__array_interface__",
        "__weakref__",
    )

    def __init__(
        self, handle: ArrayHandle, shape: tuple[int, ...], code: int, owner: Any = None
    ) -> None:
        self.handle = handle
        # For a wrapped buffer, the object owning the memory, kept alive here.
        self.owner = owner
        # The handle struct, for C calls; the handle keeps its object alive.
        self.value = handle.value
        self.shape = shape
        self.code = code
        self.storage = storage = _STORAGE[code]
        self.nbytes = storage.itemsize * math.prod(shape)
        self.ptr = int(ffi.cast("uintptr_t", lib.mlxdist_array_data(self.value)))
        # numpy needs a non-null address even for an empty array.
        self.__array_interface__ = {
            "version": 3,
            "shape": shape,
            "typestr": storage.str,
            "data": (self.ptr or 1, False),
        }

    @classmethod
    def allocate(cls, shape: tuple[int, ...], code: int) -> "MlxBuffer":
        """Uninitialised MLX memory of the given shape and ``mlx_dtype``.

        Large buffers come from, and return to, the pool of released ones.
        """
        large = _STORAGE[code].itemsize * math.prod(shape) >= MIN_BYTES
        key = (shape, code)
        handle = pool.take(key) if large else None
        if handle is None:
            handle = ArrayHandle()
            if lib.mlxdist_array_alloc(handle.out, shape, len(shape), code):
                check(1, "allocate")
        buf = cls(handle, shape, code)
        if large:
            weakref.finalize(buf, pool.give, key, handle, buf.nbytes)
        return buf

    @classmethod
    def copy_of(cls, data: np.ndarray, code: int) -> "MlxBuffer":
        """MLX memory holding a copy of a C-contiguous numpy array's bytes."""
        shape = data.shape
        if shape and max(shape) > _INT32_MAX:
            raise ShapeError(f"a dimension of shape {shape} exceeds MLX's 32-bit limit")
        if data.nbytes >= MIN_BYTES:
            buf = cls.allocate(shape, code)
            ffi.memmove(ffi.cast("void*", buf.ptr), ffi.from_buffer(data), buf.nbytes)
            return buf
        handle = ArrayHandle()
        handle.out[0] = lib.mlx_array_new_data(ffi.from_buffer(data), shape, len(shape), code)
        if handle.value.ctx == ffi.NULL:
            check(1, "copy into MLX memory")
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
        if shape and max(shape) > _INT32_MAX:
            raise ShapeError(f"a dimension of shape {shape} exceeds MLX's 32-bit limit")
        handle = ArrayHandle()
        if lib.mlxdist_array_wrap(handle.out, ffi.from_buffer(data), shape, len(shape), code):
            _can_wrap = False
            return None
        return cls(handle, shape, code, owner=data)

    @classmethod
    def adopt(cls, handle: ArrayHandle) -> "MlxBuffer":
        """Wrap an evaluated, row-contiguous array (e.g. a graph result)."""
        value = handle.value
        ndim = lib.mlx_array_ndim(value)
        shape = tuple(ffi.unpack(lib.mlx_array_shape(value), ndim)) if ndim else ()
        return cls(handle, shape, lib.mlx_array_dtype(value))

    def numpy(self) -> np.ndarray:
        """A numpy view of the buffer (bfloat16 shows as its uint16 bits)."""
        return np.asarray(self)

    def to(self, as_mlx: bool) -> ArrayLike:
        """The result in the caller's kind: a numpy view, or an mx.array (one copy)."""
        return to_kind(np.asarray(self), as_mlx, self.code)


def storage_dtype(code: int) -> np.dtype:
    """The numpy dtype holding an ``mlx_dtype``'s values (uint16 for bfloat16)."""
    return _STORAGE[code]


def code_of(view: np.ndarray) -> int:
    """The ``mlx_dtype`` of a numpy view: bfloat16 if it views a bfloat16 buffer."""
    base = view.base
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, MlxBuffer):
        return base.code
    return _numpy_code(view.dtype)


def to_kind(view: np.ndarray, as_mlx: bool, code: int) -> ArrayLike:
    """A numpy view as the caller's kind: itself, or an mx.array (one copy)."""
    if not as_mlx:
        return view
    if code == lib.MLX_BFLOAT16:
        return mx.array(view).view(mx.bfloat16)
    return mx.array(view)


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


def _mlx_numpy(x: mx.array) -> tuple[np.ndarray, int]:
    try:
        mx.eval(x)
    except ValueError as exc:
        if "transformations" in str(exc):
            raise TransformError(
                "mlxdist collectives are eager: they run when called and cannot be "
                "traced by mx.compile or mx.vmap. Call them outside the compiled or "
                "vectorised function."
            ) from exc
        raise
    code = _MLX_DTYPES[x.dtype]
    if code == lib.MLX_BFLOAT16:
        return np.asarray(x.view(mx.uint16)), code
    return np.asarray(x), code


def as_operand(x: Any, wrap: bool = False) -> tuple[MlxBuffer, bool]:
    """The MLX buffer a collective reads for ``x``, and whether ``x`` is an mlx array.

    A registered buffer is used as is. With ``wrap`` (the direct collectives,
    which never let the array reach MLX's graph) other memory is viewed in
    place where it is contiguous and aligned; anything else is copied once.

    Raises:
        TypeError: ``x`` is neither a numpy array (or scalar) nor an mlx array.
        DtypeError: the dtype or byte order cannot be communicated.
        TransformError: ``x`` is being traced by mx.compile or mx.vmap.
    """
    if type(x) is np.ndarray:
        buf = registered_buffer(x)
        if buf is not None:
            return buf, False
        code = _NUMPY_DTYPES.get(x.dtype)
        return _copy_in(x, _numpy_code(x.dtype) if code is None else code, wrap), False
    if isinstance(x, np.generic):
        x = np.asarray(x)
    if isinstance(x, np.ndarray):
        return as_operand(np.asarray(x), wrap)
    if isinstance(x, mx.array):
        data, code = _mlx_numpy(x)
        return _copy_in(data, code, wrap), True
    raise TypeError(f"expected a numpy.ndarray or mlx.core.array, got {type(x).__name__}")


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
    """
    code, is_mlx = dtype_code(dtype)
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
    return _copy_in(x, _numpy_code(x.dtype)).numpy()


def is_registered(x: Any) -> bool:
    """Whether ``x`` is a whole registered buffer (collectives read it with no copy).

    Args:
        x: Any object.

    Returns:
        True for arrays made by :func:`empty`, :func:`zeros`, :func:`asarray`
        or returned by a collective, viewed whole.
    """
    return isinstance(x, np.ndarray) and registered_buffer(x) is not None
