"""Fair timing: the same iteration counts for everyone, a barrier before each
timed block, per-iteration ``time.perf_counter`` on every rank, reduced by the
slowest rank before the statistics.

The timed iterations of one message are split into rounds, and every round
times each implementation in turn: a burst of load from elsewhere on the
machine then falls on all of them alike rather than on whichever ran then.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import mlxdist

__all__ = ["Timing", "warm_up", "time_block", "split_rounds", "slowest_rank", "summarize", "bandwidths"]


@dataclass(frozen=True)
class Timing:
    """Statistics of one timed block, in seconds.

    Attributes:
        median: Median iteration time (of the per-iteration maximum over ranks).
        p99: 99th percentile of the same.
    """

    median: float
    p99: float


def warm_up(run: Callable[[], Any], count: int) -> Any:
    """Call ``run`` ``count`` times, untimed.

    Args:
        run: One iteration.
        count: How many times.

    Returns:
        The last result (None if count is 0).
    """
    result = None
    for _ in range(count):
        result = run()
    return result


def time_block(run: Callable[[], Any], iters: int, barrier: Callable[[], None]) -> tuple[np.ndarray, Any]:
    """Synchronise the ranks, then time ``iters`` calls of ``run`` one by one.

    Args:
        run: One iteration.
        iters: Timed iterations.
        barrier: Called once before the first timed iteration.

    Returns:
        This rank's iteration times in seconds, and the last result of ``run``.
    """
    result = None
    barrier()
    times = np.empty(iters, dtype=np.float64)
    clock = time.perf_counter
    for i in range(iters):
        start = clock()
        result = run()
        times[i] = clock() - start
    return times, result


def split_rounds(iters: int, rounds: int) -> list[int]:
    """Split ``iters`` iterations into at most ``rounds`` blocks of near-equal size.

    Args:
        iters: Timed iterations in total.
        rounds: Blocks wanted.

    Returns:
        The block sizes (all >= 1, summing to ``iters``).
    """
    rounds = max(1, min(rounds, iters))
    return [iters // rounds + (1 if r < iters % rounds else 0) for r in range(rounds)]


def slowest_rank(group: mlxdist.Group, times: np.ndarray) -> np.ndarray:
    """Each iteration's time on the slowest rank.

    Args:
        group: The group the ranks share.
        times: This rank's iteration times.

    Returns:
        The element-wise maximum over ranks.
    """
    return np.asarray(group.all_max(times), dtype=np.float64)


def summarize(times: np.ndarray) -> Timing:
    """Median and 99th percentile of iteration times.

    Args:
        times: Iteration times in seconds.

    Returns:
        The :class:`Timing`.
    """
    return Timing(float(np.median(times)), float(np.percentile(times, 99)))


def bandwidths(nbytes: int, seconds: float, bus_factor: float) -> tuple[float, float]:
    """nccl-tests' algorithm and bus bandwidths in GB/s (10**9 bytes per second).

    Args:
        nbytes: The message size.
        seconds: The time of one operation.
        bus_factor: busbw / algbw for the operation.

    Returns:
        (algbw, busbw).
    """
    algbw = nbytes / seconds / 1e9 if seconds > 0 else float("inf")
    return algbw, algbw * bus_factor
