"""Benchmark: summing an MoE block's partial output (all_sum against all_to_all), and the expert compute of TP and EP.

Two measurements per backend, on the ranks this script starts (``--ranks``,
default 2):

- combine: :class:`mlxdist.nn.MoEAllSum` over a block whose output is a
  random partial ``[tokens, hidden]``, with ``dispatch="all_sum"`` and
  ``dispatch="all_to_all"`` (an all_to_all of token blocks, summed, then an
  all_gather), timed back to back in each round; the bytes each rank receives
  (:func:`mlxdist.nn.combine_bytes`) beside the times.
- compute: one switch layer (mlx-lm's ``SwitchGLU``) on random routing,
  split by features (:func:`mlxdist.nn.shard_switch`) and placed by experts
  (:func:`mlxdist.nn.place_experts`), the latter with fixed shapes (every slot
  computed, others' zeroed) and selecting only the local slots; each rank's
  local computation only (no collective).

Times are medians over rounds of the slowest rank. Rank 0 prints Markdown tables.

Run: ``python benchmarks/bench_experts.py --backends ring mpi``
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import mlxdist
from mlxdist.bench.timing import slowest_rank
from mlxdist.launch import launch
from mlxdist.nn import MoEAllSum, combine_bytes, expert_placement, place_experts, shard_switch

RESULT_TAG = "BENCH_EXPERTS_RESULT "


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=("ring", "mpi"), default=["ring", "mpi"])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size of the combine (default 2048)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512, 2048])
    parser.add_argument("--switch", type=int, nargs=4, default=[1024, 384, 32, 4],
                        metavar=("HIDDEN", "FEATURES", "EXPERTS", "TOP_K"), help="the switch layer timed")
    parser.add_argument("--compute-tokens", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class _Partial(nn.Module):
    """A block whose output is its input: what MoEAllSum sums is then exactly the given partial."""

    def __call__(self, x: mx.array) -> mx.array:
        return x


def _timed(fn: Callable[[], mx.array]) -> float:
    start = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - start


def _rounds(group: mlxdist.Group, cases: dict[str, Callable[[], mx.array]], rounds: int) -> dict[str, float]:
    for fn in cases.values():
        _timed(fn)
    times = {name: np.empty(rounds) for name in cases}
    for r in range(rounds):
        for name, fn in cases.items():
            times[name][r] = _timed(fn)
    return {name: float(np.median(slowest_rank(group, t))) for name, t in times.items()}


def _switch(hidden: int, features: int, experts: int) -> nn.Module:
    from mlx_lm.models.switch_layers import SwitchGLU

    mx.random.seed(7)
    switch = SwitchGLU(hidden, features, experts)
    mx.eval(switch.parameters())
    return switch


def run_rank(args: argparse.Namespace) -> None:
    """Measure on this rank; rank 0 prints the results as one tagged JSON line."""
    group = mlxdist.init(args.worker, strict=True)
    n = group.size()
    combine = []
    for tokens in args.tokens:
        y = mx.random.normal((tokens, args.hidden), key=mx.random.key(tokens + group.rank()))
        mx.eval(y)
        paths = {p: MoEAllSum(_Partial(), group=group, dispatch=p) for p in ("all_sum", "all_to_all")}
        a, b = paths["all_sum"](y), paths["all_to_all"](y)
        if not mx.allclose(a, b, rtol=1e-5, atol=1e-5).item():
            raise AssertionError(f"{tokens} tokens: the two paths differ")
        times = _rounds(group, {p: (lambda m=m: m(y)) for p, m in paths.items()}, args.rounds)
        combine.append({"tokens": tokens, **times, **{f"{k}_bytes": v for k, v in
                                                     combine_bytes(tokens, args.hidden, n, 4).items()}})
    hidden, features, experts, top_k = args.switch
    compute = []
    switches = {
        "tp": shard_switch(_switch(hidden, features, experts), group=group),
        "ep fixed": place_experts(_switch(hidden, features, experts), group=group,
                                  placement=expert_placement(experts, n), select_min_slots=None),
        "ep select": place_experts(_switch(hidden, features, experts), group=group,
                                   placement=expert_placement(experts, n), select_min_slots=1),
        "one process": _switch(hidden, features, experts),
    }
    for tokens in args.compute_tokens:
        key_x, key_i = mx.random.split(mx.random.key(100 + tokens))
        x = mx.random.normal((1, tokens, hidden), key=key_x)
        inds = mx.argsort(mx.random.uniform(shape=(1, tokens, experts), key=key_i), axis=-1)[..., :top_k]
        mx.eval(x, inds)
        times = _rounds(group, {name: (lambda s=s: s(x, inds)) for name, s in switches.items()}, args.rounds)
        compute.append({"tokens": tokens, **times})
    if group.rank() == 0:
        print(RESULT_TAG + json.dumps({"combine": combine, "compute": compute}), flush=True)


def collect(args: argparse.Namespace, argv: Sequence[str], backend: str) -> dict[str, Any]:
    """Run the ranks on ``backend`` and return rank 0's results."""
    out = io.StringIO()
    result = launch([sys.executable, __file__, *argv, "--worker", backend], n=args.ranks, backend=backend,
                    timeout=args.timeout, capture=True, stdout=out, stderr=out)
    lines = [line.split(RESULT_TAG, 1)[1] for line in out.getvalue().splitlines() if RESULT_TAG in line]
    if not result.ok or not lines:
        sys.stderr.write(out.getvalue())
        raise SystemExit(f"the {backend} run failed (exit codes {result.returncodes})")
    return json.loads(lines[0])


def report(args: argparse.Namespace, backend: str, results: dict[str, Any]) -> None:
    """Print one backend's results as Markdown tables."""
    hidden, features, experts, top_k = args.switch
    print(f"\ncombine, {backend}, {args.ranks} ranks, hidden {args.hidden}, float32 "
          f"(median of {args.rounds} rounds, slowest rank)\n")
    print("| tokens | all_sum ms | all_to_all ms | all_to_all / all_sum | bytes in, all_sum | bytes in, all_to_all |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in results["combine"]:
        print(f"| {row['tokens']} | {row['all_sum'] * 1e3:.3f} | {row['all_to_all'] * 1e3:.3f} | "
              f"{row['all_to_all'] / row['all_sum']:.2f} | {row['all_sum_bytes']} | {row['all_to_all_bytes']} |")
    print(f"\nexpert compute per rank, {backend}, {args.ranks} ranks, SwitchGLU hidden {hidden}, features "
          f"{features}, {experts} experts, top-{top_k}, float32 (no collective)\n")
    print("| tokens | one process ms | TP ms | EP fixed shapes ms | EP local slots ms |")
    print("|---:|---:|---:|---:|---:|")
    for row in results["compute"]:
        print(f"| {row['tokens']} | {row['one process'] * 1e3:.2f} | {row['tp'] * 1e3:.2f} | "
              f"{row['ep fixed'] * 1e3:.2f} | {row['ep select'] * 1e3:.2f} |")


def main(argv: Sequence[str] | None = None) -> int:
    """Start the ranks per backend and print their tables (or, launched, measure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        run_rank(args)
    else:
        for backend in args.backends:
            report(args, backend, collect(args, argv, backend))
    return 0


if __name__ == "__main__":
    sys.exit(main())
