"""Uneven shards: per-rank sizes of an axis in whole units, and explicit per-rank ranges.

Tensor parallelism over ranks that a head count or a feature count does not
divide gives each rank its own share: :func:`split_sizes` computes the
shares (by weight, in units of a head or a quantization group),
:func:`uneven_ranges` turns them into a rank's ranges, and
:func:`check_ranges` validates ranges given outright (which may overlap where
a shard is replicated, e.g. a key/value head on every rank whose query heads
use it).
"""

from __future__ import annotations

import numbers
from typing import Sequence, Tuple, Union

from mlxdist.errors import InvalidArgumentError, ShapeError

__all__ = ["Sizes", "Ranges", "split_sizes", "uneven_ranges", "check_ranges"]

# Per rank: its length of the sharded axis (of every segment), or one list per segment.
Sizes = Union[Sequence[int], Sequence[Sequence[int]]]
# Per rank: the (start, stop) index ranges of the axis it holds, concatenated in order.
Ranges = Sequence[Sequence[Tuple[int, int]]]


def _is_count(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def split_sizes(total: int, weights: Union[int, Sequence[float]], unit: int = 1) -> list[int]:
    """Per-rank lengths of an axis of ``total`` elements, in whole units, proportional to weights.

    Every rank gets at least one unit; the rest goes by largest remainder of
    the weighted shares (ties to the lower rank), so equal weights give sizes
    that differ by at most one unit and a divisible axis splits evenly.

    Args:
        total: The axis length (a multiple of ``unit``).
        weights: The number of ranks (equal weights), or one positive number
            per rank (e.g. ``[2, 1]`` for a rank twice as fast).
        unit: The indivisible step: a head's ``head_dim``, a quantization
            group, or 1.

    Returns:
        One length per rank, each a positive multiple of ``unit``, summing to ``total``.

    Raises:
        InvalidArgumentError: bad weights or unit, ``total`` not a multiple of
            ``unit``.
        ShapeError: fewer units than ranks.
    """
    if _is_count(weights):
        weights = [1.0] * int(weights)
    weights = list(weights) if isinstance(weights, Sequence) else weights
    if (
        not isinstance(weights, list)
        or not weights
        or any(isinstance(w, bool) or not isinstance(w, numbers.Real) or not w > 0 for w in weights)
    ):
        raise InvalidArgumentError(f"weights must be a rank count or positive numbers, got {weights!r}")
    if not _is_count(unit) or unit < 1 or not _is_count(total) or total < 0 or total % unit:
        raise InvalidArgumentError(f"total={total!r} must be a non-negative multiple of unit={unit!r} >= 1")
    units, ranks = total // unit, len(weights)
    if units < ranks:
        raise ShapeError(f"cannot give each of {ranks} ranks a share of {units} units of {unit}")
    scale = float(sum(weights))
    shares = [units * w / scale for w in weights]
    counts = [max(1, int(share)) for share in shares]
    while sum(counts) > units:  # the minimum of one unit overshot: take from the largest
        largest = max((r for r in range(ranks) if counts[r] > 1), key=lambda r: (counts[r] - shares[r], counts[r]))
        counts[largest] -= 1
    order = sorted(range(ranks), key=lambda r: (-(shares[r] - counts[r]), r))
    for r in order[: units - sum(counts)]:
        counts[r] += 1
    return [count * unit for count in counts]


def _per_segment_sizes(sizes: Sizes, segments: int, size: int) -> list[list[int]]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise InvalidArgumentError(f"sizes must be a list of per-rank lengths, got {sizes!r}")
    rows = list(sizes)
    if rows and all(_is_count(v) for v in rows):
        rows = [rows] * segments
    if len(rows) != segments or any(
        isinstance(row, (str, bytes)) or not isinstance(row, Sequence) for row in rows
    ):
        raise InvalidArgumentError(
            f"sizes must be one length per rank, or one such list per segment ({segments}), got {sizes!r}"
        )
    for row in rows:
        if len(row) != size or any(not _is_count(v) or v < 1 for v in row):
            raise InvalidArgumentError(
                f"sizes must hold {size} positive ints (one per rank), got {list(row)!r}"
            )
    return [[int(v) for v in row] for row in rows]


def uneven_ranges(
    bounds: Sequence[int], sizes: Sizes, size: int, rank: int, what: str
) -> list[tuple[int, int]]:
    """The ranges of an axis that ``rank`` holds when each rank's slice has its own length.

    Args:
        bounds: Segment boundaries from :func:`segment_bounds`.
        sizes: Each rank's length of every segment (one list for all, or one
            list per segment).
        size: The number of ranks.
        rank: This rank.
        what: Names the array and axis for error messages.

    Returns:
        One ``(start, stop)`` per segment.

    Raises:
        InvalidArgumentError: sizes malformed.
        ShapeError: a segment's sizes do not add up to its length.
    """
    rows = _per_segment_sizes(sizes, len(bounds) - 1, size)
    ranges = []
    for index, ((start, stop), row) in enumerate(zip(zip(bounds, bounds[1:]), rows)):
        if sum(row) != stop - start:
            part = f"segment {index} [{start}, {stop}) of " if len(bounds) > 2 else ""
            raise ShapeError(
                f"cannot shard {what} by sizes {row}: they add up to {sum(row)}, "
                f"but {part}the axis has length {stop - start}"
            )
        offset = start + sum(row[:rank])
        ranges.append((offset, offset + row[rank]))
    return ranges


def check_ranges(ranges: Ranges, size: int, dim: int, partition: bool, what: str) -> None:
    """Check explicit per-rank ranges of an axis of length ``dim``.

    Args:
        ranges: One list of ``(start, stop)`` per rank.
        size: The number of ranks.
        dim: The axis length.
        partition: Whether the ranks' ranges must cover the axis exactly once
            (row-parallel shards are summed, so an overlap would count twice).
        what: Names the array and axis for error messages.

    Raises:
        InvalidArgumentError: not one non-empty list of ``(start, stop)`` per
            rank, a range outside ``[0, dim)`` or empty.
        ShapeError: ``partition`` and the ranges overlap or leave a gap.
    """
    if isinstance(ranges, (str, bytes)) or not isinstance(ranges, Sequence) or len(ranges) != size:
        raise InvalidArgumentError(
            f"ranges must hold one list of (start, stop) per rank ({size}), got {ranges!r}"
        )
    for rank_ranges_of in ranges:
        if isinstance(rank_ranges_of, (str, bytes)) or not isinstance(rank_ranges_of, Sequence):
            rank_ranges_of = ()
        if not rank_ranges_of:
            raise InvalidArgumentError(
                f"each rank's ranges must be a non-empty list of (start, stop), got {ranges!r}"
            )
        for pair in rank_ranges_of:
            if (
                not isinstance(pair, Sequence)
                or len(pair) != 2
                or not all(_is_count(v) for v in pair)
                or not 0 <= pair[0] < pair[1] <= dim
            ):
                raise InvalidArgumentError(
                    f"ranges of {what}: {pair!r} is not a (start, stop) with 0 <= start < stop <= {dim}"
                )
    if partition:
        covered = sorted((int(a), int(b)) for rank_of in ranges for a, b in rank_of)
        ends = [0] + [b for _, b in covered]
        if [a for a, _ in covered] != ends[:-1] or ends[-1] != dim:
            raise ShapeError(
                f"cannot shard {what} by ranges {ranges!r}: the ranks' partial products are summed, "
                f"so their ranges must cover [0, {dim}) exactly once"
            )
