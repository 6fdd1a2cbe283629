"""Sharded decoder blocks against the unsharded block, over many head layouts, in one process.

Each example builds a one-block mlx-lm model (llama, qwen2 with q/k/v biases,
qwen3 with q/k norms, phi3 with fused qkv and gate_up projections, gemma3_text) with a drawn layout: query heads, key/value heads (MHA,
GQA, MQA), head_dim, MLP width, float or 4-/8-bit weights with a drawn
quantization group, 2-6 ranks, equal or drawn TP weights. The plan
(:func:`mlxdist.lm.plan.model_split`) and the sharding
(:func:`mlxdist.lm.tensor.shard_block`, through mlxdist.nn's real slicing)
make every rank's block; :class:`support.standin.StandInWorld` runs them one
after another with each all-sum returning the sum of every rank's partial
output, as the collective does. Every rank's output must equal the unsharded
block's (up to the summation order), and a layout the plan refuses must break
a stated constraint. Whole models of every family with a test checkpoint
(mixture-of-experts ones under expert TP and EP, multimodal wrappers whose
decoder lives under ``language_model``) are checked the same way, by drawn
and by fixed layouts; the pipeline stage against each pipelined family's inner
model; and families a mode refuses, by the typed error naming the module.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("mlx_lm", reason="mlxdist.lm needs the lm extra (Python >= 3.11)")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from support.standin import StandInWorld  # noqa: E402

from mlxdist.errors import ShapeError  # noqa: E402
from mlxdist.lm.plan import layout_of, model_split  # noqa: E402
from mlxdist.lm.tensor import shard_block  # noqa: E402
from mlxdist.lm.testing import random_model  # noqa: E402


def one_block_model(family: str, n_heads: int, n_kv: int, head_dim: int, hidden: int, inter: int,
                    bits: int | None, group_size: int, seed: int) -> nn.Module:
    return random_model(family, bits=bits, group_size=group_size, seed=seed, hidden_size=hidden, num_layers=1,
                        num_heads=n_heads, num_kv_heads=n_kv, intermediate_size=inter, head_dim=head_dim,
                        vocab_size=300)[0]


def sharded_outputs(model: nn.Module, size: int, weights, x: mx.array) -> tuple[list[mx.array], object]:
    layout = layout_of(model)
    split = model_split(model, layout, size, weights)
    world = StandInWorld(size)
    blocks = []
    for group in world.groups:
        block = copy.deepcopy(model.model.layers[0])
        shard_block(block, layout, group, split)
        blocks.append(block)
    outputs = world.run([lambda b=b: b(x, "causal", None) for b in blocks])
    assert world.all_sums == 2  # one after attention, one after the MLP
    return outputs, split


@st.composite
def layouts(draw):
    family = draw(st.sampled_from(["llama", "qwen2", "qwen3", "phi3", "gemma3_text"]))
    n_kv = draw(st.integers(1, 6))
    n_heads = n_kv * draw(st.integers(1, 4))  # 1: MHA; n_kv == 1: MQA; else GQA
    quant = draw(st.sampled_from([None, (4, 32), (8, 32), (4, 64), (8, 64)]))
    bits, group_size = quant if quant else (None, 32)
    # A quantized o_proj needs its whole input (every query head) in whole groups.
    head_dim = draw(st.sampled_from([d for d in (8, 16, 32, 64) if not bits or n_heads * d % group_size == 0]))
    hidden = draw(st.sampled_from([64, 128]))
    if family in ("qwen2", "phi3"):  # their attention takes head_dim = hidden_size // heads
        hidden = n_heads * head_dim
    unit = group_size if bits else 1
    inter = unit * draw(st.integers(6, 24)) if bits else draw(st.integers(6, 200))
    # Mostly layouts TP can split (a query head per rank); some with more ranks than heads.
    size = draw(st.integers(2, 6) if draw(st.integers(0, 9)) == 0 else st.integers(2, max(2, min(6, n_heads))))
    weights = draw(st.none() | st.lists(st.integers(1, 4), min_size=size, max_size=size))
    seed = draw(st.integers(0, 2**16))
    return family, n_heads, n_kv, head_dim, hidden, inter, bits, group_size, size, weights, seed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_sharded_block_equals_unsharded(layout) -> None:
    family, n_heads, n_kv, head_dim, hidden, inter, bits, group_size, size, weights, seed = layout
    model = one_block_model(family, n_heads, n_kv, head_dim, hidden, inter, bits, group_size, seed)
    x = mx.random.normal((1, 5, hidden), key=mx.random.key(seed + 1))
    reference = model.model.layers[0](x, "causal", None)
    try:
        outputs, split = sharded_outputs(model, size, weights, x)
    except ShapeError as exc:
        # Refused: the plan must name a real constraint of this layout.
        text = str(exc)
        if size > n_heads:
            assert "at least one query head per rank" in text
        else:
            assert bits is not None and f"group_size={group_size}" in text or "whole groups" in text, text
        event("refused")
        return
    event("uneven" if not split.is_even() else "even")
    assert [stop - start for start, stop in split.query_heads] and sum(split.intermediate) == inter
    scale = float(mx.abs(reference).max()) + 1.0
    for rank, out in enumerate(outputs):
        error = float(mx.abs(out - reference).max())
        assert error <= 2e-5 * scale, (rank, error, split.describe())


def test_six_heads_six_kv_heads_on_four_ranks() -> None:
    """The MHA layout of 6 heads on 4 ranks (query heads 2, 2, 1, 1; MLP features 213, 213, 299, 299)."""
    model = one_block_model("llama", 6, 6, 64, 384, 1024, None, 32, seed=0)
    x = mx.random.normal((1, 7, 384), key=mx.random.key(1))
    reference = model.model.layers[0](x, "causal", None)
    outputs, split = sharded_outputs(model, 4, None, x)
    assert split.as_dict()["query_heads"] == [2, 2, 1, 1]
    assert split.intermediate == [213, 213, 299, 299]
    for out in outputs:
        assert float(mx.abs(out - reference).max()) <= 2e-5 * (float(mx.abs(reference).max()) + 1.0)


MOE_FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss", "glm4_moe", "deepseek_v3", "glm4_moe_lite", "deepseek_v2",
                "kimi_k25", "deepseek_v32", "mistral4", "exaone_moe", "step3p5", "minimax_m3_vl", "minimax", "kimi_k3"]
# Routing top-2 within 1 of 2 expert groups: an even count of at least 4 experts.
GROUPED = ("glm4_moe", "deepseek_v3", "glm4_moe_lite", "deepseek_v2", "kimi_k25", "deepseek_v32", "mistral4",
           "exaone_moe", "kimi_k3")

TOKENS = mx.array([[1, 7, 42, 99, 250, 3]])


def prompt_and_one_token(model: nn.Module) -> mx.array:
    """Logits of a prompt and of one more token without a cache (latent attention's decode path)."""
    return mx.concatenate([model(TOKENS), model(TOKENS[:, :1])], axis=1)


def sharded_models(model: nn.Module, family: str, size: int, weights, experts: str = "tp"):
    """Every rank's copy of ``model``, planned under --mode tp and sharded over a stand-in world.

    Raises ShapeError where the plan refuses the layout."""
    from mlxdist.lm.plan import choose
    from mlxdist.lm.tensor import apply_tensor_parallel

    world = StandInWorld(size)
    models = []
    for group in world.groups:
        copied = copy.deepcopy(model)
        plan = choose(copied, family, group.rank(), size, "tp", tp_weights=weights, experts=experts)
        apply_tensor_parallel(copied, None, group, plan.split)
        models.append(copied)
    return world, models, plan


def assert_every_rank_equals(world, models, reference: mx.array, plan) -> None:
    """Each rank's logits equal the unsharded model's, after one all-sum per attention and per MLP/MoE (and one
    per norm over every head's features)."""
    from mlxdist.nn import ShardedRMSNorm

    outputs = world.run([lambda m=m: prompt_and_one_token(m) for m in models])
    wide_norms = sum(isinstance(module, ShardedRMSNorm) for _, module in models[0].named_modules())
    assert world.all_sums == 2 * (4 + wide_norms)  # two forwards of two blocks
    scale = float(mx.abs(reference).max()) + 1.0
    for rank, out in enumerate(outputs):
        error = float(mx.abs(out - reference).max())
        assert error <= 3e-5 * scale, (rank, error, plan.reason)


@st.composite
def moe_layouts(draw):
    family = draw(st.sampled_from(MOE_FAMILIES))
    n_kv = draw(st.integers(1, 4))
    n_heads = n_kv * draw(st.integers(2 if n_kv == 1 else 1, 3))
    quant = draw(st.sampled_from([None, (4, 32), (8, 32)]))
    bits, group_size = quant if quant else (None, 32)
    head_dim = draw(st.sampled_from([d for d in (16, 32) if not bits or n_heads * d % group_size == 0] or [32]))
    hidden = n_heads * head_dim if family == "mixtral" else 64  # mixtral: head_dim = hidden // heads
    if bits and hidden % group_size:
        hidden = 64
        head_dim = hidden // n_heads if family == "mixtral" else head_dim
    unit = group_size if bits else 1
    size = draw(st.integers(2, max(2, min(6, n_heads))))
    # Mostly enough whole quantization groups for every rank; sometimes not (refused).
    features = unit * draw(st.integers(2, 6) if draw(st.integers(0, 4)) == 0 else st.integers(size, 7)) if bits \
        else draw(st.integers(size, 48))
    grouped = family in GROUPED
    num_experts = draw(st.sampled_from([4, 6, 8]) if grouped else st.integers(2, 8))
    experts = draw(st.sampled_from(["tp", "ep"]))
    weights = draw(st.none() | st.lists(st.integers(1, 3), min_size=size, max_size=size))
    seed = draw(st.integers(0, 2**16))
    return family, n_heads, n_kv, head_dim, hidden, features, num_experts, bits, group_size, size, experts, weights, seed


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(moe_layouts())
def test_sharded_moe_model_equals_unsharded(layout) -> None:
    """qwen3_moe / mixtral / gpt_oss (sinks, expert biases) / glm4_moe (shared experts, grouped top-k with
    e_score_correction_bias, a dense first block) / deepseek_v3 and glm4_moe_lite (also multi-head latent
    attention) / deepseek_v2 (latent attention through kv_b_proj) / kimi_k25 (deepseek_v3's text model
    under a multimodal wrapper's language_model) / deepseek_v32 (also a sparse-attention indexer) / mistral4 (llama-4
    attention scaling) / exaone_moe (local windows shorter than the prompt, a dense first block) / step3p5 (a per-head
    output gate, a shared expert) / minimax_m3_vl (the decoder under a wrapper, per-head q/k norms) / minimax
    (q/k norms over every head's features, sharded with one all-sum each, replicated key/value heads counted once) /
    kimi_k3 (Kimi delta attention split by heads, latent attention with a per-head output gate, attention
    residuals across blocks, under a wrapper) under
    expert TP or EP: logits of every rank equal the
    unsharded model's; a refused layout names its constraint."""
    (family, n_heads, n_kv, head_dim, hidden, features, num_experts, bits, group_size, size, experts,
     weights, seed) = layout
    model, _ = random_model(family, bits=bits, group_size=group_size, seed=seed, hidden_size=hidden, num_layers=2,
                            num_heads=n_heads, num_kv_heads=n_kv, intermediate_size=features, head_dim=head_dim,
                            vocab_size=300, num_experts=num_experts)
    reference = prompt_and_one_token(model)
    try:
        world, models, plan = sharded_models(model, family, size, weights, experts)
    except ShapeError as exc:
        text = str(exc)
        assert (experts == "ep" and size > num_experts and "at least one expert per rank" in text) or (
            bits is not None and "group" in text
        ) or "whole quantization groups" in text, text
        event("refused")
        return
    event(f"{family} {experts}")
    assert plan.experts == experts
    if experts == "ep":
        assert [stop - start for start, stop in plan.split.experts] and plan.split.experts[-1][1] == num_experts
    else:
        assert sum(plan.split.expert_features) == features
    assert_every_rank_equals(world, models, reference, plan)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(["ministral3", "gemma3", "qwen3_5"]), n_kv=st.integers(1, 3), group=st.integers(1, 3),
       quant=st.sampled_from([None, (4, 32), (8, 32)]), size=st.integers(2, 3),
       weights=st.none() | st.lists(st.integers(1, 3), min_size=3, max_size=3), seed=st.integers(0, 2**16))
