"""What the agreement check compares of an eager call: its operand's dtype code, shape and peer."""

from __future__ import annotations

from typing import Any

from mlxdist._c import ffi, lib

__all__ = ["signature_of"]

_ARRAY_TYPE = ffi.typeof("mlx_array")


def signature_of(op: str, args: tuple[Any, ...]) -> tuple[int, tuple[int, ...], int | None]:
    """``(dtype code, shape, peer)`` of an eager gate call, from its C arguments.

    The operand is the last ``mlx_array`` argument (the input of a collective
    or send, the output buffer of a recv); the peer is the integer after it for
    send/recv. A graph recv passes ``(result, dims, dtype code, src)``.

    Args:
        op: The operation's name.
        args: Its C arguments (before the group and stream).

    Returns:
        The ``mlx_dtype`` code (-1 if none), the shape and the peer (None for collectives).
    """
    arrays = [a for a in args if isinstance(a, ffi.CData) and ffi.typeof(a) is _ARRAY_TYPE]
    ints = [a for a in args if isinstance(a, int)]
    peer = ints[-1] if op in ("send", "recv") and ints else None
    if arrays:
        arr = arrays[-1]
        ndim = lib.mlx_array_ndim(arr)
        dims = lib.mlx_array_shape(arr)
        return lib.mlx_array_dtype(arr), tuple(dims[i] for i in range(ndim)), peer
    dims_list = next((a for a in args if isinstance(a, list)), [])
    return (ints[0] if ints else -1), tuple(dims_list), peer
