"""Cutting parameters into per-rank shards: segments, sharding rules, slicing.

A weight may be several matrices fused along one axis (a fused QKV projection
is three). ``segments`` says where the parts are, and each part is split
evenly over the ranks, so rank ``r`` holds the ``r``-th slice of every part,
concatenated in order.

Shards may also differ in size: ``sizes`` gives each rank's length of every
segment (:func:`split_sizes` computes them in whole units, by weight), and
``ranges`` gives each rank's index ranges outright (they may overlap, e.g. a
key/value head replicated on the ranks whose query heads use it).

Quantized weights are packed: along their input axis a ``weight``, its
``scales`` and ``biases`` have different lengths for the same logical input.
Slicing therefore works in logical units (``logical_dim`` elements along the
axis) converted to each array's own length, and refuses a cut that falls
inside a packed word or a quantization group.
"""

from __future__ import annotations

import numbers
from typing import Callable, Iterable, Sequence, Tuple, Union

import mlx.core as mx

from mlxdist.errors import ArgumentTypeError, InvalidArgumentError, ShapeError
from mlxdist.nn.shares import Ranges, Sizes, check_ranges, split_sizes, uneven_ranges

__all__ = [
    "Segments",
    "Sizes",
    "Ranges",
    "ShardingRule",
    "Predicate",
    "LogicalDim",
    "SHARDINGS",
    "segment_bounds",
    "rank_ranges",
    "split_sizes",
    "uneven_ranges",
    "physical_ranges",
    "take_ranges",
    "check_ranges",
    "parse_rule",
    "predicate_for",
    "shard_parameters",
]

Segments = Union[int, Sequence[int], Sequence[float]]
ShardingRule = Union[int, Tuple[int, Segments], None]
Predicate = Callable[[str, mx.array], ShardingRule]
LogicalDim = Callable[[str, mx.array, int], int]

SHARDINGS = ("all-to-sharded", "sharded-to-all")


