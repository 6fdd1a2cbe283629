"""The rules every path checks before anything reaches the C layer: shapes
given by users, the shape each collective returns, and who may be a peer."""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

from mlxdist.errors import InvalidArgumentError, InvalidRankError, ShapeError, UnsupportedOperationError

__all__ = ["SAME_SHAPE", "INT32_MAX", "checked_shape", "result_shape", "composed_shape", "check_root", "check_peer"]

# Reductions return their input's shape.
SAME_SHAPE = frozenset({"all_sum", "all_max", "all_min"})
# MLX's shapes hold 32-bit dimensions; sizes are 64-bit.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def checked_shape(shape: Sequence[int] | int) -> tuple[int, ...]:
    """A shape given by a user, validated.

    Args:
        shape: An integer or a sequence of integers.

    Returns:
        The shape as a tuple of ints.

    Raises:
        ShapeError: not integers (bools included), a negative dimension,
            one past MLX's 32-bit limit, or more elements than a 64-bit count.
    """
    dims = (shape,) if isinstance(shape, numbers.Integral) else shape
    try:
        items = list(dims)  # type: ignore[arg-type]
    except TypeError:
        raise ShapeError(f"shape must be an integer or a sequence of integers, got {shape!r}") from None
    for d in items:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise ShapeError(f"shape must be a sequence of integers, got {shape!r}")
        if not 0 <= d <= INT32_MAX:
            raise ShapeError(f"invalid dimension {d} in shape {tuple(items)} (0 <= d <= {INT32_MAX})")
    dims = tuple(int(d) for d in items)
    if math.prod(dims) > INT64_MAX:
        raise ShapeError(f"shape {dims} has {math.prod(dims)} elements, more than MLX can count ({INT64_MAX})")
    return dims


def result_shape(op: str, shape: tuple[int, ...], size: int) -> tuple[int, ...]:
    """The shape a collective returns for an input of ``shape`` on ``size`` ranks.

    all_gather stacks along axis 0 (a scalar becomes a vector of ``size``);
    sum_scatter keeps this rank's ``shape[0] // size`` rows.

    Raises:
        ShapeError: sum_scatter of a scalar or of an axis 0 not divisible by
            the size; an all_gather axis 0 past MLX's 32-bit limit.
    """
    if op == "all_gather":
        rows = size * shape[0] if shape else size
        if rows > INT32_MAX:
            raise ShapeError(f"all_gather of shape {shape} on {size} ranks has {rows} rows, past MLX's 32-bit limit")
        return (rows,) + shape[1:]
    if op == "sum_scatter":
        if not shape or shape[0] % size:
            raise ShapeError(
                f"sum_scatter needs an array of at least one dimension whose axis 0 is "
                f"divisible by the group size {size}; got shape {shape}"
            )
        return (shape[0] // size,) + shape[1:]
    return shape


def composed_shape(op: str, shape: tuple[int, ...], size: int, is_root: bool) -> tuple[int, ...]:
    """The shape broadcast, gather, scatter or all_to_all returns on one rank.

    - broadcast: the input's shape (every rank passes the root's shape).
    - gather: on the root, the parts concatenated along axis 0 (a scalar part
      is one row, as all_gather); on the other ranks no rows:
      ``(0,) + shape[1:]``. A size-1 group returns its input as it is.
    - scatter: every rank passes the root's shape; each receives its
      ``shape[0] // size`` rows.
    - all_to_all: the input's shape (``size`` parts of ``shape[0] // size`` rows out, as many in).

    Raises:
        ShapeError: scatter or all_to_all of a scalar or of an axis 0 not
            divisible by the size; a gathered axis 0 past MLX's 32-bit limit.
    """
    if op == "broadcast":
        return shape
    if op == "gather":
        if size == 1:
            return shape
        return result_shape("all_gather", shape, size) if is_root else (0,) + shape[1:]
    if not shape or shape[0] % size:
        raise ShapeError(
            f"{op} needs an array of at least one dimension whose axis 0 is divisible by "
            f"the group size {size}; got shape {shape}"
        )
    return (shape[0] // size,) + shape[1:] if op == "scatter" else shape


def check_root(root: Any, size: int) -> int:
    """Validate the root rank of broadcast, gather or scatter.

    Returns:
        The root as an int.

    Raises:
        InvalidRankError: not an integer (bools included) or not a rank of the group.
    """
    if type(root) is int and 0 <= root < size:
        return root
    if isinstance(root, bool) or not isinstance(root, numbers.Integral) or not 0 <= root < size:
        raise InvalidRankError(f"root={root!r} is not a rank of a group of size {size}")
    return int(root)


def check_split(color: Any, key: Any) -> None:
    """Validate ``Group.split``'s color (>= 0) and key (>= -1).

    Args:
        color: The color given.
        key: The key given.

    Raises:
        InvalidArgumentError: either not an integer in range (bools refused).
    """
    for name, value, low in (("color", color, 0), ("key", key, -1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= INT32_MAX:
            raise InvalidArgumentError(f"split {name} must be an integer in [{low}, {INT32_MAX}], got {value!r}")


def check_peer(peer: Any, rank: int, size: int, neighbours_only: bool, verb: str, name: str) -> int:
    """Validate the rank a send or receive names.

    Args:
        peer: The rank given.
        rank: This process's rank.
        size: The group's size.
        neighbours_only: The backend reaches only rank +- 1 (ring).
        verb: "send to" or "receive from", for messages.
        name: "dst" or "src", for messages.

    Returns:
        The peer as an int.

    Raises:
        InvalidRankError: not an integer (bools included), out of range, this
            rank, or a group of size 1.
        UnsupportedOperationError: a ring peer that is not a neighbour.
    """
    if size == 1:
        raise InvalidRankError(f"cannot {verb} a peer in a group of size 1")
    if isinstance(peer, bool) or not isinstance(peer, numbers.Integral) or not 0 <= peer < size:
        raise InvalidRankError(f"{name}={peer!r} is not a rank of a group of size {size}")
    peer = int(peer)
    if peer == rank:
        raise InvalidRankError(f"{name}={peer} is this rank: cannot {verb} itself")
    if neighbours_only and (peer - rank) % size not in (1, size - 1):
        raise UnsupportedOperationError(
            f"ring can only {verb} its neighbours ({(rank - 1) % size} and {(rank + 1) % size}), not {peer}"
        )
    return peer
