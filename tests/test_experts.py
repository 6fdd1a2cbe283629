"""mlxdist.nn.experts: mlx-lm's switch layers split (TP) or placed whole (EP), in one process.

Every rank's shard is built through the same functions the launched code uses
(``shard_switch_at`` / ``place_experts_at`` are what ``shard_switch`` /
``place_experts`` call with the group's rank and size), and the sum of the
ranks' partial outputs is compared with the unsharded switch's output on
random inputs and random top-k indices: exactly what ``MoEAllSum``'s
all_sum adds up. The launched check (tests/workers/nn_experts.py, in the
nn_layers job) runs real mlx-lm MoE blocks through MoEAllSum on ranks.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

import mlxdist
from mlxdist.errors import ArgumentTypeError, InvalidArgumentError, ShapeError
from mlxdist.nn import (
    MoEAllSum,
    combine_bytes,
    choose_dispatch,
    expert_placement,
    place_experts,
    place_experts_at,
    shard_switch,
    shard_switch_at,
    split_sizes,
)

HIDDEN = 64  # a multiple of every group size tested (the switch's quantized input)
QUANTIZATIONS = (None, (4, 32), (4, 64), (8, 32), (8, 64))


def build_switch(kind: str, hidden: int, features: int, experts: int, bias: bool, quantization, seed: int) -> nn.Module:
    """The same switch layer (random weights and biases) for every call with the same arguments."""
    mx.random.seed(seed)
    cls = SwitchGLU if kind == "glu" else SwitchMLP
    switch = cls(hidden, features, experts, bias=bias)
    if bias:  # mlx-lm initialises biases to zero: make them matter
        for module in switch.children().values():
            if "bias" in module:
                module.bias = mx.random.normal(module.bias.shape)
    if quantization is not None:
        bits, group_size = quantization
        nn.quantize(switch, group_size=group_size, bits=bits)
    mx.eval(switch.parameters())
    return switch


def routing(tokens: int, experts: int, top_k: int, seed: int) -> tuple[mx.array, mx.array]:
    """Random inputs and random distinct top-k expert ids per token (uint32, as argpartition gives)."""
    key_x, key_i = mx.random.split(mx.random.key(seed))
    x = mx.random.normal((1, tokens, HIDDEN), key=key_x)
    inds = mx.argsort(mx.random.uniform(shape=(1, tokens, experts), key=key_i), axis=-1)[..., :top_k]
    return x, inds.astype(mx.uint32)


def param_bytes(module: nn.Module, skip: tuple[str, ...] = ()) -> int:
    return sum(v.nbytes for k, v in tree_flatten(module.parameters()) if k.rsplit(".", 1)[-1] not in skip)


@st.composite
def layouts(draw):
    kind = draw(st.sampled_from(["glu", "mlp"]))
    quantization = draw(st.sampled_from(QUANTIZATIONS))
    ranks = draw(st.integers(2, 6))
    weights = draw(st.one_of(st.just([1] * ranks), st.lists(st.integers(1, 4), min_size=ranks, max_size=ranks)))
    mode = draw(st.sampled_from(["tp", "ep"]))
    unit = quantization[1] if quantization else 1
    if mode == "tp":
        units = draw(st.integers(ranks, ranks + 3)) if quantization else draw(st.integers(ranks, 40))
        experts = draw(st.integers(1, 6))
    else:
        units = draw(st.integers(1, 3)) if quantization else draw(st.integers(1, 40))
        experts = draw(st.integers(ranks, 9))
    return {
        "kind": kind,
        "quantization": quantization,
        "ranks": ranks,
        "weights": weights,
        "mode": mode,
        "features": units * unit,
        "unit": unit,
        "experts": experts,
        "bias": draw(st.booleans()),
        "top_k": draw(st.integers(1, experts)),
        "tokens": draw(st.sampled_from([1, 3, 40])),  # 40 tokens x k >= 64 slots takes mlx-lm's sorted path
        "seed": draw(st.integers(0, 2**16)),
        "select_min_slots": draw(st.sampled_from([None, 1, 64])),  # fixed shapes, or only local slots
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_partial_outputs_sum_to_the_unsharded_switch(layout) -> None:
    """TP and EP, every rank's shard: the sum of the partial outputs is the unsharded output,
    and each rank holds parameter bytes in proportion to its share."""
    kind, q, n, w = layout["kind"], layout["quantization"], layout["ranks"], layout["weights"]
    args = (kind, HIDDEN, layout["features"], layout["experts"], layout["bias"], q, layout["seed"])
    full = build_switch(*args)
    x, inds = routing(layout["tokens"], layout["experts"], layout["top_k"], layout["seed"] + 1)
    want = full(x, inds)
    total = mx.zeros_like(want)
    if layout["mode"] == "tp":
        sizes = split_sizes(layout["features"], w, unit=layout["unit"])
        for rank in range(n):
            shard = shard_switch_at(build_switch(*args), rank=rank, size=n, sizes=sizes)
            total = total + shard(x, inds)
            # Everything but the down projection's (replicated, zero off rank 0) bias scales with the features.
            got = param_bytes(shard, skip=("bias",)) * layout["features"]
            assert got == param_bytes(full, skip=("bias",)) * sizes[rank], (rank, sizes)
    else:
        placement = expert_placement(layout["experts"], w)
        assert [b - a for a, b in placement] == split_sizes(layout["experts"], w)
        for rank in range(n):
            shard = place_experts_at(build_switch(*args), rank=rank, size=n, placement=placement,
                                     select_min_slots=layout["select_min_slots"])
            part = shard(x, inds)
            total = total + part
            start, stop = placement[rank]
            local = ((inds >= start) & (inds < stop))[..., None]
            assert not np.any(np.array(mx.where(local, 0, part))), "a slot of another rank's expert is not zero"
            assert param_bytes(shard) * layout["experts"] == param_bytes(full) * (stop - start)
    np.testing.assert_allclose(np.array(total), np.array(want), rtol=1e-4, atol=1e-4, err_msg=str(layout))


def test_expert_placement_by_weight() -> None:
    assert expert_placement(8, 2) == [(0, 4), (4, 8)]
    assert expert_placement(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert expert_placement(12, [2, 1]) == [(0, 8), (8, 12)]
    assert expert_placement(128, [128, 96]) == [(0, 73), (73, 128)]
    assert expert_placement(4, [100, 1, 1]) == [(0, 2), (2, 3), (3, 4)]  # every rank keeps one


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.lists(st.floats(0.01, 100), min_size=1, max_size=8))
def test_expert_placement_covers_every_rank(experts: int, weights: list[float]) -> None:
    """Any positive weights: contiguous ranges in rank order, every rank at least one expert,
    each count within one of its weighted share unless the minimum of one lifted it."""
    if len(weights) > experts:
        with pytest.raises(ShapeError):
            expert_placement(experts, weights)
        return
    placement = expert_placement(experts, weights)
    assert [a for a, _ in placement] == [0] + [b for _, b in placement[:-1]] and placement[-1][1] == experts
    counts = [b - a for a, b in placement]
    assert min(counts) >= 1
    shares = [experts * w / sum(weights) for w in weights]
    lifted = any(share < 1 for share in shares)
    assert lifted or all(abs(c - share) < 1 for c, share in zip(counts, shares)), (counts, shares)


def test_typed_errors() -> None:
    with pytest.raises(ShapeError, match="at least one expert per rank"):
        expert_placement(3, 4)
    with pytest.raises(InvalidArgumentError, match="positive numbers"):
        expert_placement(4, [1, 0])
    glu = build_switch("glu", HIDDEN, 96, 4, False, (4, 32), 1)
    with pytest.raises(ShapeError, match="whole quantization groups"):
        shard_switch_at(glu, rank=0, size=2, sizes=[48, 48])
    with pytest.raises(ShapeError, match="evenly"):
        shard_switch_at(build_switch("glu", HIDDEN, 30, 4, False, None, 1), rank=0, size=4)
    with pytest.raises(ShapeError, match="without an expert"):
        place_experts_at(glu, rank=0, size=2, placement=[(0, 4), (4, 4)])
    with pytest.raises(ShapeError, match="cover"):
        place_experts_at(glu, rank=0, size=2, placement=[(0, 2), (3, 4)])
    with pytest.raises(ArgumentTypeError, match="switch layer"):
        shard_switch_at(nn.Linear(4, 4), rank=0, size=2)
    assert glu.down_proj.weight.shape == (4, HIDDEN, 96 * 4 // 32), "a refused split changed the layer"
    placed = place_experts_at(build_switch("mlp", HIDDEN, 32, 4, False, None, 1), rank=0, size=2,
                              placement=[(0, 2), (2, 4)])
    with pytest.raises(InvalidArgumentError, match="already placed"):
        place_experts_at(placed, rank=0, size=2, placement=[(0, 1), (1, 2)])
    with pytest.raises(InvalidArgumentError, match="placed whole"):
        shard_switch_at(placed, rank=0, size=2)
    with pytest.raises(InvalidArgumentError, match="dispatch"):
        MoEAllSum(glu, dispatch="broadcast")


def test_combine_bytes_rule() -> None:
    """With replicated activations, mlxdist's all_to_all path receives more bytes than all_sum."""
    for tokens in (1, 8, 512, 4096):
        for ranks in (2, 3, 8):
            cost = combine_bytes(tokens, 2048, ranks, 2)
            assert cost["all_sum"] <= cost["all_to_all"], (tokens, ranks, cost)
            assert choose_dispatch(tokens, 2048, ranks, 2) == "all_sum"
    assert combine_bytes(4, 8, 2, 4) == {"all_sum": 128, "all_to_all": 192}


def test_wrapper_on_one_process() -> None:
    """Size-1 world: the wrapper is the block; parameter paths and attributes pass through."""
    group = mlxdist.world()
    assert group.size() == 1

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Linear(HIDDEN, 4, bias=False)
            self.switch_mlp = build_switch("glu", HIDDEN, 32, 4, False, None, 3)
            self.sharding_group = None

        def __call__(self, x: mx.array) -> mx.array:
            inds = mx.argpartition(self.gate(x), kth=-2, axis=-1)[..., -2:]
            return self.switch_mlp(x, inds).sum(axis=-2)

    block = Block()
    shard_switch(block.switch_mlp, group=group)
    place_experts(block.switch_mlp, group=group, placement=[(0, 4)])
    wrapped = MoEAllSum(block, group=group)
    assert [k for k, _ in tree_flatten(wrapped.parameters())] == [k for k, _ in tree_flatten(block.parameters())]
    assert wrapped.sharding_group is None and wrapped.switch_mlp is block.switch_mlp
    x = mx.random.normal((2, 5, HIDDEN), key=mx.random.key(4))
    np.testing.assert_array_equal(np.array(wrapped(x)), np.array(block(x)))
