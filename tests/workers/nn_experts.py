"""Checks for tests/workers/nn_layers.py: mlx-lm MoE blocks through MoEAllSum on real ranks.

Every rank builds the same small mlx-lm MoE blocks (qwen3_moe's sparse block;
gpt_oss's, with expert biases and its own activation) from shared seeds, keeps
an unsharded copy, shards the switch of another copy under tensor parallelism
(weighted feature sizes) or expert parallelism (weighted expert placement),
wraps it in MoEAllSum with each dispatch path ("auto" takes all_sum, test_experts.py), and compares its output with
the unsharded block's, for one token (decode) and for a prompt whose token
count the ranks do not divide, float32 and 4-bit.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.models import gpt_oss, qwen3_moe

import mlxdist
from mlxdist.nn import MoEAllSum, expert_placement, place_experts, shard_switch, split_sizes

HIDDEN = 64


def _qwen3_block(experts: int, features: int) -> nn.Module:
    args = qwen3_moe.ModelArgs(
        model_type="qwen3_moe", hidden_size=HIDDEN, num_hidden_layers=1, intermediate_size=128,
        num_attention_heads=2, num_experts=experts, num_experts_per_tok=2, decoder_sparse_step=1,
        mlp_only_layers=[], moe_intermediate_size=features, rms_norm_eps=1e-6, vocab_size=32,
        num_key_value_heads=2, head_dim=32, rope_theta=10000.0, tie_word_embeddings=False,
        max_position_embeddings=64, norm_topk_prob=True,
    )
    return qwen3_moe.Qwen3MoeSparseMoeBlock(args)


def _gpt_oss_block(experts: int, features: int) -> nn.Module:
    args = gpt_oss.ModelArgs(num_local_experts=experts, num_experts_per_tok=3, hidden_size=HIDDEN,
                             intermediate_size=features)
    return gpt_oss.MLPBlock(args)


def _build(make: Callable[[int, int], nn.Module], experts: int, features: int, bits: int | None, seed: int) -> nn.Module:
    mx.random.seed(seed)
    block = make(experts, features)
    # mlx-lm initialises biases to zero: make the expert and router biases matter.
    block.update(tree_map_with_path(
        lambda path, value: mx.random.normal(value.shape) if path.endswith("bias") else value, block.parameters()))
    if bits is not None:
        switch = block["switch_mlp" if "switch_mlp" in block else "experts"]
        nn.quantize(switch, group_size=32, bits=bits)
    mx.eval(block.parameters())
    return block


def _switch(block: nn.Module) -> nn.Module:
    return block["switch_mlp" if "switch_mlp" in block else "experts"]


def checks(group: mlxdist.Group) -> list[tuple[str, Callable[[], None]]]:
    """The MoE checks, in the order every rank runs them."""
    n, rank = group.size(), group.rank()
    weights = list(range(n, 0, -1))  # rank 0 the largest share
    experts = 2 * n + 1  # divisible by no rank count > 1
    features = 32 * (n + 1)  # whole groups of 32, split unevenly by the weights

    def blocks(mode: str) -> None:
        for name, make in (("qwen3_moe", _qwen3_block), ("gpt_oss", _gpt_oss_block)):
            for bits in (None, 4):
                full = _build(make, experts, features, bits, seed=300)
                for dispatch in ("all_sum", "all_to_all"):
                    block = _build(make, experts, features, bits, seed=300)
                    if mode == "tp":
                        sizes = split_sizes(features, weights, unit=32 if bits else 1)
                        shard_switch(_switch(block), group=group, sizes=sizes)
                    else:
                        placement = expert_placement(experts, weights)
                        place_experts(_switch(block), group=group, placement=placement)
                        start, stop = placement[rank]
                        mine = sum(v.nbytes for _, v in tree_flatten(_switch(block).parameters()))
                        whole = sum(v.nbytes for _, v in tree_flatten(_switch(full).parameters()))
                        assert mine * experts == whole * (stop - start), (mine, whole, placement)
                    wrapped = MoEAllSum(block, group=group, dispatch=dispatch)
                    assert wrapped.sharding_group is None  # mlx-lm's own attribute, read through
                    for tokens in (1, 8 * n + 1):  # decode; a prompt past 64 slots (only local ones computed)
                        x = mx.random.normal((2, tokens, HIDDEN), key=mx.random.key(301 + tokens))
                        want, got = full(x), wrapped(x)
                        what = f"{name} {mode} bits={bits} dispatch={dispatch} tokens={tokens}"
                        assert got.shape == want.shape, what
                        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4, err_msg=what)
                    if bits is None and name == "qwen3_moe":  # the input's gradient: every rank's part summed
                        x = mx.random.normal((1, 8 * n + 1, HIDDEN), key=mx.random.key(302))
                        want = mx.grad(lambda v: (full(v) ** 2).sum())(x)
                        got = mx.grad(lambda v: (wrapped(v) ** 2).sum())(x)
                        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-3, atol=1e-3,
                                                   err_msg=f"{name} {mode} dispatch={dispatch} input gradient")

    return [("moe blocks tp", lambda: blocks("tp")), ("moe blocks ep", lambda: blocks("ep"))]
