"""Which parallelism a model gets on a group, and why: the dispatcher and the plan.

:func:`choose` picks, on the loaded (still lazy) model, even tensor
parallelism when every head count and projection divides by the group size,
else uneven tensor parallelism (:mod:`mlxdist.lm.split`) when every rank can
get a query head (and quantized slices fall on whole groups), else pipeline
parallelism, else raises. What TP can do with a model comes from the kinds
of its blocks' modules (:mod:`mlxdist.lm.kinds`, :mod:`mlxdist.lm.sizing`);
a block with a module of an unknown kind leaves PP. Mixture-of-experts
blocks split their experts by features or place them whole (``experts``).
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field
from typing import Optional, Sequence

import mlx.nn as nn

from mlxdist.errors import InvalidArgumentError, ShapeError, UnsupportedOperationError
from mlxdist.lm.decoder import text_model
from mlxdist.lm.pipeline import PIPELINED
from mlxdist.lm.sizing import EXPERTS, block_layouts, layout_of, model_split, tp_violations
from mlxdist.lm.split import TensorSplit, check_weights

__all__ = [
    "MODES",
    "EXPERTS",
    "FamilyLayout",
    "block_layouts",
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


# The families TP was first written for; any other family whose blocks are made of
# known module kinds (mlxdist.lm.kinds) is planned the same way.
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
        experts: For a mixture-of-experts model under TP, ``"tp"`` (every
            expert's features split) or ``"ep"`` (whole experts placed on
            ranks); None for a dense model or another mode.
        kinds: The kinds of module the decoder blocks are made of.
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
    experts: Optional[str] = None
    kinds: list[str] = field(default_factory=list)
    rank_bytes: list[int] = field(default_factory=list)

    @property
    def replicated_bytes(self) -> int:
        """Bytes every rank holds whole (embeddings, norms, head)."""
        return self.full_bytes - self.sharded_full_bytes

    def as_dict(self) -> dict:
        """The plan as JSON-ready data."""
        return {
            "mode": self.mode,
            "experts": self.experts,
            "kinds": list(self.kinds),
            "reason": self.reason,
            "family": self.family,
            "rank": self.rank,
            "size": self.size,
            "layers": [list(r) for r in self.layers],
            "weight_bytes": self.weight_bytes,
            "full_bytes": self.full_bytes,
            "sharded_full_bytes": self.sharded_full_bytes,
            "shares": None if self.split is None else self.split.as_dict(),
            "rank_bytes": list(self.rank_bytes),
        }


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
    *,
    tp_weights: Optional[Sequence[float]] = None,
    vocab_parallel: bool = False,
    experts: str = "tp",
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
        experts: Mixture-of-experts blocks under TP: ``"tp"`` (every
            expert's features split) or ``"ep"`` (whole experts per rank,
            by ``tp_weights``).

    Returns:
        The :class:`Plan` (byte counts not yet filled in; ``split`` set under TP).

    Raises:
        InvalidArgumentError: unknown mode, bad weights, or PP impossible
            (fewer blocks than ranks).
        UnsupportedOperationError: a module of an unknown kind under
            ``mode="tp"``, or pipeline parallelism (chosen or requested) for a
            family whose inner model the pipeline stage is not checked against.
        ShapeError: ``mode="tp"`` and TP impossible: a rank would get no query
            head, or a quantized slice would cut a quantization group (the
            message names it).
    """
    model = text_model(model)
    if mode not in MODES:
        raise InvalidArgumentError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    num_layers = len(model.model.layers) if hasattr(model, "model") and hasattr(model.model, "layers") else 0
    everything = [(0, num_layers)] * size
    if experts not in EXPERTS:
        raise InvalidArgumentError(f"experts must be one of {', '.join(EXPERTS)}, got {experts!r}")
    if experts == "ep" and mode == "pp":
        raise InvalidArgumentError("experts='ep' places experts under tensor parallelism; mode='pp' has none")
    if experts == "ep":
        try:
            dense = not any(layout.moe for layout in block_layouts(model))
        except UnsupportedOperationError:
            dense = False
        if dense:
            raise InvalidArgumentError(
                f"experts='ep' (expert parallelism) needs a mixture-of-experts model; {family} has no experts"
            )
    if size == 1:
        plan = Plan("single", "a group of one process: nothing to shard", family, rank, size, everything)
        logger.info("mlxdist.lm: %s: %s", plan.mode, plan.reason)
        return plan
    try:
        layouts = block_layouts(model)
    except UnsupportedOperationError as exc:
        inner = getattr(model, "model", None)
        pipelined = all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm"))
        if mode == "tp" or not pipelined or experts == "ep":
            raise UnsupportedOperationError(
                f"mlxdist.lm has no sharding plan for model_type {family!r} ({type(model).__module__}): {exc}"
            ) from None
        layouts = []
        unknown = str(exc)
    kinds = sorted({kind for layout in layouts for kind in layout.kinds()})
    has_experts = any(layout.moe for layout in layouts)
    if tp_weights is not None:
        tp_weights = check_weights(tp_weights, size, "tp_weights")
    layout = layouts[0] if layouts else None
    if mode in ("auto", "tp") and layout is None:
        why = f"tensor parallel impossible ({unknown}), so pipeline parallel"
    elif mode in ("auto", "tp"):
        broken = tp_violations(model, layout, size)
        if experts == "ep":
            broken = [b for b in broken if "experts'" not in b]
        try:
            split = model_split(model, layout, size, tp_weights, vocab_parallel, experts=experts)
        except ShapeError as exc:
            if experts == "ep" and "expert" in str(exc):
                raise ShapeError(f"{family} cannot place its experts over {size} ranks: {exc}") from None
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
            if has_experts:
                how += f", experts {'placed whole (expert parallel)' if experts == 'ep' else 'split by features'}"
            plan = Plan(
                "tp", f"{how}: {split.describe()}", family, rank, size, everything, split=split,
                experts=experts if has_experts else None, kinds=kinds,
            )
            logger.info("mlxdist.lm: %s: %s", plan.mode, plan.reason)
            return plan
    else:
        why = "pipeline parallel as requested"
    if experts == "ep":
        raise InvalidArgumentError(f"experts='ep' needs tensor parallelism, and {why}")
    if type(model).__module__ not in PIPELINED:
        raise UnsupportedOperationError(
            f"{why}, but mlxdist.lm's pipeline stage is not checked against {family}'s inner model "
            f"({type(model).__module__}); pipeline parallel covers "
            f"{', '.join(sorted(m.rsplit('.', 1)[1] for m in PIPELINED))}"
        )
    ranges = layer_ranges(num_layers, size, pp_weights)
    spans = ", ".join(f"rank {r}: blocks [{a}, {b})" for r, (a, b) in enumerate(ranges))
    plan = Plan("pp", f"{why} over {size} ranks ({spans})", family, rank, size, ranges, kinds=kinds)
    logger.info("mlxdist.lm: %s: %s", plan.mode, plan.reason)
    return plan
