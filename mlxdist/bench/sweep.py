"""The sweep: every operation, dtype and size; at each, the implementations timed in rounds."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

import mlxdist
from mlxdist.bench.implementations import Implementation
from mlxdist.bench.options import BenchConfig, format_size
from mlxdist.bench.timing import Timing, bandwidths, slowest_rank, split_rounds, summarize, time_block, warm_up
from mlxdist.bench.workload import (
    ITEMSIZE,
    Message,
    bus_factor,
    count_wrong,
    expected_result,
    message,
    rank_values,
)

__all__ = ["Progress", "Skip", "plan", "size_points", "run_sweep", "skips_as_dicts", "REFERENCE"]

REFERENCE = "mx.distributed"


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


def _row(msg: Message, impl: str, timing: Timing, wrong: int, nranks: int, config: BenchConfig) -> dict[str, Any]:
    algbw, busbw = bandwidths(msg.nbytes, timing.median, bus_factor(msg.op, nranks))
    return {
        "op": msg.op,
        "dtype": msg.dtype,
        "impl": impl,
        "bytes": msg.nbytes,
        "count": msg.nbytes // ITEMSIZE[msg.dtype],
        "tokens": msg.tokens,
        "warmup": config.warmup,
        "iters": config.iters,
        "median_us": timing.median * 1e6,
        "p99_us": timing.p99 * 1e6,
        "algbw_GBps": algbw,
        "busbw_GBps": busbw,
        "wrong": wrong,
        "ratio_vs_mx": None,
    }


def _measure_message(
    msg: Message, impls: list[Implementation], group: mlxdist.Group, config: BenchConfig, progress: Progress
) -> list[dict[str, Any]]:
    """Time every implementation on one message, round by round, and check the results."""
    values = rank_values(group.rank(), msg.input_count)
    expected = expected_result(msg, group.rank(), group.size())
    prepared = [impl.prepare(msg, values) for impl in impls]
    results = [warm_up(p.run, config.warmup) for p in prepared]
    times: list[list[np.ndarray]] = [[] for _ in impls]
    for block in split_rounds(config.iters, config.rounds):
        for i, p in enumerate(prepared):
            block_times, results[i] = time_block(p.run, block, group.barrier)
            times[i].append(block_times)
            progress.advance(f"{msg.op} {msg.dtype} {format_size(msg.nbytes)} {impls[i].name}")
    rows = []
    for impl, p, result, impl_times in zip(impls, prepared, results, times):
        wrong = count_wrong(p.values(result), expected)
        timing = summarize(slowest_rank(group, np.concatenate(impl_times)))
        total_wrong = int(np.asarray(group.all_sum(np.array([wrong], np.int64)))[0])
        rows.append(_row(msg, impl.name, timing, total_wrong, group.size(), config))
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
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
    messages = plan(config, group.size())
    skips = {
        (op, dtype, impl.name): Skip(op, dtype, impl.name, reason)
        for op in config.ops
        for dtype in config.dtypes
        for impl in impls
        if (reason := impl.unsupported(op, dtype)) is not None
    }
    rounds = len(split_rounds(config.iters, config.rounds))
    progress.start(rounds * sum(1 for m in messages for i in impls if (m.op, m.dtype, i.name) not in skips))
    rows: list[dict[str, Any]] = []
    for msg in messages:
        runnable = [i for i in impls if (msg.op, msg.dtype, i.name) not in skips]
        block = _measure_message(msg, runnable, group, config, progress)
        add_ratios(block)
        rows.extend(block)
    progress.stop()
    return rows, list(skips.values())


def skips_as_dicts(skips: list[Skip]) -> list[dict[str, str]]:
    """Skips as JSON-ready dicts.

    Args:
        skips: What :func:`run_sweep` skipped.

    Returns:
        One dict per skip (op, dtype, impl, reason).
    """
    return [asdict(s) for s in skips]
