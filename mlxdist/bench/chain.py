"""The decode chain: ``python -m mlxdist.bench --workload chain``.

One decoded token of a tensor-parallel model reduces its hidden vector a few
times per layer, all inside one lazy graph that is evaluated once. The chain
times that pattern: ``--length`` (default 64) chained all_sums of a
``--hidden`` (default 4096) vector, float16 by default, built lazily and
evaluated by one ``mx.eval``, through mlxdist and through mx.distributed in the
same run. Two variants:

- ``chain``: ``x = all_sum(x)``, back to back;
- ``chain*0.5``: ``x = all_sum(x) * 0.5``, an element-wise op between the
  reductions (so consecutive collectives cannot be fused or elided).

Only lazy implementations take part (``mlxdist-mlx`` and ``mx.distributed``);
the rows' times are per chain, with ``per_op_us`` the time per all_sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx
import numpy as np

import mlxdist
from mlxdist.bench.implementations import Implementation, MX_DTYPES
from mlxdist.bench.options import BenchConfig
from mlxdist.bench.sweep import REFERENCE, Progress, Skip, add_ratios
from mlxdist.bench.timing import slowest_rank, split_rounds, summarize, time_block, warm_up
from mlxdist.bench.workload import ITEMSIZE, rank_values

__all__ = ["VARIANTS", "Chain", "chains", "chain_runner", "expected_chain", "run_chains", "count_mismatches"]

# Variant name -> the factor applied after each all_sum (None: none).
VARIANTS: dict[str, float | None] = {"chain": None, "chain*0.5": 0.5}

LazyAllSum = Callable[[mx.array], mx.array]


@dataclass(frozen=True)
class Chain:
    """One chain to time.

    Attributes:
        variant: A key of :data:`VARIANTS`.
        dtype: The dtype name.
        hidden: Elements of the reduced vector.
        length: All_sums per chain.
    """

    variant: str
    dtype: str
    hidden: int
    length: int

    @property
    def scale(self) -> float | None:
        """The factor applied after each all_sum, or None."""
        return VARIANTS[self.variant]


def chains(config: BenchConfig) -> list[Chain]:
    """The chains of a run: every variant for every dtype.

    Args:
        config: The configuration (dtypes, hidden size, chain length).

    Returns:
        The chains, by variant, then dtype.
    """
    return [Chain(v, d, config.hidden, config.chain_length) for v in VARIANTS for d in config.dtypes]


def chain_runner(all_sum: LazyAllSum, x0: mx.array, length: int, scale: float | None) -> Callable[[], mx.array]:
    """One timed iteration: build ``length`` chained all_sums of ``x0``, then evaluate once.

    Args:
        all_sum: A lazy all_sum (mx.array in, lazy mx.array out).
        x0: The evaluated input.
        length: All_sums per chain.
        scale: Factor applied after each all_sum, or None.

    Returns:
        A function running the chain and returning its evaluated result.
    """

    if scale is None:

        def run() -> mx.array:
            x = x0
            for _ in range(length):
                x = all_sum(x)
            mx.eval(x)
            return x

    else:

        def run() -> mx.array:
            x = x0
            for _ in range(length):
                x = all_sum(x) * scale
            mx.eval(x)
            return x

    return run


def expected_chain(chain: Chain, nranks: int) -> np.ndarray | None:
    """The chain's result computed with numpy, where that is exact.

    Every step is rounded to the chain's dtype. The inputs are small integers,
    so with a power-of-two number of ranks each step (a sum of equal values
    after the first, times a power of two) is exact, overflow to inf included;
    other rank counts round in an order numpy cannot know.

    Args:
        chain: The chain.
        nranks: The number of ranks.

    Returns:
        The result as float32, or None when numpy cannot predict it exactly.
    """
    if nranks & (nranks - 1):
        return None
    dtype = MX_DTYPES[chain.dtype]

    def rounded(values: np.ndarray) -> np.ndarray:
        return np.asarray(mx.array(values.astype(np.float32)).astype(dtype).astype(mx.float32), np.float64)

    x = sum(rank_values(r, chain.hidden).astype(np.float64) for r in range(nranks))
    for step in range(chain.length):
        x = rounded(x * nranks if step else x)
        if chain.scale is not None:
            x = rounded(x * chain.scale)
    return x.astype(np.float32)


def count_mismatches(result: np.ndarray, expected: np.ndarray) -> int:
    """Elements of ``result`` that differ from ``expected`` (inf equal to inf, NaN to NaN).

    Args:
        result: A chain's result as float32.
        expected: The reference.

    Returns:
        The count (every element if the shapes differ).
    """
    if result.shape != expected.shape:
        return int(expected.size)
    same = (result == expected) | (np.isnan(result) & np.isnan(expected))
    return int(np.count_nonzero(~same))


def _as_float32(x: mx.array) -> np.ndarray:
    return np.asarray(x.astype(mx.float32))


def _row(chain: Chain, impl: str, times: np.ndarray, wrong: int, config: BenchConfig) -> dict[str, Any]:
    timing = summarize(times)
    return {
        "op": chain.variant,
        "dtype": chain.dtype,
        "impl": impl,
        "bytes": chain.hidden * ITEMSIZE[chain.dtype],
        "count": chain.hidden,
        "length": chain.length,
        "warmup": config.warmup,
        "iters": config.iters,
        "median_us": timing.median * 1e6,
        "p99_us": timing.p99 * 1e6,
        "per_op_us": timing.median * 1e6 / chain.length,
        "wrong": wrong,
        "ratio_vs_mx": None,
    }


def _measure(
    chain: Chain,
    impls: list[tuple[str, LazyAllSum]],
    group: mlxdist.Group,
    config: BenchConfig,
    progress: Progress,
) -> list[dict[str, Any]]:
    """Time every implementation on one chain, round by round, and check the results."""
    x0 = mx.array(rank_values(group.rank(), chain.hidden)).astype(MX_DTYPES[chain.dtype])
    mx.eval(x0)
    runs = [chain_runner(op, x0, chain.length, chain.scale) for _, op in impls]
    results = [warm_up(run, max(config.warmup, 1)) for run in runs]
    times: list[list[np.ndarray]] = [[] for _ in impls]
    for block in split_rounds(config.iters, config.rounds):
        for i, run in enumerate(runs):
            block_times, results[i] = time_block(run, block, group.barrier)
            times[i].append(block_times)
            progress.advance(f"{chain.variant} {chain.dtype} x{chain.length} {impls[i][0]}")
    values = {name: _as_float32(result) for (name, _), result in zip(impls, results)}
    # The reference is mx.distributed's result, itself checked against numpy
    # where numpy's answer is exact.
    model = expected_chain(chain, group.size())
    reference = values.get(REFERENCE, model)
    rows = []
    for (name, _), impl_times in zip(impls, times):
        expected = model if name == REFERENCE else reference
        wrong = 0 if expected is None else count_mismatches(values[name], expected)
        total_wrong = int(np.asarray(group.all_sum(np.array([wrong], np.int64)))[0])
        slowest = slowest_rank(group, np.concatenate(impl_times))
        rows.append(_row(chain, name, slowest, total_wrong, config))
    add_ratios(rows)
    return rows


def run_chains(
    config: BenchConfig, group: mlxdist.Group, impls: list[Implementation], progress: Progress
) -> tuple[list[dict[str, Any]], list[Skip]]:
    """Time the chains of ``config`` on every lazy implementation; all ranks call it together.

    Args:
        config: The configuration.
        group: The mlxdist world group (barriers and the reduction of times use it).
        impls: The implementations asked for; the eager ones are skipped.
        progress: Told about each timed block.

    Returns:
        One row per chain and implementation, and what was skipped.
    """
    todo = chains(config)
    lazy: list[tuple[str, LazyAllSum]] = []
    skips = []
    for impl in impls:
        op = impl.lazy_all_sum()
        if op is None:
            skips += [Skip(v, d, impl.name, "eager: the chain is lazy mx.array work")
                      for v in VARIANTS for d in config.dtypes]
        else:
            lazy.append((impl.name, op))
    progress.start(len(split_rounds(config.iters, config.rounds)) * len(lazy) * len(todo))
    rows: list[dict[str, Any]] = []
    for chain in todo:
        rows.extend(_measure(chain, lazy, group, config, progress))
    progress.stop()
    return rows, skips
