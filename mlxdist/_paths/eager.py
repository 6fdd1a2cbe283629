"""The eager path: numpy arrays and registered buffers, straight to the backend.

Each call validates, finds (or views, or copies) the MLX memory to read and
write, and makes one blocking backend call through :func:`mlxdist._c.gate.call`;
when it returns, the result is complete.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mlxdist._c import gate, lib
from mlxdist._c.gate import raise_last
from mlxdist._c.handles import GroupHandle
from mlxdist._paths import fallbacks
from mlxdist._paths.foreign import host_array, host_out
from mlxdist.buffers import MIN_BYTES, MlxBuffer, operand, registered_buffer, reusable
from mlxdist.dtypes import code_of_numpy, numpy_code, parse_dtype, storage_dtype
from mlxdist.errors import ArgumentTypeError, DtypeError, InvalidArgumentError, ShapeError, UnsupportedOperationError
from mlxdist.rules import SAME_SHAPE, result_shape
from mlxdist.group_record import GroupRecord

__all__ = ["as_numpy", "as_out", "check_out", "collective", "split", "send", "recv", "recv_like"]

_OPS = {
    "all_sum": lib.MLXDIST_ALL_SUM,
    "all_max": lib.MLXDIST_ALL_MAX,
    "all_min": lib.MLXDIST_ALL_MIN,
    "all_gather": lib.MLXDIST_ALL_GATHER,
    "sum_scatter": lib.MLXDIST_SUM_SCATTER,
}


_BOOL = lib.MLX_BOOL

NUMPY_ARRAYS = fallbacks.ArrayKind(
    is_bool=lambda a: a.dtype == np.bool_,
    to_bytes=lambda a: a.view(np.uint8),
    to_bool=lambda a: a.view(np.bool_),
)


def as_numpy(x: Any) -> np.ndarray:
    """``x`` as a numpy array: arrays as they are, numpy scalars as 0-d arrays,
    buffers and CPU DLPack tensors viewed without a copy (:mod:`mlxdist._paths.foreign`).

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
        ArgumentTypeError, InvalidArgumentError: see :func:`mlxdist._paths.foreign.host_out`.
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


def _hot(group: GroupRecord, op: str, x: np.ndarray, out: np.ndarray) -> bool:
    """A reduction from one whole registered buffer into another (or itself).

    Every microsecond here shows up about threefold in small collectives: the
    ranks wait on each other's Python. The dtypes are compared by identity
    (numpy's builtin dtypes are singletons); anything unusual takes the
    general path, which checks it fully.
    """
    xb, ob = x.base, out.base
    if type(xb) is not MlxBuffer or type(ob) is not MlxBuffer or xb.owner is not None or ob.owner is not None:
        return False
    shape, storage = xb.shape, xb.storage
    if (
        x.shape == shape
        and out.shape == shape
        and ob.shape == shape
        and x.dtype is storage
        and out.dtype is storage
        and ob.storage is storage
        and group.size > 1
        and (xb.code != _BOOL or group.caps.bool_reductions)
        and (ob is xb or ob.ptr >= xb.ptr + xb.nbytes or xb.ptr >= ob.ptr + ob.nbytes)
        and out.flags.writeable
    ):
        gate.call(group, op, lib.mlxdist_collective, ob.value, xb.value, _OPS[op])
        return True
    return False


# Up to this size a plain numpy input is copied into a reused registered
# array (a memcpy) rather than viewed in place (a C handle made and freed per
# call, which costs more below this size).
STAGE_BYTES = 64 << 10


def _staged(x: np.ndarray, code: int) -> tuple[MlxBuffer, np.ndarray | None]:
    """The buffer the backend reads for ``x``, and the reused array holding a
    copy of it (kept referenced for the call), if one was used."""
    buffer = registered_buffer(x)
    if buffer is not None:
        return buffer, None
    if x.nbytes > STAGE_BYTES:
        return operand(x), None
    staged = reusable.take(x.shape, code)
    np.copyto(staged, x)
    return staged.base, staged


