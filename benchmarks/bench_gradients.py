"""Benchmark: average_gradients over a transformer-shaped gradient tree.

Times, in interleaved rounds on the same ranks and tree:

- mlxdist's average_gradients, float32 on the wire;
- the same with ``communication_type=bfloat16`` (half the bytes);
- mlx.nn.utils.average_gradients over mx.distributed (the anchor),

each followed by ``mx.eval`` of the averaged tree, and reports the median of
each round's slowest rank and the ratios (targets: bfloat16 <= 0.6x float32,
float32 <= 1.05x mlx). Both results are checked against mlx's first.

Run ``python benchmarks/bench_gradients.py`` (it starts its own ranks with
mlxdist.launch) or under a launcher; ``--quick`` for a smaller, shorter run.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn.utils
import numpy as np
from mlx.utils import tree_flatten

import mlxdist
from mlxdist.bench.timing import slowest_rank
from mlxdist.launch import launch
from mlxdist.nn.gradients import average_gradients

WIDTH = 1024
TARGET_WIRE_RATIO = 0.6
TARGET_ANCHOR_RATIO = 1.05


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line; ``--quick`` caps the size and the rounds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("ring", "mpi"), default="mpi")
    parser.add_argument("-n", "--nranks", type=int, default=2, help="ranks to start (default 2)")
    parser.add_argument(
        "--params", type=float, default=100e6, help="gradient parameters (default 100M)"
    )
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--quick", action="store_true", help="about 12M parameters and 3 rounds")
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline of the run, seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.params, args.rounds = min(args.params, 12.6e6), min(args.rounds, 3)
    return args


def gradient_tree(params: float) -> dict[str, Any]:
    """Transformer blocks of width WIDTH (about 12.6M parameters each), evaluated."""
    d = WIDTH
    shapes = {
        "q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d),
        "up": (4 * d, d), "down": (d, 4 * d), "up_bias": (4 * d,),
        "attention_norm": (d,), "mlp_norm": (d,),
    }
    per_block = sum(int(np.prod(s)) for s in shapes.values())
    blocks = max(1, round(params / per_block))
    mx.random.seed(0)
    tree = {"blocks": [{k: mx.random.normal(s) for k, s in shapes.items()} for _ in range(blocks)]}
    mx.eval(tree)
    return tree


def timed(run: Callable[[], Any], group: mlxdist.Group) -> float:
    """One synchronised call of ``run`` with its result evaluated, in seconds."""
    group.barrier()
    start = time.perf_counter()
    mx.eval(run())
    return time.perf_counter() - start


def check_against_mlx(ours: Any, theirs: Any, rtol: float) -> None:
    """Raise AssertionError unless the two averaged trees agree within ``rtol``."""
    for (key, a), (_, b) in zip(tree_flatten(ours), tree_flatten(theirs)):
        if not mx.allclose(a, b, rtol=rtol, atol=1e-6).item():
            raise AssertionError(f"average_gradients differs from mlx's at {key}")


def run_rank(args: argparse.Namespace) -> None:
    """One rank's part: check, warm up, time every variant in interleaved rounds, report."""
    group = mlxdist.init(args.backend, strict=True)
    mlx_group = mx.distributed.init(backend=args.backend)
    tree = gradient_tree(args.params)
    nparams = sum(v.size for _, v in tree_flatten(tree))
    variants: dict[str, Callable[[], Any]] = {
        "mlxdist float32": lambda: average_gradients(tree, group),
        "mlxdist bfloat16 wire": lambda: average_gradients(tree, group, communication_type=mx.bfloat16),
        "mlx.nn.utils (anchor)": lambda: mlx.nn.utils.average_gradients(tree, group=mlx_group),
    }
    reference = variants["mlx.nn.utils (anchor)"]()
    check_against_mlx(variants["mlxdist float32"](), reference, rtol=1e-6)
    check_against_mlx(variants["mlxdist bfloat16 wire"](), reference, rtol=2**-7)
    del reference
    for run in variants.values():  # warm-up: buffers, page faults
        timed(run, group)
    times = {name: np.empty(args.rounds) for name in variants}
    for r in range(args.rounds):
        for name, run in variants.items():
            times[name][r] = timed(run, group)
    medians = {name: float(np.median(slowest_rank(group, t))) for name, t in times.items()}
    if group.rank() == 0:
        report(args, group, nparams, medians)


def report(
    args: argparse.Namespace, group: mlxdist.Group, nparams: int, medians: dict[str, float]
) -> None:
    """Rank 0 prints the times, throughputs and ratios against the targets."""
    print(
        f"average_gradients: {nparams / 1e6:.1f}M float32 parameters ({nparams * 4 / 2**20:.0f} MiB), "
        f"{group.size()} ranks, {group.backend.value}, median of {args.rounds} rounds (slowest rank)"
    )
    for name, seconds in medians.items():
        rate = nparams * 4 / seconds / 1e9
        print(f"  {name:24s} {seconds * 1e3:9.1f} ms   {rate:6.2f} GB/s of float32 gradients")
    wire = medians["mlxdist bfloat16 wire"] / medians["mlxdist float32"]
    anchor = medians["mlxdist float32"] / medians["mlx.nn.utils (anchor)"]
    for label, ratio, target in (
        ("bfloat16 wire / float32", wire, TARGET_WIRE_RATIO),
        ("float32 / mlx.nn.utils", anchor, TARGET_ANCHOR_RATIO),
    ):
        verdict = "met" if ratio <= target else "MISSED"
        print(f"  ratio {label:26s} {ratio:5.2f}x  (target <= {target}x: {verdict})")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Run as a rank under a launcher, or start ``--nranks`` ranks of this script.

    Returns:
        The exit status (non-zero if a rank failed or the deadline passed).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if mlxdist.detect_backend() is not None:
        run_rank(args)
        return 0
    result = launch(
        [sys.executable, __file__, *argv], n=args.nranks, backend=args.backend,
        timeout=args.timeout, capture=False,
    )
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
