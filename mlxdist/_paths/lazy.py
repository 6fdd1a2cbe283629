"""The lazy path: mx.arrays into MLX's graph through mlx-c, lazy mx.arrays out.

Each operation is one call into the bridge (``mlxdist._bridge``), which hands
the mx.array to the cffi extension's ``mlx_distributed_*`` function as an
``mlx_array`` (no evaluation, no copy) and returns the node that function
builds. MLX's own primitives carry the VJP/JVP/vmap rules, so results are
differentiable, compile and evaluate like mx.distributed's. Argument errors
raise here, when the operation is built; failures of the communication itself
surface when the result is evaluated, as MLX's RuntimeError.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from mlxdist._c import bridge, ffi, lib
from mlxdist._c.gate import raise_last
from mlxdist._paths import fallbacks
from mlxdist.dtypes import code_of_mlx, mlx_dtype
from mlxdist.errors import ArgumentTypeError, CommunicationError, InvalidArgumentError
from mlxdist.rules import SAME_SHAPE, result_shape
from mlxdist.group_record import GroupRecord

__all__ = ["FUNCTIONS", "check_stream", "collective", "send", "recv", "recv_like"]


MLX_ARRAYS = fallbacks.ArrayKind(
    is_bool=lambda a: a.dtype == mx.bool_,
    to_bytes=lambda a: a.astype(mx.uint8),
    to_bool=lambda a: a.astype(mx.bool_),
)


def _address(name: str) -> int:
    return int(ffi.cast("uintptr_t", ffi.addressof(lib, name)))


# The addresses of mlx-c's functions, which the bridge calls.
FUNCTIONS: dict[str, int] = {
    op: _address(f"mlx_distributed_{op}")
    for op in ("all_sum", "all_max", "all_min", "all_gather", "sum_scatter", "send", "recv", "recv_like")
}


def check_stream(stream: Any) -> None:
    """Refuse a ``stream=`` that is neither None, a Stream nor a Device, or
    names a device this MLX build lacks.

    Raises:
        ArgumentTypeError: not a Stream or Device (a TypeError, as MLX raises for it).
        InvalidArgumentError: a device this build has no backend for (a
            ValueError: MLX's own ValueError, typed).
    """
    if stream is None:
        return
    if not isinstance(stream, (mx.Stream, mx.Device, mx.DeviceType)):
        raise ArgumentTypeError(
            f"stream must be an mlx.core.Stream, an mlx.core.Device or None, got {type(stream).__name__}"
        )
    device = stream.device if isinstance(stream, mx.Stream) else stream
    if not mx.is_available(device if isinstance(device, mx.Device) else mx.Device(device)):
        raise InvalidArgumentError(f"stream={stream}: this MLX build has no backend for that device")


def _checked_group(group: GroupRecord) -> int:
    if group.closed:
        group.live_handle()
    lost = group.world.lost
    if lost is not None:
        raise CommunicationError(f"this group's world already failed ({lost}); start the job again")
    return group.address


def _agree(group: GroupRecord, op: str, dtype: Any, shape: Any, peer: int | None = None) -> None:
    if group.world.checked:
        # The group's own world's watchdog (set once the check is on).
        group.world.watchdog.check_build(op, group, code_of_mlx(dtype), shape, peer)


def _built(what: str, result: mx.array | None) -> mx.array:
    if result is None:
        raise_last(what)
    return result


def _native(group: GroupRecord, op: str, x: mx.array, stream: Any) -> mx.array:
    return _built(op, bridge.collective(FUNCTIONS[op], x, _checked_group(group), stream, True))


def collective(group: GroupRecord, op: str, x: mx.array, stream: Any) -> mx.array:
    """A lazy collective of an mx.array.

    Args:
        group: The group.
        op: all_sum, all_max, all_min, all_gather or sum_scatter.
        x: The input.
        stream: None (the backend's communication stream), a Stream or a Device.

    Returns:
        The lazy result.

    Raises:
        ShapeError, ArgumentTypeError and InvalidArgumentError (``stream=``),
        DtypeError, GroupClosedError, CommunicationError (a world that already
        failed), or the kind the C layer reported.
    """
    if stream is not None:
        check_stream(stream)
    if op not in SAME_SHAPE:
        result_shape(op, tuple(x.shape), group.size)
    _agree(group, op, x.dtype, x.shape)
    if fallbacks.needed(group, op, x, MLX_ARRAYS):
        return fallbacks.compose(group, op, x, MLX_ARRAYS, lambda o, a: _native(group, o, a, stream))
    return _native(group, op, x, stream)


def send(group: GroupRecord, x: mx.array, dst: int, stream: Any) -> mx.array:
    """A lazy send of ``x`` to ``dst`` (validated by the caller); evaluating the
    returned array (or anything depending on it) sends."""
    check_stream(stream)
    _agree(group, "send", x.dtype, x.shape, dst)
    return _built("send", bridge.peer(FUNCTIONS["send"], x, dst, _checked_group(group), stream))


def recv(group: GroupRecord, shape: tuple[int, ...], code: int, src: int, stream: Any) -> mx.array:
    """A lazy receive of ``shape`` and ``code`` from ``src`` (validated by the caller)."""
    check_stream(stream)
    _agree(group, "recv", mlx_dtype(code), shape, src)
    return _built("recv", bridge.recv(FUNCTIONS["recv"], list(shape), code, src, _checked_group(group), stream))


def recv_like(group: GroupRecord, x: mx.array, src: int, stream: Any) -> mx.array:
    """A lazy receive of an array like ``x`` from ``src`` (validated by the caller)."""
    check_stream(stream)
    _agree(group, "recv", x.dtype, x.shape, src)
    return _built("recv_like", bridge.peer(FUNCTIONS["recv_like"], x, src, _checked_group(group), stream))
