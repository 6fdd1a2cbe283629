"""Rank worker for tests/test_lm.py: runs a list of sharded-inference checks in one job.

Usage: lm_checks.py SPEC.json OUT.json. SPEC is a list of checks:
``{"kind": "generate", "path", "mode", "prompt", "max_tokens"}`` (optionally
``tp_weights``, ``vocab_parallel`` and ``experts``, passed to ``load``),
``{"kind": "mlx_lm_shard", "path", "prompt", "max_tokens"}`` (mlx-lm's own
``model.shard()`` over mx.distributed), ``{"kind": "memory", "path", "mode"}``.
"generate" and "mlx_lm_shard" also record teacher-forced logits of the
prompt followed by the generated tokens (``logits_of`` tokens, if given).
Rank 0 writes one result per check to OUT (exceptions recorded by type and
message; each with the seconds it took); every rank must agree on the tokens, or the worker fails.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import mlxdist  # noqa: E402
from mlxdist.lm import generate_tokens, load, logits, peak_rss_bytes, rss_bytes  # noqa: E402


def agreed(group: mlxdist.Group, tokens: list[int]) -> None:
    """Fail unless every rank generated the same tokens."""
    mine = np.array([tokens], dtype=np.int64)
    every = np.asarray(group.all_gather(mine))
    if not (every == every[0]).all():
        raise AssertionError(f"ranks disagree on the tokens: {every.tolist()}")


def run_generate(group: mlxdist.Group, check: dict) -> dict:
    try:
        model, _, plan = load(
            check["path"],
            group,
            check["mode"],
            tp_weights=check.get("tp_weights"),
            pp_weights=check.get("pp_weights"),
            vocab_parallel=check.get("vocab_parallel", False),
            experts=check.get("experts", "tp"),
        )
    except Exception as exc:  # recorded for the test to judge
        return {
            "error": type(exc).__name__,
            "message": str(exc),
            "mro": [c.__name__ for c in type(exc).__mro__],
        }
    out = generate_tokens(model, check["prompt"], check["max_tokens"],
                          prefill_step_size=check.get("prefill_step_size", 2048))
    agreed(group, out.tokens)
    scored = check.get("logits_of") or check["prompt"] + out.tokens
    return {
        "tokens": out.tokens,
        "logits": np.array(logits(model, scored)).tolist(),
        "plan": plan.as_dict(),
        "weight_bytes": plan.weight_bytes,
    }


def run_mlx_lm_shard(group: mlxdist.Group, check: dict) -> dict:
    from mlx_lm.utils import load_model

    mx_group = mx.distributed.init(backend=str(group.backend))
    assert mx_group.size() == group.size(), "mx.distributed sees another world"
    model, _ = load_model(__import__("pathlib").Path(check["path"]), lazy=True)
    model.shard(mx_group)
    mx.eval(model.parameters())
    out = generate_tokens(model, check["prompt"], check["max_tokens"])
    scored = check.get("logits_of") or check["prompt"] + out.tokens
    return {"tokens": out.tokens, "logits": np.array(logits(model, scored)).tolist()}


def run_memory(group: mlxdist.Group, check: dict) -> dict:
    before = rss_bytes()
    peak_before = peak_rss_bytes()
    model, _, plan = load(check["path"], group, check["mode"])
    peaks = np.array([[before, peak_before, peak_rss_bytes(), plan.weight_bytes]], dtype=np.int64)
    every = np.asarray(group.all_gather(peaks)).reshape(group.size(), 4)
    return {
        "rss_before": every[:, 0].tolist(),
        "peak_before": every[:, 1].tolist(),
        "peak_after": every[:, 2].tolist(),
        "weight_bytes": every[:, 3].tolist(),
        "plan": plan.as_dict(),
    }


RUNNERS = {"generate": run_generate, "mlx_lm_shard": run_mlx_lm_shard, "memory": run_memory}


def main() -> None:
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        checks = json.load(f)
    group = mlxdist.init()
    results = []
    for check in checks:
        start = time.perf_counter()
        results.append({**RUNNERS[check["kind"]](group, check), "seconds": time.perf_counter() - start})
    if group.rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
