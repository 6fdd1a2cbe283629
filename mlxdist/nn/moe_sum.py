"""Summing an MoE block's partial output over the ranks, once per block: :class:`MoEAllSum`.

Under tensor parallelism of the experts (:func:`mlxdist.nn.shard_switch`)
or expert parallelism (:func:`mlxdist.nn.place_experts`), with shared experts
split as dense MLPs, an MoE block's output on each rank is a partial sum.
The router and the activations are replicated, so every rank routes every
token identically and nothing needs dispatching: one collective per block
combines the parts, an ``all_sum`` or an ``all_to_all`` of token blocks
followed by an ``all_gather``, whichever :func:`choose_dispatch` finds
cheaper in bytes.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from mlxdist.composed import all_to_all
from mlxdist.errors import ArgumentTypeError, InvalidArgumentError
from mlxdist.group import Group
from mlxdist.world import all_gather, all_sum, resolve_group
from mlxdist.nn.base import sum_gradients

__all__ = ["DISPATCHES", "MoEAllSum", "choose_dispatch", "combine_bytes"]

DISPATCHES = ("auto", "all_sum", "all_to_all")


def combine_bytes(tokens: int, hidden: int, ranks: int, itemsize: int) -> dict[str, int]:
    """Bytes each rank receives to sum a block's partial ``[tokens, hidden]`` output, per path.

    With the activations replicated (as under tensor parallelism) every rank
    already holds every token, so dispatching tokens to their experts moves
    nothing; what remains is combining the partial outputs into the full
    output on every rank. With ``S = tokens * hidden * itemsize``:

    - ``all_sum``: a reduce-scatter and an all-gather, ``2 (N-1)/N S``
      (ring; MPI's allreduce moves at least as much).
    - ``all_to_all``: the token blocks to their owner ranks, summed there,
      then an ``all_gather``: ``(N-1)/N S`` each with a direct all_to_all,
      but mlxdist's lazy all_to_all keeps its blocks of an all_gather,
      ``(N-1) S``, so ``(N-1)(1 + 1/N) S`` in all (tokens padded to a multiple of N).

    Args:
        tokens: Tokens in the block's input (batch times sequence).
        hidden: The hidden size.
        ranks: The group size N.
        itemsize: Bytes per element.

    Returns:
        ``{"all_sum": bytes, "all_to_all": bytes}``.
    """
    if ranks == 1:
        return {"all_sum": 0, "all_to_all": 0}
    rows = -(-tokens // ranks)
    size = tokens * hidden * itemsize
    block = rows * hidden * itemsize
    return {
        "all_sum": 2 * (ranks - 1) * size // ranks,
        "all_to_all": (ranks - 1) * ranks * block + (ranks - 1) * block,
    }


def choose_dispatch(tokens: int, hidden: int, ranks: int, itemsize: int) -> str:
    """What ``dispatch="auto"`` uses: the path whose combine receives fewer bytes (ties: ``all_sum``).

    Args:
        tokens: Tokens in the block's input.
        hidden: The hidden size.
        ranks: The group size.
        itemsize: Bytes per element.

    Returns:
        ``"all_sum"`` or ``"all_to_all"``.
    """
    cost = combine_bytes(tokens, hidden, ranks, itemsize)
    return "all_to_all" if cost["all_to_all"] < cost["all_sum"] else "all_sum"


class MoEAllSum(nn.Module):
    """Runs an MoE block whose experts yield partial sums, and sums its output over the ranks once.

    The block's switch was sharded with :func:`shard_switch` or
    :func:`place_experts` (and its shared experts split as dense MLPs), so
    its output is this rank's partial sum; the wrapper adds one lazy,
    differentiable collective per block. The wrapper presents the block's
    children under the same names (parameter paths do not change), and
    attributes it lacks are read from the block (``.sharding_group`` and the
    like; leave mlx-lm's own ``sharding_group`` None).

    Dispatch rule: with the router and activations replicated, no tokens need
    dispatching, and summing ``S = tokens * hidden * itemsize`` bytes costs
    each rank ``2 (N-1)/N S`` with ``all_sum`` against ``(N-1)(1 + 1/N) S``
    with mlxdist's ``all_to_all`` (blocks of an all_gather) plus the
    ``all_gather`` of the summed blocks (:func:`combine_bytes`): the
    all_to_all path never receives fewer bytes, so ``"auto"`` takes
    ``all_sum`` (:func:`choose_dispatch`). Measured at 2 ranks (ring, MPI;
    docs/guides/experts.md) the all_to_all path was 2-6x slower at 1-16
    tokens and 2.5-4.5x at 2048, level or faster only around 1-2 MiB on ring
    on a heavily loaded machine.

    Args:
        block: The MoE block (e.g. mlx-lm's ``Qwen3MoeSparseMoeBlock``).
        group: The :class:`mlxdist.Group` (the world group when None).
        dispatch: ``"auto"``, ``"all_sum"`` or ``"all_to_all"``.

    Raises:
        InvalidArgumentError: unknown dispatch.
        ArgumentTypeError: block not an nn.Module, or group not an mlxdist group.
    """

    def __init__(self, block: nn.Module, *, group: Optional[Group] = None, dispatch: str = "auto") -> None:
        if not isinstance(block, nn.Module):
            raise ArgumentTypeError(f"MoEAllSum wraps an mlx.nn.Module, got {type(block).__name__}")
        if dispatch not in DISPATCHES:
            raise InvalidArgumentError(f"dispatch must be one of {', '.join(map(repr, DISPATCHES))}, got {dispatch!r}")
        super().__init__()
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "_group", resolve_group(group))
        object.__setattr__(self, "dispatch", dispatch)
        dict.update(self, block)

    @property
    def block(self) -> nn.Module:
        """The wrapped MoE block."""
        return object.__getattribute__(self, "_block")

    @property
    def group(self) -> Group:
        """The group the output is summed over."""
        return object.__getattribute__(self, "_group")

    def __getattr__(self, key: str) -> Any:
        if key in self:
            return self[key]
        try:
            block = object.__getattribute__(self, "_block")
        except AttributeError:
            raise AttributeError(key) from None
        return getattr(block, key)

    def path_for(self, tokens: int, hidden: int, itemsize: int) -> str:
        """The collective this wrapper uses for a block output of ``tokens`` x ``hidden``.

        Args:
            tokens: Tokens in the output.
            hidden: Its last dimension.
            itemsize: Bytes per element.

        Returns:
            ``"all_sum"`` or ``"all_to_all"``.
        """
        if self.dispatch != "auto":
            return self.dispatch
        return choose_dispatch(tokens, hidden, self.group.size(), itemsize)

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        """The block's output, summed over the ranks.

        Args:
            x: The block's input (the same on every rank).
            *args: Passed to the block.
            **kwargs: Passed to the block.

        Returns:
            The unsharded block's output, on every rank.
        """
        block = self.block
        for key, value in self.items():
            if block.get(key) is not value:
                block[key] = value  # what was loaded or swapped into the wrapper reaches the block
        group = self.group
        if group.size() == 1:
            return block(x, *args, **kwargs)
        # Each rank's part of the input's gradient is summed, as for column-parallel layers.
        y = block(sum_gradients(group)(x), *args, **kwargs)
        tokens = math.prod(y.shape[:-1]) if y.ndim > 1 else 1
        if self.path_for(tokens, y.shape[-1], y.dtype.size) == "all_sum":
            return all_sum(y, group=group)
        return _sum_by_all_to_all(y, group)


def _sum_by_all_to_all(y: mx.array, group: Group) -> mx.array:
    """Each rank sums its block of tokens from every rank's partial (all_to_all), then all_gather."""
    size = group.size()
    shape = y.shape
    flat = y.reshape(-1, shape[-1]) if y.ndim > 1 else y.reshape(1, -1)
    tokens = flat.shape[0]
    rows = -(-tokens // size)
    if rows * size != tokens:
        flat = mx.concatenate([flat, mx.zeros((rows * size - tokens, flat.shape[1]), dtype=flat.dtype)])
    received = all_to_all(flat, group=group)
    mine = received.reshape(size, rows, flat.shape[1]).sum(axis=0).astype(y.dtype)
    return all_gather(mine, group=group)[:tokens].reshape(shape)
