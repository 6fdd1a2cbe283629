"""Per-rank shares of a decoder under tensor parallelism, even or not.

:func:`tensor_split` decides, from a model's head counts and widths, which
query heads, key/value heads, MLP features and (optionally) vocabulary rows
each rank holds:

- query heads in proportion to the ranks' weights (equal by default), every
  rank at least one;
- while there are at least as many key/value heads as ranks, whole
  grouped-query-attention groups (a key/value head and the query heads it
  serves) go to one rank; with more ranks than key/value heads, the query
  heads are split and each rank holds the key/value heads its query heads use
  (a head is then replicated on several ranks);
- MLP intermediate features so that each rank's whole share of a block
  (its attention projections plus its MLP features) follows the weights: the
  rank whose whole GQA groups gave it more attention gets fewer MLP features,
  in whole quantization groups where the down projection is quantized;
- vocabulary rows in proportion to the weights.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Optional, Sequence

from mlxdist.errors import InvalidArgumentError, ShapeError
from mlxdist.nn.shares import split_sizes

__all__ = ["TensorSplit", "tensor_split", "check_weights"]


def check_weights(weights: Optional[Sequence[float]], size: int, what: str) -> list[float]:
    """Per-rank weights: ``weights`` checked, or equal ones when None.

    Args:
        weights: One positive number per rank, or None.
        size: The number of ranks.
        what: Names the argument in the error message.

    Returns:
        ``size`` floats.

    Raises:
        InvalidArgumentError: not ``size`` positive numbers.
    """
    if weights is None:
        return [1.0] * size
    values = list(weights)
    if len(values) != size or any(
        isinstance(w, bool) or not isinstance(w, numbers.Real) or not w > 0 for w in values
    ):
        raise InvalidArgumentError(f"{what} must be {size} positive numbers (one per rank), got {values!r}")
    return [float(w) for w in values]


@dataclass(frozen=True)
class TensorSplit:
    """What each rank holds under tensor parallelism (lists indexed by rank).

    Attributes:
        head_dim: Features per attention head.
        query_heads: ``(first, stop)`` query heads of each rank.
        kv_heads: The key/value heads each rank holds, in its local order
            (one per local group of query heads; a head may appear on several
            ranks, or, where a rank's query heads straddle groups unevenly,
            once per query head).
        intermediate: MLP intermediate features of each rank.
        vocab: Vocabulary rows of each rank, or None (head and embedding whole).
        widths: Each rank's features of every other dense MLP width in the
            model (shared experts, dense blocks between MoE blocks), by width.
        expert_features: Under expert TP, each rank's intermediate features
            of every routed expert; None otherwise.
        experts: Under expert parallelism, each rank's ``(start, stop)``
            range of whole experts; None otherwise.
        linear_heads: Where blocks hold linear attention, each rank's
            ``(start, stop)`` range of its heads (a gated delta net's key heads,
            each with the value heads it serves); None otherwise.
    """

    head_dim: int
    query_heads: list[tuple[int, int]]
    kv_heads: list[list[int]]
    intermediate: list[int]
    vocab: Optional[list[int]] = None
    widths: dict[int, list[int]] = field(default_factory=dict)
    expert_features: Optional[list[int]] = None
    experts: Optional[list[tuple[int, int]]] = None
    linear_heads: Optional[list[tuple[int, int]]] = None

    def features(self, width: int) -> list[int]:
        """Each rank's share of a dense MLP (or shared experts) ``width`` features wide."""
        if width in self.widths:
            return list(self.widths[width])
        if sum(self.intermediate) != width:
            raise ValueError(f"the split has no share of an MLP {width} features wide")  # a planner bug
        return list(self.intermediate)

    @property
    def query_sizes(self) -> list[int]:
        """Query (and attention output) features of each rank."""
        return [(stop - start) * self.head_dim for start, stop in self.query_heads]

    def kv_ranges(self) -> list[list[tuple[int, int]]]:
        """Each rank's ``(start, stop)`` feature ranges of a key or value projection, adjacent ones merged."""
        merged_all = []
        for heads in self.kv_heads:
            merged: list[tuple[int, int]] = []
            for head in heads:
                start, stop = head * self.head_dim, (head + 1) * self.head_dim
                if merged and merged[-1][1] == start:
                    merged[-1] = (merged[-1][0], stop)
                else:
                    merged.append((start, stop))
            merged_all.append(merged)
        return merged_all

    def is_even(self) -> bool:
        """Whether every rank holds the same amount of everything and no head is replicated."""
        counts = {stop - start for start, stop in self.query_heads}
        held = [h for heads in self.kv_heads for h in heads]
        vocab_even = self.vocab is None or len(set(self.vocab)) == 1
        unique_kv = len(held) == len(set(held))
        widths_even = all(len(set(sizes)) == 1 for sizes in self.widths.values())
        experts_even = (self.expert_features is None or len(set(self.expert_features)) == 1) and (
            self.experts is None or len({stop - start for start, stop in self.experts}) == 1
        ) and (self.linear_heads is None or len({stop - start for start, stop in self.linear_heads}) == 1)
        return (
            len(counts) == 1 and len(set(self.intermediate)) == 1 and unique_kv and vocab_even
            and widths_even and experts_even
        )

    def as_dict(self) -> dict:
        """JSON-ready: per rank query heads, key/value heads, intermediate features, vocabulary rows."""
        return {
            "query_heads": [stop - start for start, stop in self.query_heads],
            "kv_heads": [list(heads) for heads in self.kv_heads],
            "intermediate": list(self.intermediate),
            "vocab": None if self.vocab is None else list(self.vocab),
            "widths": {str(width): list(sizes) for width, sizes in self.widths.items()},
            "expert_features": None if self.expert_features is None else list(self.expert_features),
            "experts": None if self.experts is None else [stop - start for start, stop in self.experts],
            "expert_ranges": None if self.experts is None else [list(r) for r in self.experts],
            "linear_heads": (None if self.linear_heads is None
                             else [stop - start for start, stop in self.linear_heads]),
        }

    def describe(self) -> str:
        """One line: each rank's share."""
        parts = []
        rows = zip(self.query_heads, self.kv_heads, self.intermediate)
        for rank, ((start, stop), heads, inter) in enumerate(rows):
            vocab = "" if self.vocab is None else f", {self.vocab[rank]} vocab rows"
            if self.experts is not None:
                first, last = self.experts[rank]
                vocab += f", experts [{first}, {last})"
            elif self.expert_features is not None:
                vocab += f", {self.expert_features[rank]} features of every expert"
            if self.linear_heads is not None:
                first, last = self.linear_heads[rank]
                vocab += f", linear-attention heads [{first}, {last})"
            parts.append(f"rank {rank}: {stop - start} q heads, kv {heads}, {inter} mlp features{vocab}")
        return "; ".join(parts)


