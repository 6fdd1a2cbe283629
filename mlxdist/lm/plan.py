"""Which parallelism a model gets on a group, and why: family layouts, checks, the dispatcher.

A :class:`FamilyLayout` says where a family's mlx-lm model keeps what
sharding touches (the decoder blocks, the projections, the head counts on the
attention module). :func:`choose` picks, on the loaded (still lazy) model,
even tensor parallelism when every head count and projection divides by the
group size, else uneven tensor parallelism (:mod:`mlxdist.lm.split`) when
every rank can get a query head (and quantized slices fall on whole groups),
else pipeline parallelism, else raises.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field
from typing import Optional, Sequence

import mlx.nn as nn

from mlxdist.errors import InvalidArgumentError, ShapeError, UnsupportedOperationError
from mlxdist.lm.split import TensorSplit, check_weights, tensor_split
from mlxdist.nn.quantized import quantized_input_dims

__all__ = [
    "MODES",
    "FamilyLayout",
    "LAYOUTS",
    "Plan",
    "layout_of",
    "tp_violations",
    "model_split",
    "layer_ranges",
    "choose",
]

logger = logging.getLogger("mlxdist.lm")

MODES = ("auto", "tp", "pp")


@dataclass(frozen=True)
class FamilyLayout:
    """Where a decoder-only family's mlx-lm model keeps what sharding touches.

    Attributes:
        column: Projections of a block made column-parallel (all-to-sharded).
        row: Projections made row-parallel (sharded-to-all).
        attention: The block's attention module.
        head_counts: Attributes of the attention module holding the query
            and key/value head counts, set to each rank's under TP.
        query: Projections split with the query heads (q, and o's input).
        key_value: Projections split with the key/value heads.
        mlp: Projections split with the MLP intermediate features.
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
    query: tuple[str, ...] = ("self_attn.q_proj", "self_attn.o_proj")
    key_value: tuple[str, ...] = ("self_attn.k_proj", "self_attn.v_proj")
    mlp: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


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
        split: Under TP, each rank's query heads, key/value heads, MLP
            features and vocabulary rows.
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
    split: Optional[TensorSplit] = None
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
            "shares": None if self.split is None else self.split.as_dict(),
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


def model_split(
    model: nn.Module,
    layout: FamilyLayout,
    size: int,
    weights: Optional[Sequence[float]] = None,
    vocab_parallel: bool = False,
) -> TensorSplit:
    """Each rank's share of a model under tensor parallelism (see :func:`mlxdist.lm.split.tensor_split`).

    Args:
        model: A loaded mlx-lm model of the layout's family (weights may be lazy).
        layout: Its family layout.
        size: The group size.
        weights: Per-rank TP weights (None: equal shares).
        vocab_parallel: Also split the vocabulary (embedding and head).

    Returns:
        The split, the same for every block.

    Raises:
        ShapeError: a rank would get no query head, the blocks differ in
            shape, or a quantized row-parallel slice (attention output or MLP)
            is not a whole number of quantization groups.
        UnsupportedOperationError: a projection is neither ``nn.Linear`` nor
            ``nn.QuantizedLinear``.
    """
    shapes = set()
    for block in model.model.layers:
        attention = _module(block, layout.attention)
        n_heads, n_kv = (int(getattr(attention, name)) for name in layout.head_counts)
        query_out, hidden, _ = _linear_dims(_module(block, layout.query[0]))
        intermediate, _, _ = _linear_dims(_module(block, layout.mlp[0]))
        _, _, o_group = _linear_dims(_module(block, layout.query[-1]))
        _, _, down_group = _linear_dims(_module(block, layout.mlp[-1]))
        shapes.add((n_heads, n_kv, query_out // n_heads, intermediate, o_group or 1, down_group or 1, hidden))
    if len(shapes) != 1:
        raise ShapeError(f"tensor parallelism needs decoder blocks of one shape, found {sorted(shapes)}")
    ((n_heads, n_kv, head_dim, intermediate, o_unit, mlp_unit, hidden),) = shapes
    vocab = int(model.model.embed_tokens.weight.shape[0]) if vocab_parallel else None
    split = tensor_split(
        n_heads, n_kv, head_dim, intermediate, size, weights, mlp_unit=mlp_unit, vocab=vocab, hidden=hidden
    )
    misaligned = [q for q in split.query_sizes if q % o_unit]
    if misaligned:
        raise ShapeError(
            f"quantized {layout.query[-1]}: query features per rank {split.query_sizes} "
            f"({head_dim} per head) are not multiples of group_size={o_unit}"
        )
    return split


def choose(
    model: nn.Module,
    family: str,
    rank: int,
    size: int,
    mode: str = "auto",
    pp_weights: Optional[Sequence[float]] = None,
    *,
    tp_weights: Optional[Sequence[float]] = None,
    vocab_parallel: bool = False,
) -> Plan:
    """Pick the parallelism for a model on a group, and log the choice in one line.

    Even tensor parallelism when every head count and projection divides
    (and no ``tp_weights``), else uneven tensor parallelism when every rank
    gets at least one query head, else pipeline parallelism.

    Args:
        model: The loaded (lazy) mlx-lm model.
        family: Its ``model_type`` (for messages).
        rank: This process's rank.
        size: The group size.
        mode: ``"auto"`` (TP when valid, else PP), ``"tp"`` or ``"pp"``.
        pp_weights: Per-rank weights for PP's block ranges.
        tp_weights: Per-rank weights for TP's shares (e.g. ``[2, 1]`` for a
            rank twice as fast); None: as even as the heads allow.
        vocab_parallel: Under TP, also split the embedding and head by
            vocabulary rows.

    Returns:
        The :class:`Plan` (byte counts not yet filled in; ``split`` set under TP).

    Raises:
        InvalidArgumentError: unknown mode, bad weights, or PP impossible
            (fewer blocks than ranks).
        UnsupportedOperationError: no layout for the family (any mode on more
            than one rank).
        ShapeError: ``mode="tp"`` and TP impossible: a rank would get no query
            head, or a quantized slice would cut a quantization group (the
            message names it).
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
    if tp_weights is not None:
        tp_weights = check_weights(tp_weights, size, "tp_weights")
    if mode in ("auto", "tp"):
        broken = tp_violations(model, layout, size)
        try:
            split = model_split(model, layout, size, tp_weights, vocab_parallel)
        except ShapeError as exc:
            if mode == "tp":
                raise ShapeError(f"{family} cannot be tensor-parallel over {size} ranks: {exc}") from None
            why = f"tensor parallel impossible ({'; '.join(broken + [str(exc)])}), so pipeline parallel"
        else:
            if not broken and tp_weights is None:
                how = f"tensor parallel over {size} ranks: every head count and projection divides"
            elif broken:
                more = f", and {len(broken) - 1} more" if len(broken) > 1 else ""
                how = f"uneven tensor parallel over {size} ranks ({broken[0]}{more})"
            else:
                how = f"uneven tensor parallel over {size} ranks by tp weights {tp_weights}"
            plan = Plan("tp", f"{how}: {split.describe()}", family, rank, size, everything, split=split)
            logger.info("mlxdist.lm: %s: %s", plan.mode, plan.reason)
            return plan
    else:
        why = "pipeline parallel as requested"
    ranges = layer_ranges(num_layers, size, pp_weights)
    spans = ", ".join(f"rank {r}: blocks [{a}, {b})" for r, (a, b) in enumerate(ranges))
    plan = Plan("pp", f"{why} over {size} ranks ({spans})", family, rank, size, ranges)
    logger.info("mlxdist.lm: %s: %s", plan.mode, plan.reason)
    return plan
