"""Column- and row-parallel linear layers over an :class:`mlxdist.Group`.

- :class:`AllToShardedLinear` (column parallel): the input is replicated, each
  rank holds a slice of the output features; no communication forward, an
  all-sum of the input's gradient backward.
- :class:`ShardedToAllLinear` (row parallel): each rank holds a slice of the
  input features, the partial products are all-summed, and the bias is added
  once after the sum.

They are ``mlx.nn.Module``\\ s with ``weight``/``bias`` parameters laid out as
in ``mlx.nn.Linear`` (each rank's slice), so ``parameters()``, ``update``,
``load_weights``, ``freeze``, ``nn.quantize``, ``value_and_grad`` and
``mx.compile`` work as for MLX's own layers.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import mlx.core as mx
import mlx.nn as nn

from mlxdist.errors import ArgumentTypeError

from mlxdist.group import Group
from mlxdist.nn.base import (
    KeyLike,
    LayerT,
    ShardedLinearBase,
    agreed_key,
    check_dims,
    global_linear_parameters,
    resolve_group,
    shard_layer_parameters,
    uneven_config,
)
from mlxdist.nn.quantized import quantized_from_float
from mlxdist.nn.shares import Ranges, Sizes
from mlxdist.nn.slicing import Segments

__all__ = ["AllToShardedLinear", "ShardedToAllLinear"]


class _FloatShardedLinear(ShardedLinearBase):
    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        bias: bool = True,
        group: Optional[Group] = None,
        *,
        key: KeyLike = None,
    ) -> None:
        super().__init__()
        check_dims(input_dims=input_dims, output_dims=output_dims)
        group = resolve_group(group)
        self._check_shardable(input_dims, output_dims, group)
        full = global_linear_parameters(input_dims, output_dims, bias, agreed_key(group, key))
        self._install(group, shard_layer_parameters(full, self.sharding, 1, group))

    def _product(self, x: mx.array) -> mx.array:
        return x @ self["weight"].T

    def _affine(self, x: mx.array) -> mx.array:
        if "bias" in self:
            return mx.addmm(self["bias"], x, self["weight"].T)
        return self._product(x)

    @classmethod
    def from_linear(
        cls: type[LayerT],
        linear_layer: nn.Module,
        segments: Segments = 1,
        group: Optional[Group] = None,
        *,
        sizes: Optional[Sizes] = None,
        ranges: Optional[Ranges] = None,
    ) -> LayerT:
        """Shard an ``nn.Linear``: this rank keeps its slice of the layer's weights.

        Args:
            linear_layer: The unsharded ``mlx.nn.Linear`` (the same on every rank).
            segments: The fused parts of the sharded axis: an int (3 for a
                fused QKV), a list of split indices or a list of fractions.
            group: The group (the world group when None).
            sizes: Each rank's length of the sharded axis (of every segment),
                for shards of different sizes; None splits evenly.
            ranges: Each rank's ``(start, stop)`` ranges of the sharded axis,
                concatenated in order (column-parallel ones may overlap: a
                replicated slice); None: from segments and sizes.

        Returns:
            The sharded layer, in the linear layer's dtype. No communication.

        Raises:
            TypeError: ``linear_layer`` is not an ``mlx.nn.Linear``, or group is not
                an mlxdist group.
            InvalidArgumentError: bad segments, sizes or ranges.
            ShapeError: a segment of the sharded dimension is not divisible
                by the group size (or not the sum of ``sizes``), or row-parallel
                ``ranges`` that do not cover the input once.
        """
        if not isinstance(linear_layer, nn.Linear):
            raise ArgumentTypeError(f"from_linear needs an mlx.nn.Linear, got {type(linear_layer).__name__}")
        group = resolve_group(group)
        parameters = shard_layer_parameters(
            dict(linear_layer.parameters()), cls.sharding, segments, group, sizes=sizes, ranges=ranges
        )
        uneven = uneven_config(cls.sharding, linear_layer["weight"].shape, sizes, ranges)
        return cls._assemble(group, parameters, **uneven)

    def to_quantized(
        self,
        group_size: Optional[int] = None,
        bits: Optional[int] = None,
        mode: str = "affine",
        quantize_input: bool = False,
    ) -> ShardedLinearBase:
        """Quantize this rank's shard (what ``nn.quantize`` calls).

        Args:
            group_size: Quantization group size (None: the mode's default).
            bits: Bits per weight (None: the mode's default).
            mode: A mode of ``mx.quantize`` (``"affine"``, ``"mxfp4"``...).
            quantize_input: Not supported for sharded layers.

        Returns:
            The matching quantized sharded layer.

        Raises:
            UnsupportedOperationError: quantize_input is True.
            InvalidArgumentError: MLX does not support the quantization.
            ShapeError: the local input dimension is not a multiple of the
                group size.
        """
        return quantized_from_float(self, group_size, bits, mode, quantize_input)


class AllToShardedLinear(_FloatShardedLinear):
    """Column-parallel linear layer: replicated input, output features sharded.

    Rank ``r`` holds rows ``[r * out / N, (r + 1) * out / N)`` of the weight and
    bias and returns that slice of the output. The forward pass does not
    communicate; the backward pass all-sums the input's gradient (see
    :func:`mlxdist.nn.sum_gradients`).

    Args:
        input_dims: Input features.
        output_dims: Output features of the whole layer (divisible by the
            group size).
        bias: Whether the layer has a bias.
        group: The :class:`mlxdist.Group` (the world group when None).
        key: Seed or ``mx.random.key`` of the whole layer's initial weights;
            None draws one on rank 0 and broadcasts it. Every rank gets its
            slice of the same global matrix, drawn as ``nn.Linear`` draws it.

    Raises:
        InvalidArgumentError: dims not positive integers.
        ShapeError: output_dims not divisible by the group size.
        TypeError: group is not an mlxdist group.
    """

    sharding: ClassVar[str] = "all-to-sharded"


class ShardedToAllLinear(_FloatShardedLinear):
    """Row-parallel linear layer: input features sharded, output all-summed.

    Rank ``r`` holds columns ``[r * in / N, (r + 1) * in / N)`` of the weight
    and the whole bias. It multiplies its slice of the input, the partial
    results are all-summed over the group (eagerly), and the bias is added
    once, so every rank returns the whole output.

    Args:
        input_dims: Input features of the whole layer (divisible by the group
            size).
        output_dims: Output features.
        bias: Whether the layer has a bias.
        group: The :class:`mlxdist.Group` (the world group when None).
        key: As for :class:`AllToShardedLinear`; the bias is the same on
            every rank.

    Raises:
        InvalidArgumentError: dims not positive integers.
        ShapeError: input_dims not divisible by the group size.
        TypeError: group is not an mlxdist group.
    """

    sharding: ClassVar[str] = "sharded-to-all"