def _kv_heads_of(first: int, stop: int, group: int) -> list[int]:
    """The key/value heads a rank with query heads ``[first, stop)`` holds, in the order attention needs."""
    used = [head // group for head in range(first, stop)]
    distinct = sorted(set(used))
    per_kv, remainder = divmod(len(used), len(distinct))
    # Attention maps local query head j to local kv head j // (local q / local kv): that holds
    # when every distinct kv head serves the same number of this rank's query heads.
    if not remainder and all(used.count(head) == per_kv for head in distinct):
        return distinct
    return used  # one copy per query head


def _balancing_weights(
    query_heads: list[tuple[int, int]],
    kv_heads: list[list[int]],
    head_dim: int,
    hidden: int,
    intermediate: int,
    weights: list[float],
) -> list[float]:
    """MLP feature weights that bring each rank's block share (attention + MLP) to its weight's share."""
    head_cost, feature_cost = 2 * hidden * head_dim, 3 * hidden
    attention = [head_cost * ((stop - start) + len(kv)) for (start, stop), kv in zip(query_heads, kv_heads)]
    total = sum(attention) + intermediate * feature_cost
    scale = sum(weights)
    wanted = [(total * w / scale - cost) / feature_cost for w, cost in zip(weights, attention)]
    # A rank whose attention alone exceeds its share still gets the minimum (split_sizes' one unit).
    return [max(features, 1e-9) for features in wanted]


def tensor_split(
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    intermediate: int,
    size: int,
    weights: Optional[Sequence[float]] = None,
    *,
    mlp_unit: int = 1,
    vocab: Optional[int] = None,
    hidden: Optional[int] = None,
) -> TensorSplit:
    """Each rank's share of a decoder's heads, MLP features and (optionally) vocabulary.

    Args:
        n_heads: Query heads.
        n_kv_heads: Key/value heads (a divisor of ``n_heads``).
        head_dim: Features per head.
        intermediate: MLP intermediate features (0: no dense MLP).
        size: Ranks.
        weights: One positive number per rank (e.g. its speed); None: equal.
        mlp_unit: The step of the MLP split (the quantization group size of
            a quantized down projection, else 1).
        vocab: Vocabulary rows to split too, or None.
        hidden: The model width. Given, the MLP features balance each rank's
            whole block share (a query head's q and o rows and a key/value
            head's k and v rows cost ``2 * hidden * head_dim`` weights each, an
            MLP feature ``3 * hidden``) against the weights; None splits the
            MLP features alone by the weights.

    Returns:
        The split.

    Raises:
        InvalidArgumentError: bad weights or head counts.
        ShapeError: a rank would get no query head, or fewer MLP units
            (or vocabulary rows) than ranks.
    """
    weights = check_weights(weights, size, "tp weights")
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise InvalidArgumentError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads} >= 1")
    if size > n_heads:
        raise ShapeError(
            f"tensor parallelism needs at least one query head per rank: n_heads={n_heads} < {size} ranks"
        )
    group = n_heads // n_kv_heads
    if size <= n_kv_heads:
        counts = [kv * group for kv in split_sizes(n_kv_heads, weights)]
    else:
        counts = split_sizes(n_heads, weights)
    starts = [sum(counts[:rank]) for rank in range(size)]
    query_heads = [(start, start + count) for start, count in zip(starts, counts)]
    kv_heads = [_kv_heads_of(start, stop, group) for start, stop in query_heads]
    if intermediate == 0:  # no dense MLP (every feed-forward is experts)
        mlp = [0] * size
    elif intermediate % mlp_unit or intermediate // mlp_unit < size:
        raise ShapeError(
            f"the MLP's {intermediate} intermediate features cannot give each of {size} ranks "
            f"whole groups of {mlp_unit}"
        )
    if intermediate:
        mlp_weights = weights
        if hidden is not None:
            mlp_weights = _balancing_weights(query_heads, kv_heads, head_dim, hidden, intermediate, weights)
        mlp = split_sizes(intermediate, mlp_weights, mlp_unit)
    rows = None
    if vocab is not None:
        if vocab < size:
            raise ShapeError(f"a vocabulary of {vocab} rows cannot be split over {size} ranks")
        rows = split_sizes(vocab, weights)
    return TensorSplit(head_dim, query_heads, kv_heads, mlp, rows)
