"""An RMS norm over features spread across ranks: each rank normalises its own features by the whole width's RMS.

Some attention layers (minimax's q/k norms) normalise every head's features
together. Under tensor parallelism a rank holds only its heads' features, so
:class:`ShardedRMSNorm` sums the squares of its features, adds the other
ranks' sums with one all-sum of a ``(..., 1)`` array, and scales its features
by the whole width's root mean square. Features held by several ranks (key/value
heads replicated where there are fewer of them than ranks) count once: each copy's
square is weighted by one over the number of copies.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from mlxdist.errors import InvalidArgumentError
from mlxdist.group import Group

__all__ = ["ShardedRMSNorm"]


class ShardedRMSNorm(nn.Module):
    """This rank's features of an RMS norm whose mean runs over every rank's features.

    Args:
        weight: This rank's features' scale, ``(features,)``.
        eps: Added to the mean square.
        total: The whole width the mean runs over (each feature counted once).
        group: The group the features are spread over.
        copies: How many times each of this rank's features is held across the
            group (this rank's own repeats included), or None when every feature
            is held once.
    """

    def __init__(
        self, weight: mx.array, eps: float, total: int, *, group: Group, copies: Optional[mx.array] = None
    ) -> None:
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.total = total
        self.group = group
        self._square_weights = None if copies is None else (1.0 / copies.astype(mx.float32))

    @classmethod
    def from_rms_norm(
        cls, norm: nn.Module, ranges: Sequence[Sequence[tuple[int, int]]], *, group: Group
    ) -> "ShardedRMSNorm":
        """This rank's part of ``norm``, an ``nn.RMSNorm`` over the whole width.

        Args:
            norm: The unsharded norm (``weight`` of the whole width, ``eps``).
            ranges: Every rank's ``(start, stop)`` feature ranges, in the order its
                projection's output holds them (indexed by rank).
            group: The group.

        Returns:
            The sharded norm for ``group.rank()``.

        Raises:
            InvalidArgumentError: not one list of ranges per rank, a range outside
                the width, or a feature no rank holds.
        """
        width = int(norm.weight.shape[-1])
        if len(ranges) != group.size():
            raise InvalidArgumentError(f"ranges must hold one list per rank ({group.size()}), got {len(ranges)}")
        counts = [0] * width
        for rank_ranges in ranges:
            for start, stop in rank_ranges:
                if not 0 <= start < stop <= width:
                    raise InvalidArgumentError(f"feature range {(start, stop)} is outside the norm's width {width}")
                for feature in range(start, stop):
                    counts[feature] += 1
        if 0 in counts:
            raise InvalidArgumentError(f"feature {counts.index(0)} of the norm is held by no rank")
        mine = [f for start, stop in ranges[group.rank()] for f in range(start, stop)]
        index = mx.array(mine, dtype=mx.int32)
        copies = None if max(counts) == 1 else mx.array([counts[f] for f in mine])
        weight = mx.contiguous(norm.weight[index])
        return cls(weight, float(norm.eps), width, group=group, copies=copies)

    def _extra_repr(self) -> str:
        return f"{self.weight.shape[0]} of {self.total}, eps={self.eps}"

    def __call__(self, x: mx.array) -> mx.array:
        """Normalise this rank's features ``x`` (``(..., features)``) by the whole width's RMS."""
        wide = x.astype(mx.float32)
        squares = wide.square()
        if self._square_weights is not None:
            squares = squares * self._square_weights
        total = self.group.all_sum(squares.sum(axis=-1, keepdims=True))
        scale = mx.rsqrt(total / self.total + self.eps)
        return (wide * scale * self.weight.astype(mx.float32)).astype(x.dtype)