def segment_bounds(segments: Segments, dim: int) -> list[int]:
    """The boundaries ``[0, ..., dim]`` of the fused parts of an axis of length ``dim``.

    Args:
        segments: A number of equal parts (``3`` for a fused QKV), a list of
            split indices (``[1024, 1536]``), or a list of fractions of
            ``dim`` (``[0.5, 0.75]``; each rounds to the nearest index).

    Returns:
        Strictly increasing boundaries starting at 0 and ending at ``dim``.

    Raises:
        InvalidArgumentError: segments is not one of those forms, an integer
            count does not divide ``dim``, or the indices are not strictly
            increasing inside ``(0, dim)``.
    """
    if isinstance(segments, bool) or not isinstance(segments, (numbers.Integral, Sequence)):
        raise InvalidArgumentError(
            f"segments must be an int, a list of split indices or a list of fractions, got {segments!r}"
        )
    if isinstance(segments, numbers.Integral):
        count = int(segments)
        if count < 1:
            raise InvalidArgumentError(f"segments must be >= 1, got {count}")
        if dim % count:
            raise InvalidArgumentError(
                f"segments={count} does not divide the sharded axis of length {dim} into equal parts"
            )
        return [i * (dim // count) for i in range(count + 1)]
    values = list(segments)
    if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in values):
        raise InvalidArgumentError(f"segments must hold only numbers, got {segments!r}")
    if all(isinstance(v, numbers.Integral) for v in values):
        indices = [int(v) for v in values]
    elif all(0 < float(v) < 1 for v in values):
        indices = [round(float(v) * dim) for v in values]
    else:
        raise InvalidArgumentError(
            f"segments {segments!r} must be all integer split indices or all fractions "
            "strictly between 0 and 1"
        )
    bounds = [0, *indices, dim]
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise InvalidArgumentError(
            f"segments {segments!r} give split indices {indices} on an axis of length {dim}: "
            "they must be strictly increasing and inside (0, {dim})".replace("{dim}", str(dim))
        )
    return bounds


def rank_ranges(bounds: Sequence[int], size: int, rank: int, what: str) -> list[tuple[int, int]]:
    """The ranges of an axis that ``rank`` holds: its slice of every segment.

    Args:
        bounds: Segment boundaries from :func:`segment_bounds`.
        size: The number of ranks.
        rank: This rank.
        what: Names the array and axis for error messages.

    Returns:
        One ``(start, stop)`` per segment.

    Raises:
        ShapeError: a segment's length is not divisible by ``size``.
    """
    ranges = []
    for index, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        length = stop - start
        if length % size:
            part = f"segment {index} [{start}, {stop}) of " if len(bounds) > 2 else ""
            raise ShapeError(
                f"cannot shard {what} across {size} ranks: {part}length {length} "
                f"is not divisible by {size}"
            )
        step = length // size
        ranges.append((start + rank * step, start + (rank + 1) * step))
    return ranges


def physical_ranges(
    ranges: Iterable[tuple[int, int]], physical: int, logical_dim: int, what: str
) -> list[tuple[int, int]]:
    """Map logical ranges of an axis to indices of an array that stores it in ``physical`` slots.

    Args:
        ranges: ``(start, stop)`` in logical units.
        physical: The array's length along the axis: ``logical_dim`` for plain
            data, a fixed fraction of it for packed or per-group quantized data.
        logical_dim: The logical length of the axis.
        what: Names the array and axis for error messages.

    Returns:
        The ranges in the array's own indices.

    Raises:
        ShapeError: a boundary does not fall on a whole index of the array.
    """
    mapped = []
    for start, stop in ranges:
        for logical in (start, stop):
            if (logical * physical) % logical_dim:
                raise ShapeError(
                    f"cannot cut {what} at element {logical} of {logical_dim}: the cut falls "
                    "inside a packed word or a quantization group"
                )
        mapped.append((start * physical // logical_dim, stop * physical // logical_dim))
    return mapped


def take_ranges(array: mx.array, axis: int, ranges: Sequence[tuple[int, int]]) -> mx.array:
    """Concatenate index ranges of ``array`` along ``axis`` into a contiguous array.

    Args:
        array: The full array.
        axis: A non-negative axis of ``array``.
        ranges: ``(start, stop)`` indices of the array.

    Returns:
        A contiguous array holding the ranges in order.
    """
    parts = [array[(slice(None),) * axis + (slice(start, stop),)] for start, stop in ranges]
    return mx.contiguous(parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=axis))


def parse_rule(rule: ShardingRule, path: str, ndim: int) -> tuple[int, Segments] | None:
    """Validate what a sharding predicate returned for one parameter.

    Args:
        rule: An axis, ``(axis, segments)`` or None.
        path: The parameter's path, for messages.
        ndim: The parameter's number of dimensions.

    Returns:
        ``(non-negative axis, segments)``, or None to leave it whole.

    Raises:
        TypeError: the rule has another form.
        InvalidArgumentError: the axis is out of range.
    """
    if rule is None:
        return None
    if isinstance(rule, tuple) and len(rule) == 2:
        axis, segments = rule
    elif isinstance(rule, numbers.Integral) and not isinstance(rule, bool):
        axis, segments = rule, 1
    else:
        raise ArgumentTypeError(
            f"the sharding predicate returned {rule!r} for {path!r}: expected an axis, "
            "(axis, segments) or None"
        )
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise ArgumentTypeError(f"the sharding predicate returned axis {axis!r} for {path!r}: expected an int")
    if not -ndim <= axis < ndim:
        raise InvalidArgumentError(
            f"the sharding predicate returned axis {axis} for {path!r}, which has {ndim} dimensions"
        )
    return int(axis) % ndim, segments


def _leaf_name(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def predicate_for(sharding: str, segments: Segments = 1) -> Predicate:
    """The predicate behind ``"all-to-sharded"`` or ``"sharded-to-all"``.

    All-to-sharded (column parallel) cuts each weight's output axis (axis
    ``ndim - 2``, so 0 for a linear weight) and each ``bias``. Sharded-to-all
    (row parallel) cuts each weight's last (input) axis and leaves ``bias``
    whole, as it is added once after the sum.

    Args:
        sharding: ``"all-to-sharded"`` or ``"sharded-to-all"``.
        segments: The fused parts of the sharded axis.

    Returns:
        A predicate ``(path, weight) -> (axis, segments) | None``.

    Raises:
        InvalidArgumentError: unknown sharding.
    """
    if sharding == "all-to-sharded":

        def column(path: str, weight: mx.array) -> ShardingRule:
            if _leaf_name(path) == "bias":
                return -1, segments
            return max(weight.ndim - 2, 0), segments

        return column
    if sharding == "sharded-to-all":

        def row(path: str, weight: mx.array) -> ShardingRule:
            if _leaf_name(path) == "bias":
                return None
            return -1, segments

        return row
    raise InvalidArgumentError(
        f"sharding must be one of {', '.join(map(repr, SHARDINGS))} or a predicate, got {sharding!r}"
    )


def shard_parameters(
    parameters: Iterable[tuple[str, mx.array]],
    predicate: Predicate,
    size: int,
    rank: int,
    logical_dim: LogicalDim | None = None,
    *,
    sizes: Sizes | None = None,
    ranges: Ranges | None = None,
    partition: bool = False,
) -> list[tuple[str, mx.array]]:
    """Apply a sharding predicate to flat ``(path, array)`` parameters.

    Every cut is checked before any array is sliced, so an error leaves
    nothing half done.

    Args:
        parameters: ``(path, array)`` pairs.
        predicate: Says which axis (and segments) to shard, or None.
        size: The number of ranks.
        rank: This rank.
        logical_dim: ``(path, array, axis) -> length`` in logical units
            (default: the array's own length along the axis).
        sizes: Each rank's length of every segment (None: equal shares);
            see :func:`uneven_ranges`.
        ranges: Each rank's ``(start, stop)`` ranges of the whole axis, in
            logical units (None: from segments and sizes); only with one segment.
        partition: With ``ranges``, require them to cover the axis exactly once.

    Returns:
        ``(path, shard)`` for the parameters the predicate sharded.

    Raises:
        TypeError, InvalidArgumentError: a bad rule, segments, sizes or ranges
            (or both sizes and ranges).
        ShapeError: a segment not divisible by ``size`` (or not the sum of
            ``sizes``), overlapping ``ranges`` where a partition is needed, or a
            cut inside a packed word or quantization group.
    """
    if sizes is not None and ranges is not None:
        raise InvalidArgumentError("give sizes or ranges, not both")
    plans = []
    for path, array in parameters:
        if not isinstance(array, mx.array):
            continue
        parsed = parse_rule(predicate(path, array), path, array.ndim)
        if parsed is None:
            continue
        axis, segments = parsed
        dim = logical_dim(path, array, axis) if logical_dim else array.shape[axis]
        what = f"{path!r} (shape {tuple(array.shape)}, axis {axis})"
        try:
            bounds = segment_bounds(segments, dim)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{path!r}: {exc}") from None
        if ranges is not None:
            if len(bounds) > 2:
                raise InvalidArgumentError(f"{path!r}: ranges replace segments; give segments=1 with ranges")
            check_ranges(ranges, size, dim, partition, what)
            mine = [(int(a), int(b)) for a, b in ranges[rank]]
        elif sizes is not None:
            mine = uneven_ranges(bounds, sizes, size, rank, what)
        else:
            mine = rank_ranges(bounds, size, rank, what)
        plans.append((path, array, axis, physical_ranges(mine, array.shape[axis], dim, what)))
    return [(path, take_ranges(array, axis, ranges)) for path, array, axis, ranges in plans]
