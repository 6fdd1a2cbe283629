"""What the eager path takes besides numpy arrays: buffer-protocol objects and
DLPack tensors, viewed as numpy arrays without a copy.

- Buffer-protocol objects (bytes, bytearray, memoryview, array.array, ...)
  are viewed through ``memoryview``: their format gives the dtype (bytes are
  uint8) and their shape the shape.
- Objects with ``__dlpack__`` (torch and JAX CPU tensors, numpy's own) are
  imported with ``numpy.from_dlpack``, which shares their memory. A tensor on
  another device (a GPU) cannot be read by the CPU backends: a typed error
  names the device.

The eager collectives then read these views in place like any numpy array.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from mlxdist.errors import ArgumentTypeError, DtypeError, InvalidArgumentError

__all__ = ["host_array", "host_out"]

# DLPack's DLDeviceType codes (dlpack.h), for naming a device in errors.
_DLPACK_DEVICES = {
    1: "cpu",
    2: "cuda",
    3: "cuda_host",
    4: "opencl",
    7: "vulkan",
    8: "metal",
    9: "vpi",
    10: "rocm",
    11: "rocm_host",
    13: "cuda_managed",
    14: "oneapi",
    15: "webgpu",
    16: "hexagon",
}
_DLPACK_CPU = 1


def _device_name(device: Any) -> str:
    try:
        kind, index = int(device[0]), int(device[1])
    except (TypeError, ValueError, IndexError):
        return repr(device)
    return f"{_DLPACK_DEVICES.get(kind, f'device type {kind}')}:{index}"


def _from_dlpack(x: Any) -> np.ndarray:
    device = x.__dlpack_device__() if hasattr(x, "__dlpack_device__") else (_DLPACK_CPU, 0)
    if device is None or int(device[0]) != _DLPACK_CPU:
        raise InvalidArgumentError(
            f"a {type(x).__name__} on {_device_name(device)}: the eager path reads CPU memory only; "
            "move it to the CPU first (e.g. tensor.cpu())"
        )
    try:
        return np.from_dlpack(x)
    except (TypeError, ValueError, BufferError, RuntimeError) as exc:
        # e.g. a torch tensor that requires grad, or a dtype numpy lacks (bfloat16).
        raise ArgumentTypeError(f"cannot view the {type(x).__name__} through DLPack: {exc}") from exc


def _from_buffer(x: Any) -> np.ndarray:
    try:
        view = memoryview(x)
    except TypeError:
        raise ArgumentTypeError(
            f"expected a numpy.ndarray, mlx.core.array, buffer (bytes, memoryview, array.array) "
            f"or DLPack tensor, got {type(x).__name__}"
        ) from None
    try:
        return np.asarray(view)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise DtypeError(f"the {type(x).__name__}'s buffer format {view.format!r} has no numpy dtype: {exc}") from exc


def host_array(x: Any) -> np.ndarray:
    """``x`` as a numpy array sharing its memory (numpy scalars as 0-d arrays).

    Args:
        x: A numpy array or scalar, a buffer-protocol object or a CPU DLPack tensor.

    Returns:
        A numpy view of ``x``'s memory (read-only for read-only buffers).

    Raises:
        ArgumentTypeError: anything else (a list, a Python number, None, str).
        InvalidArgumentError: a DLPack tensor on another device than the CPU.
        DtypeError: a buffer format numpy cannot read.
    """
    if isinstance(x, (np.ndarray, np.generic)):
        return np.asarray(x)
    if isinstance(x, (str, mx.array)) or x is None:
        raise ArgumentTypeError(f"expected a numpy.ndarray or mlx.core.array, got {type(x).__name__}")
    if hasattr(x, "__dlpack__"):
        return _from_dlpack(x)
    return _from_buffer(x)


def host_out(out: Any) -> np.ndarray:
    """``out=`` of an eager call as a numpy array sharing its memory.

    Args:
        out: A numpy array, a writable buffer (bytearray, memoryview,
            array.array) or a CPU DLPack tensor.

    Returns:
        The numpy view to write into (its writability checked by the caller).

    Raises:
        ArgumentTypeError: an mx.array (MLX owns its memory: results of the
            lazy path are new arrays), a list or other non-buffer.
        InvalidArgumentError: a DLPack tensor not on the CPU.
    """
    if type(out) is np.ndarray:
        return out
    if isinstance(out, mx.array):
        raise ArgumentTypeError("out must be a numpy.ndarray, a writable buffer or a CPU DLPack tensor, got an mlx.core.array")
    try:
        return host_array(out)
    except ArgumentTypeError:
        raise ArgumentTypeError(
            f"out must be a numpy.ndarray, a writable buffer or a CPU DLPack tensor, got {type(out).__name__}"
        ) from None
