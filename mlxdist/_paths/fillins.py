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

from mlxdist.backends import OPERATIONS, Capabilities
from mlxdist.rules import SAME_SHAPE

__all__ = ["ArrayKind", "applies", "composed", "needed", "compose"]


class ArrayKind(NamedTuple):
    """How a path's arrays are tested for bool and cast to and from bytes."""

    is_bool: Callable[[Any], bool]
    to_bytes: Callable[[Any], Any]
    to_bool: Callable[[Any], Any]


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


def needed(group: Any, op: str, x: Any, kind: ArrayKind) -> bool:
    """Whether ``group`` composes ``op`` for ``x`` (from its ``_composed`` sets).

    The dtype is read only where it matters: on the hot path of small
    collectives every attribute read shows.
    """
    always, for_bool = group._composed
    return op in always or (op in for_bool and kind.is_bool(x))


def compose(group: Any, op: str, x: Any, kind: ArrayKind, native: Callable[[str, Any], Any]) -> Any:
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
    caps, rank, size = group._caps, group._rank, group._size
    if _scatter_missing(op, caps):
        rows = x.shape[0] // size
        total = compose(group, "all_sum", x, kind, native)
        return total[rank * rows : (rank + 1) * rows]
    if _bool_as_bytes(op, caps, kind.is_bool(x)):
        return kind.to_bool(native("all_max" if op == "all_sum" else op, kind.to_bytes(x)))
    return native(op, x)
