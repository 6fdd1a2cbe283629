"""Mixture-of-experts layers over ranks: experts split (TP) or placed whole (EP).

mlx-lm builds its MoE blocks from switch layers: ``SwitchGLU`` (``gate_proj``,
``up_proj``, ``down_proj``) and ``SwitchMLP`` (``fc1``, ``fc2``), whose
projections hold one weight per expert (``[experts, out, in]``, float or
quantized, optionally a per-expert ``bias``) and are called with the router's
top-k ``indices``. This module recognises them by that shape (it does not
import mlx-lm) and shards them two ways:

- :func:`shard_switch` (tensor parallelism): every expert's intermediate
  features split across the ranks, evenly or by per-rank ``sizes`` (whole
  quantization groups where the down projection is quantized).
- :func:`place_experts` (expert parallelism): each rank keeps whole experts,
  a contiguous range from :func:`expert_placement` (proportional to the
  ranks' weights), and computes only the router's slots that fall on them.

Either way the switch's output becomes a partial sum over the ranks, and
:class:`MoEAllSum` (:mod:`mlxdist.nn.moe_sum`) wraps the MoE block to sum
it once per block. The router stays replicated, so every rank routes every
token identically and no dispatch of activations is needed. The EP layer
classes are in :mod:`mlxdist.nn.expert_layers`.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxdist.errors import ArgumentTypeError, InvalidArgumentError, ShapeError
from mlxdist.group import Group
from mlxdist.world import resolve_group
from mlxdist.nn.expert_layers import SELECT_MIN_SLOTS, ExpertLinear, LocalSlots, local_class
from mlxdist.nn.moe_sum import MoEAllSum
from mlxdist.nn.quantized import QUANTIZED_PARAMETERS, quantized_input_dims, unpacked_length
from mlxdist.nn.shares import split_sizes
from mlxdist.nn.slicing import ShardingRule, shard_parameters, take_ranges

__all__ = [
    "MoEAllSum",  # from mlxdist.nn.moe_sum, with the functions that produce its partial sums
    "expert_placement",
    "place_experts",
    "place_experts_at",
    "shard_switch",
    "shard_switch_at",
    "switch_projections",
]

# (projections fed by the block's input, the projection whose output is the switch's)
_LAYOUTS = ((("gate_proj", "up_proj"), "down_proj"), (("fc1",), "fc2"))


def _is_count(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def switch_projections(switch: nn.Module) -> tuple[tuple[str, ...], str]:
    """The projections of an mlx-lm switch layer: those fed by its input, and the output one.

    Args:
        switch: A ``SwitchGLU`` or ``SwitchMLP`` (or a module laid out like
            one: projections holding a 3-D ``weight`` of one matrix per expert).

    Returns:
        ``(("gate_proj", "up_proj"), "down_proj")`` or ``(("fc1",), "fc2")``.

    Raises:
        ArgumentTypeError: ``switch`` is not laid out as a switch layer.
    """
    if isinstance(switch, nn.Module):
        for feeds, out in _LAYOUTS:
            names = (*feeds, out)
            if all(
                isinstance(switch.get(name), nn.Module)
                and isinstance(switch[name].get("weight"), mx.array)
                and switch[name]["weight"].ndim == 3
                for name in names
            ):
                return feeds, out
    raise ArgumentTypeError(
        f"expected an mlx-lm switch layer (SwitchGLU with gate_proj/up_proj/down_proj or SwitchMLP with "
        f"fc1/fc2, each holding a [experts, out, in] weight), got {type(switch).__name__}"
    )


def _num_experts(switch: nn.Module, names: Sequence[str]) -> int:
    counts = {int(switch[name]["weight"].shape[0]) for name in names}
    if len(counts) != 1:
        raise ShapeError(f"the switch's projections hold different numbers of experts: {sorted(counts)}")
    return counts.pop()


def _input_dims(module: nn.Module) -> int:
    quantized = quantized_input_dims(module)
    return int(module["weight"].shape[-1]) if quantized is None else quantized


def expert_placement(num_experts: int, weights: int | Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous expert ranges per rank, in rank order, in proportion to the ranks' weights.

    Counts go by largest remainder of the weighted shares (equal weights: as
    even as possible, the larger counts on the lower ranks), every rank at
    least one expert.

    Args:
        num_experts: The number of routed experts.
        weights: The number of ranks (equal weights) or one positive number
            per rank (e.g. its memory).

    Returns:
        One ``(start, stop)`` per rank, covering ``[0, num_experts)`` in order.

    Raises:
        InvalidArgumentError: ``num_experts`` not a positive int, or bad
            weights (not a rank count or positive numbers).
        ShapeError: more ranks than experts (a rank would hold none).
    """
    if not _is_count(num_experts) or num_experts < 1:
        raise InvalidArgumentError(f"num_experts must be a positive int, got {num_experts!r}")
    ranks = int(weights) if _is_count(weights) else len(weights) if isinstance(weights, Sequence) else 0
    if _is_count(weights) and weights < 1:
        raise InvalidArgumentError(f"weights must be a rank count >= 1 or positive numbers, got {weights!r}")
    if ranks > num_experts:
        raise ShapeError(
            f"cannot place {num_experts} experts on {ranks} ranks: expert parallelism needs at least one "
            "expert per rank (use fewer ranks, or split the experts with tensor parallelism)"
        )
    counts = split_sizes(int(num_experts), weights)
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + count)
    return list(zip(bounds, bounds[1:]))


