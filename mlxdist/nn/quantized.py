"""Quantized column- and row-parallel linear layers.

They hold this rank's slice of a quantized weight (``weight``, ``scales`` and,
for affine quantization, ``biases``) laid out as ``mlx.nn.QuantizedLinear``
lays them out, and like it they are frozen. Every mode, bit width and group
size that ``mx.quantize`` accepts in the running MLX build is supported; the
check is made by asking MLX, not from a fixed table.

A row-parallel shard cuts the weight along its input axis, which is stored in
quantization groups: each rank's input slice must be a whole number of
groups, ``(input_dims / N) % group_size == 0``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import mlx.core as mx
import mlx.nn as nn

from mlxdist.errors import ArgumentTypeError, InvalidArgumentError, ShapeError, UnsupportedOperationError
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
from mlxdist.nn.shares import Ranges, Sizes
from mlxdist.nn.slicing import Segments, segment_bounds

__all__ = [
    "QUANTIZED_PARAMETERS",
    "QuantizationSpec",
    "quantization_spec",
    "quantized_input_dims",
    "unpacked_length",
    "QuantizedAllToShardedLinear",
    "QuantizedShardedToAllLinear",
    "quantized_from_float",
]

# The arrays of a quantized weight, packed along their last (input) axis.
QUANTIZED_PARAMETERS = ("weight", "scales", "biases")


@dataclass(frozen=True)
class QuantizationSpec:
    """A quantization MLX accepts, with defaults resolved.

    Attributes:
        group_size: Weights per scale (and bias).
        bits: Bits per weight.
        mode: The ``mx.quantize`` mode.
        has_biases: Whether the mode stores per-group biases (affine does).
    """

    group_size: int
    bits: int
    mode: str
    has_biases: bool


@functools.lru_cache(maxsize=None)
def quantization_spec(group_size: Optional[int], bits: Optional[int], mode: str) -> QuantizationSpec:
    """Ask this MLX build whether it quantizes with these settings, and resolve defaults.

    Args:
        group_size: Weights per scale, or None for the mode's default.
        bits: Bits per weight, or None for the mode's default.
        mode: The ``mx.quantize`` mode.

    Returns:
        The settings MLX would use.

    Raises:
        InvalidArgumentError: MLX rejects the combination (unknown mode,
            unsupported bits or group size).
    """
    if not isinstance(mode, str):
        raise InvalidArgumentError(f"mode must be a string, got {mode!r}")
    for name, value in (("group_size", group_size), ("bits", bits)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidArgumentError(f"{name} must be a positive int or None, got {value!r}")
    # A row of group_size * 32 weights packs into whole words for every bit width.
    columns = group_size * 32 if group_size else 4096
    try:
        quantized = mx.quantize(mx.zeros((1, columns)), group_size, bits, mode=mode)
        mx.eval(quantized)
    except (ValueError, RuntimeError) as exc:
        raise InvalidArgumentError(
            f"this MLX build cannot quantize with mode={mode!r}, group_size={group_size}, "
            f"bits={bits}: {exc}"
        ) from None
    packed, scales = quantized[0], quantized[1]
    return QuantizationSpec(
        group_size=columns // scales.shape[-1],
        bits=packed.shape[-1] * 32 // columns,
        mode=mode,
        has_biases=len(quantized) > 2,
    )


def quantized_input_dims(module: nn.Module | None) -> int | None:
    """The unpacked input features of a quantized module, or None if it is not one.

    Args:
        module: Any module (or None); quantized ones hold ``scales`` and an
            int ``group_size``.

    Returns:
        ``scales.shape[-1] * group_size``, or None.
    """
    group_size = getattr(module, "group_size", None)
    if isinstance(group_size, int) and "scales" in module and isinstance(module["scales"], mx.array):
        return int(module["scales"].shape[-1]) * group_size
    return None


def unpacked_length(name: str, array: mx.array, axis: int, input_dims: int | None) -> int:
    """The logical length of a parameter's axis: unpacked input features for a quantized array.

    Args:
        name: The parameter's name within its module (``"weight"``, ``"scales"``...).
        array: The parameter.
        axis: A non-negative axis of ``array``.
        input_dims: The owning module's unpacked input features, or None if
            it is not quantized.

    Returns:
        ``input_dims`` for the input axis of a quantized array, else the
        array's own length.
    """
    if input_dims is not None and name in QUANTIZED_PARAMETERS and axis == array.ndim - 1:
        return input_dims
    return array.shape[axis]


def _check_group_alignment(
    sharding: str,
    input_dims: int,
    segments: Segments,
    group: Group,
    spec: QuantizationSpec,
    sizes: Optional[Sizes] = None,
    ranges: Optional[Ranges] = None,
) -> None:
    """The input axis must hold whole quantization groups, and row-parallel shards cut between them."""
    if input_dims % spec.group_size:
        raise ShapeError(
            f"a quantized layer's input_dims={input_dims} must be a multiple of group_size={spec.group_size}"
        )
    if sharding != "sharded-to-all":
        return
    if sizes is not None or ranges is not None:
        try:
            given = f"sizes {list(sizes)}" if sizes is not None else f"ranges {list(ranges)}"
            cuts = (
                [v for row in ([sizes] if all(isinstance(v, int) for v in sizes) else sizes) for v in row]
                if sizes is not None
                else [v for rank in ranges for pair in rank for v in pair]
            )
        except TypeError:
            return  # malformed: shard_parameters names what is wrong
        if any(isinstance(v, int) and v % spec.group_size for v in cuts):
            raise ShapeError(
                f"cannot shard a quantized layer's input (input_dims={input_dims}) by {given}: every "
                f"rank's slice must be a whole number of quantization groups (group_size={spec.group_size})"
            )
        return
    bounds = segment_bounds(segments, input_dims)
    for start, stop in zip(bounds, bounds[1:]):
        local, remainder = divmod(stop - start, group.size())
        if remainder:
            continue  # left to the divisibility check, which names the segment
        if start % spec.group_size or local % spec.group_size:
            raise ShapeError(
                f"cannot shard a quantized layer's input across {group.size()} ranks: each rank's "
                f"input slice has {local} features (segment [{start}, {stop}) of input_dims="
                f"{input_dims}), not a multiple of group_size={spec.group_size}; "
                "(input_dims / N) % group_size must be 0 for each segment"
            )


def _quantize_weight(weight: mx.array, spec: QuantizationSpec) -> dict[str, mx.array]:
    quantized = mx.quantize(weight, spec.group_size, spec.bits, mode=spec.mode)
    return dict(zip(QUANTIZED_PARAMETERS, quantized))


class _QuantizedShardedLinear(ShardedLinearBase):
    group_size: int
    bits: int
    mode: str

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        bias: bool = True,
        group_size: Optional[int] = None,
        bits: Optional[int] = None,
        mode: str = "affine",
        group: Optional[Group] = None,
        *,
        key: KeyLike = None,
    ) -> None:
        super().__init__()
        check_dims(input_dims=input_dims, output_dims=output_dims)
        group = resolve_group(group)
        spec = quantization_spec(group_size, bits, mode)
        self._check_shardable(input_dims, output_dims, group)
        _check_group_alignment(self.sharding, input_dims, 1, group, spec)
        full = global_linear_parameters(input_dims, output_dims, False, agreed_key(group, key))
        local = shard_layer_parameters(full, self.sharding, 1, group)
        parameters = _quantize_weight(local["weight"], spec)
        if bias:
            parameters["bias"] = mx.zeros((local["weight"].shape[0],))
        self._install(group, parameters, **_config(spec))

    def _install(self, group: Group, parameters: dict[str, mx.array], **config: Any) -> None:
        super()._install(group, parameters, **config)
        self.freeze()

    def unfreeze(self, *args: Any, **kwargs: Any) -> "_QuantizedShardedLinear":
        """Unfreeze as ``nn.Module.unfreeze`` does, but keep this layer's own parameters frozen.

        Returns:
            The layer.
        """
        super().unfreeze(*args, **kwargs)
        self.freeze(recurse=False)
        return self

    @property
    def local_input_dims(self) -> int:
        """Input features of this rank's (quantized) weight."""
        return int(self["scales"].shape[-1]) * self.group_size

    def _product(self, x: mx.array) -> mx.array:
        return mx.quantized_matmul(
            x,
            self["weight"],
            scales=self["scales"],
            biases=self.get("biases"),
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )

    def _extra_repr(self) -> str:
        return f"{super()._extra_repr()}, group_size={self.group_size}, bits={self.bits}, mode={self.mode}"

    @classmethod
    def from_quantized_linear(
        cls: type[LayerT],
        quantized_linear_layer: nn.Module,
        segments: Segments = 1,
        group: Optional[Group] = None,
        *,
        sizes: Optional[Sizes] = None,
        ranges: Optional[Ranges] = None,
    ) -> LayerT:
        """Shard an ``nn.QuantizedLinear``: this rank keeps its slice of the packed weights.

        Args:
            quantized_linear_layer: The unsharded ``mlx.nn.QuantizedLinear``.
            segments: The fused parts of the sharded axis (int, split indices
                or fractions), in unpacked input or output features.
            group: The group (the world group when None).
            sizes: Each rank's length of the sharded axis (unpacked features;
                row-parallel: whole quantization groups), or None for equal shares.
            ranges: Each rank's ``(start, stop)`` ranges of the sharded axis
                (column-parallel ones may overlap), or None.

        Returns:
            The sharded quantized layer (frozen). No communication.

        Raises:
            TypeError: not an ``mlx.nn.QuantizedLinear``, or group is not an
                mlxdist group.
            InvalidArgumentError: bad segments.
            ShapeError: a segment not divisible by the group size, or a
                row-parallel slice that is not a whole number of
                quantization groups.
        """
        if not isinstance(quantized_linear_layer, nn.QuantizedLinear):
            raise ArgumentTypeError(
                "from_quantized_linear needs an mlx.nn.QuantizedLinear, "
                f"got {type(quantized_linear_layer).__name__}"
            )
        group = resolve_group(group)
        source = quantized_linear_layer
        spec = quantization_spec(source.group_size, source.bits, getattr(source, "mode", "affine"))
        input_dims = quantized_input_dims(source)
        _check_group_alignment(cls.sharding, input_dims, segments, group, spec, sizes, ranges)
        parameters = shard_layer_parameters(
            dict(source.parameters()),
            cls.sharding,
            segments,
            group,
            lambda name, array, axis: unpacked_length(name, array, axis, input_dims),
            sizes=sizes,
            ranges=ranges,
        )
        uneven = uneven_config(cls.sharding, source["weight"].shape, sizes, ranges, input_dims)
        return cls._assemble(group, parameters, **_config(spec), **uneven)


