"""What tensor parallelism needs of a loaded model, and each rank's share of it.

:func:`block_layouts` finds each decoder block's module kinds
(:mod:`mlxdist.lm.kinds`); :func:`tp_violations` lists the even-split
constraints a model breaks; :func:`model_split` computes every rank's share
(query heads, key/value heads, MLP features, expert features or whole
experts, vocabulary rows) from the (still lazy) model's shapes.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import mlx.nn as nn

from mlxdist.errors import InvalidArgumentError, ShapeError, UnsupportedOperationError
from mlxdist.lm.decoder import text_model
from mlxdist.lm.kinds import BlockLayout, block_layout
from mlxdist.lm.linear_attention import linear_attention_dims
from mlxdist.lm.split import TensorSplit, check_weights, tensor_split
from mlxdist.nn.experts import expert_placement, switch_projections
from mlxdist.nn.quantized import quantized_input_dims
from mlxdist.nn.shares import split_sizes

__all__ = ["EXPERTS", "block_layouts", "layout_of", "tp_violations", "model_split"]

EXPERTS = ("tp", "ep")


def _blocks(model: nn.Module) -> list:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return list(layers) if isinstance(layers, (list, tuple)) else []


def block_layouts(model: nn.Module) -> list[BlockLayout]:
    """Each decoder block's layout, from the kinds of its modules (:mod:`mlxdist.lm.kinds`).

    Args:
        model: A loaded mlx-lm model (weights may be lazy).

    Returns:
        One :class:`~mlxdist.lm.kinds.BlockLayout` per block of ``model.model.layers``.

    Raises:
        UnsupportedOperationError: no ``model.model.layers``, or a block holds
            a module of an unknown kind (named in the message).
    """
    model = text_model(model)
    blocks = _blocks(model)
    if not blocks:
        raise UnsupportedOperationError(
            f"{type(model).__module__}: no decoder blocks at model.model.layers to shard"
        )
    return [block_layout(block, f"model.layers.{index}") for index, block in enumerate(blocks)]


def layout_of(model: nn.Module) -> Optional[BlockLayout]:
    """The first decoder block's layout, or None if a block holds a module of an unknown kind."""
    try:
        return block_layouts(model)[0]
    except UnsupportedOperationError:
        return None


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


