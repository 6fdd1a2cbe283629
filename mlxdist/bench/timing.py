"""Fair timing: the same iteration counts for everyone, a barrier before each
timed block, per-iteration ``time.perf_counter`` on every rank, reduced by the
slowest rank before the statistics."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import mlxdist

__all__ = ["Timing", "time_block", "slowest_rank", "summarize", "bandwidths"]


@dataclass(frozen=True)
class Timing:
    """Statistics of one timed block, in seconds.

    Attributes:
        median: Median iteration time (of the per-iteration maximum over ranks).
        p99: 99th percentile of the same.
    """

    median: float
    p99: float


def time_block(
    run: Callable[[], Any], warmup: int, iters: int, barrier: Callable[[], None]
) -> tuple[np.ndarray, Any]:
    """Warm up, synchronise, then time ``iters`` calls of ``run`` one by one.

    Args:
        run: One iteration.
        warmup: Untimed iterations first.
        iters: Timed iterations.
        barrier: Called once between warm-up and the timed iterations.

    Returns:
        This rank's iteration times in seconds, and the last result of ``run``.
    """
    result = None
    for _ in range(warmup):
        result = run()
    barrier()
    times = np.empty(iters, dtype=np.float64)
    clock = time.perf_counter
    for i in range(iters):
        start = clock()
        result = run()
        times[i] = clock() - start
    return times, result


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
