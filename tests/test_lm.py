"""mlxdist.lm: sharded inference of mlx-lm checkpoints, against independent references.

The references are computed in this process with plain mlx-lm (``load_model``
and ``generate_step``, one process, no mlxdist), and, for float16/bfloat16,
mlx-lm's own ``model.shard()`` over mx.distributed in the same job as
mlxdist's TP. Checkpoints are written by the tests (random weights, mlx-lm's
format, an offline tokenizer). Each (ranks, backend) configuration runs all
its checks in one launched job (tests/workers/lm_checks.py): llama, qwen2,
qwen3, mistral, qwen3_moe, mixtral, gpt_oss, deepseek_v3, gemma3_text and phi3
in detail (plans, shares, bytes), and every other family with a test checkpoint
(FAMILY_CHECKS) under TP and EP, float32 and 4-bit, for its tokens and plan.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from conftest import BACKENDS, run_ranks

import mlxdist
from mlxdist.lm import choose, generate_tokens, layer_ranges, load
from mlxdist.lm.testing import write_checkpoint

os.environ["HF_HUB_OFFLINE"] = "1"

PROMPT = [17, 260, 301, 42, 99, 400, 5, 311]
MAX_TOKENS = 12
DIMS = dict(hidden_size=128, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=256, vocab_size=512)
ODD_HEADS = dict(hidden_size=96, num_layers=4, head_dim=32, intermediate_size=192, vocab_size=512)
MOE_DIMS = dict(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, vocab_size=512)
# name -> write_checkpoint arguments. Every family appears; "odd" has 6 heads and 3 kv heads.
CHECKPOINTS = {
    "f32": dict(family="llama", dtype="float32", **DIMS),
    "q4": dict(family="qwen3", dtype="float32", bits=4, group_size=32, seed=1, **DIMS),
    "q8": dict(family="llama", dtype="float32", bits=8, group_size=32, seed=2, **DIMS),
    "f16": dict(family="qwen2", dtype="float16", seed=3, **DIMS),
    "bf16": dict(family="mistral", dtype="bfloat16", seed=4, **DIMS),
    "odd": dict(
        family="qwen2",
        dtype="float32",
        seed=5,
        hidden_size=96,
        num_layers=4,
        num_heads=6,
        num_kv_heads=3,
        intermediate_size=192,
        vocab_size=512,
    ),
    # Heads no rank count above 1 divides, with head_dim a whole quantization group.
    "g3": dict(family="llama", dtype="float32", seed=6, **ODD_HEADS, num_heads=3, num_kv_heads=1),
    "g3q4": dict(family="qwen3", dtype="float32", bits=4, group_size=32, seed=7, **ODD_HEADS, num_heads=3,
                 num_kv_heads=1),
    # MHA with 6 heads: on 4 ranks query heads 2, 2, 1, 1 and MLP features 213, 213, 299, 299.
    "mha6": dict(family="llama", dtype="float32", seed=9, hidden_size=384, num_layers=2, num_heads=6,
                 num_kv_heads=6, head_dim=64, intermediate_size=1024, vocab_size=512),
    # Mixture of experts (4 or 6 experts of 96/128 features, 2 chosen per token).
    "moe": dict(family="qwen3_moe", dtype="float32", seed=10, **MOE_DIMS, num_experts=6, intermediate_size=96),
    "moe_q4": dict(family="mixtral", dtype="float32", bits=4, group_size=32, seed=11,
                   **{**MOE_DIMS, "hidden_size": 128}, num_experts=4, intermediate_size=128),
    "ds": dict(family="deepseek_v3", dtype="float32", seed=15, **MOE_DIMS, num_experts=4, intermediate_size=64),
    "oss": dict(family="gpt_oss", dtype="float32", seed=12, **MOE_DIMS, num_experts=4, intermediate_size=64),
    "gemma": dict(family="gemma3_text", dtype="float32", seed=13, **MOE_DIMS, head_dim=16, intermediate_size=128),
    "phi3": dict(family="phi3", dtype="float32", seed=14, **MOE_DIMS, intermediate_size=128),
    "odd_q4": dict(family="llama", dtype="float32", bits=4, group_size=32, seed=8, **ODD_HEADS, num_heads=6,
                   num_kv_heads=3),
}
# The families tests/test_lm_layouts.py proves in one process, launched here too: every one under TP,
# the mixture-of-experts ones under EP as well, float32 and 4-bit among them, spread over the jobs
# below as (ranks, backend): [(family, bits, experts, weights)].
FAMILY_DIMS = dict(hidden_size=96, num_layers=2, num_heads=6, num_kv_heads=3, head_dim=16, intermediate_size=96,
                   vocab_size=512, num_experts=4)
# (ranks, backend) -> (family, bits, how: "tp"/"ep" (experts under TP) or "pp", weights). Every family
# appears at 2, 3 and 4 ranks, on ring and MPI, in float32 and 4-bit, under TP, EP (with experts) and PP
# (a covering, not every combination: 4 ring ranks spin too long on 2 cores, and 4-bit at 4 ranks leaves a
# rank less than a quantization group of these small models).
FAMILY_CHECKS = {
    (2, "ring"): [("glm4_moe", None, "tp", [2, 1]), ("deepseek_v32", None, "tp", [2, 1]), ("kimi_k25", 4, "ep", None),
                  ("mistral4", 4, "ep", None), ("deepseek_v2", 4, "ep", None), ("ministral3", None, "pp", None),
                  ("mistral4", 4, "pp", [2, 1]), ("minimax", 4, "ep", None), ("glm4_moe", None, "pp", None),
                  ("glm4_moe_lite", None, "tp", [2, 1]), ("glm4_moe_lite", 4, "pp", None),
                  ("minimax_m3_vl", 4, "ep", None), ("exaone_moe", 4, "ep", None), ("step3p5", 4, "tp", [2, 1]),
                  ("gemma3", None, "tp", [2, 1]), ("qwen3_5", 4, "tp", None), ("kimi_k3", None, "tp", [2, 1])],
    (2, "mpi"): [("minimax_m3_vl", None, "tp", [2, 1]), ("exaone_moe", None, "tp", [2, 1]),
                 ("ministral3", None, "tp", [2, 1]), ("glm4_moe", 4, "ep", None), ("glm4_moe_lite", 4, "ep", None),
                 ("step3p5", 4, "ep", None), ("exaone_moe", 4, "pp", None), ("step3p5", None, "pp", [1, 2]),
                 ("qwen3_5", None, "tp", [2, 1]), ("qwen3_5", 4, "pp", None), ("deepseek_v32", None, "pp", None),
                 ("kimi_k25", None, "pp", None), ("deepseek_v2", None, "pp", None), ("minimax", 4, "tp", None),
                 ("minimax", None, "pp", None), ("minimax_m3_vl", 4, "pp", None), ("gemma3", 4, "pp", None),
                 ("kimi_k3", 4, "ep", None)],
    (3, "mpi"): [("glm4_moe_lite", None, "tp", None), ("step3p5", None, "tp", None),
                 ("minimax_m3_vl", None, "ep", [1, 2, 1]), ("exaone_moe", None, "ep", [1, 2, 1]),
                 ("gemma3", 4, "tp", [1, 1, 2]), ("kimi_k25", 4, "tp", [1, 1, 2]), ("ministral3", 4, "tp", [1, 1, 2]),
                 ("minimax", None, "tp", [1, 1, 2]), ("qwen3_5", 4, "tp", None), ("glm4_moe", 4, "tp", [1, 1, 2]),
                 ("deepseek_v32", 4, "ep", [1, 2, 1]), ("mistral4", None, "ep", [1, 2, 1]),
                 ("deepseek_v2", 4, "tp", [1, 1, 2]), ("kimi_k3", None, "ep", [1, 2, 1])],
    (4, "mpi"): [("deepseek_v2", None, "tp", None), ("mistral4", None, "tp", None), ("deepseek_v32", None, "ep", None),
                 ("gemma3", None, "tp", None), ("qwen3_5", None, "tp", [1, 1, 2, 2]), ("glm4_moe", None, "ep", None),
                 ("glm4_moe_lite", None, "ep", None), ("kimi_k25", None, "tp", None), ("minimax", None, "ep", None),
                 ("minimax_m3_vl", None, "tp", None), ("exaone_moe", None, "tp", None), ("step3p5", None, "ep", None),
                 ("ministral3", None, "tp", None), ("kimi_k3", None, "tp", None)],
}
DENSE_FAMILIES = ("gemma3", "ministral3", "qwen3_5")
NO_PIPELINE = ("kimi_k3",)  # its blocks pass attention residuals to one another


def test_family_checks_cover_ranks_backends_modes_and_dtypes() -> None:
    """Every family of FAMILY_CHECKS is launched at 2, 3 and 4 ranks, on ring and MPI, float32 and 4-bit,
    under TP, EP where it has experts, and PP where the pipeline stage runs it."""
    seen: dict[str, dict[str, set]] = {}
    for (n, backend), checks in FAMILY_CHECKS.items():
        for family, bits, how, _ in checks:
            point = seen.setdefault(family, {"ranks": set(), "backends": set(), "bits": set(), "modes": set()})
            point["ranks"].add(n), point["backends"].add(backend), point["bits"].add(bits), point["modes"].add(how)
    for family, point in seen.items():
        modes = {"tp"} | (set() if family in NO_PIPELINE else {"pp"}) | (set() if family in DENSE_FAMILIES else {"ep"})
        assert point == {"ranks": {2, 3, 4}, "backends": {"ring", "mpi"}, "bits": {None, 4}, "modes": modes}, family


def family_name(family: str, bits: int | None) -> str:
    return f"{family}_q{bits}" if bits else family


CHECKPOINTS.update({
    family_name(family, bits): dict(family=family, dtype="float32", seed=20 + i, **FAMILY_DIMS,
                                    **({"bits": bits, "group_size": 32} if bits else {}))
    for i, (family, bits) in enumerate(sorted({(f, b) for checks in FAMILY_CHECKS.values() for f, b, _, _ in checks},
                                              key=str))
})
# Largest |logit difference| allowed between a float16/bfloat16 model sharded
# over 2 ranks and the same model in one process (teacher-forced, logits of
# order 10 on these models; measured 0.17 and 0.18 here): TP changes the
# summation order of the row-parallel products, and the partial sums are
# rounded to the model dtype before the all-sum.
LOGIT_TOLERANCE = {"f16": 0.35, "bf16": 0.35}
LATENT = re.compile(r"\.(q_b_proj|embed_q|unembed_out)\.")  # multi-head latent attention's per-head parts
SWITCH = re.compile(r"\.(switch_mlp|experts)\.")
PROJECTION = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.")
VOCAB = re.compile(r"^(model\.embed_tokens|lm_head)\.")
# A projection's share follows the query heads, the key/value heads or the MLP features.
ROLE = {"q_proj": "query_heads", "o_proj": "query_heads", "k_proj": "kv_heads", "v_proj": "kv_heads",
        "gate_proj": "intermediate", "up_proj": "intermediate", "down_proj": "intermediate"}
BLOCK = re.compile(r"\.layers\.(\d+)\.")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm")
    return {name: write_checkpoint(root / name, **args) for name, args in CHECKPOINTS.items()}


def reference(path: Path, prompt: list[int] = PROMPT) -> dict:
    """One process, plain mlx-lm: greedy tokens and teacher-forced logits."""
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    generated = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=MAX_TOKENS):
        generated.append(int(token))
        if len(generated) == MAX_TOKENS:
            break
    scored = prompt + generated
    logits = model(mx.array(scored)[None])[0].astype(mx.float32)
    return {"tokens": generated, "logits": np.array(logits)}


@pytest.fixture(scope="module")
def references(checkpoints) -> dict[str, dict]:
    return {name: reference(path) for name, path in checkpoints.items()}


def parameter_groups(path: Path) -> tuple[int, int, dict[int, int]]:
    """From the checkpoint file: (replicated bytes, projection bytes, bytes per block)."""
    weights = mx.load(str(path / "model.safetensors"))
    replicated = sum(v.nbytes for k, v in weights.items() if not PROJECTION.search(k))
    projections = sum(v.nbytes for k, v in weights.items() if PROJECTION.search(k))
    blocks: dict[int, int] = {}
    for k, v in weights.items():
        match = BLOCK.search("." + k)
        if match:
            blocks[int(match.group(1))] = blocks.get(int(match.group(1)), 0) + v.nbytes
    return replicated, projections, blocks


def job(tmp_path: Path, n: int, backend: str, checks: list[dict], timeout: float = 240) -> list[dict]:
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps(checks))
    run_ranks("lm_checks.py", n, backend, [str(spec), str(out)], timeout=timeout)
    return json.loads(out.read_text())


def generate_check(path: Path, mode: str, **extra) -> dict:
    return {
        "kind": "generate",
        "path": str(path),
        "mode": mode,
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        **extra,
    }


def family_checks(checkpoints: dict[str, Path], n: int, backend: str) -> list[dict]:
    """The launched checks of FAMILY_CHECKS for ``(n, backend)``."""
    checks = []
    for family, bits, how, weights in FAMILY_CHECKS.get((n, backend), []):
        path = checkpoints[family_name(family, bits)]
        if how == "pp":  # the prompt in chunks of 3: ranks that evaluate only their caches still send
            checks.append(generate_check(path, "pp", pp_weights=weights, prefill_step_size=3))
        else:
            checks.append(generate_check(path, "tp", tp_weights=weights,
                                         **({} if family in DENSE_FAMILIES else {"experts": how})))
    return checks


def job_with_families(tmp_path: Path, n: int, backend: str, checks: list[dict], checkpoints: dict[str, Path],
                      references: dict) -> list[dict]:
    """:func:`job` with this configuration's FAMILY_CHECKS appended and judged; the results of ``checks``."""
    families = family_checks(checkpoints, n, backend)
    results = job(tmp_path, n, backend, checks + families)
    assert_family_results(families, results[len(checks):], references, n)
    return results[:len(checks)]


