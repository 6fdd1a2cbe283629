"""Operations a backend lacks, composed from those it has, for both paths.

- sum_scatter on ring and MPI: an all_sum, then this rank's rows of axis 0.
- Reductions of bool arrays on MPI (no arithmetic on MPI_C_BOOL; the job
  aborts): the bytes reduced as uint8, where max is logical or (a bool
  "sum", as MLX's other backends compute it) and min is logical and.

The array operations used (slicing, the given casts) are lazy on mx.arrays,
so the composed operation stays lazy and differentiable.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from mlxdist.backends import bool_as_bytes, scatter_missing
from mlxdist.group_record import GroupRecord

__all__ = ["ArrayKind", "needed", "compose"]


class ArrayKind(NamedTuple):
    """How a path's arrays are tested for bool and cast to and from bytes."""

    is_bool: Callable[[Any], bool]
    to_bytes: Callable[[Any], Any]
    to_bool: Callable[[Any], Any]


def needed(group: GroupRecord, op: str, x: Any, kind: ArrayKind) -> bool:
    """Whether ``group`` composes ``op`` for ``x`` (from its ``_composed`` sets).

    The dtype is read only where it matters: on the hot path of small
    collectives every attribute read shows.
    """
    always, for_bool = group.composed
    return op in always or (op in for_bool and kind.is_bool(x))


def compose(group: GroupRecord, op: str, x: Any, kind: ArrayKind, native: Callable[[str, Any], Any]) -> Any:
    """``op`` on ``x`` built from the group's backend's native operations.

    Args:
        group: The group (its capabilities, rank and size).
        op: The collective.
        x: A numpy array or mx.array whose shape suits ``op`` (checked by the caller).
        kind: The array kind of ``x``.
        native: Runs a native collective on an array of the same kind.

    Returns:
        The result, of ``x``'s kind.
    """
    caps, rank, size = group.caps, group.rank, group.size
    if scatter_missing(op, caps):
        rows = x.shape[0] // size
        total = compose(group, "all_sum", x, kind, native)
        return total[rank * rows : (rank + 1) * rows]
    if bool_as_bytes(op, caps, kind.is_bool(x)):
        return kind.to_bool(native("all_max" if op == "all_sum" else op, kind.to_bytes(x)))
    return native(op, x)
