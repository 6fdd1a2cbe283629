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
from mlxdist.lm.decoder import text_model
from mlxdist.lm.kinds import BlockLayout
from mlxdist.lm.plan import FamilyLayout
from mlxdist.lm.linear_attention import linear_attention_dims, shard_linear_attention
from mlxdist.lm.sizing import block_layouts
from mlxdist.lm.split import TensorSplit
from mlxdist.lm.vocab import apply_vocab_parallel
from mlxdist.nn import shard_inplace, shard_linear
from mlxdist.nn.experts import MoEAllSum, place_experts, shard_switch
from mlxdist.nn.norms import ShardedRMSNorm
from mlxdist.nn.quantized import quantized_input_dims

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


def _width(module: nn.Module, row: bool) -> int:
    """A projection's MLP-side width: output features (column) or unpacked input features (row)."""
    if row:
        return int(quantized_input_dims(module) or module["weight"].shape[-1])
    return int(module["weight"].shape[0])


def _fused_ranges(path: str, layout: FamilyLayout, split: TensorSplit, module: nn.Module) -> list:
    """Each rank's ranges of a fused projection: its part of every fused segment, in segment order."""
    if path in layout.mlp:  # gate_up_proj: [gate | up], each split like the MLP
        width = _width(module, False) // 2
        sizes = split.features(width)
        starts = [sum(sizes[:rank]) for rank in range(len(sizes))]
        return [[(a, a + n), (width + a, width + a + n)] for a, n in zip(starts, sizes)]
    # qkv_proj: [queries | keys | values]
    heads = split.query_heads[-1][1]
    queries = heads * split.head_dim
    keys = (_width(module, False) - queries) // 2
    ranges = []
    for (first, stop), kv in zip(split.query_heads, split.kv_ranges()):
        mine = [(first * split.head_dim, stop * split.head_dim)]
        mine += [(queries + a, queries + b) for a, b in kv] + [(queries + keys + a, queries + keys + b) for a, b in kv]
        ranges.append(mine)
    return ranges


def _shares(path: str, layout: FamilyLayout, split: TensorSplit, module: nn.Module) -> dict[str, Any]:
    """The ``shard_linear`` arguments that give a projection its shares under ``split``."""
    if path in getattr(layout, "fused", ()):
        return {"ranges": _fused_ranges(path, layout, split, module)}
    if path in layout.key_value:
        return {"ranges": split.kv_ranges()}
    if path in layout.query:  # whole heads; a head's width is the projection's own (q and o may differ)
        heads = split.query_heads[-1][1]
        per_head = _width(module, path == layout.query[-1]) // heads
        return {"sizes": [(stop - start) * per_head for start, stop in split.query_heads]}
    if path in layout.mlp:
        return {"sizes": split.features(_width(module, path == layout.mlp[-1]))}
    raise ValueError(f"{path} has no role in the family layout")  # a layout bug, not user input


