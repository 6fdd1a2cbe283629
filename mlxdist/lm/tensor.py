"""Tensor parallelism for mlx-lm models with mlxdist.nn's layers.

Per decoder block: the attention's q/k/v and the MLP's gate/up projections
become column-parallel (:class:`mlxdist.nn.AllToShardedLinear` or its
quantized form), o and down row-parallel (one all-sum each), and the
attention module's head counts are divided by the group size. Embeddings,
norms and the head stay whole on every rank.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxdist.group import Group
from mlxdist.lm.plan import FamilyLayout
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


def shard_block(block: nn.Module, layout: FamilyLayout, group: Group) -> None:
    """Shard one decoder block in place over ``group``, materialising each projection's shard at once.

    Only one unsharded projection is read into memory at a time.

    Args:
        block: The block (checked beforehand with :func:`mlxdist.lm.plan.tp_violations`).
        layout: Its family layout.
        group: The group.

    Raises:
        ShapeError: a projection does not divide (only if unchecked).
    """
    for sharding, paths in (("all-to-sharded", layout.column), ("sharded-to-all", layout.row)):
        for path in paths:
            sharded = shard_linear(_get(block, path), sharding, group=group)
            _set(block, path, sharded)
            mx.eval(sharded.parameters())
            mx.clear_cache()  # the unsharded projection's buffers go back to the system
    attention = _get(block, layout.attention)
    n = group.size()
    for name in layout.head_counts:
        setattr(attention, name, getattr(attention, name) // n)


def apply_tensor_parallel(model: nn.Module, layout: FamilyLayout, group: Group) -> int:
    """Shard every decoder block, one projection at a time.

    No rank ever holds more than its shard plus one unsharded projection.

    Args:
        model: A lazily loaded mlx-lm model whose TP constraints hold.
        layout: Its family layout.
        group: The group.

    Returns:
        Bytes of the unsharded weights of the sharded projections.
    """
    sharded_full = 0
    for block in model.model.layers:
        for path in (*layout.column, *layout.row):
            sharded_full += sum(v.nbytes for _, v in tree_flatten(_get(block, path).parameters()))
        shard_block(block, layout, group)
        mx.eval(block.parameters())
    return sharded_full