def tp_violations(model: nn.Module, layout: Any, size: int) -> list[str]:
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
    model = text_model(model)
    found: dict[str, str] = {}
    for index, (block, layout) in enumerate(zip(model.model.layers, block_layouts(model))):
        where = f"layers.{index}"
        attention = _module(block, layout.attention)
        for name in layout.head_counts:
            count = int(getattr(attention, name))
            if count % size:
                found.setdefault(
                    name, f"{name}={count} is not divisible by {size} ranks ({where}.{layout.attention})"
                )
        for path in (*layout.column, *layout.shared[:2]):
            out_dims, _, _ = _linear_dims(_module(block, path))
            if out_dims % size:
                found.setdefault(
                    path, f"{path} output features {out_dims} are not divisible by {size} ranks ({where})"
                )
        if layout.moe:
            features, _, unit, _ = _switch_dims(_module(block, f"{layout.moe}.{layout.switch}"))
            if features % size or (features // size) % unit:
                found.setdefault(
                    "experts",
                    f"the experts' {features} features do not split into {size} equal shares of whole "
                    f"groups of {unit} ({where})",
                )
        for path in (*layout.row, *layout.mlp[2:], *layout.shared[2:]):
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


def _linear_split(
    shapes: set[tuple[str, int, int, int, int, int]], size: int, weights: list[float]
) -> Optional[list[tuple[int, int]]]:
    """Each rank's range of a linear-attention block's heads (by the weights), or None without such blocks."""
    if not shapes:
        return None
    if len(shapes) != 1:
        raise ShapeError(
            f"tensor parallelism needs linear attention of one shape in every block, found {sorted(shapes)}"
        )
    ((kind, heads, per, _, v_dim, unit),) = shapes
    if heads < size:
        raise ShapeError(
            f"tensor parallelism needs at least one {kind} head per rank: {heads} heads < {size} ranks"
        )
    counts = split_sizes(heads, weights)
    out_sizes = [count * per * v_dim for count in counts]
    if any(features % unit for features in out_sizes):
        raise ShapeError(
            f"quantized output projection of the {kind}: its input features per rank {out_sizes} are not "
            f"multiples of group_size={unit}"
        )
    starts = [sum(counts[:rank]) for rank in range(size)]
    return [(start, start + count) for start, count in zip(starts, counts)]


def _switch_dims(switch: nn.Module) -> tuple[int, int, int, int]:
    """(intermediate features of every expert, experts, quantization unit of the output projection, hidden)."""
    feeds, out = switch_projections(switch)
    down = switch[out]
    features = quantized_input_dims(down) or int(down["weight"].shape[-1])
    unit = int(down.group_size) if quantized_input_dims(down) else 1
    return int(features), int(down["weight"].shape[0]), unit, int(down["weight"].shape[1])


def model_split(
    model: nn.Module,
    layout: Any,
    size: int,
    weights: Optional[Sequence[float]] = None,
    vocab_parallel: bool = False,
    *,
    experts: str = "tp",
) -> TensorSplit:
    """Each rank's share of a model under tensor parallelism (see :func:`mlxdist.lm.split.tensor_split`).

    Args:
        model: A loaded mlx-lm model (weights may be lazy).
        layout: Unused (each block's layout comes from its modules); kept
            for callers of the earlier signature.
        size: The group size.
        weights: Per-rank TP weights (None: equal shares).
        vocab_parallel: Also split the vocabulary (embedding and head).
        experts: For mixture-of-experts blocks: ``"tp"`` (every expert's
            features split by the weights, in whole quantization groups) or
            ``"ep"`` (whole experts placed in proportion to the weights).

    Returns:
        The split, the same for every block.

    Raises:
        ShapeError: a rank would get no query head (or, under EP, no
            expert), the blocks' attention differs in shape, or a quantized
            row-parallel slice is not a whole number of quantization groups.
        InvalidArgumentError: ``experts="ep"`` on a model without experts.
        UnsupportedOperationError: a block holds a module of an unknown kind.
    """
    model = text_model(model)
    if experts not in EXPERTS:
        raise InvalidArgumentError(f"experts must be one of {', '.join(EXPERTS)}, got {experts!r}")
    shapes, widths, switches, linear = set(), {}, set(), set()
    for block, kinds in zip(model.model.layers, block_layouts(model)):
        attention = _module(block, kinds.attention)
        n_heads, n_kv = (int(getattr(attention, name)) for name in kinds.head_counts)
        if kinds.linear:
            linear.add((kinds.linear, *linear_attention_dims(attention, kinds.linear)))
        else:
            hidden, o_in, o_group = _linear_dims(_module(block, kinds.query[-1]))  # o: the model width out
            query_out = _linear_dims(_module(block, kinds.query[0]))[0] if len(kinds.query) > 1 else o_in
            # A head's width: a key head's where there are key projections (a query projection may also
            # carry a per-head gate, qwen3_next's), else a query head's.
            head_dim = (_linear_dims(_module(block, kinds.key_value[0]))[0] // n_kv if kinds.key_value
                        else query_out // n_heads)
            shapes.add((n_heads, n_kv, head_dim, o_in // n_heads, o_group or 1, hidden))
        for mlp in (kinds.mlp, kinds.shared):
            if mlp:
                _, width, down_group = _linear_dims(_module(block, mlp[-1]))  # the down projection's input
                widths.setdefault(width, down_group or 1)
        if kinds.moe:
            switches.add(_switch_dims(_module(block, f"{kinds.moe}.{kinds.switch}")))
    if len(shapes) != 1:
        raise ShapeError(f"tensor parallelism needs attention of one shape in every block, found {sorted(shapes)}")
    ((n_heads, n_kv, head_dim, o_head, o_unit, hidden),) = shapes
    if experts == "ep" and not switches:
        raise InvalidArgumentError(
            "experts='ep' (expert parallelism) needs a mixture-of-experts model; this one has no experts"
        )
    vocab = int(model.model.embed_tokens.weight.shape[0]) if vocab_parallel else None
    ordered = sorted(widths)
    main = ordered[-1] if widths else None
    if main is not None:
        split = tensor_split(
            n_heads, n_kv, head_dim, main, size, weights, mlp_unit=widths[main], vocab=vocab, hidden=hidden
        )
    else:  # every block's feed-forward is experts: the attention split alone
        split = tensor_split(n_heads, n_kv, head_dim, 0, size, weights, vocab=vocab)
    rank_weights = check_weights(weights, size, "tp weights")
    others = {}
    for width in ordered[:-1]:
        if width % widths[width] or width // widths[width] < size:
            raise ShapeError(
                f"an MLP of {width} features cannot give each of {size} ranks whole groups of {widths[width]}"
            )
        others[width] = split_sizes(width, rank_weights, widths[width])
    expert_features = placement = None
    if switches:
        features = {(f, u) for f, _, u, _ in switches}
        counts = {n for _, n, _, _ in switches}
        if len(features) != 1 or len(counts) != 1:
            raise ShapeError(f"expert layers of different shapes across blocks: {sorted(switches)}")
        ((feature_count, unit),), (num_experts,) = features, counts
        if experts == "ep":
            placement = expert_placement(num_experts, rank_weights)
        else:
            if feature_count % unit or feature_count // unit < size:
                raise ShapeError(
                    f"the experts' {feature_count} intermediate features cannot give each of {size} ranks "
                    f"whole quantization groups of {unit} (try experts='ep')"
                )
            expert_features = split_sizes(feature_count, rank_weights, unit)
    split = TensorSplit(
        split.head_dim, split.query_heads, split.kv_heads, split.intermediate, split.vocab, others,
        expert_features, placement, _linear_split(linear, size, rank_weights),
    )
    o_sizes = [(stop - start) * o_head for start, stop in split.query_heads]
    if any(q % o_unit for q in o_sizes):
        raise ShapeError(
            f"quantized o_proj: its input features per rank {o_sizes} "
            f"({o_head} per head) are not multiples of group_size={o_unit}"
        )
    return split
