"""Every rank of a tensor-parallel world, simulated in one process.

:class:`StandInWorld` gives one :class:`StandInGroup` per rank (a real
:class:`mlxdist.Group` subclass, so mlxdist's layers accept it). Sharded
modules built with those groups run one rank after another; each all-sum
returns the sum of every rank's input to the same call, as the collective
does. Because a rank's later all-sum inputs depend on earlier sums,
:meth:`StandInWorld.run` replays the ranks until every call's sum is known
(a decoder block with two all-sums takes three rounds).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import mlx.core as mx

from mlxdist.group import Group


class StandInGroup(Group):
    """One simulated rank: ``rank()``/``size()`` as given, ``all_sum`` through its world."""

    __slots__ = ("_standin",)

    def __init__(self, world: "StandInWorld", rank: int) -> None:  # no C handle: nothing to open
        self._standin = world
        self._rank = rank
        self._size = world.size
        self._closed = False
        self.backend = None

    def all_sum(self, x: Any, *, stream: Any = None, out: Any = None) -> Any:
        """The sum over the simulated ranks of their inputs to this call (see :class:`StandInWorld`)."""
        return self._standin.all_sum(self._rank, x)

    def all_gather(self, x: Any, *, stream: Any = None, out: Any = None) -> Any:
        """This rank's ``x`` in every rank's place (only load()'s byte report gathers; it is not checked here)."""
        import numpy as np

        return np.concatenate([np.asarray(x)] * self._size)

    def __repr__(self) -> str:
        return f"StandInGroup(rank={self._rank}, size={self._size})"


class StandInWorld:
    """``size`` simulated ranks whose all-sums are computed by replaying them in turn."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.groups = [StandInGroup(self, rank) for rank in range(size)]
        self._sums: list[mx.array] = []
        self._inputs: list[dict[int, mx.array]] = []
        self._calls = [0] * size
        self.all_sums = 0

    def all_sum(self, rank: int, x: mx.array) -> mx.array:
        index = self._calls[rank]
        self._calls[rank] += 1
        if index < len(self._sums):
            return self._sums[index]
        while len(self._inputs) <= index:
            self._inputs.append({})
        self._inputs[index][rank] = x
        return x  # not yet known: a later round recomputes what depends on it

    def run(self, forwards: Sequence[Callable[[], mx.array]]) -> list[mx.array]:
        """Run each rank's forward (``forwards[rank]()``), replaying until every all-sum is exact.

        Returns:
            Each rank's output.
        """
        assert len(forwards) == self.size
        self._sums, self._inputs = [], []
        while True:
            self._calls = [0] * self.size
            self._inputs = []
            outputs = [forward() for forward in forwards]
            known = len(self._sums)
            if all(calls == known for calls in self._calls):
                self.all_sums = known
                mx.eval(outputs)
                return outputs
            pending = self._inputs[known]
            assert sorted(pending) == list(range(self.size)), "ranks made different all-sum calls"
            total = pending[0]
            for rank in range(1, self.size):
                total = total + pending[rank]
            mx.eval(total)
            self._sums.append(total)
