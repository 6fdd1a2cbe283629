"""Benchmark: prefill (time to first token) of mlxdist.lm's TP beside mlx-lm's own ``shard()``, same job.

For each weight format of ``bench_lm.py`` (float16; 4-bit with float32 scales)
the script writes the same random-weight Llama checkpoint and runs one job of
2 ranks per backend (started by ``mlxdist.launch``) that loads mlxdist TP and
mlx-lm's ``model.shard()`` side by side. After a warm-up prefill of every
prompt length by both, it times, for each prompt length, ``--rounds`` prefills
of each, interleaved (A B B A ...): one prefill is mlx-lm's ``generate_step``
up to its first token (``mlxdist.lm.generate_tokens`` with one token, a fresh
KV cache each time), timed as the slowest rank's. It reports per length the
median prompt tokens/s of each and the median of the round-by-round ratio
(mlxdist TP's rate over mlx-lm's): on a shared machine, load that drifts
falls on both alike. Each prefill's process CPU time (both ranks added) is
reported beside it: work that the variant itself does, which other load on the
machine inflates far less than wall time.

It also compares the two forward graphs (``mx.export_to_dot``): the count of
each primitive, which should be equal (``same_graph_ops``).

Run ``python benchmarks/bench_prefill.py`` (``--backends ring mpi``,
``--lengths 16 64 256``, ``--quick`` for the smaller model); ``--markdown``
prints the README table, ``--json FILE`` writes the results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from common import FORMATS, SIZES, emit, run_job  # noqa: E402

OURS, THEIRS = "mlxdist TP", "mlx-lm shard()"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=("ring", "mpi"), default=["ring", "mpi"])
    parser.add_argument("--formats", nargs="+", choices=tuple(FORMATS), default=list(FORMATS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[16, 64, 256], help="prompt tokens")
    parser.add_argument("--rounds", type=int, default=6, help="timed prefills of each variant per length")
    parser.add_argument("--quick", action="store_true", help="the smaller model")
    parser.add_argument("--timeout", type=float, default=1800.0, help="deadline per launched job, seconds")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    parser.add_argument("--worker", nargs=2, metavar=("CHECKPOINT", "FORMAT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def prompt_of(length: int, vocab: int) -> list[int]:
    """A deterministic prompt of ``length`` ids, clear of the tokenizer's special ids."""
    return [(7 * i + 3) % (vocab - 12) + 3 for i in range(length)]


def graph_ops(model: Any, prompt: list[int]) -> dict[str, int]:
    """How many nodes of each primitive the model's forward graph over ``prompt`` has (not evaluated)."""
    import collections
    import io
    import re

    import mlx.core as mx

    dot = io.StringIO()
    mx.export_to_dot(dot, model(mx.array(prompt)[None]))
    return dict(collections.Counter(re.findall(r'label ?= ?"([^"]*)"', dot.getvalue())))


