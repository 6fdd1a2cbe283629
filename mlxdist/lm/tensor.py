"""Tensor parallelism for mlx-lm models with mlxdist.nn's layers.

Per decoder block: the attention's q/k/v and the MLP's gate/up projections
become column-parallel (:class:`mlxdist.nn.AllToShardedLinear` or its
quantized form), o and down row-parallel (one all-sum each), and the
attention module's head counts become this rank's. With a
:class:`~mlxdist.lm.split.TensorSplit` the shards follow it (uneven shares,
replicated key/value heads); without one they are even. Norms stay whole on
every rank, and so do the embeddings and head unless the split covers the
vocabulary (:mod:`mlxdist.lm.vocab`).
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxdist.group import Group
from mlxdist.lm.plan import FamilyLayout
from mlxdist.lm.split import TensorSplit
from mlxdist.lm.vocab import apply_vocab_parallel
from mlxdist.nn import shard_linear

__all__ = ["shard_block", "apply_tensor_parallel"]


def _set(root: nn.Module, path: str, value: nn.Module) -> None:
    *parents, name = path.split(".")
    for part in parents:
        root = getattr(root, part)
    setattr(root, name, value)


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _shares(path: str, layout: FamilyLayout, split: TensorSplit) -> dict[str, Any]:
    """The ``shard_linear`` arguments that give a projection its shares under ``split``."""
    if path in layout.key_value:
        return {"ranges": split.kv_ranges()}
    if path in layout.query:
        return {"sizes": split.query_sizes}
    if path in layout.mlp:
        return {"sizes": split.intermediate}
    raise ValueError(f"{path} has no role in the family layout")  # a layout bug, not user input


def shard_block(
    block: nn.Module, layout: FamilyLayout, group: Group, split: Optional[TensorSplit] = None
) -> None:
    """Shard one decoder block in place over ``group``, materialising each projection's shard at once.

    Only one unsharded projection is read into memory at a time.

    Args:
        block: The block (checked beforehand with :func:`mlxdist.lm.plan.tp_violations`
            or :func:`mlxdist.lm.plan.model_split`).
        layout: Its family layout.
        group: The group.
        split: Each rank's shares; None splits every projection evenly.

    Raises:
        ShapeError: a projection does not divide (only if unchecked).
    """
    for sharding, paths in (("all-to-sharded", layout.column), ("sharded-to-all", layout.row)):
        for path in paths:
            shares = {} if split is None else _shares(path, layout, split)
            sharded = shard_linear(_get(block, path), sharding, group=group, **shares)
            _set(block, path, sharded)
            mx.eval(sharded.parameters())
            mx.clear_cache()  # the unsharded projection's buffers go back to the system
    attention = _get(block, layout.attention)
    queries, kv = layout.head_counts
    if split is None:
        for name in layout.head_counts:
            setattr(attention, name, getattr(attention, name) // group.size())
        return
    first, stop = split.query_heads[group.rank()]
    setattr(attention, queries, stop - first)
    setattr(attention, kv, len(split.kv_heads[group.rank()]))


def apply_tensor_parallel(
    model: nn.Module, layout: FamilyLayout, group: Group, split: Optional[TensorSplit] = None
) -> int:
    """Shard every decoder block, one projection at a time (and the vocabulary if the split says so).

    No rank ever holds more than its shard plus one unsharded projection.

    Args:
        model: A lazily loaded mlx-lm model whose TP constraints hold.
        layout: Its family layout.
        group: The group.
        split: Each rank's shares (from :func:`mlxdist.lm.plan.model_split`);
            None splits evenly.

    Returns:
        Bytes of the unsharded weights of the sharded parameters.
    """
    sharded_full = 0
    for block in model.model.layers:
        for path in (*layout.column, *layout.row):
            sharded_full += sum(v.nbytes for _, v in tree_flatten(_get(block, path).parameters()))
        shard_block(block, layout, group, split)
        mx.eval(block.parameters())
    if split is not None and split.vocab is not None:
        sharded_full += apply_vocab_parallel(model, split.vocab, group)
    return sharded_full
