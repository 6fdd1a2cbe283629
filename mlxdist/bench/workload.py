"""What each benchmarked operation moves, the data it is fed, and the answer it must give.

Every rank's input is small integers, so sums are exact in float16 and
bfloat16 too and any mismatch with numpy's answer is a real error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "OPERATIONS",
    "ROOT",
    "DTYPES",
    "ITEMSIZE",
    "Message",
    "message",
    "bus_factor",
    "rank_values",
    "expected_result",
    "count_wrong",
]

OPERATIONS = (
    "all_sum",
    "all_gather",
    "sum_scatter",
    "all_max",
    "all_min",
    "sendrecv",
    "broadcast",
    "gather",
    "scatter",
    "all_to_all",
)
# The rooted operations' root.
ROOT = 0
# Operations whose input is split into one block per rank.
_SPLIT = ("all_gather", "sum_scatter", "gather", "scatter", "all_to_all")
DTYPES = ("float32", "float16", "bfloat16")
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}

# Values are in [-_SPREAD, _SPREAD]: a sum over up to 2**7 / _SPREAD ranks
# stays an integer that bfloat16 (8 significant bits) holds exactly.
_SPREAD = 8


@dataclass(frozen=True)
class Message:
    """The arrays of one operation at one size.

    Attributes:
        op: The operation.
        dtype: The dtype name.
        nbytes: The size nccl-tests reports: the whole result for all_gather
            and gather, the whole input for sum_scatter and scatter, the array
            for the others.
        input_count: Elements of each rank's input.
        output_count: Elements of each rank's result (the root's, for gather:
            the other ranks get none).
        tokens: Token count for tensor-parallel sizes, else None.
    """

    op: str
    dtype: str
    nbytes: int
    input_count: int
    output_count: int
    tokens: int | None = None


def message(op: str, dtype: str, nbytes: int, nranks: int, tokens: int | None = None) -> Message:
    """The message of ``op`` closest to ``nbytes`` (rounded down to whole elements per rank).

    Args:
        op: One of :data:`OPERATIONS`.
        dtype: One of :data:`DTYPES`.
        nbytes: The requested size in bytes.
        nranks: The number of ranks.
        tokens: The token count, for tensor-parallel sizes.

    Returns:
        The :class:`Message`.

    Raises:
        ValueError: unknown op or dtype, or a size too small for one element per rank.
    """
    if op not in OPERATIONS or dtype not in DTYPES:
        raise ValueError(f"unknown operation {op!r} or dtype {dtype!r}")
    total = nbytes // ITEMSIZE[dtype]
    if op in _SPLIT:
        total -= total % nranks
    if total < nranks:
        raise ValueError(f"{nbytes} bytes of {dtype} is less than one element per rank for {op}")
    per_rank = total // nranks
    counts = {
        "all_gather": (per_rank, total),
        "gather": (per_rank, total),
        "sum_scatter": (total, per_rank),
        "scatter": (total, per_rank),
    }
    input_count, output_count = counts.get(op, (total, total))
    return Message(op, dtype, total * ITEMSIZE[dtype], input_count, output_count, tokens)


def bus_factor(op: str, nranks: int) -> float:
    """nccl-tests' busbw / algbw factor for ``op`` on ``nranks`` ranks.

    Args:
        op: One of :data:`OPERATIONS`.
        nranks: The number of ranks.

    Returns:
        2(n-1)/n for the all-reduces, (n-1)/n for all_gather, sum_scatter,
        gather, scatter and all_to_all, 1 for sendrecv and broadcast.
    """
    if op in ("sendrecv", "broadcast"):
        return 1.0
    if op in _SPLIT:
        return (nranks - 1) / nranks
    return 2 * (nranks - 1) / nranks


def rank_values(rank: int, count: int) -> np.ndarray:
    """The input of ``rank``: small integers as float32, different on every rank.

    Element ``i`` is ``(7 i + 3 rank) mod 17 - 8``: a pattern of period 17, tiled.

    Args:
        rank: The rank.
        count: Number of elements.

    Returns:
        A float32 array of integers in [-8, 8].
    """
    period = 2 * _SPREAD + 1
    pattern = (np.arange(period) * 7 + rank * 3) % period - _SPREAD
    return np.resize(pattern.astype(np.float32), count)


def expected_result(msg: Message, rank: int, nranks: int) -> np.ndarray:
    """What ``rank`` must hold after ``msg.op``, computed with numpy.

    Args:
        msg: The message.
        rank: This rank.
        nranks: The number of ranks.

    Returns:
        The exact result as float32 (sums of the small inputs are exact).
    """
    if msg.op == "sendrecv":
        return rank_values((rank - 1) % nranks, msg.input_count)
    if msg.op == "broadcast":
        return rank_values(ROOT, msg.input_count)
    if msg.op == "scatter":
        return rank_values(ROOT, msg.input_count)[rank * msg.output_count : (rank + 1) * msg.output_count]
    inputs = np.stack([rank_values(r, msg.input_count) for r in range(nranks)])
    if msg.op == "gather":
        return inputs.reshape(-1) if rank == ROOT or nranks == 1 else np.zeros(0, np.float32)
    if msg.op == "all_to_all":
        block = msg.input_count // nranks
        return inputs[:, rank * block : (rank + 1) * block].reshape(-1)
    if msg.op == "all_gather":
        return inputs.reshape(-1)
    if msg.op == "all_max":
        return inputs.max(axis=0)
    if msg.op == "all_min":
        return inputs.min(axis=0)
    total = inputs.sum(axis=0)
    if msg.op == "sum_scatter":
        return total[rank * msg.output_count : (rank + 1) * msg.output_count]
    return total


def count_wrong(result: np.ndarray, expected: np.ndarray) -> int:
    """How many elements of ``result`` differ from ``expected`` (all of them if the shapes differ).

    Args:
        result: The result as float32.
        expected: The exact answer.

    Returns:
        The number of mismatching elements.
    """
    if result.shape != expected.shape:
        return int(expected.size)
    return int(np.count_nonzero(result != expected))