def test_sharded_dense_model_equals_unsharded(family, n_kv, group, quant, size, weights, seed) -> None:
    """Dense families whose blocks take more than (x, mask, cache) (ministral3 passes its llama-4 attention
    scale), gemma3's multimodal wrapper (the decoder under language_model) and qwen3_5 (gated delta nets split by
    key heads between gated-query attention blocks, under a wrapper): the whole model under TP,
    even, uneven or weighted, float or quantized, equals the unsharded model's logits on a prompt and one
    decoded token; a refused layout names its constraint."""
    n_heads = n_kv * group
    size = min(size, n_heads) if n_heads > 1 else 2
    bits, group_size = quant if quant else (None, 32)
    weights = weights[:size] if weights else None
    model, _ = random_model(family, bits=bits, group_size=group_size, seed=seed, hidden_size=64, num_layers=2,
                            num_heads=n_heads, num_kv_heads=n_kv, intermediate_size=96, head_dim=32,
                            vocab_size=300)
    reference = prompt_and_one_token(model)
    try:
        world, models, plan = sharded_models(model, family, size, weights)
    except ShapeError as exc:
        text = str(exc)
        assert (size > n_heads and "at least one query head per rank" in text) or "group" in text or (
            family == "qwen3_5" and size > n_heads and "gated delta net key head per rank" in text), text
        event("refused")
        return
    event(f"{family} {'uneven' if not plan.split.is_even() else 'even'}")
    assert plan.mode == "tp" and sum(plan.split.intermediate) == 96
    assert_every_rank_equals(world, models, reference, plan)


