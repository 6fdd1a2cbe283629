"""The eager path: numpy arrays and registered buffers, straight to the backend.

Each call validates, finds (or views, or copies) the MLX memory to read and
write, and makes one blocking backend call through :func:`mlxdist._c.gate.call`;
when it returns, the result is complete.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlxdist._c import gate, lib
from mlxdist._paths import fillins
from mlxdist._paths.host import host_array, host_out
from mlxdist.buffers import MlxBuffer, operand, registered_buffer
from mlxdist.dtypes import code_of_numpy, storage_dtype
from mlxdist.errors import ArgumentTypeError, DtypeError, InvalidArgumentError, ShapeError
from mlxdist.rules import SAME_SHAPE, result_shape

__all__ = ["as_numpy", "as_out", "check_out", "collective", "send", "recv"]

_OPS = {
    "all_sum": lib.MLXDIST_ALL_SUM,
    "all_max": lib.MLXDIST_ALL_MAX,
    "all_min": lib.MLXDIST_ALL_MIN,
    "all_gather": lib.MLXDIST_ALL_GATHER,
    "sum_scatter": lib.MLXDIST_SUM_SCATTER,
}


NUMPY_ARRAYS = fillins.ArrayKind(
    is_bool=lambda a: a.dtype == np.bool_,
    to_bytes=lambda a: a.view(np.uint8),
    to_bool=lambda a: a.view(np.bool_),
)


def as_numpy(x: Any) -> np.ndarray:
    """``x`` as a numpy array: arrays as they are, numpy scalars as 0-d arrays,
    buffers and CPU DLPack tensors viewed without a copy (:mod:`mlxdist._paths.host`).

    Raises:
        ArgumentTypeError: anything else (a list, a Python number, None):
            pass an array, which names the dtype.
        InvalidArgumentError: a DLPack tensor on another device than the CPU.
    """
    if type(x) is np.ndarray:
        return x
    return host_array(x)


def as_out(out: Any) -> np.ndarray | None:
    """``out=`` as a numpy array sharing its memory (None stays None).

    Raises:
        ArgumentTypeError, InvalidArgumentError: see :func:`mlxdist._paths.host.host_out`.
    """
    if out is None or type(out) is np.ndarray:
        return out
    return host_out(out)


def _overlap(a: MlxBuffer, b: MlxBuffer) -> bool:
    return a.ptr < b.ptr + b.nbytes and b.ptr < a.ptr + a.nbytes


def check_out(out: Any, shape: tuple[int, ...], code: int) -> None:
    """Refuse an ``out`` the result does not fit."""
    if type(out) is not np.ndarray:
        raise ArgumentTypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != shape:
        raise ShapeError(f"out has shape {out.shape}, the result has shape {shape}")
    if out.dtype != storage_dtype(code):
        raise DtypeError(f"out has dtype {out.dtype}, the result has dtype {storage_dtype(code)}")
    if not out.flags.writeable:
        raise InvalidArgumentError("out is read-only")


def _writable(out: np.ndarray, code: int) -> MlxBuffer | None:
    """The buffer the backend can write straight into for a checked ``out``, if any."""
    buffer = registered_buffer(out)
    flags = out.flags
    if buffer is None and flags.c_contiguous and flags.aligned:
        buffer = MlxBuffer.wrap(out, code)
    return buffer


def _hot(group: Any, op: str, x: np.ndarray, out: np.ndarray) -> bool:
    """A reduction from one whole registered buffer into another (or itself).

    Every microsecond here shows up about threefold in small collectives: the
    ranks wait on each other's Python.
    """
    xb, ob = x.base, out.base
    if (
        type(xb) is MlxBuffer
        and type(ob) is MlxBuffer
        and xb.owner is None
        and ob.owner is None
        and x.shape == xb.shape == ob.shape == out.shape
        and x.dtype == xb.storage == ob.storage == out.dtype
        and group._size > 1
        and (xb.code != lib.MLX_BOOL or group._caps.bool_reductions)
        and (ob is xb or not _overlap(ob, xb))
        and out.flags.writeable
    ):
        gate.call(group, op, lib.mlxdist_collective, ob.value, xb.value, _OPS[op])
        return True
    return False


def collective(group: Any, op: str, x: Any, out: np.ndarray | None) -> np.ndarray:
    """An eager collective of a numpy array.

    Args:
        group: The group (its handle, world, rank, size and capabilities).
        op: all_sum, all_max, all_min, all_gather or sum_scatter.
        x: A numpy array or scalar.
        out: Optional numpy array for the result.

    Returns:
        The result (``out`` when given), a numpy view of MLX memory otherwise.

    Raises:
        DtypeError, ShapeError, InvalidArgumentError, GroupClosedError,
        CommunicationError.
    """
    if out is not None and type(x) is np.ndarray and op in SAME_SHAPE and type(out) is np.ndarray:
        if _hot(group, op, x, out):
            return out
    x = as_numpy(x)
    out = as_out(out)
    code = code_of_numpy(x.dtype)
    shape = result_shape(op, x.shape, group._size)
    if out is not None:
        check_out(out, shape, code)
    if group._size == 1:
        group._live_handle()
        if out is None:
            return x
        np.copyto(out, x)
        return out
    if fillins.needed(group, op, x, NUMPY_ARRAYS):
        result = fillins.compose(group, op, x, NUMPY_ARRAYS, lambda o, a: collective(group, o, a, None))
        if out is None:
            return result
        np.copyto(out, result)
        return out
    src = operand(x)
    dest = None if out is None else _writable(out, code)
    if dest is not None and _overlap(dest, src) and (dest.ptr != src.ptr or op not in SAME_SHAPE):
        # Writing over the input as it is read (the in-place all_gather idiom,
        # x a slice of out): read a copy instead, as MPI_IN_PLACE semantics ask.
        src = MlxBuffer.copy_of(np.array(x, order="C"), code)
    result = dest or MlxBuffer.allocate(shape, code)
    gate.call(group, op, lib.mlxdist_collective, result.value, src.value, _OPS[op])
    if out is None:
        return result.numpy()
    if result is not dest:
        np.copyto(out, result.numpy())
    return out


def send(group: Any, x: Any, dst: int) -> None:
    """Send a numpy array to ``dst`` (validated by the caller); returns when sent."""
    src = operand(as_numpy(x))
    gate.call(group, "send", lib.mlxdist_send, src.value, dst)


def recv(group: Any, shape: tuple[int, ...], code: int, src: int, out: np.ndarray | None) -> np.ndarray:
    """Receive into ``out`` (or a new buffer) from ``src``; returns when received."""
    dest = None
    out = as_out(out)
    if out is not None:
        check_out(out, shape, code)
        dest = _writable(out, code)
    result = dest or MlxBuffer.allocate(shape, code)
    gate.call(group, "recv", lib.mlxdist_recv, result.value, src)
    if out is None:
        return result.numpy()
    if result is not dest:
        np.copyto(out, result.numpy())
    return out