def _check_placement(placement: object, size: int, num_experts: int) -> list[tuple[int, int]]:
    if isinstance(placement, (str, bytes)) or not isinstance(placement, Sequence) or len(placement) != size:
        raise InvalidArgumentError(
            f"placement must hold one (start, stop) expert range per rank ({size}), got {placement!r}"
        )
    ranges = []
    for pair in placement:
        if not isinstance(pair, Sequence) or len(pair) != 2 or not all(_is_count(v) for v in pair):
            raise InvalidArgumentError(f"placement entries must be (start, stop) ints, got {pair!r}")
        ranges.append((int(pair[0]), int(pair[1])))
    stops = [0] + [stop for _, stop in ranges]
    if [start for start, _ in ranges] != stops[:-1] or stops[-1] != num_experts:
        raise ShapeError(
            f"placement {ranges} must cover the {num_experts} experts in order, contiguously and once"
        )
    if any(stop <= start for start, stop in ranges):
        raise ShapeError(f"placement {ranges} leaves a rank without an expert: every rank needs at least one")
    return ranges


# -- tensor parallelism -------------------------------------------------------


def _column_rule(path: str, array: mx.array) -> ShardingRule:
    name = path.rsplit(".", 1)[-1]
    if name in QUANTIZED_PARAMETERS or name == "bias":
        return 1  # [experts, out, ...]: the output features
    return None


def _row_rule(path: str, array: mx.array) -> ShardingRule:
    name = path.rsplit(".", 1)[-1]
    return array.ndim - 1 if name in QUANTIZED_PARAMETERS else None