def _config(spec: QuantizationSpec) -> dict[str, Any]:
    return {"group_size": spec.group_size, "bits": spec.bits, "mode": spec.mode}


class QuantizedAllToShardedLinear(_QuantizedShardedLinear):
    """Column-parallel linear layer with a quantized weight (frozen).

    The quantized counterpart of :class:`mlxdist.nn.AllToShardedLinear`:
    rank ``r`` holds rows ``[r * out / N, (r + 1) * out / N)`` of ``weight``,
    ``scales``, ``biases`` and ``bias``.

    Args:
        input_dims: Input features (a multiple of group_size).
        output_dims: Output features of the whole layer (divisible by the
            group size).
        bias: Whether the layer has a bias (zeros initially, as in
            ``nn.QuantizedLinear``).
        group_size: Weights per scale; None for the mode's default.
        bits: Bits per weight; None for the mode's default.
        mode: An ``mx.quantize`` mode (``"affine"``, ``"mxfp4"``, ``"mxfp8"``,
            ``"nvfp4"``, as this MLX build supports).
        group: The :class:`mlxdist.Group` (the world group when None).
        key: Seed or key of the float weights quantized at construction;
            None draws one on rank 0 and broadcasts it.

    Raises:
        InvalidArgumentError: bad dims or a quantization MLX rejects.
        ShapeError: output_dims not divisible by the group size.
    """

    sharding: ClassVar[str] = "all-to-sharded"