def _pooled(group: GroupRecord, op: str, x: np.ndarray) -> np.ndarray | None:
    """A reduction of a plain numpy array into a reused registered result, or
    None where the general path must run (size 1, composed, large, unusual dtype)."""
    code = numpy_code(x.dtype)
    if (
        code is None
        or group.size == 1
        or x.nbytes >= MIN_BYTES
        or (code == _BOOL and not group.caps.bool_reductions)
    ):
        return None
    src, staged = _staged(x, code)
    result = reusable.take(x.shape, code)
    gate.call(group, op, lib.mlxdist_collective, result.base.value, src.value, _OPS[op])
    del staged
    return result


def collective(group: GroupRecord, op: str, x: Any, out: np.ndarray | None) -> np.ndarray:
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
    elif out is None and type(x) is np.ndarray and op in SAME_SHAPE:
        result = _pooled(group, op, x)
        if result is not None:
            return result
    x = as_numpy(x)
    out = as_out(out)
    code = code_of_numpy(x.dtype)
    shape = result_shape(op, x.shape, group.size)
    if out is not None:
        check_out(out, shape, code)
    if group.size == 1:
        group.live_handle()
        if out is None:
            return x
        np.copyto(out, x)
        return out
    if fallbacks.needed(group, op, x, NUMPY_ARRAYS):
        result = fallbacks.compose(group, op, x, NUMPY_ARRAYS, lambda o, a: collective(group, o, a, None))
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


def split(group: GroupRecord, color: int, key: int) -> GroupHandle:
    """The handle of this rank's subgroup of ``group`` (color and key checked by the caller).

    Raises:
        UnsupportedOperationError: the backend cannot split.
        GroupClosedError: the group is closed.
        DistributedError: the kind the C layer reported.
    """
    group.live_handle()
    if "split" not in group.caps.native:
        name = group.backend.value if group.backend else "the single-process group"
        raise UnsupportedOperationError(f"split: {name} cannot split groups")
    handle = GroupHandle()
    with group.lock:
        rc = lib.mlx_distributed_group_split(handle.out, group.live_handle(), int(color), int(key))
    if rc:
        raise_last("split")
    return handle


def send(group: GroupRecord, x: Any, dst: int) -> None:
    """Send a numpy array to ``dst`` (validated by the caller); returns when sent."""
    x = as_numpy(x)
    code = numpy_code(x.dtype)
    if code is None:
        code_of_numpy(x.dtype)  # raises the DtypeError
    src, staged = _staged(x, code)
    gate.call(group, "send", lib.mlxdist_send, src.value, dst)
    del staged


def recv_like(group: GroupRecord, x: Any, src: int, out: Any) -> np.ndarray:
    """Receive an array like ``x`` from ``src`` (validated by the caller) into
    ``out`` or a reused registered array; returns when received.

    Raises:
        ArgumentTypeError, DtypeError, ShapeError, InvalidArgumentError: ``x`` or ``out``.
        GroupClosedError, CommunicationError.
    """
    if type(out) is np.ndarray and type(x) is np.ndarray:
        ob = out.base
        if (
            type(ob) is MlxBuffer
            and ob.owner is None
            and out.shape == ob.shape == x.shape
            and out.dtype == ob.storage == x.dtype
            and out.flags.writeable
        ):
            gate.call(group, "recv", lib.mlxdist_recv, ob.value, src)
            return out
    x = as_numpy(x)
    return recv(group, x.shape, parse_dtype(x.dtype)[0], src, out)


def recv(group: GroupRecord, shape: tuple[int, ...], code: int, src: int, out: np.ndarray | None) -> np.ndarray:
    """Receive into ``out`` (or a new buffer) from ``src``; returns when received."""
    dest = None
    out = as_out(out)
    if out is not None:
        check_out(out, shape, code)
        dest = _writable(out, code)
    elif storage_dtype(code).itemsize * math.prod(shape) < MIN_BYTES:
        array = reusable.take(shape, code)
        gate.call(group, "recv", lib.mlxdist_recv, array.base.value, src)
        return array
    result = dest or MlxBuffer.allocate(shape, code)
    gate.call(group, "recv", lib.mlxdist_recv, result.value, src)
    if out is None:
        return result.numpy()
    if result is not dest:
        np.copyto(out, result.numpy())
    return out
