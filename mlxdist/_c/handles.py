"""Owning Python objects for cmlx's C handles.

Each C handle (a struct holding ``ctx``) has exactly one owner here. The owner
frees it when garbage-collected (``ffi.gc``) or earlier through an idempotent
``close()``; nothing else ever frees a handle.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from mlxdist._c import ffi, lib
from mlxdist._c.failures import raise_last

__all__ = ["Handle", "ArrayHandle", "GroupHandle", "thread_stream"]


class Handle:
    """Owns one C handle of type ``_ctype`` and frees it exactly once."""

    _ctype = ""
    # A C function taking the handle's address: called by the finalizer with
    # no Python frame in between.
    _release: Callable[[Any], None]
    # cffi's type of a pointer to the handle, looked up once per class (eager
    # calls make handles for their operands).
    _pointer_type: Any = None
    __slots__ = ("_ptr", "__weakref__")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._pointer_type = ffi.typeof(cls._ctype + "*")

    def __init__(self) -> None:
        self._ptr = ffi.gc(ffi.new(self._pointer_type), self._release)

    @property
    def out(self) -> Any:
        """Pointer to the handle, for C functions that fill a result in."""
        return self._ptr

    @property
    def value(self) -> Any:
        """The handle itself, for C functions that take it by value."""
        return self._ptr[0]

    @property
    def current(self) -> Any:
        """The pointer to the handle, or None once closed."""
        return self._ptr

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def close(self) -> None:
        """Free the C object now; later calls do nothing."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            ffi.release(ptr)


class ArrayHandle(Handle):
    """Owns an ``mlx_array``."""

    _ctype = "mlx_array"
    _release = lib.mlxdist_array_release
    __slots__ = ()


class GroupHandle(Handle):
    """Owns an ``mlx_distributed_group``."""

    _ctype = "mlx_distributed_group"
    _release = lib.mlxdist_group_release
    __slots__ = ()


class _StreamHandle(Handle):
    _ctype = "mlx_stream"
    _release = lib.mlxdist_stream_release
    __slots__ = ()


_local = threading.local()


def thread_stream() -> Any:
    """The calling thread's default CPU stream, created on first use.

    MLX's CPU command encoders are per thread: a stream fetched on one thread
    fails when used from another, so each thread keeps its own.
    """
    try:
        return _local.value
    except AttributeError:
        pass
    handle = _StreamHandle()
    handle.out[0] = lib.mlx_default_cpu_stream_new()
    if handle.value.ctx == ffi.NULL:
        raise_last("default CPU stream")
    _local.handle = handle
    _local.value = handle.value
    return _local.value