def shard_switch_at(
    switch: nn.Module, *, rank: int, size: int, sizes: Optional[Sequence[int]] = None
) -> nn.Module:
    """:func:`shard_switch` for an explicit ``rank`` of ``size`` ranks (no group needed).

    What :func:`shard_switch` does with its group's rank and size; a planner
    or a one-process check of every rank's shard calls it directly.

    Args:
        switch: An mlx-lm ``SwitchGLU`` or ``SwitchMLP``, float or quantized.
        rank: The rank whose shard to keep.
        size: The number of ranks.
        sizes: Each rank's count of intermediate features, or None for equal shares.

    Returns:
        ``switch``, updated in place.

    Raises:
        ArgumentTypeError: not a switch layer.
        InvalidArgumentError: bad rank, size or sizes.
        ShapeError: features not divisible by ``size`` (without ``sizes``),
            sizes not adding up to the features, or a down projection that is
            quantized and a rank's features not whole quantization groups.
    """
    feeds, out = switch_projections(switch)
    if isinstance(switch, LocalSlots):
        raise InvalidArgumentError("this switch's experts are placed whole (expert parallelism): not split too")
    if not _is_count(size) or size < 1 or not _is_count(rank) or not 0 <= rank < size:
        raise InvalidArgumentError(f"rank={rank!r} and size={size!r} must satisfy 0 <= rank < size")
    hidden = _input_dims(switch[out])
    for name in feeds:
        if switch[name]["weight"].shape[1] != hidden:
            raise ShapeError(
                f"{name} has {switch[name]['weight'].shape[1]} output features but {out} takes {hidden}"
            )
    if sizes is None:
        if hidden % size:
            raise ShapeError(
                f"cannot split the experts' {hidden} intermediate features evenly across {size} ranks: "
                "give per-rank sizes (mlxdist.nn.split_sizes)"
            )
        sizes = [hidden // size] * size
    group_size = getattr(switch[out], "group_size", None) if quantized_input_dims(switch[out]) else None
    if group_size and any(_is_count(v) and v % group_size for v in sizes):
        raise ShapeError(
            f"cannot split the experts' quantized {out} by sizes {list(sizes)}: every rank's slice of its "
            f"{hidden} input features must be whole quantization groups (group_size={group_size})"
        )
    updates = {}
    for name, rule in [(name, _column_rule) for name in feeds] + [(out, _row_rule)]:
        module = switch[name]
        dims = quantized_input_dims(module)
        updates[name] = dict(
            shard_parameters(
                tree_flatten(module.parameters()),
                rule,
                size,
                rank,
                lambda path, array, axis, dims=dims: unpacked_length(path, array, axis, dims),
                sizes=list(sizes),
            )
        )
    for name, parameters in updates.items():
        switch[name].update(parameters)
    if "bias" in switch[out] and rank != 0:
        # Added once to the ranks' sum: rank 0 keeps it, so the sum is exact.
        switch[out].update({"bias": mx.zeros_like(switch[out]["bias"])})
    return switch


def shard_switch(switch: nn.Module, *, group: Optional[Group] = None, sizes: Optional[Sequence[int]] = None) -> nn.Module:
    """Split every expert's intermediate features across the ranks (tensor parallelism), in place.

    ``gate_proj``/``up_proj`` (``fc1``) keep this rank's output features,
    ``down_proj`` (``fc2``) the matching input features, for every expert;
    a down-projection ``bias`` (gpt-oss) stays on rank 0 and is zero
    elsewhere. The switch is then called as before, with the router's
    indices, and returns this rank's PARTIAL sum: summing it over the ranks
    (:class:`MoEAllSum`, once per block) gives the unsharded output.

    Args:
        switch: An mlx-lm ``SwitchGLU`` or ``SwitchMLP``, float or quantized
            (the same weights on every rank).
        group: The :class:`mlxdist.Group` (the world group when None).
        sizes: Each rank's count of intermediate features (e.g.
            ``split_sizes(features, weights, unit=group_size)``), or None for
            equal shares.

    Returns:
        ``switch``, updated in place. No communication.

    Raises:
        ArgumentTypeError: not a switch layer, or group not an mlxdist group.
        InvalidArgumentError: malformed sizes.
        ShapeError: features not divisible by the group size (without
            ``sizes``), sizes not adding up, or a quantized down projection
            cut inside a quantization group.
    """
    group = resolve_group(group)
    return shard_switch_at(switch, rank=group.rank(), size=group.size(), sizes=sizes)


# -- expert parallelism -------------------------------------------------------


def place_experts_at(
    switch: nn.Module,
    *,
    rank: int,
    size: int,
    placement: Sequence[tuple[int, int]],
    select_min_slots: Optional[int] = SELECT_MIN_SLOTS,
) -> nn.Module:
    """:func:`place_experts` for an explicit ``rank`` of ``size`` ranks (no group needed).

    Args:
        switch: An mlx-lm ``SwitchGLU`` or ``SwitchMLP``, float or quantized.
        rank: The rank whose experts to keep.
        size: The number of ranks.
        placement: One ``(start, stop)`` per rank (:func:`expert_placement`).
        select_min_slots: From this many routed slots on, compute only the
            local ones (see :class:`LocalSlots`); None: fixed shapes always.

    Returns:
        ``switch``, its projections replaced by :class:`ExpertLinear` and its
        class by a subclass adding :class:`LocalSlots`.

    Raises:
        ArgumentTypeError: not a switch layer.
        InvalidArgumentError: bad rank, size, placement entries or
            select_min_slots, or a switch already placed.
        ShapeError: a placement that does not cover the experts in order,
            or leaves a rank none.
    """
    feeds, out = switch_projections(switch)
    if isinstance(switch, LocalSlots):
        raise InvalidArgumentError("this switch's experts are already placed")
    if select_min_slots is not None and (not _is_count(select_min_slots) or select_min_slots < 1):
        raise InvalidArgumentError(f"select_min_slots must be a positive int or None, got {select_min_slots!r}")
    if not _is_count(size) or size < 1 or not _is_count(rank) or not 0 <= rank < size:
        raise InvalidArgumentError(f"rank={rank!r} and size={size!r} must satisfy 0 <= rank < size")
    ranges = _check_placement(placement, size, _num_experts(switch, (*feeds, out)))
    start, stop = ranges[rank]
    replaced = {}
    for name in (*feeds, out):
        module = switch[name]
        parameters = {
            key: take_ranges(value, 0, [(start, stop)])
            for key, value in tree_flatten(module.parameters())
            if isinstance(value, mx.array)
        }
        quantization = None
        if quantized_input_dims(module) is not None:
            quantization = (int(module.group_size), int(module.bits), str(getattr(module, "mode", "affine")))
        replaced[name] = ExpertLinear(parameters, start, masks=name == out, quantization=quantization)
    for name, layer in replaced.items():
        switch[name] = layer
    switch.__class__ = local_class(type(switch))
    switch.expert_first, switch.expert_count = start, stop - start
    switch.select_min_slots = select_min_slots
    return switch


def place_experts(
    switch: nn.Module,
    *,
    group: Optional[Group] = None,
    placement: Sequence[tuple[int, int]],
    select_min_slots: Optional[int] = SELECT_MIN_SLOTS,
) -> nn.Module:
    """Keep only this rank's experts, whole (expert parallelism), in place.

    Every projection of the switch is replaced by an :class:`ExpertLinear`
    holding this rank's range of experts (float or quantized, any feature
    count). Called as before with the router's GLOBAL top-k indices, the
    switch computes the slots of its own experts and gives exact zeros for
    the others': its output is a PARTIAL sum whose sum over the ranks
    (:class:`MoEAllSum`) equals the unsharded switch's output.

    Args:
        switch: An mlx-lm ``SwitchGLU`` or ``SwitchMLP``.
        group: The :class:`mlxdist.Group` (the world group when None).
        placement: One ``(start, stop)`` expert range per rank, e.g. from
            :func:`expert_placement`.
        select_min_slots: From this many routed slots on (prefill, batches),
            compute only the slots of local experts, after one host
            synchronisation; below it, or when None (for ``mx.compile``),
            every slot runs on a local expert and the others' are zeroed.

    Returns:
        ``switch``, updated in place (its class gains :class:`LocalSlots`).
        No communication.

    Raises:
        ArgumentTypeError: not a switch layer, or group not an mlxdist group.
        InvalidArgumentError, ShapeError: a placement that is not one
            non-empty contiguous range per rank covering every expert.
    """
    group = resolve_group(group)
    return place_experts_at(
        switch, rank=group.rank(), size=group.size(), placement=placement, select_min_slots=select_min_slots
    )
