"""The sweep: every operation, dtype and size, each implementation timed back to back."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

import mlxdist
from mlxdist.bench.implementations import Implementation
from mlxdist.bench.options import BenchConfig
from mlxdist.bench.timing import bandwidths, slowest_rank, summarize, time_block
from mlxdist.bench.workload import (
    ITEMSIZE,
    Message,
    bus_factor,
    count_wrong,
    expected_result,
    message,
    rank_values,
)

__all__ = ["Progress", "Skip", "plan", "size_points", "run_sweep", "skips_as_dicts", "REFERENCE", "MLXDIST_PREFERENCE"]

REFERENCE = "mx.distributed"
# The mlxdist variant the ratio column uses: the first one that ran.
MLXDIST_PREFERENCE = ("mlxdist-reg", "mlxdist-mlx", "mlxdist-numpy")


class Progress(Protocol):
    """Receives the sweep's progress (see :mod:`mlxdist.bench.progress`)."""

    def start(self, total: int) -> None:
        """The sweep has ``total`` timed blocks."""

    def advance(self, description: str) -> None:
        """One timed block finished; ``description`` says which."""

    def stop(self) -> None:
        """The sweep is over."""


@dataclass(frozen=True)
class Skip:
    """An implementation that cannot run an operation on a dtype, and why."""

    op: str
    dtype: str
    impl: str
    reason: str


def size_points(config: BenchConfig, dtype: str) -> list[tuple[int, int | None]]:
    """The requested sizes in bytes, with their token counts in tensor-parallel mode.

    Args:
        config: The configuration.
        dtype: The dtype (tensor-parallel sizes depend on its item size).

    Returns:
        ``(nbytes, tokens)`` pairs, ``tokens`` None outside tensor-parallel mode.
    """
    if config.tp:
        return [(config.hidden * t * ITEMSIZE[dtype], t) for t in config.tokens]
    points = []
    nbytes = config.min_bytes
    while nbytes <= config.max_bytes:
        points.append((nbytes, None))
        if config.step_factor < 2:
            break
        nbytes *= config.step_factor
    return points


def plan(config: BenchConfig, nranks: int) -> list[Message]:
    """Every message of the sweep, by operation, then dtype, then size.

    Args:
        config: The configuration.
        nranks: The number of ranks.

    Returns:
        The messages; sizes too small for one element per rank are dropped.
    """
    messages = []
    for op in config.ops:
        for dtype in config.dtypes:
            for nbytes, tokens in size_points(config, dtype):
                if nbytes // ITEMSIZE[dtype] >= nranks:
                    messages.append(message(op, dtype, nbytes, nranks, tokens))
    return messages


def _measure(
    impl: Implementation, msg: Message, values: np.ndarray, expected: np.ndarray,
    group: mlxdist.Group, config: BenchConfig,
) -> dict[str, Any]:
    prepared = impl.prepare(msg, values)
    times, result = time_block(prepared.run, config.warmup, config.iters, group.barrier)
    wrong = count_wrong(prepared.values(result), expected)
    timing = summarize(slowest_rank(group, times))
    total_wrong = int(np.asarray(group.all_sum(np.array([wrong], np.int64)))[0])
    algbw, busbw = bandwidths(msg.nbytes, timing.median, bus_factor(msg.op, group.size))
    return {
        "op": msg.op,
        "dtype": msg.dtype,
        "impl": impl.name,
        "bytes": msg.nbytes,
        "count": msg.nbytes // ITEMSIZE[msg.dtype],
        "tokens": msg.tokens,
        "warmup": config.warmup,
        "iters": config.iters,
        "median_us": timing.median * 1e6,
        "p99_us": timing.p99 * 1e6,
        "algbw_GBps": algbw,
        "busbw_GBps": busbw,
        "wrong": total_wrong,
        "ratio_vs_mx": None,
    }


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Set each mlxdist row's median time over mx.distributed's at the same message."""
    reference = next((r for r in rows if r["impl"] == REFERENCE), None)
    if reference is None:
        return
    for row in rows:
        if row["impl"] != REFERENCE and reference["median_us"] > 0:
            row["ratio_vs_mx"] = row["median_us"] / reference["median_us"]


def run_sweep(
    config: BenchConfig, group: mlxdist.Group, impls: list[Implementation], progress: Progress
) -> tuple[list[dict[str, Any]], list[Skip]]:
    """Time every implementation on every message; all ranks call it together.

    Args:
        config: The configuration.
        group: The mlxdist world group (barriers and the reduction of times use it).
        impls: The implementations to compare.
        progress: Told about each timed block (rank 0's shows it).

    Returns:
        One row per message and implementation that ran, and what was skipped.
    """
    messages = plan(config, group.size)
    skips = {
        (op, dtype, impl.name): Skip(op, dtype, impl.name, reason)
        for op in config.ops
        for dtype in config.dtypes
        for impl in impls
        if (reason := impl.unsupported(op, dtype)) is not None
    }
    runnable = {(m, i.name) for m in messages for i in impls if (m.op, m.dtype, i.name) not in skips}
    progress.start(len(runnable))
    rows: list[dict[str, Any]] = []
    for msg in messages:
        values = rank_values(group.rank, msg.input_count)
        expected = expected_result(msg, group.rank, group.size)
        block = []
        for impl in impls:
            if (msg, impl.name) not in runnable:
                continue
            block.append(_measure(impl, msg, values, expected, group, config))
            progress.advance(f"{msg.op} {msg.dtype} {msg.nbytes} B {impl.name}")
        _add_ratios(block)
        rows.extend(block)
    progress.stop()
    return rows, list(skips.values())


def skips_as_dicts(skips: list[Skip]) -> list[dict[str, str]]:
    """Skips as JSON-ready dicts."""
    return [asdict(s) for s in skips]