@pytest.mark.parametrize(
    "family", ["llama", "gemma3_text", "phi3", "qwen3_moe", "mixtral", "gpt_oss", "glm4_moe", "deepseek_v3",
               "glm4_moe_lite", "minimax", "deepseek_v2", "gemma3", "kimi_k25", "deepseek_v32",
               "minimax_m3_vl", "ministral3", "mistral4", "exaone_moe", "step3p5", "qwen3_5"]
)
def test_pipeline_stage_over_every_block_equals_the_inner_model(family: str) -> None:
    """Pipeline parallelism swaps the family's inner model for mlxdist's stage: over all blocks (one rank)
    it must compute what the family's own inner model does, on a prompt, on a prompt in two chunks and then
    token by token from its caches (embedding scale, masks, local windows: 24 tokens cross gemma3's window
    of 16 and exaone_moe's and step3p5's of 4; llama-4's attention scale, which ministral3's and mistral4's
    test configs make grow every 8 positions; qwen3_5's linear-attention state masks), or PP would be
    silently wrong for that family."""
    import mlxdist
    from mlx_lm.models.cache import make_prompt_cache

    from mlxdist.lm.pipeline import apply_pipeline_parallel

    model, _ = random_model(family, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                            intermediate_size=64, vocab_size=300, seed=3)
    tokens = mx.array([[1, 5, 7, 9, 11, 13] * 4])

    def forwards() -> list[mx.array]:
        cache = make_prompt_cache(model)
        outputs = [model(tokens[:, :10], cache=cache), model(tokens[:, 10:], cache=cache)]  # a chunked prefill
        for _ in range(10):
            outputs.append(model(mx.argmax(outputs[-1][:, -1:], axis=-1), cache=cache))
        return [model(tokens), *outputs]

    reference = forwards()
    apply_pipeline_parallel(model, 0, 3, mlxdist.world())
    for got, expected in zip(forwards(), reference, strict=True):
        assert float(mx.abs(got - expected).max()) == 0.0


