"""The one dtype table: mlx-c's ``mlx_dtype`` codes, MLX's dtypes and numpy's.

numpy has no bfloat16: its values travel in uint16 storage on the numpy path
and as mx.bfloat16 on the mlx path.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Union

import mlx.core as mx
import numpy as np

from mlxdist._c import lib
from mlxdist.errors import DtypeError

__all__ = ["DType", "DTYPES", "DTypeLike", "code_of_numpy", "code_of_mlx", "parse_dtype", "storage_dtype", "mlx_dtype", "name_of_code"]

DTypeLike = Union[np.dtype, type, str, mx.Dtype]


class DType(NamedTuple):
    """One row: the C code, MLX's dtype, numpy's (None if numpy has none) and
    the numpy dtype that holds its bytes."""

    code: int
    mlx: mx.Dtype
    numpy: np.dtype | None
    storage: np.dtype


def _row(code: int, mlx: mx.Dtype, numpy: Any) -> DType:
    dtype = None if numpy is None else np.dtype(numpy)
    return DType(code, mlx, dtype, dtype if dtype is not None else np.dtype(np.uint16))


DTYPES: tuple[DType, ...] = (
    _row(lib.MLX_BOOL, mx.bool_, np.bool_),
    _row(lib.MLX_UINT8, mx.uint8, np.uint8),
    _row(lib.MLX_UINT16, mx.uint16, np.uint16),
    _row(lib.MLX_UINT32, mx.uint32, np.uint32),
    _row(lib.MLX_UINT64, mx.uint64, np.uint64),
    _row(lib.MLX_INT8, mx.int8, np.int8),
    _row(lib.MLX_INT16, mx.int16, np.int16),
    _row(lib.MLX_INT32, mx.int32, np.int32),
    _row(lib.MLX_INT64, mx.int64, np.int64),
    _row(lib.MLX_FLOAT16, mx.float16, np.float16),
    _row(lib.MLX_FLOAT32, mx.float32, np.float32),
    _row(lib.MLX_FLOAT64, mx.float64, np.float64),
    _row(lib.MLX_BFLOAT16, mx.bfloat16, None),
    _row(lib.MLX_COMPLEX64, mx.complex64, np.complex64),
)
_BY_NUMPY = {row.numpy: row.code for row in DTYPES if row.numpy is not None}
_BY_MLX = {row.mlx: row.code for row in DTYPES}
_BY_CODE = {row.code: row for row in DTYPES}


def code_of_numpy(dtype: np.dtype) -> int:
    """The ``mlx_dtype`` of a numpy dtype.

    Raises:
        DtypeError: non-native byte order, or a dtype MLX cannot move.
    """
    code = _BY_NUMPY.get(dtype)
    if code is not None:
        return code
    if not dtype.isnative:
        raise DtypeError(
            f"array has non-native byte order ({dtype.str}); convert it with a.astype(a.dtype.newbyteorder('='))"
        )
    supported = ", ".join(sorted(str(d) for d in _BY_NUMPY))
    raise DtypeError(f"dtype {dtype} cannot be communicated; supported: {supported} (bfloat16 through mlx arrays)")


def numpy_code(dtype: np.dtype) -> int | None:
    """The ``mlx_dtype`` of a numpy dtype, or None where :func:`code_of_numpy` would raise.

    Args:
        dtype: A numpy dtype.

    Returns:
        Its code, or None (a dtype MLX cannot move, or non-native byte order).
    """
    return _BY_NUMPY.get(dtype)


def code_of_mlx(dtype: mx.Dtype) -> int:
    """The ``mlx_dtype`` of an MLX dtype."""
    return _BY_MLX[dtype]


def parse_dtype(dtype: Any) -> tuple[int, bool]:
    """A dtype given by a user: its ``mlx_dtype`` and whether it was an MLX one.

    Raises:
        DtypeError: None, not a dtype, or one MLX cannot move.
    """
    if isinstance(dtype, mx.Dtype):
        return _BY_MLX[dtype], True
    if dtype is None:
        raise DtypeError("dtype is None: name the dtype (numpy's float64 default is not assumed)")
    try:
        np_dtype = np.dtype(dtype)
    except TypeError as exc:
        raise DtypeError(f"not a dtype: {dtype!r}") from exc
    return code_of_numpy(np_dtype), False


def storage_dtype(code: int) -> np.dtype:
    """The numpy dtype holding an ``mlx_dtype``'s bytes (uint16 for bfloat16)."""
    return _BY_CODE[code].storage


def mlx_dtype(code: int) -> mx.Dtype:
    """MLX's dtype for an ``mlx_dtype`` code."""
    return _BY_CODE[code].mlx


def name_of_code(code: int) -> str:
    """The name of an ``mlx_dtype`` code (``"float32"``...), or the code itself if unknown."""
    row = _BY_CODE.get(code)
    return str(code) if row is None else str(row.mlx).removeprefix("mlx.core.")