def worker(args: argparse.Namespace) -> None:
    import mlx.core as mx
    from mlx_lm.utils import load_model

    import mlxdist
    from mlxdist.lm import generate_tokens, load

    path, fmt = Path(args.worker[0]), args.worker[1]
    group = mlxdist.init()
    models: dict[str, Any] = {}
    models[OURS], _, _ = load(path, group, "tp")
    theirs, _ = load_model(path, lazy=True)
    theirs.shard(mx.distributed.init(backend=str(group.backend)))
    mx.eval(theirs.parameters())
    models[THEIRS] = theirs
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    prompts = {length: prompt_of(length, vocab) for length in args.lengths}
    # The same graph, primitive for primitive, is what parity should rest on.
    ops = {name: graph_ops(model, prompts[args.lengths[0]]) for name, model in models.items()}
    first_tokens: dict[str, dict[int, int]] = {name: {} for name in models}
    for length, prompt in prompts.items():  # warm-up: allocations, kernels, page faults
        for name, model in models.items():
            first_tokens[name][length] = generate_tokens(model, prompt, 1).tokens[0]
    seconds: dict[int, dict[str, list[float]]] = {n: {name: [] for name in models} for n in prompts}
    cpu: dict[int, dict[str, list[float]]] = {n: {name: [] for name in models} for n in prompts}
    order = list(models)
    for round_index in range(args.rounds):
        for length, prompt in prompts.items():
            for name in order if round_index % 2 == 0 else order[::-1]:
                cpu_start = time.process_time()
                seconds[length][name].append(generate_tokens(models[name], prompt, 1).prompt_seconds)
                cpu[length][name].append(time.process_time() - cpu_start)
    rows = []
    for length in prompts:
        slowest = {
            name: np.asarray(group.all_gather(np.array([times]))).max(axis=0).tolist()
            for name, times in seconds[length].items()
        }
        cpu_total = {
            name: np.asarray(group.all_gather(np.array([times]))).sum(axis=0).tolist()
            for name, times in cpu[length].items()
        }
        rows.append(
            {
                "prompt_tokens": length,
                "prompt_tps": {name: length / median(t) for name, t in slowest.items()},
                "tp_vs_mlx_lm": median(theirs / ours for ours, theirs in zip(slowest[OURS], slowest[THEIRS])),
                "cpu_seconds": {name: median(t) for name, t in cpu_total.items()},
                "cpu_tp_vs_mlx_lm": median(
                    theirs / ours for ours, theirs in zip(cpu_total[OURS], cpu_total[THEIRS])
                ),
                "seconds": slowest,
            }
        )
    result = {
        "format": fmt,
        "ranks": group.size(),
        "backend": str(group.backend),
        "rounds": args.rounds,
        "rows": rows,
        "same_first_tokens": first_tokens[OURS] == first_tokens[THEIRS],
        "same_graph_ops": ops[OURS] == ops[THEIRS],
        "graph_ops": ops,
        "load_average": os.getloadavg()[0],
    }
    if group.rank() == 0:
        emit(result)


def markdown(results: list[dict]) -> str:
    """The README table: one row per format, backend and prompt length."""
    lines = [
        "| weights | backend | prompt tokens | mlx-lm shard() tok/s | mlxdist TP tok/s | TP × mlx-lm "
        "| CPU s, mlx-lm / TP | CPU × mlx-lm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for row in r["rows"]:
            tps = row["prompt_tps"]
            lines.append(
                f"| {r['format']} | {r['backend']} | {row['prompt_tokens']} | {tps[THEIRS]:.0f} | "
                f"{tps[OURS]:.0f} | {row['tp_vs_mlx_lm']:.2f}× | {row['cpu_seconds'][THEIRS]:.2f} / "
                f"{row['cpu_seconds'][OURS]:.2f} | {row['cpu_tp_vs_mlx_lm']:.2f}× |"
            )
    lines.append("")
    lines.append(
        f"2 ranks; prompt tokens/s: prompt length / median time to the first token over "
        f"{results[0]['rounds'] if results else 0} interleaved rounds (slowest rank); × mlx-lm: median of "
        "the round-by-round ratio. CPU s: median process CPU time of one prefill, both ranks added (load "
        "from other processes inflates it far less than wall time); CPU × mlx-lm: median of the "
        "round-by-round ratio (mlx-lm's CPU time over TP's). Same forward graph, primitive for primitive: "
        + ", ".join(f"{r['format']} {r['backend']} {'yes' if r['same_graph_ops'] else 'NO'}" for r in results)
        + "; same first tokens: " + ", ".join("yes" if r["same_first_tokens"] else "NO" for r in results)
        + ". Load average during the jobs: "
        + ", ".join(f"{r['load_average']:.1f}" for r in results)
        + "."
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        worker(args)
        return 0
    from mlxdist.lm.testing import write_checkpoint

    dims = SIZES["quick" if args.quick else "default"]
    common = ["--rounds", str(args.rounds), "--lengths", *map(str, args.lengths)]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-prefill-") as tmp:
        for fmt in args.formats:
            path = write_checkpoint(Path(tmp) / fmt.replace(" ", ""), "llama", seed=0, **FORMATS[fmt], **dims)
            for backend in args.backends:
                result, _ = run_job(["--worker", str(path), fmt, *common], 2, backend, args.timeout, __file__)
                results.append(result)
                print(json.dumps(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": dims, "results": results}, indent=2))
    if args.markdown:
        print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
