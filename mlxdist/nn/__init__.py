"""Tensor- and data-parallel building blocks over an :class:`mlxdist.Group`.

The counterparts of ``mlx.nn.layers.distributed`` for mlxdist's groups:
column-parallel (:class:`AllToShardedLinear`) and row-parallel
(:class:`ShardedToAllLinear`) linear layers, their quantized forms,
:func:`shard_linear` / :func:`shard_inplace` to shard existing modules (evenly,
or in per-rank ``sizes`` from :func:`split_sizes` when the ranks' shares
differ) and
:func:`sum_gradients`; and for data parallelism :func:`average_gradients`
(bucketed, optionally cast on the wire) and :func:`clip_grad_norm_sharded`.
Mixture-of-experts switch layers split or placed by rank, and their blocks
summed once: :mod:`mlxdist.nn.experts`. An RMS norm over features spread across
ranks (q/k norms over every head): :class:`ShardedRMSNorm`.
The layers call mlxdist's lazy collectives, so models built from them
differentiate and compile as MLX's own do.

Example (run under ``python -m mlxdist.launch -n 2 -- python script.py``)::

    import mlx.nn as nn
    import mlxdist
    from mlxdist.nn import shard_linear

    group = mlxdist.init()
    up = shard_linear(nn.Linear(512, 2048), "all-to-sharded", group=group)
    down = shard_linear(nn.Linear(2048, 512), "sharded-to-all", group=group)
"""

from mlxdist.nn.base import ShardedLinearBase, sum_gradients
from mlxdist.nn.expert_layers import ExpertLinear, LocalSlots
from mlxdist.nn.experts import (
    expert_placement,
    place_experts,
    place_experts_at,
    shard_switch,
    shard_switch_at,
)
from mlxdist.nn.moe_sum import MoEAllSum, choose_dispatch, combine_bytes
from mlxdist.nn.gradients import average_gradients, clip_grad_norm_sharded
from mlxdist.nn.linear import AllToShardedLinear, ShardedToAllLinear
from mlxdist.nn.norms import ShardedRMSNorm
from mlxdist.nn.quantized import (
    QuantizationSpec,
    QuantizedAllToShardedLinear,
    QuantizedShardedToAllLinear,
    quantization_spec,
)
from mlxdist.nn.shares import split_sizes
from mlxdist.nn.sharding import shard_inplace, shard_linear

__all__ = [
    "AllToShardedLinear",
    "ShardedToAllLinear",
    "ShardedLinearBase",
    "ShardedRMSNorm",
    "QuantizedAllToShardedLinear",
    "QuantizedShardedToAllLinear",
    "QuantizationSpec",
    "quantization_spec",
    "shard_linear",
    "shard_inplace",
    "split_sizes",
    "sum_gradients",
    "average_gradients",
    "clip_grad_norm_sharded",
    "ExpertLinear",
    "LocalSlots",
    "MoEAllSum",
    "choose_dispatch",
    "combine_bytes",
    "expert_placement",
    "place_experts",
    "place_experts_at",
    "shard_switch",
    "shard_switch_at",
]