def test_minimax_whole_width_qk_norms_are_sharded() -> None:
    """minimax normalises all heads' queries (and keys) together: under TP each rank's q/k norm covers its own
    heads' features and divides by the whole width's RMS (one all-sum of the sums of squares); a norm of
    another kind over every head is refused naming the module."""
    from mlxdist.errors import UnsupportedOperationError
    from mlxdist.lm.plan import choose
    from mlxdist.nn import ShardedRMSNorm

    model, _ = random_model("minimax", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                            intermediate_size=32, vocab_size=300)
    reference = prompt_and_one_token(model)
    # 3 ranks over 2 key/value heads: key/value head 1 is held by two ranks and counts once in the norm.
    world, models, plan = sharded_models(model, "minimax", 3, None)
    assert plan.mode == "tp" and plan.split.kv_heads == [[0], [1], [1]]
    for rank, copy in enumerate(models):
        norms = [copy.model.layers[0].self_attn[name] for name in ("q_norm", "k_norm")]
        assert all(isinstance(norm, ShardedRMSNorm) for norm in norms)
        assert [norm.total for norm in norms] == [64, 32] and norms[1].weight.shape[0] == 16
    assert [m.model.layers[0].self_attn.q_norm.weight.shape[0] for m in models] == [32, 16, 16]
    assert_every_rank_equals(world, models, reference, plan)
    model.model.layers[0].self_attn.k_norm = nn.LayerNorm(32)
    with pytest.raises(UnsupportedOperationError, match=r"model\.layers\.0\.self_attn\.k_norm \(LayerNorm\)"):
        choose(model, "minimax", 0, 2, "tp")


