"""Benchmark (``bench_lm.py --moe``): prefill and decode tokens/s of a mixture-of-experts checkpoint.

A random-weight qwen3_moe checkpoint (``mlxdist.lm.testing``, float32) is run

- in 1 process: mlx-lm's unsharded model;
- on 2 ranks of each backend, in the same job: mlxdist with the experts
  split by features (``experts="tp"``), mlxdist with the experts placed whole
  (``experts="ep"``), and mlx-lm's own ``model.shard()`` over ``mx.distributed``.

For 1 and 8 concurrent sequences (a batch of 8 prompts of ``--prompt``
tokens, decoded together) it times the prefill of the batch and then
``--steps`` greedy decode steps, the models interleaved step by step
(A B C C B A ...), each step timed alone as its slowest rank. Rates are
tokens over the median time; ratios are medians of the step-by-step ratios
against mlx-lm's ``shard()``. The first decoded tokens of every model are
compared with mlx-lm's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

RESULT_TAG = "BENCH_LM_MOE_RESULT "
MODEL = dict(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=512,
             vocab_size=512, num_experts=16)
BATCHES = (1, 8)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=("ring", "mpi"), default=["ring", "mpi"])
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    parser.add_argument("--steps", type=int, default=24, help="interleaved decode steps per batch size")
    parser.add_argument("--prefills", type=int, default=5, help="interleaved prefills per batch size")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--moe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _timed_rounds(fns: dict[str, Callable[[], mx.array]], count: int, group: Any) -> dict[str, list[float]]:
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(count):
        for name in names if index % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            mx.eval(fns[name]())
            times[name].append(time.perf_counter() - start)
    if group is None:
        return times
    return {name: np.asarray(group.all_gather(np.array([t]))).max(axis=0).tolist() for name, t in times.items()}


def worker(args: argparse.Namespace) -> None:
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    path = Path(args.worker)
    single = os.environ.get("BENCH_LM_MOE_SINGLE") == "1"
    models: dict[str, Any] = {}
    group = None
    if single:
        models["1 process"], _ = load_model(path)
    else:
        import mlxdist
        from mlxdist.lm import load

        group = mlxdist.init()
        models["mlxdist TP"], _, _ = load(path, group, "tp", experts="tp")
        models["mlxdist EP"], _, _ = load(path, group, "tp", experts="ep")
        theirs, _ = load_model(path, lazy=True)
        theirs.shard(mx.distributed.init(backend=str(group.backend)))
        mx.eval(theirs.parameters())
        models["mlx-lm shard()"] = theirs
    result: dict[str, Any] = {"backend": None if single else str(group.backend), "batches": {}}
    for batch in BATCHES:
        prompts = mx.array([[(7 * i + 13 * b + 3) % 500 + 3 for i in range(args.prompt)] for b in range(batch)])
        caches: dict[str, Any] = {}

        def prefill(name: str) -> Callable[[], mx.array]:
            def run() -> mx.array:
                caches[name] = make_prompt_cache(models[name])
                return mx.argmax(models[name](prompts, cache=caches[name])[:, -1, :], axis=-1)
            return run

        prefills = {name: prefill(name) for name in models}
        for fn in prefills.values():  # warm-up (first-touch costs)
            mx.eval(fn())
        prefill_times = _timed_rounds(prefills, args.prefills, group)
        last = {name: prefills[name]() for name in models}  # fresh caches, prefilled
        mx.eval(list(last.values()))
        first = {name: np.array(v).tolist() for name, v in last.items()}

        def decode(name: str) -> Callable[[], mx.array]:
            def step() -> mx.array:
                last[name] = mx.argmax(models[name](last[name][:, None], cache=caches[name])[:, -1, :], axis=-1)
                return last[name]
            return step

        decode_times = _timed_rounds({name: decode(name) for name in models}, args.steps, group)
        row: dict[str, Any] = {
            "prefill_tps": {n: batch * args.prompt / median(t) for n, t in prefill_times.items()},
            "decode_tps": {n: batch / median(t) for n, t in decode_times.items()},
        }
        if not single:
            anchor_p, anchor_d = prefill_times["mlx-lm shard()"], decode_times["mlx-lm shard()"]
            row["vs_mlx_lm"] = {
                n: {"prefill": median(a / b for a, b in zip(anchor_p, prefill_times[n])),
                    "decode": median(a / b for a, b in zip(anchor_d, decode_times[n]))}
                for n in ("mlxdist TP", "mlxdist EP")
            }
            row["first_tokens_equal_mlx_lm"] = {n: first[n] == first["mlx-lm shard()"] for n in models}
        result["batches"][str(batch)] = row
    result["load_average"] = os.getloadavg()[0]
    if single or group.rank() == 0:
        print(RESULT_TAG + json.dumps(result), flush=True)


def _job(argv: list[str], n: int, backend: str, timeout: float) -> dict:
    from mlxdist.launch import launch

    command = [sys.executable, os.path.abspath(__file__), *argv]
    if n == 1:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "BENCH_LM_MOE_SINGLE": "1"})
        output, ok = done.stdout + done.stderr, done.returncode == 0
    else:
        import io

        sink = io.StringIO()
        launched = launch(command, n=n, backend=backend, timeout=timeout, capture=True, stdout=sink, stderr=sink)
        output, ok = sink.getvalue(), launched.ok
    lines = [line.split(RESULT_TAG, 1)[1] for line in output.splitlines() if RESULT_TAG in line]
    if not ok or not lines:
        sys.stderr.write(output[-6000:])
        raise SystemExit(f"the {n}-rank {backend} job failed")
    return json.loads(lines[0])


def main(argv: Sequence[str] | None = None) -> int:
    """Write the checkpoint, run the jobs, print the JSON lines and a Markdown table."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.worker:
        worker(args)
        return 0
    from mlxdist.lm.testing import write_checkpoint

    common = ["--prompt", str(args.prompt), "--steps", str(args.steps), "--prefills", str(args.prefills)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-lm-moe-") as tmp:
        path = write_checkpoint(Path(tmp) / "qwen3_moe", "qwen3_moe", dtype="float32", seed=0, **MODEL)
        single = _job(["--worker", str(path), *common], 1, "ring", args.timeout)
        print(json.dumps(single), flush=True)
        for backend in args.backends:
            result = _job(["--worker", str(path), *common], 2, backend, args.timeout)
            print(json.dumps(result), flush=True)
            rows.append(result)
    print(f"\nqwen3_moe {MODEL}, float32, prompt {args.prompt}, tokens/s (ratio to mlx-lm's shard() in the same job)\n")
    print("| backend | sequences | phase | 1 process | mlx-lm shard() | mlxdist TP | mlxdist EP |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for result in rows:
        for batch, row in result["batches"].items():
            one = single["batches"][batch]
            for phase in ("prefill", "decode"):
                tps, vs = row[f"{phase}_tps"], row["vs_mlx_lm"]
                print(f"| {result['backend']} | {batch} | {phase} | {one[f'{phase}_tps']['1 process']:.1f} | "
                      f"{tps['mlx-lm shard()']:.1f} | {tps['mlxdist TP']:.1f} ({vs['mlxdist TP'][phase]:.2f}x) | "
                      f"{tps['mlxdist EP']:.1f} ({vs['mlxdist EP'][phase]:.2f}x) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
