"""Sharding existing modules: :func:`shard_linear` and :func:`shard_inplace`.

Both mirror ``mlx.nn.layers.distributed``'s functions of the same names and
arguments, over an :class:`mlxdist.Group` instead of ``mx.distributed``.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from mlxdist.errors import ArgumentTypeError, InvalidArgumentError
from mlxdist.group import Group
from mlxdist.nn.base import ShardedLinearBase, resolve_group
from mlxdist.nn.linear import AllToShardedLinear, ShardedToAllLinear
from mlxdist.nn.quantized import (
    QuantizedAllToShardedLinear,
    QuantizedShardedToAllLinear,
    quantized_input_dims,
    unpacked_length,
)
from mlxdist.nn.shares import Ranges, Sizes
from mlxdist.nn.slicing import SHARDINGS, Predicate, Segments, predicate_for, shard_parameters

__all__ = ["shard_linear", "shard_inplace"]

_CONVERTERS: dict[tuple[str, type], Callable[..., ShardedLinearBase]] = {
    ("all-to-sharded", nn.Linear): AllToShardedLinear.from_linear,
    ("sharded-to-all", nn.Linear): ShardedToAllLinear.from_linear,
    ("all-to-sharded", nn.QuantizedLinear): QuantizedAllToShardedLinear.from_quantized_linear,
    ("sharded-to-all", nn.QuantizedLinear): QuantizedShardedToAllLinear.from_quantized_linear,
}


def _check_sharding_name(sharding: object) -> None:
    if sharding not in SHARDINGS:
        raise InvalidArgumentError(
            f"sharding must be one of {', '.join(map(repr, SHARDINGS))}, got {sharding!r}"
        )


def shard_linear(
    module: nn.Module,
    sharding: str,
    *,
    segments: Segments = 1,
    sizes: Optional[Sizes] = None,
    ranges: Optional[Ranges] = None,
    group: Optional[Group] = None,
) -> ShardedLinearBase:
    """A new tensor-parallel layer holding this rank's shard of a linear layer.

    ``nn.Linear`` becomes :class:`AllToShardedLinear` or
    :class:`ShardedToAllLinear`; ``nn.QuantizedLinear`` becomes the quantized
    counterpart. The original module is left unchanged.

    Args:
        module: An ``mlx.nn.Linear`` or ``mlx.nn.QuantizedLinear`` (the same
            weights on every rank).
        sharding: ``"all-to-sharded"`` (column parallel) or
            ``"sharded-to-all"`` (row parallel).
        segments: The fused parts of the sharded axis: an int (3 for a fused
            QKV projection), a list of split indices or a list of fractions.
        sizes: Shards of different sizes: each rank's length of the sharded
            axis (of every segment, or one list per segment), in features;
            :func:`mlxdist.nn.split_sizes` computes them in whole units (a
            head's ``head_dim``, a quantization group). None: equal shares.
        ranges: Each rank's ``(start, stop)`` ranges of the sharded axis,
            concatenated in order; column-parallel ranges may overlap (a
            replicated key/value head: the forward pass is exact, and each
            holder's weight gradient is its own part, to be summed over the
            holders when training), row-parallel ones must cover the input
            once. None: from segments and sizes.
        group: The :class:`mlxdist.Group` (the world group when None).

    Returns:
        The sharded layer (its forward, all-sum and gradients as for even shards).

    Raises:
        InvalidArgumentError: unknown sharding, bad segments, sizes or ranges.
        TypeError: another module type, or group not an mlxdist group.
        ShapeError: a segment not divisible by the group size (or not the sum
            of ``sizes``), overlapping row-parallel ranges, or a quantized
            row-parallel slice that is not a whole number of groups.
    """
    _check_sharding_name(sharding)
    if not isinstance(module, ShardedLinearBase):
        for (name, kind), converter in _CONVERTERS.items():
            if name == sharding and isinstance(module, kind):
                return converter(module, segments=segments, group=group, sizes=sizes, ranges=ranges)
    state = "is already sharded" if isinstance(module, ShardedLinearBase) else "is not supported"
    raise ArgumentTypeError(
        f"shard_linear: {type(module).__name__} {state}; it shards mlx.nn.Linear and "
        "mlx.nn.QuantizedLinear (use shard_inplace with a predicate for other modules)"
    )


def shard_inplace(
    module: nn.Module,
    sharding: Union[str, Predicate],
    *,
    segments: Segments = 1,
    sizes: Optional[Sizes] = None,
    group: Optional[Group] = None,
) -> nn.Module:
    """Replace a module's parameters by this rank's shards, in place.

    Only the parameters change: for the model to compute the unsharded
    result, its code must communicate where needed (e.g. with
    :func:`mlxdist.nn.all_sum` and :func:`mlxdist.nn.sum_gradients`).
    Quantized sub-modules (``weight``/``scales``/``biases`` with a
    ``group_size``) are cut along their input axis in unpacked features.

    Args:
        module: Any ``mlx.nn.Module``.
        sharding: ``"all-to-sharded"``, ``"sharded-to-all"`` or a predicate
            ``(path, weight) -> axis | (axis, segments) | None`` called for
            each parameter (``path`` as in ``tree_flatten``, e.g.
            ``"layers.0.weight"``); None leaves the parameter whole.
        segments: The fused parts of the sharded axis, for the string forms.
        sizes: Each rank's length of every sharded axis (in logical, unpacked
            features), for shards of different sizes; None: equal shares.
        group: The :class:`mlxdist.Group` (the world group when None).

    Returns:
        ``module``, updated.

    Raises:
        InvalidArgumentError: unknown sharding, bad segments, segments given
            with a predicate, or an axis out of range.
        TypeError: sharding is neither a string nor callable, the predicate
            returned something else than an axis, ``(axis, segments)`` or None,
            or group is not an mlxdist group.
        ShapeError: a segment not divisible by the group size (or not the
            sum of ``sizes``), or a cut inside a quantization group.
    """
    if isinstance(sharding, str):
        predicate = predicate_for(sharding, segments)
    elif callable(sharding):
        if segments != 1:
            raise InvalidArgumentError("segments apply to the string shardings; a predicate returns its own")
        predicate = sharding
    else:
        raise ArgumentTypeError(f"sharding must be a string or a predicate, got {type(sharding).__name__}")
    group = resolve_group(group)
    owners = dict(module.named_modules())

    def logical_dim(path: str, array: mx.array, axis: int) -> int:
        prefix, _, name = path.rpartition(".")
        return unpacked_length(name, array, axis, quantized_input_dims(owners.get(prefix)))

    parameters = module.parameters()
    sharded = dict(
        shard_parameters(
            tree_flatten(parameters), predicate, group.size(), group.rank(), logical_dim, sizes=sizes
        )
    )
    if sharded:
        module.update(tree_map_with_path(lambda path, value: sharded.get(path, value), parameters))
    return module