@pytest.mark.parametrize("family, module", [("longcat_flash", "lists of modules ['self_attn', 'mlps'")])
def test_unknown_kinds_are_refused_naming_the_module(family: str, module: str) -> None:
    """longcat_flash holds two attentions and two MLPs per block in lists; the pipeline stage runs none of them:
    every mode is refused with UnsupportedOperationError naming the module (found under a wrapper's
    language_model where there is one), while mlx-lm runs the model in one process."""
    from mlxdist.errors import UnsupportedOperationError
    from mlxdist.lm.plan import choose

    model, _ = random_model(family, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=4, head_dim=16,
                            intermediate_size=64, vocab_size=300)
    assert model(mx.array([[1, 5, 7]])).shape == (1, 3, 300)
    for mode in ("tp", "auto", "pp"):
        with pytest.raises(UnsupportedOperationError) as caught:
            choose(model, family, 0, 2, mode)
        if mode != "pp":
            assert module in str(caught.value)
        if mode != "tp":
            assert f"pipeline stage is not checked against {family}" in str(caught.value)


CASES = [(None, 3, None, "tp"), (None, 2, [2, 1], "tp"), (None, 3, [1, 2, 1], "ep"), (4, 3, [1, 1, 2], "tp"),
         (4, 2, None, "ep")]


@pytest.mark.parametrize("family", [*MOE_FAMILIES, "ministral3", "gemma3", "qwen3_5"])
@pytest.mark.parametrize("bits, size, weights, experts", CASES)
def test_every_family_at_fixed_layouts(family: str, bits, size: int, weights, experts: str) -> None:
    """Every family with a test checkpoint, whatever the property tests happen to draw: uneven TP over 3 ranks
    (6 query heads over 3 key/value heads), weighted TP and EP, float and 4-bit; every rank's logits on a
    prompt and one decoded token equal the unsharded model's."""
    dense = family not in MOE_FAMILIES
    if dense and experts == "ep":
        experts = "tp"
    model, _ = random_model(family, bits=bits, seed=1, hidden_size=96, num_layers=2, num_heads=6, num_kv_heads=3,
                            head_dim=16, intermediate_size=96, vocab_size=300, num_experts=4)
    reference = prompt_and_one_token(model)
    world, models, plan = sharded_models(model, family, size, weights, experts)
    assert plan.experts == (None if dense else experts)
    assert_every_rank_equals(world, models, reference, plan)


@pytest.mark.parametrize("family", ["glm4_moe_lite", "ministral3", "minimax", "deepseek_v2", "deepseek_v32", "mistral4",
                                    "exaone_moe", "step3p5", "qwen3_5", "kimi_k3", "longcat_flash", "minimax_m3_vl",
                                    "gemma3", "kimi_k25"])
