"""Which parallelism a model gets on a group, and why: family layouts, checks, the dispatcher.

A :class:`FamilyLayout` says where a family's mlx-lm model keeps what
sharding touches (the decoder blocks, the projections, the head counts on the
attention module). :func:`choose` checks tensor parallelism's constraints on
the loaded (still lazy) model, and picks TP when every one holds, else
pipeline parallelism, else raises.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field
from typing import Optional, Sequence

import mlx.nn as nn

from mlxdist.errors import InvalidArgumentError, ShapeError, UnsupportedOperationError
from mlxdist.nn.quantized import quantized_input_dims

__all__ = ["MODES", "FamilyLayout", "LAYOUTS", "Plan", "layout_of", "tp_violations", "layer_ranges", "choose"]

logger = logging.getLogger("mlxdist.lm")

MODES = ("auto", "tp", "pp")


@dataclass(frozen=True)
class FamilyLayout:
    """Where a decoder-only family's mlx-lm model keeps what sharding touches.

    Attributes:
        column: Projections of a block made column-parallel (all-to-sharded).
        row: Projections made row-parallel (sharded-to-all).
        attention: The block's attention module.
        head_counts: Attributes of the attention module holding head counts,
            divided by the group size under TP.
    """

    column: tuple[str, ...] = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
    )
    row: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    attention: str = "self_attn"
    head_counts: tuple[str, ...] = ("n_heads", "n_kv_heads")


# mlx-lm model module -> layout. Every listed family has model.model.{embed_tokens,
# layers, norm}, and mistral checkpoints load through mlx_lm.models.llama.
LAYOUTS: dict[str, FamilyLayout] = {
    "mlx_lm.models.llama": FamilyLayout(),
    "mlx_lm.models.qwen2": FamilyLayout(),
    "mlx_lm.models.qwen3": FamilyLayout(),
}


@dataclass
class Plan:
    """How a model is split over a group.

    Attributes:
        mode: ``"tp"``, ``"pp"`` or ``"single"`` (a group of one process).
        reason: Why this mode, in one sentence.
        family: The checkpoint's ``model_type``.
        rank: This process's rank.
        size: The group size.
        layers: ``(start, stop)`` of the decoder blocks each rank runs (all
            of them on every rank unless PP).
        weight_bytes: Bytes of this rank's parameters after sharding.
        full_bytes: Bytes of the whole checkpoint's parameters.
        sharded_full_bytes: Of ``full_bytes``, the parameters TP splits (or PP
            distributes: the decoder blocks).
        seconds: How long :func:`mlxdist.lm.load` spent: ``"plan"`` (choosing
            the plan), ``"load"`` (the rest: reading the checkpoint, sharding
            it and evaluating this rank's weights block by block, the tokenizer).
    """

    mode: str
    reason: str
    family: str
    rank: int
    size: int
    layers: list[tuple[int, int]] = field(default_factory=list)
    weight_bytes: int = 0
    full_bytes: int = 0
    sharded_full_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def replicated_bytes(self) -> int:
        """Bytes every rank holds whole (embeddings, norms, head)."""
        return self.full_bytes - self.sharded_full_bytes

    def as_dict(self) -> dict:
        """The plan as JSON-ready data."""
        return {
            "mode": self.mode,
            "reason": self.reason,
            "family": self.family,
            "rank": self.rank,
            "size": self.size,
            "layers": [list(r) for r in self.layers],
            "weight_bytes": self.weight_bytes,
            "full_bytes": self.full_bytes,
            "sharded_full_bytes": self.sharded_full_bytes,
        }


def layout_of(model: nn.Module) -> Optional[FamilyLayout]:
    """The layout of a loaded mlx-lm model, or None if its family has none."""
    return LAYOUTS.get(type(model).__module__)


def _module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _linear_dims(module: nn.Module) -> tuple[int, int, Optional[int]]:
    """(output features, input features, quantization group size or None)."""
    input_dims = quantized_input_dims(module)
    if input_dims is not None:
        return int(module["weight"].shape[0]), input_dims, int(module.group_size)
    if isinstance(module, nn.Linear):
        return int(module["weight"].shape[0]), int(module["weight"].shape[1]), None
    raise UnsupportedOperationError(
        f"tensor parallelism shards nn.Linear and nn.QuantizedLinear, not {type(module).__name__}"
    )


def tp_violations(model: nn.Module, layout: FamilyLayout, size: int) -> list[str]:
    """The tensor-parallel constraints a model breaks on ``size`` ranks.

    Checked for every decoder block: each head count divisible by ``size``;
    each column-parallel projection's output features divisible by ``size``;
    each row-parallel projection's input features divisible by ``size`` and,
    when quantized, ``input / size`` a multiple of the quantization group size.

    Args:
        model: A loaded mlx-lm model of the layout's family (weights may be lazy).
        layout: Its family layout.
        size: The group size.

    Returns:
        One message per distinct broken constraint (empty: TP is valid).

    Raises:
        UnsupportedOperationError: a projection is neither ``nn.Linear`` nor
            ``nn.QuantizedLinear``.
    """
    found: dict[str, str] = {}
    for index, block in enumerate(model.model.layers):
        where = f"layers.{index}"
        attention = _module(block, layout.attention)
        for name in layout.head_counts:
            count = int(getattr(attention, name))
            if count % size:
                found.setdefault(
                    name, f"{name}={count} is not divisible by {size} ranks ({where}.{layout.attention})"
                )
        for path in layout.column:
            out_dims, _, _ = _linear_dims(_module(block, path))
            if out_dims % size:
                found.setdefault(
                    path, f"{path} output features {out_dims} are not divisible by {size} ranks ({where})"
                )
        for path in layout.row:
            _, in_dims, group_size = _linear_dims(_module(block, path))
            if in_dims % size:
                found.setdefault(
                    path, f"{path} input features {in_dims} are not divisible by {size} ranks ({where})"
                )
            elif group_size and (in_dims // size) % group_size:
                found.setdefault(
                    path,
                    f"quantized {path}: input features per rank {in_dims}/{size}={in_dims // size} are not "
                    f"a multiple of group_size={group_size} ({where})",
                )
    return list(found.values())


def layer_ranges(
    num_layers: int, size: int, weights: Optional[Sequence[float]] = None
) -> list[tuple[int, int]]:
    """Contiguous decoder-block ranges, one per rank, in rank order.

    Args:
        num_layers: Decoder blocks in the model.
        size: Ranks.
        weights: One positive number per rank (e.g. its memory); a rank's
            share of the blocks is proportional to it. None: equal shares
            (earlier ranks take the remainder).

    Returns:
        ``[(start, stop), ...]``, covering ``range(num_layers)``, each with at
        least one block.

    Raises:
        InvalidArgumentError: fewer blocks than ranks, or weights of the wrong
            length or not all positive.
    """
    if num_layers < size:
        raise InvalidArgumentError(
            "pipeline parallelism needs at least one decoder block per rank: "
            f"{num_layers} blocks, {size} ranks"
        )
    if weights is None:
        weights = [1.0] * size
    weights = list(weights)
    if len(weights) != size or any(
        isinstance(w, bool) or not isinstance(w, numbers.Real) or not w > 0 for w in weights
    ):
        raise InvalidArgumentError(f"weights must be {size} positive numbers (one per rank), got {weights!r}")
    total = float(sum(weights))
    # One block each, the rest by largest remainder of the weighted shares.
    shares = [(num_layers - size) * w / total for w in weights]
    counts = [1 + int(s) for s in shares]
    order = sorted(range(size), key=lambda r: (-(shares[r] - int(shares[r])), r))
    for r in order[: num_layers - sum(counts)]:
        counts[r] += 1
    starts = [sum(counts[:r]) for r in range(size)]
    return [(start, start + count) for start, count in zip(starts, counts)]


def choose(
    model: nn.Module,
    family: str,
    rank: int,
    size: int,
    mode: str = "auto",
    pp_weights: Optional[Sequence[float]] = None,
) -> Plan:
    """Pick the parallelism for a model on a group, and log the choice in one line.

    Args:
        model: The loaded (lazy) mlx-lm model.
        family: Its ``model_type`` (for messages).
        rank: This process's rank.
        size: The group size.
        mode: ``"auto"`` (TP when valid, else PP), ``"tp"`` or ``"pp"``.
        pp_weights: Per-rank weights for PP's block ranges.

    Returns:
        The :class:`Plan` (byte counts not yet filled in).

    Raises:
        InvalidArgumentError: unknown mode, or PP impossible (fewer blocks
            than ranks, bad weights).
        UnsupportedOperationError: no layout for the family (any mode on more
            than one rank).
        ShapeError: ``mode="tp"`` and a TP constraint is broken (the message
            names it).
    """
    if mode not in MODES:
        raise InvalidArgumentError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    num_layers = len(model.model.layers) if hasattr(model, "model") and hasattr(model.model, "layers") else 0
    everything = [(0, num_layers)] * size
    if size == 1:
        plan = Plan("single", "a group of one process: nothing to shard", family, rank, size, everything)
        logger.info("mlxdist.lm: %s: %s", plan.mode, plan.reason)
        return plan
    layout = layout_of(model)
    if layout is None:
        raise UnsupportedOperationError(
            f"mlxdist.lm has no sharding plan for model_type {family!r} ({type(model).__module__}); "
            f"supported: {', '.join(sorted(m.rsplit('.', 1)[1] for m in LAYOUTS))} (and mistral)"
        )
    if mode in ("auto", "tp"):
        broken = tp_violations(model, layout, size)
        if not broken:
            plan = Plan(
                "tp",
                f"tensor parallel over {size} ranks: every head count and projection divides",
                family,
                rank,
                size,
                everything,
            )
            logger.info("mlxdist.lm: %s: %s", plan.mode, plan.reason)
            return plan
        if mode == "tp":
            raise ShapeError(f"{family} cannot be tensor-parallel over {size} ranks: " + "; ".join(broken))
        why = f"tensor parallel impossible ({'; '.join(broken)}), so pipeline parallel"
    else:
        why = "pipeline parallel as requested"
    ranges = layer_ranges(num_layers, size, pp_weights)
    spans = ", ".join(f"rank {r}: blocks [{a}, {b})" for r, (a, b) in enumerate(ranges))
    plan = Plan("pp", f"{why} over {size} ranks ({spans})", family, rank, size, ranges)
    logger.info("mlxdist.lm: %s: %s", plan.mode, plan.reason)
    return plan
