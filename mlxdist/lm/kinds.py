"""The kinds of modules mlx-lm decoder blocks are made of, recognised by their parts.

A decoder block is sharded by what it contains, not by its family's name:

- attention: a module with ``q_proj``/``k_proj``/``v_proj``/``o_proj``
  linear layers and its head counts under any of the names families use
  (``n_heads``/``num_attention_heads``/``num_heads``,
  ``n_kv_heads``/``num_key_value_heads``/``num_kv_heads``); q/k norms
  per head stay whole, q/k norms over every head's features together
  (minimax's) become :class:`mlxdist.nn.ShardedRMSNorm` over the rank's heads
  (one all-sum of a sum of squares each), q/k/v biases follow their features, an o bias is
  added once after the sum, attention ``sinks`` (one per query head) and a
  per-head output gate ``g_proj`` follow their heads;
- multi-head latent attention (deepseek_v2/v3 and kin): ``q_proj`` or
  ``q_a_proj``/``q_b_proj``, ``kv_a_proj_with_mqa``, ``o_proj``, and either
  per-head ``embed_q`` and ``unembed_out`` (deepseek_v3) or a ``kv_b_proj``
  linear layer expanding the latent to every head's keys and values
  (deepseek_v2), heads counted by ``num_heads``; the query projection,
  ``kv_b_proj``, the per-head modules and ``o_proj`` split by query heads,
  the shared latent (``q_a``, ``kv_a`` and their norms) whole;
- linear attention (qwen3_5's gated delta nets, kimi_k3's Kimi delta attention):
  split by whole heads, see :mod:`mlxdist.lm.linear_attention`;
- fused attention (phi3): ``qkv_proj`` and ``o_proj`` with the same head
  counts; each rank keeps its query, key and value features of the fused
  projection;
- dense MLP: ``gate_proj``/``up_proj``/``down_proj`` linear layers, or a
  fused ``gate_up_proj`` and ``down_proj``;
- mixture of experts: a module holding a switch layer (mlx-lm's
  ``SwitchGLU``/``SwitchMLP``, float or quantized, see
  :func:`mlxdist.nn.experts.switch_projections`) beside its router (``gate``
  or ``router``, replicated, whatever top-k or score correction it does) and
  optionally shared experts (a dense MLP under ``shared_experts`` or
  ``shared_expert`` or ``share_expert``).

:func:`block_layout` returns a block's :class:`BlockLayout`, or raises
:class:`~mlxdist.errors.UnsupportedOperationError` naming the module it
does not know (pipeline parallelism still applies to such a model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from mlxdist.errors import ArgumentTypeError, UnsupportedOperationError
from mlxdist.lm.linear_attention import COUNTS, linear_attention_kind
from mlxdist.nn.experts import switch_projections
from mlxdist.nn.quantized import quantized_input_dims

__all__ = [
    "QUERY_COUNTS",
    "KV_COUNTS",
    "BlockLayout",
    "block_layout",
    "has_latent_attention",
    "is_linear",
]

QUERY_COUNTS = ("n_heads", "num_attention_heads", "num_heads")
KV_COUNTS = ("n_kv_heads", "num_key_value_heads", "num_kv_heads")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_DENSE = ("gate_proj", "up_proj", "down_proj")
_LATENT = ("kv_a_proj_with_mqa", "o_proj")
_FUSED_ATTENTION = ("qkv_proj", "o_proj")
_FUSED_DENSE = ("gate_up_proj", "down_proj")
_PER_HEAD = ("embed_q", "unembed_out")
_SWITCHES = ("switch_mlp", "experts")
_ROUTERS = ("gate", "router")
_SHARED = ("shared_experts", "shared_expert", "share_expert")


def is_linear(module: object) -> bool:
    """Whether ``module`` is an ``nn.Linear`` or ``nn.QuantizedLinear`` (what TP shards)."""
    return isinstance(module, nn.Linear) or (
        isinstance(module, nn.Module) and quantized_input_dims(module) is not None and module.get("weight") is not None
        and module["weight"].ndim == 2
    )


@dataclass(frozen=True)
class BlockLayout:
    """Where a decoder block keeps what sharding touches (paths relative to the block).

    Attributes:
        column: Projections made column-parallel (all-to-sharded).
        row: Projections made row-parallel (sharded-to-all, one all-sum each).
        attention: The attention module.
        head_counts: Its attribute names of the query and key/value head counts.
        query: Projections split with the query heads (q, and o's input).
        key_value: Projections split with the key/value heads.
        mlp: Dense MLP projections (split with its intermediate features).
        sinks: Whether the attention holds per-query-head ``sinks``.
        moe: The mixture-of-experts module, or None.
        switch: Its switch layer's attribute name.
        router: Its router's attribute name.
        shared: Its shared experts' projections (split like a dense MLP,
            their output a partial sum added to the switch's).
        latent: Multi-head latent attention's per-head modules (weights
            ``[heads, ...]``, sliced by query heads); empty for q/k/v/o attention
            and for latent attention with ``kv_b_proj``.
        mla: Whether the attention is multi-head latent attention (one latent
            for every head: only the query heads' count changes).
        fused: Fused projections (``qkv_proj``: query, key and value parts;
            ``gate_up_proj``: gate and up parts), cut by per-rank ranges.
        wide_norms: Norms over every head's features at once, each with the
            projection whose output it normalises (``(norm, projection)``).
        linear: The attention's kind when it is linear attention
            (:mod:`mlxdist.lm.linear_attention`; ``column``/``row`` then hold
            only the MLP's projections), else None.
    """

    column: tuple[str, ...]
    row: tuple[str, ...]
    attention: str
    head_counts: tuple[str, str]
    query: tuple[str, ...]
    key_value: tuple[str, ...]
    mlp: tuple[str, ...] = ()
    sinks: bool = False
    moe: Optional[str] = None
    switch: Optional[str] = None
    router: Optional[str] = None
    shared: tuple[str, ...] = ()
    latent: tuple[str, ...] = ()
    fused: tuple[str, ...] = ()
    mla: bool = False
    wide_norms: tuple[tuple[str, str], ...] = ()
    linear: Optional[str] = None

    def kinds(self) -> list[str]:
        """The kinds of this block's modules, for plans and messages."""
        if self.linear:
            found = [self.linear]
        else:
            found = ["latent attention" if self.mla else "attention" + (" with sinks" if self.sinks else "")]
        if self.mlp:
            found.append("dense mlp")
        if self.moe:
            found.append("mixture of experts" + (" with shared experts" if self.shared else ""))
        return found


def _children(module: nn.Module) -> dict[str, nn.Module]:
    return {name: value for name, value in module.items() if isinstance(value, nn.Module)}


def _count_name(module: nn.Module, names: tuple[str, ...]) -> Optional[str]:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return name
    return None


def _has_linears(module: nn.Module, names: tuple[str, ...]) -> bool:
    return all(is_linear(module.get(name)) for name in names)


def _switch_name(module: nn.Module) -> Optional[str]:
    for name in _SWITCHES:
        child = module.get(name)
        if isinstance(child, nn.Module):
            try:
                switch_projections(child)
            except ArgumentTypeError:
                continue
            return name
    return None


def _is_latent(module: nn.Module) -> bool:
    has_query = is_linear(module.get("q_proj")) or is_linear(module.get("q_b_proj"))
    per_head = all(isinstance(module.get(name), nn.Module) for name in _PER_HEAD)
    per_head = per_head or is_linear(module.get("kv_b_proj"))
    return has_query and per_head and _has_linears(module, _LATENT) and _count_name(module, ("num_heads",)) is not None


def has_latent_attention(block: nn.Module) -> bool:
    """Whether a decoder block's attention is multi-head latent attention (it needs an array mask)."""
    return any(_is_latent(child) for child in _children(block).values())


def _wide_norms(attn: nn.Module, counts: tuple[str, str], attention: str, where: str) -> tuple[tuple[str, str], ...]:
    """The q/k norms of ``attn`` that normalise every head's features together (minimax's), with their projections."""
    found = []
    for norm, proj, count in (("q_norm", "q_proj", counts[0]), ("k_norm", "k_proj", counts[1])):
        weight = getattr(attn.get(norm), "weight", None) if isinstance(attn.get(norm), nn.Module) else None
        if isinstance(weight, mx.array) and getattr(attn, count) > 1 and weight.shape[-1] == _width(attn[proj]):
            if not isinstance(attn[norm], nn.RMSNorm):
                raise UnsupportedOperationError(
                    f"tensor parallelism does not know the module {where}.{attention}.{norm} "
                    f"({type(attn[norm]).__name__}): it normalises all {getattr(attn, count)} heads' features "
                    "together and is not an RMS norm"
                )
            found.append((f"{attention}.{norm}", f"{attention}.{proj}"))
    return tuple(found)


def _width(projection: nn.Module) -> int:
    return int(projection["weight"].shape[0])


def block_layout(block: nn.Module, where: str = "block") -> BlockLayout:
    """The layout of one decoder block, from the kinds of its modules.

    Args:
        block: An mlx-lm decoder block (weights may be lazy).
        where: Its path, for messages (e.g. ``"model.layers.0"``).

    Returns:
        Its :class:`BlockLayout`.

    Raises:
        UnsupportedOperationError: a child module of a kind TP does not know
            (named in the message), or no attention / feed-forward found.
    """
    attention = None
    feedforward: list[tuple[str, nn.Module]] = []
    for name, child in _children(block).items():
        if isinstance(child, (nn.RMSNorm, nn.LayerNorm)) or "norm" in name:
            continue
        if is_linear(child) and child["weight"].shape[0] == 1:
            continue  # one scalar of the hidden state (kimi_k3's attention-residual weights): whole
        if (linear_attention_kind(child) or _has_linears(child, _ATTENTION) or _has_linears(child, _FUSED_ATTENTION)
                or _is_latent(child)) and attention is None:
            attention = name
        elif _has_linears(child, _DENSE) or _has_linears(child, _FUSED_DENSE) or _switch_name(child):
            feedforward.append((name, child))
        else:
            raise UnsupportedOperationError(
                f"tensor parallelism does not know the module {where}.{name} ({type(child).__name__}): "
                "not attention with q/k/v/o projections, a dense MLP or a mixture-of-experts block"
            )
    if attention is None or len(feedforward) != 1:
        listed = [name for name, value in block.items()
                  if isinstance(value, list) and any(isinstance(item, nn.Module) for item in value)]
        raise UnsupportedOperationError(
            f"tensor parallelism needs one attention (q/k/v/o projections) and one feed-forward module in "
            f"{where} ({type(block).__name__}); found attention={attention!r}, "
            f"feed-forward={[name for name, _ in feedforward]}"
            + (f", and lists of modules {listed}, which it does not split" if listed else "")
        )
    attn = block[attention]
    linear = linear_attention_kind(attn)
    if linear:
        base = dict(column=(), row=(), attention=attention, head_counts=COUNTS[linear], query=(), key_value=(),
                    linear=linear)
    elif _is_latent(attn):
        query = f"{attention}.{'q_proj' if is_linear(attn.get('q_proj')) else 'q_b_proj'}"
        o = f"{attention}.o_proj"
        heads = ("num_heads", "num_heads")  # one latent shared by every head: only query heads split
        if is_linear(attn.get("kv_b_proj")):  # every head's keys and values from the latent: split by heads
            kv_b = f"{attention}.kv_b_proj"
            base = dict(column=(query, kv_b), row=(o,), attention=attention, head_counts=heads,
                        query=(query, kv_b, o), key_value=(), mla=True)
        else:
            # A per-head output gate (kimi_k3's g_proj: its rows head-major) goes with the query heads.
            gate = (f"{attention}.g_proj",) if is_linear(attn.get("g_proj")) else ()
            base = dict(column=(query, *gate), row=(o,), attention=attention, head_counts=heads,
                        query=(query, *gate, o), key_value=(),
                        latent=tuple(f"{attention}.{name}" for name in _PER_HEAD), mla=True)
    else:
        base = None
    counts = (_count_name(attn, QUERY_COUNTS), _count_name(attn, KV_COUNTS)) if base is None else ("", "")
    if None in counts:
        raise UnsupportedOperationError(
            f"{where}.{attention} ({type(attn).__name__}) keeps no head counts under "
            f"{'/'.join(QUERY_COUNTS)} and {'/'.join(KV_COUNTS)}"
        )
    wide_norms = _wide_norms(attn, counts, attention, where) if base is None and _has_linears(attn, _ATTENTION) else ()
    sinks = isinstance(attn.get("sinks"), mx.array)
    if base is None and _has_linears(attn, _FUSED_ATTENTION) and not _has_linears(attn, _ATTENTION):
        qkv, o = (f"{attention}.{name}" for name in _FUSED_ATTENTION)
        base = dict(column=(qkv,), row=(o,), attention=attention, head_counts=counts, query=(o,), key_value=(),
                    sinks=sinks, fused=(qkv,))
    elif base is None:
        q, k, v, o = (f"{attention}.{name}" for name in _ATTENTION)
        # A per-head output gate (step3p5's g_proj: its rows head-major) goes with the query heads.
        gate = (f"{attention}.g_proj",) if is_linear(attn.get("g_proj")) else ()
        base = dict(column=(q, *gate, k, v), row=(o,), attention=attention, head_counts=counts,
                    query=(q, *gate, o), key_value=(k, v), sinks=sinks, wide_norms=wide_norms)
    name, ff = feedforward[0]
    switch = _switch_name(ff)
    if switch is None:
        parts = _DENSE if _has_linears(ff, _DENSE) else _FUSED_DENSE
        mlp = tuple(f"{name}.{part}" for part in parts)
        fused = base.get("fused", ()) + ((mlp[0],) if parts == _FUSED_DENSE else ())
        return BlockLayout(**{**base, "column": (*base["column"], *mlp[:-1]), "row": (*base["row"], mlp[-1]),
                              "mlp": mlp, "fused": fused})
    router = next((r for r in _ROUTERS if isinstance(ff.get(r), nn.Module)), None)
    if router is None:
        raise UnsupportedOperationError(f"{where}.{name}: a switch layer but no router (gate/router)")
    shared: tuple[str, ...] = ()
    for child_name, child in _children(ff).items():
        if child_name in (switch, router) or child_name.endswith("_gate"):
            continue  # qwen2_moe's shared_expert_gate: replicated
        if child_name in _SHARED and _has_linears(child, _DENSE):
            shared = tuple(f"{name}.{child_name}.{part}" for part in _DENSE)
            continue
        raise UnsupportedOperationError(
            f"tensor parallelism does not know the module {where}.{name}.{child_name} "
            f"({type(child).__name__}) of a mixture-of-experts block"
        )
    return BlockLayout(**base, moe=name, switch=switch, router=router, shared=shared)