class QuantizedShardedToAllLinear(_QuantizedShardedLinear):
    """Row-parallel linear layer with a quantized weight (frozen).

    The quantized counterpart of :class:`mlxdist.nn.ShardedToAllLinear`: rank
    ``r`` holds input features ``[r * in / N, (r + 1) * in / N)`` of the packed
    weight, its scales and biases, and the whole ``bias``, added after the
    all-sum.

    Args:
        input_dims: Input features of the whole layer; ``input_dims / N``
            must be a multiple of group_size.
        output_dims: Output features.
        bias: Whether the layer has a bias (zeros initially).
        group_size: Weights per scale; None for the mode's default.
        bits: Bits per weight; None for the mode's default.
        mode: An ``mx.quantize`` mode.
        group: The :class:`mlxdist.Group` (the world group when None).
        key: As for :class:`QuantizedAllToShardedLinear`.

    Raises:
        InvalidArgumentError: bad dims or a quantization MLX rejects.
        ShapeError: input_dims not divisible by the group size, or
            ``(input_dims / N) % group_size != 0``.
    """

    sharding: ClassVar[str] = "sharded-to-all"


_QUANTIZED_OF = {
    "all-to-sharded": QuantizedAllToShardedLinear,
    "sharded-to-all": QuantizedShardedToAllLinear,
}


def quantized_from_float(
    layer: ShardedLinearBase,
    group_size: Optional[int],
    bits: Optional[int],
    mode: str,
    quantize_input: bool = False,
) -> ShardedLinearBase:
    """Quantize a float sharded layer's local shard into the matching quantized layer.

    Args:
        layer: An :class:`AllToShardedLinear` or :class:`ShardedToAllLinear`.
        group_size: Weights per scale (None: the mode's default).
        bits: Bits per weight (None: the mode's default).
        mode: An ``mx.quantize`` mode.
        quantize_input: Must be False (activation quantization is not
            supported for sharded layers).

    Returns:
        A :class:`QuantizedAllToShardedLinear` or :class:`QuantizedShardedToAllLinear`.

    Raises:
        UnsupportedOperationError: quantize_input is True.
        InvalidArgumentError: a quantization MLX rejects.
        ShapeError: the local input dimension is not a multiple of group_size.
    """
    if quantize_input:
        raise UnsupportedOperationError("quantize_input=True is not supported for sharded linear layers")
    spec = quantization_spec(group_size, bits, mode)
    local_inputs = layer.local_input_dims
    if local_inputs % spec.group_size:
        raise ShapeError(
            f"cannot quantize {type(layer).__name__} with group_size={spec.group_size}: its local input "
            f"dimension {local_inputs} (input_dims / N for row-parallel layers) is not a multiple of it"
        )
    parameters = _quantize_weight(layer["weight"], spec)
    if "bias" in layer:
        parameters["bias"] = layer["bias"]
    uneven = {} if layer.sharded_dims is None else {"sharded_dims": layer.sharded_dims}
    return _QUANTIZED_OF[layer.sharding]._assemble(layer.group, parameters, **_config(spec), **uneven)
