"""Data-parallel gradient utilities: averaging gradient trees over ranks, and
clipping the global norm of gradients sharded over ranks.

:func:`average_gradients` packs the leaves of a gradient tree into flat buckets
and all-reduces each bucket once, in place. A bucket whose wire dtype numpy
has lives in a registered buffer (:func:`mlxdist.empty`: MLX memory seen by
numpy), all-reduced eagerly with no copy; released large buffers return to
mlxdist's buffer cache, so the next call reuses them instead of first-touching
fresh memory. A leaf that travels in its own dtype is divided by the group
size as numpy packs it (one pass), so the sum comes back averaged; a leaf cast
for the wire is cast by mlx, and cast back and divided after the sum.
bfloat16 buckets (numpy has no bfloat16) are concatenated and all-summed
lazily as mx.arrays.
"""

from __future__ import annotations

from numbers import Real
from typing import Any, Hashable, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mlxdist.buffers import empty
from mlxdist.errors import ArgumentTypeError, DtypeError, InvalidArgumentError
from mlxdist.group import Group
from mlxdist.world import resolve_group

__all__ = [
    "average_gradients",
    "clip_grad_norm_sharded",
    "plan_buckets",
    "DEFAULT_ALL_REDUCE_SIZE",
]

DEFAULT_ALL_REDUCE_SIZE = 32 * 1024**2

# The floating dtypes a gradient may have or travel as, and numpy's for them
# (None: numpy has none).
_WIRE_NUMPY: dict[mx.Dtype, Any] = {
    mx.float16: np.float16,
    mx.bfloat16: None,
    mx.float32: np.float32,
    mx.float64: np.float64,
}


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


_FLOAT_NAMES = ", ".join(_dtype_name(d) for d in _WIRE_NUMPY)


def plan_buckets(nbytes: Sequence[int], kinds: Sequence[Hashable], limit: int) -> list[list[int]]:
    """Group arrays, in order, into buckets of one kind of at most ``limit`` bytes.

    An array larger than ``limit`` gets a bucket of its own; ``limit == 0``
    gives every array its own bucket. A bucket is emitted when the next array
    of its kind would overflow it, and the open buckets at the end in the
    order their kinds first appeared, so equal inputs give equal plans on
    every rank.

    Args:
        nbytes: Each array's size in bytes.
        kinds: Each array's kind (its dtype on the wire); only arrays of one
            kind share a bucket.
        limit: The largest bucket, in bytes (>= 0).

    Returns:
        The buckets, as lists of indices into ``nbytes``.
    """
    buckets: list[list[int]] = []
    open_buckets: dict[Hashable, tuple[list[int], int]] = {}
    for index, (size, kind) in enumerate(zip(nbytes, kinds)):
        members, filled = open_buckets.get(kind, ([], 0))
        if members and filled + size > limit:
            buckets.append(members)
            members, filled = [], 0
        members.append(index)
        open_buckets[kind] = (members, filled + size)
    buckets.extend(members for members, _ in open_buckets.values())
    return buckets


def _checked_size(all_reduce_size: Any) -> int:
    if isinstance(all_reduce_size, bool) or not isinstance(all_reduce_size, (int, np.integer)):
        raise InvalidArgumentError(
            f"all_reduce_size must be an integer number of bytes, got {all_reduce_size!r}"
        )
    if all_reduce_size < 0:
        raise InvalidArgumentError(
            f"all_reduce_size must be >= 0 (0: one all-reduce per array), got {all_reduce_size}"
        )
    return int(all_reduce_size)


def _checked_wire_type(communication_type: Any) -> mx.Dtype | None:
    if communication_type is None:
        return None
    dtype = communication_type
    if isinstance(dtype, str):
        dtype = getattr(mx, dtype, None)
    if not isinstance(dtype, mx.Dtype):
        raise DtypeError(
            f"communication_type must be an mlx floating dtype ({_FLOAT_NAMES}) or None, "
            f"got {communication_type!r}"
        )
    if dtype not in _WIRE_NUMPY:
        raise DtypeError(
            f"communication_type must be a floating dtype ({_FLOAT_NAMES}), got {_dtype_name(dtype)}"
        )
    return dtype


def _checked_leaves(gradients: Any) -> list[tuple[str, mx.array]]:
    """The tree's leaves with their keys, each checked to be a floating mx.array."""
    leaves = tree_flatten(gradients)
    for key, leaf in leaves:
        name = repr(key) if key else "the tree itself"
        if not isinstance(leaf, mx.array):
            raise ArgumentTypeError(
                f"gradient leaf {name} is a {type(leaf).__name__}, not an mlx.core.array"
            )
        if leaf.dtype not in _WIRE_NUMPY:
            raise DtypeError(
                f"gradient leaf {name} has dtype {_dtype_name(leaf.dtype)}; gradients must be "
                f"floating-point ({_FLOAT_NAMES})"
            )
    return leaves


def _average_bucket_eager(
    group: Group, leaves: list[mx.array], members: list[int], wire: mx.Dtype, averaged: list[mx.array | None]
) -> None:
    """All-reduce one bucket of leaves in a registered buffer; store their averages."""
    size = group.size()
    bucket = empty(sum(leaves[i].size for i in members), _WIRE_NUMPY[wire])
    sources = [leaves[i].astype(wire) if leaves[i].dtype != wire else leaves[i] for i in members]
    mx.eval(sources)
    offset = 0
    slots = []
    for index, source in zip(members, sources):
        slot = bucket[offset : offset + source.size].reshape(source.shape)
        if leaves[index].dtype == wire:
            np.divide(np.asarray(source), size, out=slot)
        else:
            np.copyto(slot, np.asarray(source))
        slots.append((index, slot))
        offset += source.size
    group.all_sum(bucket, out=bucket)
    for index, slot in slots:
        dtype = leaves[index].dtype
        value = mx.array(slot, dtype=wire)
        averaged[index] = value if dtype == wire else value.astype(dtype) / size
    # Evaluated now, each bucket's temporaries are freed before the next one's.
    mx.eval([averaged[index] for index, _ in slots])


