"""``mlxdist.lm.load``: an mlx-lm checkpoint, loaded lazily and sharded for a group."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxdist.errors import InvalidArgumentError
from mlxdist.group import Group
from mlxdist.lm.memory import parameter_bytes
from mlxdist.lm.pipeline import apply_pipeline_parallel
from mlxdist.lm.plan import Plan, choose
from mlxdist.lm.tensor import apply_tensor_parallel
from mlxdist.world import resolve_group

__all__ = ["load", "plan_for"]


def _checkpoint_dir(path_or_dir: Union[str, Path]) -> Path:
    path = Path(path_or_dir)
    if not (path / "config.json").is_file():
        raise InvalidArgumentError(
            f"{str(path_or_dir)!r} is not an mlx-lm checkpoint directory (no config.json in it)"
        )
    return path


def load(
    path_or_dir: Union[str, Path],
    group: Optional[Group] = None,
    mode: str = "auto",
    *,
    pp_weights: Optional[Sequence[float]] = None,
    tp_weights: Optional[Sequence[float]] = None,
    vocab_parallel: bool = False,
    tokenizer_config: Optional[dict[str, Any]] = None,
    experts: str = "tp",
) -> tuple[nn.Module, Any, Plan]:
    """Load an mlx-lm checkpoint and shard it over a group.

    The weights are loaded lazily; each rank reads and keeps only its shard
    (TP: its slice of every projection, one block at a time; PP: its blocks),
    plus the replicated embeddings, norms and head.

    Args:
        path_or_dir: A local checkpoint directory in mlx-lm's format
            (``config.json``, ``model*.safetensors``, tokenizer files).
        group: The :class:`mlxdist.Group` (the world group when None).
        mode: ``"auto"`` (tensor parallel when valid, else pipeline
            parallel), ``"tp"`` or ``"pp"``.
        pp_weights: One positive number per rank: pipeline block shares
            proportional to them (e.g. each rank's memory).
        tp_weights: One positive number per rank: tensor-parallel shares
            (query heads, MLP features, vocabulary rows) proportional to them,
            e.g. ``[2, 1]`` for a rank twice as fast. None: as even as the
            heads allow.
        vocab_parallel: Under TP, also split the embedding and head by
            vocabulary rows (logits all-gathered).
        tokenizer_config: Extra arguments for the tokenizer.
        experts: Mixture-of-experts blocks under TP: ``"tp"`` (every
            expert's intermediate features split by ``tp_weights``, in whole
            quantization groups) or ``"ep"`` (whole experts per rank, in
            proportion to ``tp_weights``); the router stays replicated and
            each MoE block sums its output once.

    Returns:
        ``(model, tokenizer, plan)``: the sharded mlx-lm model (call it, or
        pass it to ``mlx_lm.generate`` functions, identically on every rank),
        mlx-lm's tokenizer wrapper, and the :class:`~mlxdist.lm.plan.Plan`.

    Raises:
        InvalidArgumentError: not a checkpoint directory, unknown mode, bad
            weights, PP impossible (fewer blocks than ranks), or
            ``experts="ep"`` on a model without experts (before any weight is read).
        ShapeError: ``mode="tp"`` on a model that TP cannot split: a rank
            would get no query head (or, under ``experts="ep"``, no expert),
            or a quantized slice would cut a group (names the constraint).
        UnsupportedOperationError: no sharding plan for the model's family
            (on more than one rank).
        ArgumentTypeError: ``group`` is not an mlxdist group (a ``TypeError``).
    """
    from mlx_lm.utils import load_model, load_tokenizer

    path = _checkpoint_dir(path_or_dir)
    group = resolve_group(group)
    began = time.perf_counter()
    model, config = load_model(path, lazy=True)
    full_bytes = parameter_bytes(model)
    planning = time.perf_counter()
    plan = choose(
        model,
        config["model_type"],
        group.rank(),
        group.size(),
        mode,
        pp_weights,
        tp_weights=tp_weights,
        vocab_parallel=vocab_parallel,
        experts=experts,
    )
    planned = time.perf_counter()
    plan.full_bytes = full_bytes
    if plan.mode == "tp":
        plan.sharded_full_bytes = apply_tensor_parallel(model, None, group, plan.split)
    elif plan.mode == "pp":
        start, stop = plan.layers[plan.rank]
        plan.sharded_full_bytes = apply_pipeline_parallel(model, start, stop, group)
    mx.eval(model.parameters())
    plan.weight_bytes = parameter_bytes(model)
    if group.size() > 1:
        every = np.asarray(group.all_gather(np.array([plan.weight_bytes], dtype=np.int64)))
        plan.rank_bytes = [int(v) for v in every.reshape(-1)]
    else:
        plan.rank_bytes = [plan.weight_bytes]
    tokenizer = load_tokenizer(path, tokenizer_config, eos_token_ids=config.get("eos_token_id"))
    plan.seconds = {"plan": planned - planning, "load": time.perf_counter() - began - (planned - planning)}
    return model, tokenizer, plan


def plan_for(path_or_dir: Union[str, Path], size: int, mode: str = "auto", **options: Any) -> Plan:
    """The plan :func:`load` would choose on a group of ``size`` ranks, without reading any weight.

    For a process that starts ranks and wants their typed refusal first
    (e.g. ``experts="ep"`` on a dense model, or more ranks than experts).

    Args:
        path_or_dir: A local checkpoint directory in mlx-lm's format.
        size: The ranks the group would have.
        mode: As :func:`load`'s.
        **options: :func:`load`'s ``pp_weights``, ``tp_weights``, ``vocab_parallel`` and ``experts``.

    Returns:
        Rank 0's :class:`~mlxdist.lm.plan.Plan` (byte counts not filled in).

    Raises:
        InvalidArgumentError, ShapeError, UnsupportedOperationError: as :func:`load` would
            on ``size`` ranks, before reading the weights.
        TypeError: an option :func:`load` does not take.
    """
    from mlx_lm.utils import load_model

    model, config = load_model(_checkpoint_dir(path_or_dir), lazy=True)
    return choose(model, config["model_type"], 0, size, mode, **options)