def _norm_ranges(
    key_value: bool, split: Optional[TensorSplit], size: int, width: int
) -> list[list[tuple[int, int]]]:
    """Every rank's feature ranges of a norm over a whole projection's output: its heads' features."""
    if split is None:  # even: rank r holds the r-th of size equal parts
        return [[(rank * width // size, (rank + 1) * width // size)] for rank in range(size)]
    if key_value:
        return split.kv_ranges()
    return [[(start * split.head_dim, stop * split.head_dim)] for start, stop in split.query_heads]


def _shard_experts(block: nn.Module, layout: BlockLayout, group: Group, split: Optional[TensorSplit]) -> None:
    """Shard a mixture-of-experts module so it yields a partial sum, and wrap it to sum once."""
    moe = _get(block, layout.moe)
    switch = moe[layout.switch]
    if split is not None and split.experts is not None:
        place_experts(switch, group=group, placement=split.experts)
    else:
        shard_switch(switch, group=group, sizes=None if split is None else split.expert_features)
    mx.eval(switch.parameters())
    if layout.shared:
        prefix = layout.moe + "."
        up, down = layout.shared[0], layout.shared[-1]
        shared = _get(block, up.rsplit(".", 1)[0])
        width = _width(_get(block, up), False)
        sizes = None if split is None else split.features(width)
        for path in layout.shared:
            name = path[len(prefix):].split(".", 1)[1]
            sharding = "sharded-to-all" if path == down else "all-to-sharded"
            shard_inplace(shared[name], sharding, sizes=sizes, group=group)
            if path == down and "bias" in shared[name] and group.rank() != 0:
                shared[name].update({"bias": mx.zeros_like(shared[name]["bias"])})  # added once in the sum
        mx.eval(shared.parameters())
    mx.clear_cache()
    _set(block, layout.moe, MoEAllSum(moe, group=group))


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
            module = _get(block, path)
            shares = {} if split is None else _shares(path, layout, split, module)
            sharded = shard_linear(module, sharding, group=group, **shares)
            _set(block, path, sharded)
            mx.eval(sharded.parameters())
            mx.clear_cache()  # the unsharded projection's buffers go back to the system
    if getattr(layout, "moe", None):
        _shard_experts(block, layout, group, split)
    attention = _get(block, layout.attention)
    if getattr(layout, "linear", None):
        if split is not None and split.linear_heads is not None:
            heads = split.linear_heads
        else:  # even
            count, size = linear_attention_dims(attention, layout.linear)[0], group.size()
            heads = [(rank * count // size, (rank + 1) * count // size) for rank in range(size)]
        shard_linear_attention(attention, layout.linear, heads, group)
        return
    queries, kv = layout.head_counts
    n_heads = getattr(attention, queries)
    if split is None:
        per_rank = n_heads // group.size()
        first, stop = group.rank() * per_rank, (group.rank() + 1) * per_rank
        kv_count = getattr(attention, kv) // group.size()
    else:
        first, stop = split.query_heads[group.rank()]
        kv_count = len(split.kv_heads[group.rank()])
    if getattr(layout, "mla", False):  # one latent for every head: only the query heads split
        for path in layout.latent:
            module = _get(block, path)
            module.update({k: mx.contiguous(v[first:stop]) for k, v in module.items() if isinstance(v, mx.array)})
            mx.eval(module.parameters())
        setattr(attention, queries, stop - first)
        return
    for norm_path, projection in getattr(layout, "wide_norms", ()):
        norm = _get(block, norm_path)
        ranges = _norm_ranges(projection in layout.key_value, split, group.size(), int(norm.weight.shape[-1]))
        _set(block, norm_path, ShardedRMSNorm.from_rms_norm(norm, ranges, group=group))
    setattr(attention, queries, stop - first)
    setattr(attention, kv, kv_count)
    for ratio in ("num_key_value_groups", "repeats"):  # query heads per key/value head, where kept
        if isinstance(getattr(attention, ratio, None), int):
            setattr(attention, ratio, (stop - first) // kv_count)
    if getattr(layout, "sinks", False):  # one per query head: this rank's heads'
        attention.sinks = mx.contiguous(attention.sinks[first:stop])
        mx.eval(attention.sinks)


def apply_tensor_parallel(
    model: nn.Module, layout: FamilyLayout, group: Group, split: Optional[TensorSplit] = None
) -> int:
    """Shard every decoder block, one projection at a time (and the vocabulary if the split says so).

    No rank ever holds more than its shard plus one unsharded projection.

    Args:
        model: A lazily loaded mlx-lm model whose TP constraints hold.
        layout: Unused: each block's layout comes from its modules
            (:func:`mlxdist.lm.plan.block_layouts`).
        group: The group.
        split: Each rank's shares (from :func:`mlxdist.lm.plan.model_split`);
            None splits evenly.

    Returns:
        Bytes of the unsharded weights of the sharded parameters.
    """
    model = text_model(model)
    sharded_full = 0
    for block, layout in zip(model.model.layers, block_layouts(model)):
        paths = [*layout.column, *layout.row]
        if layout.moe:
            paths.append(f"{layout.moe}.{layout.switch}")
            paths += layout.shared
        paths += list(layout.latent)
        if layout.linear:
            paths.append(layout.attention)
        for path in paths:
            sharded_full += sum(v.nbytes for _, v in tree_flatten(_get(block, path).parameters()))
        if layout.sinks:
            sharded_full += _get(block, layout.attention).sinks.nbytes
        shard_block(block, layout, group, split)
        mx.eval(block.parameters())
    if split is not None and split.vocab is not None:
        sharded_full += apply_vocab_parallel(model, split.vocab, group)
    return sharded_full
