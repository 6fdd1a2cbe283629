"""Who sends to whom in the composed collectives (broadcast, gather, scatter,
all_to_all): schedules from the point-to-point links a backend has.

- Any-to-any send/recv (MPI): a binomial tree rooted at the root, ceil(log2 n)
  rounds; each rank receives once from its parent and sends to its children,
  the largest subtree first.
- Neighbours only (ring): two chains from the root, one each way round the
  ring, ceil((n - 1) / 2) hops.

A broadcast sends the whole array down the tree; a scatter sends each child
the blocks of its subtree; a gather sends them up. Each rank receives before
it sends and the tree has no cycle, so blocking sends cannot deadlock, and a
lazy graph needs no ordering beyond its data dependencies.

all_to_all's pairwise exchange (any-to-any backends) runs ``n - 1`` rounds;
in round ``k`` rank ``r`` sends to ``r + k`` and receives from ``r - k``. The
round's pairs form cycles; alternate members of a cycle send first, the
others receive first, so blocking sends cannot wait on each other in a ring.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

__all__ = ["Tree", "tree", "exchange_rounds"]


class Tree(NamedTuple):
    """One rank's place in a tree (actual ranks).

    Attributes:
        parent: The rank this one receives from (None at the root).
        children: The ranks it sends to, in order.
        members: Every rank's subtree, in the order its blocks travel:
            ``members[c]`` for a child ``c`` is what the child's message holds.
    """

    parent: int | None
    children: tuple[int, ...]
    members: dict[int, tuple[int, ...]]


def _binomial(size: int) -> dict[int, tuple[int | None, tuple[int, ...], tuple[int, ...]]]:
    """(parent, children, subtree) per relative rank of a binomial tree."""
    nodes = {}
    for v in range(size):
        low = v & -v if v else 1 << max(0, math.ceil(math.log2(size)))
        parent = v - (v & -v) if v else None
        children = tuple(v + step for step in _powers_below(low) if v + step < size)
        nodes[v] = (parent, children, tuple(range(v, min(v + low, size))))
    return nodes


def _powers_below(limit: int) -> list[int]:
    """Powers of two below ``limit``, largest first."""
    powers, step = [], 1
    while step < limit:
        powers.append(step)
        step <<= 1
    return powers[::-1]


def _chains(size: int) -> dict[int, tuple[int | None, tuple[int, ...], tuple[int, ...]]]:
    """(parent, children, subtree) per relative rank of the two ring chains."""
    right = size // 2  # relative ranks 1..right go right; right+1..size-1 left
    nodes: dict[int, tuple[int | None, tuple[int, ...], tuple[int, ...]]] = {}
    first = (1,) if size > 1 else ()
    nodes[0] = (None, first + ((size - 1,) if size - 1 > right else ()), tuple(range(size)))
    for v in range(1, right + 1):
        nodes[v] = (v - 1, (v + 1,) if v + 1 <= right else (), tuple(range(v, right + 1)))
    for v in range(size - 1, right, -1):
        parent = (v + 1) % size
        nodes[v] = (parent, (v - 1,) if v - 1 > right else (), tuple(range(v, right, -1)))
    return nodes


@functools.lru_cache(maxsize=256)
def tree(size: int, root: int, rank: int, neighbours_only: bool) -> Tree:
    """``rank``'s place in the tree of a group of ``size`` rooted at ``root``.

    Args:
        size: The group size (>= 1).
        root: The root rank.
        rank: This rank.
        neighbours_only: The backend reaches only rank +- 1 (ring chains), else
            any rank (a binomial tree).

    Returns:
        The :class:`Tree` of ``rank``.
    """
    nodes = _chains(size) if neighbours_only else _binomial(size)

    def actual(v: int) -> int:
        return (v + root) % size

    parent, children, _ = nodes[(rank - root) % size]
    members = {actual(v): tuple(actual(m) for m in subtree) for v, (_, _, subtree) in nodes.items()}
    return Tree(None if parent is None else actual(parent), tuple(actual(c) for c in children), members)


@functools.lru_cache(maxsize=256)
def exchange_rounds(size: int, rank: int) -> tuple[tuple[int, int, bool], ...]:
    """The pairwise exchange of all_to_all for ``rank``: per round
    ``(destination, source, send_first)``."""
    rounds = []
    for k in range(1, size):
        # This rank's position in its cycle, counted from the cycle's smallest rank.
        position, member = 0, rank % math.gcd(size, k)
        while member != rank:
            member = (member + k) % size
            position += 1
        rounds.append(((rank + k) % size, (rank - k) % size, position % 2 == 0))
    return tuple(rounds)
