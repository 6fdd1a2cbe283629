"""Operations a backend lacks, composed from those it has, for both paths.

- sum_scatter on ring and MPI: an all_sum, then this rank's rows of axis 0.
- Reductions of bool arrays on MPI (no arithmetic on MPI_C_BOOL; the job
  aborts): the bytes reduced as uint8, where max is logical or (a bool
  "sum", as MLX's other backends compute it) and min is logical and.

The array operations used (slicing, the given casts) are lazy on mx.arrays,
so the composed operation stays lazy and differentiable.
"""

from __future__ import annotations

from typing import Any, Callable

from mlxdist.backends import OPERATIONS, Capabilities
from mlxdist.rules import SAME_SHAPE

__all__ = ["applies", "composed", "compose"]


def _scatter_missing(op: str, caps: Capabilities) -> bool:
    return op == "sum_scatter" and "sum_scatter" not in caps.native


def _bool_as_bytes(op: str, caps: Capabilities, is_bool: bool) -> bool:
    return is_bool and not caps.bool_reductions and op in SAME_SHAPE


def applies(op: str, caps: Capabilities, is_bool: bool) -> bool:
    """Whether ``op`` on this backend (for this dtype) must be composed."""
    return _scatter_missing(op, caps) or _bool_as_bytes(op, caps, is_bool)


def composed(caps: Capabilities, size: int) -> tuple[frozenset[str], frozenset[str]]:
    """The operations a group of ``size`` ranks composes, decided once per group.

    Returns:
        (those composed whatever the dtype, those composed for bool arrays);
        both empty on a single-process group, where collectives return their
        input.
    """
    if size == 1:
        return frozenset(), frozenset()
    return (
        frozenset(op for op in OPERATIONS if applies(op, caps, False)),
        frozenset(op for op in OPERATIONS if applies(op, caps, True)),
    )


def compose(
    op: str,
    x: Any,
    caps: Capabilities,
    rank: int,
    size: int,
    native: Callable[[str, Any], Any],
    is_bool: bool,
    to_bytes: Callable[[Any], Any],
    to_bool: Callable[[Any], Any],
) -> Any:
    """``op`` on ``x`` built from the backend's native operations.

    Args:
        op: The collective.
        x: A numpy array or mx.array whose shape suits ``op`` (checked by the caller).
        caps: The backend's capabilities.
        rank: This rank.
        size: The group's size.
        native: Runs a native collective on an array of the same kind.
        is_bool: Whether ``x`` is a bool array.
        to_bytes: Casts a bool array to uint8 (of its kind).
        to_bool: Casts a uint8 array back to bool.

    Returns:
        The result, of ``x``'s kind.
    """
    if _scatter_missing(op, caps):
        rows = x.shape[0] // size
        total = compose("all_sum", x, caps, rank, size, native, is_bool, to_bytes, to_bool)
        return total[rank * rows : (rank + 1) * rows]
    if _bool_as_bytes(op, caps, is_bool):
        return to_bool(native("all_max" if op == "all_sum" else op, to_bytes(x)))
    return native(op, x)