def assert_family_results(checks: list[dict], results: list[dict], references: dict, n: int) -> None:
    """Each family's tokens equal one process's, under the plan asked for; no rank holds the whole model."""
    for check, result in zip(checks, results, strict=True):
        name = Path(check["path"]).name
        assert "error" not in result, (name, result)
        plan = result["plan"]
        assert plan["mode"] == check["mode"] and plan["experts"] == check.get("experts"), (name, plan)
        if check["mode"] == "pp":
            assert plan["layers"] == [[0, 1], [1, 2]], (name, plan)
        assert result["tokens"] == references[name]["tokens"], (name, check)
        assert len(plan["rank_bytes"]) == n and max(plan["rank_bytes"]) < plan["full_bytes"], (name, plan)
        if check.get("experts") == "ep":
            assert sum(plan["shares"]["experts"]) == FAMILY_DIMS["num_experts"], (name, plan["shares"])


def expected_tp_bytes(path: Path, shares: dict, rank: int) -> int:
    """This rank's parameter bytes under TP with these shares, from the checkpoint file alone."""
    weights = mx.load(str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    whole = {
        "query_heads": config["num_attention_heads"],
        "kv_heads": config["num_key_value_heads"],
        "intermediate": config["intermediate_size"],
    }
    held = {
        "query_heads": shares["query_heads"][rank],
        "kv_heads": len(shares["kv_heads"][rank]),
        "intermediate": shares["intermediate"][rank],
    }
    total = 0
    for key, value in weights.items():
        projection = PROJECTION.search(key)
        if ".qkv_proj." in key:  # phi3's fused projection: q heads, then k and v heads
            held_heads = held["query_heads"] + 2 * held["kv_heads"]
            total += value.nbytes * held_heads // (whole["query_heads"] + 2 * whole["kv_heads"])
        elif ".gate_up_proj." in key:
            total += value.nbytes * held["intermediate"] // whole["intermediate"]
        elif projection:
            role = ROLE[projection.group(1)]
            share = value.nbytes * held[role]
            assert share % whole[role] == 0, (key, held[role], whole[role])
            total += share // whole[role]
        elif shares["vocab"] is not None and VOCAB.search(key):
            total += value.nbytes * shares["vocab"][rank] // config["vocab_size"]
        else:
            total += value.nbytes
    return total


def expected_moe_bytes(path: Path, shares: dict, rank: int) -> int:
    """This rank's parameter bytes of a mixture-of-experts checkpoint under TP (experts split or placed)."""
    weights = mx.load(str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    total = 0
    for key, value in weights.items():
        if SWITCH.search(key):
            if shares["experts"] is not None:  # EP: whole experts
                held, whole = shares["experts"][rank], value.shape[0]
            elif key.endswith("down_proj.bias"):  # kept whole (zero on ranks above 0)
                held, whole = 1, 1
            else:
                held, whole = shares["expert_features"][rank], sum(shares["expert_features"])
            assert value.nbytes * held % whole == 0, key
            total += value.nbytes * held // whole
        elif key.endswith("o_proj.bias"):  # row-parallel: added once after the sum, held whole
            total += value.nbytes
        elif PROJECTION.search(key) and ROLE[PROJECTION.search(key).group(1)] == "intermediate":
            # A dense block's MLP or the shared experts: that width's share.
            shared = "shared_experts" in key
            width = config["moe_intermediate_size"] * config["n_shared_experts"] if shared else config[
                "intermediate_size"]
            sizes = shares["widths"].get(str(width), shares["intermediate"])
            assert sum(sizes) == width, (key, sizes, width)
            total += value.nbytes * sizes[rank] // width
        elif PROJECTION.search(key) or LATENT.search(key):
            role = "query_heads" if LATENT.search(key) else ROLE[PROJECTION.search(key).group(1)]
            held = {"query_heads": shares["query_heads"][rank], "kv_heads": len(shares["kv_heads"][rank])}[role]
            whole = config["num_attention_heads"] if role == "query_heads" else config["num_key_value_heads"]
            total += value.nbytes * held // whole
        elif key.endswith("sinks"):
            total += value.nbytes * shares["query_heads"][rank] // config["num_attention_heads"]
        else:
            total += value.nbytes
    return total


def check_weight_bytes(path: Path, result: dict, n: int) -> float:
    """Assert this rank's weight bytes are its share; return the ratio to the whole model."""
    replicated, projections, blocks = parameter_groups(path)
    plan = result["plan"]
    if plan["mode"] == "tp" and plan["experts"]:
        expected = expected_moe_bytes(path, plan["shares"], plan["rank"])
    elif plan["mode"] == "tp":
        expected = expected_tp_bytes(path, plan["shares"], plan["rank"])
    else:
        start, stop = plan["layers"][plan["rank"]]
        expected = (
            (replicated + projections) - sum(blocks.values()) + sum(blocks[i] for i in range(start, stop))
        )
    assert result["weight_bytes"] == expected
    assert plan["full_bytes"] == replicated + projections
    return result["weight_bytes"] / plan["full_bytes"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 4])
def test_sharded_generation(checkpoints, references, tmp_path, n: int, backend: str) -> None:
    """Float32 dense, 4-bit (8-bit at 2 ranks): TP and PP tokens equal 1 process (on 4 ring ranks:
    PP, the 6 / 6 layout and the refusal only).

    Heads that do not divide (6 / 3 at 2 and 4 ranks, 6 / 6 at 4 ranks, 3 / 1 at 2 ranks): auto picks uneven TP, tokens
    equal 1 process (4-bit 6 / 3 at 4 ranks on MPI); 3 query heads on 4 ranks: mode="tp" raises
    ShapeError. On ring at 2 ranks also: --tp-weights 2,1 and the vocabulary-parallel head (the split is
    backend-independent).
    """
    # 4 ring ranks on a 2-core machine take ~10 s per TP check (MLX's ring transport spins while it
    # waits): there, the 6 / 6 layout, PP and the refusal; the split itself is backend-independent.
    four_ring = (n, backend) == (4, "ring")
    if four_ring:
        checks = [generate_check(checkpoints["f32"], "pp")]
    else:
        dense = ["f32", "q4"] + (["q8"] if n == 2 else [])
        checks = [generate_check(checkpoints[name], mode) for name in dense for mode in ("auto", "pp")]
        checks.append(generate_check(checkpoints["odd"], "auto"))
    if n == 2:
        checks += [generate_check(checkpoints[name], "auto") for name in ("g3", "g3q4")]
    else:
        checks.append(generate_check(checkpoints["g3"], "tp"))
        checks.append(generate_check(checkpoints["mha6"], "auto"))
        if not four_ring:
            checks.append(generate_check(checkpoints["odd_q4"], "auto"))
    if n == 2 and backend == "ring":
        checks.append(generate_check(checkpoints["odd"], "auto", tp_weights=[2, 1]))
        checks.append(generate_check(checkpoints["f32"], "auto", vocab_parallel=True))
    # Mixture of experts: experts split by features (tp) or placed whole (ep), weighted on 2 ring ranks.
    moe = {
        (2, "ring"): [("moe", "tp", [2, 1]), ("moe", "ep", [2, 1]), ("oss", "tp", None), ("moe_q4", "ep", None)],
        (2, "mpi"): [("oss", "ep", None), ("moe_q4", "tp", None), ("ds", "ep", [1, 2])],
        (4, "ring"): [],
        (4, "mpi"): [("moe", "ep", None), ("oss", "tp", None), ("oss", "ep", None), ("ds", "tp", None),
                     ("moe_q4", "tp", None)],
    }[(n, backend)]
    checks += [generate_check(checkpoints[name], "tp", experts=experts, tp_weights=weights)
               for name, experts, weights in moe]
    if n == 2 and backend == "mpi":  # gemma3's blocks; phi3's fused qkv_proj and gate_up_proj
        checks += [generate_check(checkpoints["gemma"], "auto", tp_weights=[1, 3]),
                   generate_check(checkpoints["phi3"], "auto", tp_weights=[2, 1])]
    results = job_with_families(tmp_path, n, backend, checks, checkpoints, references)
    ratios, shares = {}, {}
    for check, result in zip(checks, results):
        name = Path(check["path"]).name
        if name == "g3" and check["mode"] == "tp":
            assert result["error"] == "ShapeError", result
            assert "ValueError" in result["mro"]
            assert f"at least one query head per rank: n_heads=3 < {n} ranks" in result["message"]
            continue
        assert "error" not in result, result
        plan = result["plan"]
        want = "pp" if check["mode"] == "pp" else "tp"
        assert plan["mode"] == want, plan
        assert result["tokens"] == references[name]["tokens"], (name, check)
        uneven = name in ("odd", "odd_q4", "g3", "g3q4", "mha6")
        if uneven:
            assert "uneven tensor parallel" in plan["reason"]
        key = (name, want, str(check.get("tp_weights", "")), check.get("vocab_parallel", False))
        if name in ("moe", "moe_q4", "oss", "ds"):
            key += (check["experts"],)
            assert plan["experts"] == check["experts"] and "mixture of experts" in " ".join(plan["kinds"])
            # Every rank's bytes (gathered by load) are its share of the checkpoint file.
            assert plan["rank_bytes"] == [expected_moe_bytes(checkpoints[name], plan["shares"], r) for r in range(n)]
        ratios[key] = check_weight_bytes(checkpoints[name], result, n)
        shares[key] = plan["shares"]
    if n == 2:
        assert shares[("g3", "tp", "", False)]["query_heads"] == [2, 1]
        assert shares[("g3", "tp", "", False)]["kv_heads"] == [[0], [0]]  # one KV head on both ranks
    else:
        if not four_ring:
            assert shares[("odd", "tp", "", False)]["query_heads"] == [2, 2, 1, 1]
            assert shares[("odd", "tp", "", False)]["kv_heads"] == [[0], [1], [2], [2]]
        assert shares[("mha6", "tp", "", False)]["query_heads"] == [2, 2, 1, 1]
        assert shares[("mha6", "tp", "", False)]["intermediate"] == [213, 213, 299, 299]
    if n == 2 and backend == "ring":
        # Weights 2, 1: rank 0 holds 2/3 of every expert's features, or 4 of the 6 experts.
        assert shares[("moe", "tp", "[2, 1]", False, "tp")]["expert_features"] == [64, 32]
        assert shares[("moe", "tp", "[2, 1]", False, "ep")]["experts"] == [4, 2]
        weighted = shares[("odd", "tp", "[2, 1]", False)]
        assert weighted["query_heads"] == [4, 2] and weighted["intermediate"] == [128, 64]
        # The vocabulary-parallel head and embedding: rank 0 holds half of each.
        head = sum(v.nbytes for k, v in mx.load(str(checkpoints["f32"] / "model.safetensors")).items()
                   if VOCAB.search(k))
        full = parameter_groups(checkpoints["f32"])
        saved = (ratios[("f32", "tp", "", False)] - ratios[("f32", "tp", "", True)]) * sum(full[:2])
        assert round(saved) == head // 2
    print(
        f"\nweight bytes of rank 0 / whole model, {n} {backend} ranks:",
        {k: round(v, 3) for k, v in ratios.items()},
        "\nseconds per check:",
        [(Path(c["path"]).name, c["mode"], round(r["seconds"], 1)) for c, r in zip(checks, results)],
    )


@pytest.mark.parametrize("backend", ["mpi"])
def test_uneven_tp_on_three_ranks(checkpoints, references, tmp_path, backend: str) -> None:
    """8 query / 4 KV heads on 3 ranks: auto picks uneven TP (4, 2, 2 heads); float32 dense and 4-bit
    tokens equal 1 process, also with a vocabulary-parallel tied head; float16 logits within tolerance.
    Mixture of experts on the same 3 ranks: mixtral 4-bit experts split 64, 32, 32 features, qwen3_moe's
    6 experts placed 2, 2, 2, gpt_oss weighted 1, 2, 1, deepseek_v3 (latent attention): tokens equal 1
    process; and pipeline parallel (weighted for deepseek_v3) over qwen3_moe, deepseek_v3, gpt_oss, phi3."""
    checks = [generate_check(checkpoints[name], "auto") for name in ("f32", "q4")]
    checks.append(generate_check(checkpoints["q4"], "auto", vocab_parallel=True))
    checks.append(generate_check(checkpoints["f16"], "auto", logits_of=PROMPT + references["f16"]["tokens"]))
    moe = [("moe_q4", "tp", None), ("moe", "ep", None), ("oss", "tp", [1, 2, 1]), ("ds", "tp", None)]
    moe_checks = [generate_check(checkpoints[name], "tp", experts=experts, tp_weights=weights)
                  for name, experts, weights in moe]
    # Pipeline parallel over MoE, latent-attention and fused (phi3) blocks, and gemma3's local attention
    # (window 16, crossed by the 20 tokens).
    pp_checks = [generate_check(checkpoints[name], "pp", pp_weights=weights)
                 for name, weights in (("moe", None), ("ds", [1, 2, 1]), ("oss", None), ("phi3", None),
                                       ("gemma", None))]
    results = job_with_families(tmp_path, 3, backend, checks + moe_checks + pp_checks, checkpoints, references)
    pp_results = results[len(checks) + len(moe_checks):]
    for check, result in zip(pp_checks, pp_results):
        assert "error" not in result, result
        assert result["plan"]["mode"] == "pp" and result["plan"]["experts"] is None
        assert result["tokens"] == references[Path(check["path"]).name]["tokens"], check
    results = results[: len(checks) + len(moe_checks)]
    for check, result in zip(moe_checks, results[len(checks):]):
        name = Path(check["path"]).name
        assert "error" not in result, result
        assert result["tokens"] == references[name]["tokens"], check
        plan = result["plan"]
        assert plan["experts"] == check["experts"]
        assert plan["rank_bytes"] == [expected_moe_bytes(checkpoints[name], plan["shares"], r) for r in range(3)]
    assert results[len(checks)]["plan"]["shares"]["expert_features"] == [64, 32, 32]
    assert results[len(checks) + 1]["plan"]["shares"]["experts"] == [2, 2, 2]
    results = results[: len(checks)]
    for check, result in zip(checks, results):
        name = Path(check["path"]).name
        assert "error" not in result, result
        plan = result["plan"]
        assert plan["mode"] == "tp" and "uneven tensor parallel over 3 ranks" in plan["reason"], plan
        assert plan["shares"]["query_heads"] == [4, 2, 2] and plan["shares"]["kv_heads"] == [[0, 1], [2], [3]]
        check_weight_bytes(checkpoints[name], result, 3)
        if name == "f16":
            drift = np.abs(np.array(result["logits"]) - references[name]["logits"]).max()
            print(f"\nf16 uneven TP at 3 {backend} ranks: max |logit - 1 process| = {drift:.4f}")
            assert drift <= LOGIT_TOLERANCE[name], drift
        else:
            assert result["tokens"] == references[name]["tokens"], check
    assert results[2]["plan"]["shares"]["vocab"] == [171, 171, 170]
    print("seconds per check:", [round(r["seconds"], 1) for r in results])


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_tp_matches_mlx_lm_shard(checkpoints, references, tmp_path, backend: str) -> None:
    """Float16/bfloat16 TP at 2 ranks: as mlx-lm's own shard() in the same job; logits near 1 process."""
    checks = []
    for name in ("f16", "bf16"):
        scored = PROMPT + references[name]["tokens"]
        checks.append(generate_check(checkpoints[name], "tp", logits_of=scored))
        checks.append(
            {
                "kind": "mlx_lm_shard",
                "path": str(checkpoints[name]),
                "prompt": PROMPT,
                "max_tokens": MAX_TOKENS,
                "logits_of": scored,
            }
        )
    results = job(tmp_path, 2, backend, checks)
    for index, name in enumerate(("f16", "bf16")):
        ours, theirs = results[2 * index], results[2 * index + 1]
        assert "error" not in ours, ours
        assert ours["plan"]["mode"] == "tp"
        assert ours["tokens"] == theirs["tokens"], name
        ours_logits, their_logits = np.array(ours["logits"]), np.array(theirs["logits"])
        np.testing.assert_array_equal(ours_logits, their_logits, err_msg=name)
        drift = np.abs(ours_logits - references[name]["logits"]).max()
        print(f"\n{name} TP at 2 {backend} ranks: max |logit - 1 process| = {drift:.4f}")
        assert drift <= LOGIT_TOLERANCE[name], (name, drift)
        # The references are not degenerate: a sharded model that dropped a
        # rank's partial sums would be far outside the tolerance.
        assert np.abs(references[name]["logits"]).max() > 4 * LOGIT_TOLERANCE[name]


def test_memory_each_rank_reads_only_its_shard(tmp_path) -> None:
    """A 100 MB float32 model at 2 ranks: no rank's peak RSS grows by the whole model (TP and PP)."""
    path = write_checkpoint(
        tmp_path / "big",
        "llama",
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=1536,
        vocab_size=512,
    )
    full = sum(v.nbytes for v in mx.load(str(path / "model.safetensors")).values())
    for mode in ("tp", "pp"):
        (result,) = job(tmp_path, 2, "ring", [{"kind": "memory", "path": str(path), "mode": mode}])
        assert result["plan"]["mode"] == mode
        for rank in range(2):
            growth = result["peak_after"][rank] - result["rss_before"][rank]
            print(
                f"\n{mode} rank {rank}: peak RSS growth {growth / full:.2f} x model, "
                f"weights {result['weight_bytes'][rank] / full:.2f} x"
            )
            # The shard (about half), plus one unsharded projection at a time while slicing (TP).
            assert growth < 0.7 * full, (mode, rank, growth / full)
            assert result["weight_bytes"][rank] < 0.6 * full


def test_single_process_load_equals_mlx_lm(checkpoints, references) -> None:
    model, tokenizer, plan = load(checkpoints["q4"], mlxdist.world())
    assert plan.mode == "single" and plan.weight_bytes == plan.full_bytes
    assert generate_tokens(model, PROMPT, MAX_TOKENS).tokens == references["q4"]["tokens"]
    assert tokenizer.decode(tokenizer.encode("hello world")) == "hello world"


def test_dispatcher_on_a_lazy_model(checkpoints) -> None:
    from mlx_lm.utils import load_model

    odd, _ = load_model(checkpoints["odd"], lazy=True)
    for size in (2, 4):
        plan = choose(odd, "qwen2", 0, size, "auto")
        assert plan.mode == "tp" and "uneven tensor parallel" in plan.reason
        assert "n_kv_heads=3 is not divisible by" in plan.reason or "n_heads=6" in plan.reason
        assert choose(odd, "qwen2", 0, size, "tp").split == plan.split
    even = choose(odd, "qwen2", 0, 3, "auto")
    assert even.mode == "tp" and "every head count and projection divides" in even.reason
    assert even.split.as_dict()["query_heads"] == [2, 2, 2]
    weighted = choose(odd, "qwen2", 0, 3, "auto", tp_weights=[1, 1, 1]).split
    assert weighted == even.split  # equal weights: the even split, just reached another way
    assert choose(odd, "qwen2", 0, 2, "tp", tp_weights=[2, 1]).split.as_dict()["intermediate"] == [128, 64]
    with pytest.raises(mlxdist.InvalidArgumentError, match="tp_weights must be 2 positive numbers"):
        choose(odd, "qwen2", 0, 2, "auto", tp_weights=[1])
    # More ranks than query heads: PP, and mode="tp" names the constraint.
    g3, _ = load_model(checkpoints["g3"], lazy=True)
    assert choose(g3, "llama", 0, 4, "auto").mode == "pp"
    with pytest.raises(mlxdist.ShapeError, match="at least one query head per rank"):
        choose(g3, "llama", 0, 4, "tp")
    with pytest.raises(mlxdist.InvalidArgumentError, match="at least one decoder block per rank"):
        choose(g3, "llama", 0, 5, "auto")
    with pytest.raises(mlxdist.InvalidArgumentError, match="mode must be one of"):
        choose(odd, "qwen2", 0, 2, "sequence")
    q4, _ = load_model(checkpoints["q4"], lazy=True)
    # 8 ranks: one head (16 features) of o_proj's input per rank is below the group size 32.
    with pytest.raises(mlxdist.ShapeError, match="group_size=32"):
        choose(q4, "qwen3", 0, 8, "tp")


def test_dispatcher_refuses_unknown_family() -> None:
    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = [nn.Linear(4, 4), nn.Linear(4, 4)]

    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Inner()

    with pytest.raises(mlxdist.UnsupportedOperationError, match="no sharding plan for model_type 'gpt9'"):
        choose(Other(), "gpt9", 0, 2, "auto")
    assert choose(Other(), "gpt9", 0, 1, "auto").mode == "single"


def test_layer_ranges() -> None:
    assert layer_ranges(4, 2) == [(0, 2), (2, 4)]
    assert layer_ranges(5, 2) == [(0, 3), (3, 5)]
    assert layer_ranges(10, 3, [1, 2, 1]) == [(0, 3), (3, 7), (7, 10)]
    assert layer_ranges(4, 4, [1, 100, 1, 1]) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(mlxdist.InvalidArgumentError, match="one per rank"):
        layer_ranges(4, 2, [1])
    with pytest.raises(mlxdist.InvalidArgumentError, match="positive"):
        layer_ranges(4, 2, [1, 0])


def test_load_refuses_bad_arguments(tmp_path, checkpoints) -> None:
    with pytest.raises(mlxdist.InvalidArgumentError, match="not an mlx-lm checkpoint directory"):
        load(tmp_path)
    with pytest.raises(mlxdist.ArgumentTypeError, match="group must be an mlxdist.Group"):
        load(checkpoints["f32"], mx.distributed.init())
    with pytest.raises(mlxdist.InvalidArgumentError, match="mode must be one of"):
        load(checkpoints["f32"], mlxdist.world(), mode="dp")


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_command(checkpoints, references, backend: str) -> None:
    """mlxdist-generate -n 2 starts its ranks, and rank 0 prints one JSON line (on MPI with
    --tp-weights 2,1 --vocab-parallel: the shares follow the weights, the tokens do not change)."""
    command = [
        sys.executable,
        "-m",
        "mlxdist.lm",
        "--model",
        str(checkpoints["f32"]),
        "--prompt-ids",
        ",".join(map(str, PROMPT)),
        "--max-tokens",
        str(MAX_TOKENS),
        "-n",
        "2",
        "--backend",
        backend,
        "--json",
        "--ignore-eos",
        "--timeout",
        "120",
    ]
    if backend == "mpi":  # the TP options reach load() and the shares the JSON
        command += ["--tp-weights", "2,1", "--vocab-parallel"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout
    record = json.loads(lines[0])
    assert record["tokens"] == references["f32"]["tokens"]
    assert record["mode"] == "tp" and record["ranks"] == 2 and record["backend"] == backend
    assert record["decode_tps"] > 0 and record["prompt_tps"] > 0
    assert len(record["weight_bytes"]) == 2 and len(record["peak_rss_bytes"]) == 2
    assert record["weight_bytes"][0] < record["full_weight_bytes"]
    if backend == "mpi":
        # 4 KV groups by 2:1 -> 3 and 1 (6 and 2 query heads); the vocabulary 341 and 171 rows.
        assert record["shares"]["query_heads"] == [6, 2] and record["shares"]["vocab"] == [341, 171]
        assert record["weight_bytes"][0] > record["weight_bytes"][1]
        assert "by tp weights" in record["reason"]


def test_generate_command_text_prompt(checkpoints) -> None:
    """One process, --prompt TEXT: the checkpoint's tokenizer encodes it; tokens as mlx-lm's."""
    from mlx_lm.utils import load_tokenizer

    text = "hello sharded world"
    ids = load_tokenizer(checkpoints["q4"]).encode(text)
    command = [
        sys.executable,
        "-m",
        "mlxdist.lm",
        "--model",
        str(checkpoints["q4"]),
        "--prompt",
        text,
        "--max-tokens",
        str(MAX_TOKENS),
        "--ignore-eos",
        "--json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["mode"] == "single" and record["prompt_tokens"] == len(ids)
    assert record["tokens"] == reference(checkpoints["q4"], ids)["tokens"]


def test_generate_command_errors(checkpoints) -> None:
    base = [sys.executable, "-m", "mlxdist.lm", "--model", str(checkpoints["odd"]), "--prompt-ids", "1,2"]
    bad_ids = subprocess.run(base[:-1] + ["1,x"], capture_output=True, text=True, timeout=60)
    assert bad_ids.returncode == 2 and "expected comma-separated token ids" in bad_ids.stderr
    too_big = subprocess.run(base[:-1] + ["1,512"], capture_output=True, text=True, timeout=60)
    assert too_big.returncode == 2 and "below the vocabulary size 512" in too_big.stderr
    dense_ep = subprocess.run(base + ["--experts", "ep"], capture_output=True, text=True, timeout=60)
    assert dense_ep.returncode == 2 and "needs a mixture-of-experts model" in dense_ep.stderr


def test_experts_refused_before_loading(checkpoints) -> None:
    """--experts ep on a dense model, more ranks than experts, a bad experts mode: typed errors from the
    plan, on the lazy model (no weight read)."""
    from mlx_lm.utils import load_model

    from mlxdist.lm.testing import random_model

    dense, _ = load_model(checkpoints["f32"], lazy=True)
    for size in (1, 2):
        with pytest.raises(mlxdist.InvalidArgumentError, match="needs a mixture-of-experts model"):
            choose(dense, "llama", 0, size, "auto", experts="ep")
    with pytest.raises(mlxdist.InvalidArgumentError, match="experts must be one of tp, ep"):
        choose(dense, "llama", 0, 2, "auto", experts="dp")
    with pytest.raises(mlxdist.InvalidArgumentError, match="needs a mixture-of-experts model"):
        load(checkpoints["f32"], experts="ep")
    eight_heads, _ = random_model("qwen3_moe", hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4,
                                  intermediate_size=64, num_experts=3)
    with pytest.raises(mlxdist.ShapeError, match="cannot place 3 experts on 4 ranks"):
        choose(eight_heads, "qwen3_moe", 0, 4, "auto", experts="ep")
    with pytest.raises(mlxdist.InvalidArgumentError, match="mode='pp' has none"):
        choose(eight_heads, "qwen3_moe", 0, 2, "pp", experts="ep")
    plan = choose(eight_heads, "qwen3_moe", 0, 3, "auto", experts="ep")
    assert plan.experts == "ep" and plan.split.experts == [(0, 1), (1, 2), (2, 3)]
    assert choose(eight_heads, "qwen3_moe", 0, 4, "auto").split.expert_features == [16, 16, 16, 16]
