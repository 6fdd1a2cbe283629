"""What every sharded layer shares: the group, the gradient rule, parameter
sharding and the layer base class.

The float layers (:mod:`mlxdist.nn.linear`) and the quantized ones
(:mod:`mlxdist.nn.quantized`) build on this module; it imports neither.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, ClassVar, Sequence, TypeVar, Union

import mlx.core as mx
import mlx.nn as nn

from mlxdist.errors import ArgumentTypeError, InvalidArgumentError
from mlxdist.group import Group
from mlxdist.world import all_sum, resolve_group
from mlxdist.nn.shares import Ranges, Sizes
from mlxdist.nn.slicing import (
    LogicalDim,
    Segments,
    predicate_for,
    rank_ranges,
    segment_bounds,
    shard_parameters,
)

__all__ = [
    "sum_gradients",
    "resolve_group",
    "KeyLike",
    "ShardedLinearBase",
    "AllToShardedLinear",
    "ShardedToAllLinear",
    "agreed_key",
    "shard_layer_parameters",
]

KeyLike = Union[int, mx.array, None]
LayerT = TypeVar("LayerT", bound="ShardedLinearBase")


@functools.lru_cache(maxsize=None)
def _sum_gradients(group: Group) -> Callable[[mx.array], mx.array]:
    @mx.custom_function
    def passthrough(x: mx.array) -> mx.array:
        return x

    @passthrough.vjp
    def passthrough_vjp(primals: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
        return all_sum(cotangent, group=group)

    return passthrough


def sum_gradients(group: Group | None = None) -> Callable[[mx.array], mx.array]:
    """A function that is the identity forward and all-sums its gradient backward.

    Put it on the replicated input of column-parallel layers: each rank's
    shard contributes part of the input's gradient, and the all-sum gives
    every rank the whole of it. It is lazy like the collectives, so it
    compiles and differentiates inside ``mx.compile``.

    Args:
        group: The group (the world group when None).

    Returns:
        A function ``f(x) -> x`` whose vjp all-sums the cotangent over the
        group (the identity on a size-1 group).

    Raises:
        ArgumentTypeError: ``group`` is not an mlxdist group (a TypeError).
    """
    group = resolve_group(group)
    if group.size() == 1:
        return _identity
    return _sum_gradients(group)


def _identity(x: mx.array) -> mx.array:
    return x


def agreed_key(group: Group, key: KeyLike) -> mx.array:
    """A PRNG key that every rank of ``group`` holds.

    Args:
        group: The group.
        key: An ``mx.random.key``, an int seed, or None to draw one from rank
            0's global random state and broadcast it (a small collective: every
            rank must make the same call).

    Returns:
        The key.

    Raises:
        TypeError: ``key`` has another type.
    """
    if isinstance(key, mx.array):
        return key
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        return mx.random.key(int(key))
    if key is not None:
        raise ArgumentTypeError(f"key must be an mx.random.key, an int seed or None, got {type(key).__name__}")
    drawn = mx.random.randint(0, 2**31 - 1, (2,), dtype=mx.int32)
    if group.size() > 1:
        drawn = group.all_sum(drawn if group.rank() == 0 else mx.zeros_like(drawn))
    return drawn.astype(mx.uint32)


def check_dims(**dims: int) -> None:
    """Check that layer dimensions are positive integers.

    Raises:
        InvalidArgumentError: one is not.
    """
    for name, value in dims.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")


def global_linear_parameters(
    input_dims: int, output_dims: int, bias: bool, key: mx.array
) -> dict[str, mx.array]:
    """The unsharded weight (and bias) of a linear layer, drawn as ``nn.Linear`` draws them.

    ``weight`` is uniform in ``±1/sqrt(input_dims)`` from the first key of
    ``mx.random.split(key)``, ``bias`` likewise from the second.

    Args:
        input_dims: Input features.
        output_dims: Output features.
        bias: Whether to make a bias.
        key: The PRNG key.

    Returns:
        ``{"weight": (output_dims, input_dims)[, "bias": (output_dims,)]}``.
    """
    scale = math.sqrt(1.0 / input_dims)
    weight_key, bias_key = mx.random.split(key)
    parameters = {"weight": mx.random.uniform(-scale, scale, (output_dims, input_dims), key=weight_key)}
    if bias:
        parameters["bias"] = mx.random.uniform(-scale, scale, (output_dims,), key=bias_key)
    return parameters


def shard_layer_parameters(
    parameters: dict[str, mx.array],
    sharding: str,
    segments: Segments,
    group: Group,
    logical_dim: LogicalDim | None = None,
    *,
    sizes: Sizes | None = None,
    ranges: Ranges | None = None,
) -> dict[str, mx.array]:
    """A layer's parameters with this rank's shard in place of the sharded ones.

    Args:
        parameters: Flat ``name -> array`` (``weight``, ``bias``, ``scales``...).
        sharding: ``"all-to-sharded"`` or ``"sharded-to-all"``.
        segments: The fused parts of the sharded axis.
        group: The group.
        logical_dim: Logical length of an axis (for packed quantized arrays).
        sizes: Per-rank lengths of the sharded axis (None: equal shares).
        ranges: Per-rank ``(start, stop)`` ranges of it; row-parallel ones
            must cover it exactly once.

    Returns:
        The parameters, sharded.

    Raises:
        InvalidArgumentError, ShapeError: see :func:`mlxdist.nn.slicing.shard_parameters`.
    """
    predicate = predicate_for(sharding, segments)
    sharded = shard_parameters(
        parameters.items(),
        predicate,
        group.size(),
        group.rank(),
        logical_dim,
        sizes=sizes,
        ranges=ranges,
        partition=sharding == "sharded-to-all",
    )
    return {**parameters, **dict(sharded)}


def uneven_config(
    sharding: str,
    weight_shape: Sequence[int],
    sizes: Sizes | None,
    ranges: Ranges | None,
    input_dims: int | None = None,
) -> dict[str, int]:
    """The layer attribute recording the whole sharded axis, when shards may differ in size.

    Args:
        sharding: ``"all-to-sharded"`` or ``"sharded-to-all"``.
        weight_shape: The unsharded weight's shape.
        sizes: The per-rank sizes given, or None.
        ranges: The per-rank ranges given, or None.
        input_dims: Unpacked input features, for a quantized weight.

    Returns:
        ``{"sharded_dims": length}`` for uneven shards, else ``{}`` (even
        shards derive it from the group size).
    """
    if sizes is None and ranges is None:
        return {}
    if sharding == "all-to-sharded":
        return {"sharded_dims": int(weight_shape[0])}
    return {"sharded_dims": int(input_dims if input_dims is not None else weight_shape[-1])}


class ShardedLinearBase(nn.Module):
    """What the column- and row-parallel layers, float and quantized, share.

    Subclasses set ``sharding`` and define the local product.

    Attributes:
        group: The :class:`mlxdist.Group` the layer is sharded over.
    """

    sharding: ClassVar[str]

    @classmethod
    def _assemble(cls: type[LayerT], group: Group, parameters: dict[str, mx.array], **config: Any) -> LayerT:
        """A layer holding the given (already sharded) parameters, with no random init."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._install(group, parameters, **config)
        return layer

    def _install(self, group: Group, parameters: dict[str, mx.array], **config: Any) -> None:
        self.group = group
        for name, value in config.items():
            setattr(self, name, value)
        for name, value in parameters.items():
            setattr(self, name, value)

    @classmethod
    def _check_shardable(cls, input_dims: int, output_dims: int, group: Group) -> None:
        """Raise ShapeError now if the sharded dimension does not split over the group."""
        name, dim = (
            ("output_dims", output_dims) if cls.sharding == "all-to-sharded" else ("input_dims", input_dims)
        )
        rank_ranges(segment_bounds(1, dim), group.size(), group.rank(), f"{name}={dim}")

    def _product(self, x: mx.array) -> mx.array:
        """``x`` times the local weight, transposed, without bias."""
        raise NotImplementedError

    def _add_bias(self, y: mx.array) -> mx.array:
        return y + self["bias"] if "bias" in self else y

    def _affine(self, x: mx.array) -> mx.array:
        """The local product plus the local bias."""
        return self._add_bias(self._product(x))

    def __call__(self, x: mx.array) -> mx.array:
        """Apply this rank's part of the layer.

        Args:
            x: All-to-sharded: the whole input, the same on every rank.
                Sharded-to-all: this rank's slice of the input features.

        Returns:
            All-to-sharded: this rank's slice of the output features.
            Sharded-to-all: the whole output (all-summed), the same on every rank.

        Lazy, as MLX's layers: the all-sum runs when the result is evaluated.
        """
        if self.sharding == "all-to-sharded":
            return self._affine(sum_gradients(self.group)(x))
        return self._add_bias(all_sum(self._product(x), group=self.group))

    @property
    def local_input_dims(self) -> int:
        """Input features of this rank's weight."""
        return int(self["weight"].shape[-1])

    # Length of the sharded axis of the whole layer, set when the shards are uneven.
    sharded_dims: int | None = None

    def _whole(self, local: int) -> int:
        return self.sharded_dims if self.sharded_dims is not None else local * self.group.size()

    @property
    def input_dims(self) -> int:
        """Input features of the whole (unsharded) layer."""
        local = self.local_input_dims
        return self._whole(local) if self.sharding == "sharded-to-all" else local

    @property
    def output_dims(self) -> int:
        """Output features of the whole (unsharded) layer."""
        local = int(self["weight"].shape[0])
        return self._whole(local) if self.sharding == "all-to-sharded" else local

    def _extra_repr(self) -> str:
        return (
            f"input_dims={self.input_dims}, output_dims={self.output_dims}, "
            f"bias={'bias' in self}, ranks={self.group.size()}"
        )