def test_written_checkpoint_loads_with_mlx_lm(family: str, tmp_path) -> None:
    """The test writer's checkpoint of each family added here is what mlx-lm's own loader reads back:
    the same logits as the model it was written from."""
    from mlx_lm.utils import load_model

    from mlxdist.lm.testing import write_checkpoint

    dims = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=64,
                vocab_size=300)
    write_checkpoint(tmp_path, family, **dims)
    loaded, _ = load_model(tmp_path)
    written, _ = random_model(family, **dims)
    tokens = mx.array([[1, 5, 7, 9]])
    assert mx.array_equal(loaded(tokens), written(tokens))


@st.composite
def norm_layouts(draw):
    """A width, a rank count and each rank's feature ranges: every feature held at least once, some by several
    ranks or twice by one (as replicated key/value heads are)."""
    width = draw(st.integers(2, 40))
    size = draw(st.integers(2, 5))
    owner = [draw(st.integers(0, size - 1)) for _ in range(width)]
    ranges: list[list[tuple[int, int]]] = [[] for _ in range(size)]
    for feature, rank in enumerate(owner):
        ranges[rank].append((feature, feature + 1))
    for _ in range(draw(st.integers(0, 4))):  # extra copies of a slice, on any rank, anywhere in its order
        start = draw(st.integers(0, width - 1))
        stop = draw(st.integers(start + 1, width))
        rank = draw(st.integers(0, size - 1))
        ranges[rank].insert(draw(st.integers(0, len(ranges[rank]))), (start, stop))
    return width, size, ranges


@settings(max_examples=60, deadline=None)
@given(layout=norm_layouts(), dtype=st.sampled_from(["float32", "float16"]), seed=st.integers(0, 2**16))
def test_sharded_rms_norm_equals_the_whole_norm(layout, dtype, seed) -> None:
    """Each rank's ShardedRMSNorm output equals the whole-width nn.RMSNorm's output at that rank's features,
    whichever features a rank holds and however often (a copied feature counts once in the mean)."""
    from mlxdist.nn import ShardedRMSNorm

    width, size, ranges = layout
    key_x, key_w = mx.random.split(mx.random.key(seed))
    x = mx.random.normal((2, 3, width), key=key_x).astype(getattr(mx, dtype))
    norm = nn.RMSNorm(width, eps=1e-5)
    norm.weight = mx.random.normal((width,), key=key_w)
    reference = norm(x.astype(mx.float32))
    world = StandInWorld(size)
    sharded = [ShardedRMSNorm.from_rms_norm(norm, ranges, group=group) for group in world.groups]
    local = [mx.concatenate([x[..., :0]] + [x[..., a:b] for a, b in ranges[rank]], axis=-1) for rank in range(size)]
    outputs = world.run([lambda r=r: sharded[r](local[r]) for r in range(size)])
    tolerance = 1e-5 if dtype == "float32" else 2e-3
    for rank, out in enumerate(outputs):
        assert out.dtype == x.dtype
        expected = mx.concatenate([reference[..., :0]] + [reference[..., a:b] for a, b in ranges[rank]], axis=-1)
        assert out.shape == expected.shape
        if expected.size:
            scale = float(mx.abs(expected).max()) + 1.0
            assert float(mx.abs(out.astype(mx.float32) - expected).max()) <= tolerance * scale, rank


def test_sharded_rms_norm_refuses_bad_ranges() -> None:
    """Ranges for the wrong number of ranks, outside the width, or leaving a feature unheld: typed errors."""
    from mlxdist.errors import InvalidArgumentError
    from mlxdist.nn import ShardedRMSNorm

    norm, group = nn.RMSNorm(8), StandInWorld(2).groups[0]
    with pytest.raises(InvalidArgumentError, match="one list per rank"):
        ShardedRMSNorm.from_rms_norm(norm, [[(0, 8)]], group=group)
    with pytest.raises(InvalidArgumentError, match="outside the norm's width 8"):
        ShardedRMSNorm.from_rms_norm(norm, [[(0, 4)], [(4, 9)]], group=group)
    with pytest.raises(InvalidArgumentError, match="feature 5 of the norm is held by no rank"):
        ShardedRMSNorm.from_rms_norm(norm, [[(0, 4)], [(4, 5), (6, 8)]], group=group)
