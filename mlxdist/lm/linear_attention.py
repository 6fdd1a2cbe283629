"""Linear-attention blocks (a recurrent state instead of a key/value cache) under tensor parallelism.

Two kinds, recognised by their parts, each split by whole heads in proportion to
the ranks' weights (at least one head per rank), with the output projection
row-parallel (one all-sum) and the per-head output norm whole:

- gated delta net (qwen3_5, qwen3_next): ``in_proj_qkv``, ``in_proj_z``,
  ``in_proj_b``, ``in_proj_a`` and ``out_proj`` linear layers, a depthwise
  ``conv1d``, per-value-head ``dt_bias`` and ``A_log``, heads counted by
  ``num_k_heads``/``num_v_heads``. A rank keeps whole key heads, each with the
  value heads it serves: its heads' query, key and value rows of
  ``in_proj_qkv`` and the matching convolution channels, its value heads' rows
  of ``in_proj_z``/``in_proj_b``/``in_proj_a`` and entries of ``dt_bias``/``A_log``.
- Kimi delta attention (kimi_k3, kimi_linear): ``qkv_proj``, ``f_a_proj``,
  ``f_b_proj``, ``b_proj`` and ``o_proj`` linear layers, a short convolution
  ``qkv_conv.conv`` over the fused query/key/value, a gate (``g_proj``, or the
  low-rank ``g_a_proj``/``g_b_proj``), per-head ``A_log`` and per-feature
  ``dt_bias``, heads counted by ``num_heads``. A rank keeps its heads' rows of
  ``qkv_proj`` (in each of the three parts) and the matching convolution
  channels, of ``f_b_proj``, ``b_proj`` and the gate's last projection, and
  their entries of ``A_log`` and ``dt_bias``; the low-rank inputs (``f_a_proj``,
  ``g_a_proj``) stay whole.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from mlxdist.group import Group
from mlxdist.nn import shard_linear
from mlxdist.nn.quantized import quantized_input_dims

__all__ = ["GATED_DELTA_NET", "KIMI_DELTA", "COUNTS", "linear_attention_kind", "linear_attention_dims",
           "shard_linear_attention"]

GATED_DELTA_NET = "gated delta net"
KIMI_DELTA = "kimi delta attention"
# Each kind's head-count attributes (split heads, and the heads each of them serves with it).
COUNTS = {GATED_DELTA_NET: ("num_k_heads", "num_v_heads"), KIMI_DELTA: ("num_heads", "num_heads")}
_PROJECTIONS = {
    GATED_DELTA_NET: ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"),
    KIMI_DELTA: ("qkv_proj", "f_a_proj", "f_b_proj", "b_proj", "o_proj"),
}


def _is_linear(module: object) -> bool:
    return isinstance(module, nn.Linear) or (
        isinstance(module, nn.Module) and quantized_input_dims(module) is not None and module.get("weight") is not None
    )


def _rows(module: nn.Module) -> int:
    return int(module["weight"].shape[0])


def _conv(module: nn.Module, kind: str) -> Optional[nn.Module]:
    conv = module.get("conv1d") if kind == GATED_DELTA_NET else getattr(module.get("qkv_conv"), "conv", None)
    return conv if isinstance(conv, nn.Conv1d) else None


def linear_attention_kind(module: nn.Module) -> Optional[str]:
    """Which kind of linear attention ``module`` is (:data:`GATED_DELTA_NET` or :data:`KIMI_DELTA`), or None."""
    for kind, projections in _PROJECTIONS.items():
        counts_ok = all(isinstance(getattr(module, name, None), int) for name in COUNTS[kind])
        if (counts_ok and all(_is_linear(module.get(name)) for name in projections) and _conv(module, kind) is not None
                and all(isinstance(module.get(name), mx.array) for name in ("dt_bias", "A_log"))):
            if kind == KIMI_DELTA and not (_is_linear(module.get("g_proj")) or _is_linear(module.get("g_b_proj"))):
                continue
            return kind
    return None


def linear_attention_dims(module: nn.Module, kind: str) -> tuple[int, int, int, int, int]:
    """(heads split, heads of the value side per split head, query/key head width, value head width,
    the output projection's quantization unit), from the projections' shapes."""
    out = module[_PROJECTIONS[kind][-1]]
    unit = int(out.group_size) if quantized_input_dims(out) is not None else 1
    if kind == GATED_DELTA_NET:
        n_k, n_v = int(module.num_k_heads), int(module.num_v_heads)
        value_dim = _rows(module["in_proj_z"])
        return n_k, n_v // n_k, (_rows(module["in_proj_qkv"]) - value_dim) // (2 * n_k), value_dim // n_v, unit
    heads = int(module.num_heads)
    width = _rows(module["qkv_proj"]) // (3 * heads)
    return heads, 1, width, width, unit


def shard_linear_attention(module: nn.Module, kind: str, heads: list[tuple[int, int]], group: Group) -> None:
    """Keep this rank's heads of a linear-attention module (see the module docstring), in place.

    Args:
        module: The unsharded module (weights may be lazy).
        kind: Its kind (:func:`linear_attention_kind`).
        heads: Every rank's ``(start, stop)`` range of split heads.
        group: The group.
    """
    n, per, k_dim, v_dim, _ = linear_attention_dims(module, kind)
    keys = n * k_dim
    # The fused [queries | keys | values] rows (and convolution channels) of each rank.
    fused = [[(a * k_dim, b * k_dim), (keys + a * k_dim, keys + b * k_dim),
              (2 * keys + a * per * v_dim, 2 * keys + b * per * v_dim)] for a, b in heads]
    values = [[(a * per * v_dim, b * per * v_dim)] for a, b in heads]
    value_heads = [[(a * per, b * per)] for a, b in heads]
    if kind == GATED_DELTA_NET:
        columns = {"in_proj_qkv": fused, "in_proj_z": values, "in_proj_b": value_heads, "in_proj_a": value_heads}
        out, per_feature = "out_proj", ()
    else:
        gate = "g_proj" if _is_linear(module.get("g_proj")) else "g_b_proj"
        columns = {"qkv_proj": fused, "f_b_proj": values, "b_proj": value_heads, gate: values}
        out, per_feature = "o_proj", ("dt_bias",)
    for name, ranges in columns.items():
        module[name] = shard_linear(module[name], "all-to-sharded", group=group, ranges=ranges)
    module[out] = shard_linear(module[out], "sharded-to-all", group=group, sizes=[r[0][1] - r[0][0] for r in values])
    first, stop = heads[group.rank()]
    conv = _conv(module, kind)
    channels = mx.concatenate([mx.arange(a, b) for a, b in fused[group.rank()]])
    conv.update({k: mx.contiguous(v[channels]) for k, v in conv.items() if isinstance(v, mx.array)})
    conv.groups = int(channels.shape[0])
    mine = slice(first * per, stop * per)
    module["A_log"] = mx.contiguous(module["A_log"].reshape(-1)[mine])
    if "dt_bias" in per_feature:
        module["dt_bias"] = mx.contiguous(module["dt_bias"].reshape(-1)[first * v_dim: stop * v_dim])
    else:
        module["dt_bias"] = mx.contiguous(module["dt_bias"][mine])
    local = stop - first
    if kind == GATED_DELTA_NET:
        module.num_k_heads, module.num_v_heads = local, local * per
        module.key_dim, module.value_dim = local * k_dim, local * per * v_dim
        module.conv_dim = 2 * module.key_dim + module.value_dim
    else:
        module.num_heads, module.projection_dim = local, local * v_dim
    mx.eval(module.parameters())