def _average_bucket_lazy(
    group: Group, leaves: list[mx.array], members: list[int], wire: mx.Dtype, averaged: list[mx.array | None]
) -> None:
    """All-sum one bucket of leaves as one flat mx.array in ``wire``; store their averages."""
    size = group.size()
    flat = mx.concatenate([leaves[i].astype(wire).reshape(-1) for i in members])
    summed = group.all_sum(flat)
    offset = 0
    for index in members:
        leaf = leaves[index]
        averaged[index] = (summed[offset : offset + leaf.size].reshape(leaf.shape).astype(leaf.dtype)) / size
        offset += leaf.size
    mx.eval([averaged[index] for index in members])


def average_gradients(
    gradients: Any,
    group: Group | None = None,
    all_reduce_size: int = DEFAULT_ALL_REDUCE_SIZE,
    communication_type: mx.Dtype | str | None = None,
) -> Any:
    """Average a gradient tree over the ranks of ``group`` (data parallelism).

    Leaves are packed, in tree order, into flat buckets of at most
    ``all_reduce_size`` bytes on the wire, one dtype per bucket; each bucket
    takes one all-reduce. An array larger than the limit travels alone.
    Empty arrays are returned as they are, without communication. Every rank
    must pass a tree of the same structure, shapes and dtypes.

    A leaf sent in its own dtype is divided by the group size before the sum
    (``sum(x / n)``, which also keeps float16 sums from overflowing); a leaf
    cast for the wire is summed in the wire dtype, then cast back and divided.

    Args:
        gradients: A tree (dicts, lists, tuples) of floating mx.array leaves.
        group: The group to average over; the world group when None.
        all_reduce_size: The bucket size limit in bytes; 0 means one
            all-reduce per array.
        communication_type: A floating dtype (e.g. ``mx.bfloat16`` or
            ``"bfloat16"``) the leaves are cast to for the all-reduce and cast
            back from; None sends each leaf in its own dtype.

    Returns:
        A tree of the same structure (dicts, lists, tuples, named tuples) with
        the averaged leaves, evaluated, each with its input's shape and dtype.
        On a size-1 group, ``gradients`` itself.

    Raises:
        TypeError: a leaf is not an mx.array.
        DtypeError: a leaf is not floating-point, or communication_type is
            not a floating dtype.
        InvalidArgumentError: all_reduce_size is negative or not an integer.
        CommunicationError, GroupClosedError: from the collective.
    """
    limit = _checked_size(all_reduce_size)
    wire_type = _checked_wire_type(communication_type)
    flat = _checked_leaves(gradients)
    group = resolve_group(group)
    if group.size() == 1:
        return gradients
    leaves = [leaf for _, leaf in flat]
    averaged: list[mx.array | None] = list(leaves)
    sent = [i for i, leaf in enumerate(leaves) if leaf.size]
    wires = [wire_type or leaves[i].dtype for i in sent]
    buckets = plan_buckets([leaves[i].size * w.size for i, w in zip(sent, wires)], wires, limit)
    for bucket in buckets:
        members = [sent[j] for j in bucket]
        wire = wires[bucket[0]]
        average = _average_bucket_eager if _WIRE_NUMPY[wire] is not None else _average_bucket_lazy
        average(group, leaves, members, wire, averaged)
    results = iter(averaged)
    return tree_map(lambda _: next(results), gradients)


def _squared_norm(gradient: mx.array, accumulator: mx.Dtype) -> mx.array:
    return mx.sum(mx.square(gradient.astype(accumulator)))


def clip_grad_norm_sharded(
    gradients: Any, max_norm: float, group: Group | None = None
) -> tuple[Any, mx.array]:
    """Clip gradients sharded over ranks by their global norm, as mlx's clip_grad_norm.

    Every leaf is taken as this rank's shard: the global norm is the square
    root of the all-sum of each rank's sum of squares (a gradient replicated
    on every rank would count ``size`` times). Squares are summed in float32
    (float64 if a leaf is float64). Every rank of the group must call it, even
    with an empty tree.

    Args:
        gradients: A tree of floating mx.array leaves (this rank's shard).
        max_norm: The largest global norm allowed (>= 0).
        group: The group the gradients are sharded over; the world group when None.

    Returns:
        ``(clipped, total_norm)``: the gradients scaled by
        ``min(max_norm / (total_norm + 1e-6), 1)`` in their own dtypes and
        tree structure, and the global norm before clipping (a scalar).

    Raises:
        InvalidArgumentError: max_norm is negative or not a real number.
        TypeError: a leaf is not an mx.array.
        DtypeError: a leaf is not floating-point.
        CommunicationError, GroupClosedError: from the collective.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, Real) or not max_norm >= 0:
        raise InvalidArgumentError(f"max_norm must be a real number >= 0, got {max_norm!r}")
    leaves = [leaf for _, leaf in _checked_leaves(gradients)]
    accumulator = mx.float64 if any(g.dtype == mx.float64 for g in leaves) else mx.float32
    local = mx.array(0.0, dtype=accumulator)
    for gradient in leaves:
        local = local + _squared_norm(gradient, accumulator)
    total_norm = mx.sqrt(resolve_group(group).all_sum(local))
    scale = mx.minimum(max_norm / (total_norm + 1e-6), 1.0)
    clipped = tree_map(lambda g: (g * scale).astype(g.dtype), gradients)
    return clipped, total_norm
