"""Benchmark: forward time of a tensor-parallel Llama MLP, mlxdist.nn against mlx's own layers.

The MLP (gate and up projections all-to-sharded, down projection
sharded-to-all, no biases) is sharded twice in the same run, from the same
global weights: with ``mlxdist.nn.shard_linear`` over an mlxdist group and
with ``mlx.nn.layers.distributed.shard_linear`` over ``mx.distributed`` (the
anchor). For each format (float16 weights and activations; 4-bit affine
weights with group size 64, with float32 scales and activations by default:
MLX's CPU quantized matmul is about 40x slower with float16 ones, 1.8 s
against 0.04 s for one 4096x11008 layer at one token, measured here), number of
tokens and number of ranks it times
``mx.eval(mlp(x))`` in rounds that run both back to back, takes each round's
slowest rank, and reports the median times and the median over rounds of the
ratio mlxdist / mlx (target <= 1.1x; with ``--compile``, both models under
``mx.compile``, <= 1.0x). The two outputs are checked against each other
first.

Run ``python benchmarks/bench_layers.py`` from a shell: it starts the ranks
itself (``--ranks 1 2``, ``--backend mpi`` or ring). The defaults are the
Llama-7B MLP (hidden 4096, intermediate 11008) at 1, 8 and 128 tokens, a few
minutes a round on two cores; ``--quick`` runs hidden 512, intermediate 1408,
and 4-bit only at 1 and 8 tokens.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.nn.layers.distributed as mlx_distributed
import numpy as np
from rich.console import Console
from rich.table import Table

import mlxdist
import mlxdist.nn
from mlxdist.bench.timing import slowest_rank
from mlxdist.launch import launch

TARGET_RATIO = 1.1
COMPILED_TARGET_RATIO = 1.0
RESULT_TAG = "BENCH_LAYERS_RESULT "
FORMATS = ("float16", "4-bit")
QUANTIZATION = {"group_size": 64, "bits": 4}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("ring", "mpi"), default="mpi")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="rank counts to run (default 1 2)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 128])
    parser.add_argument("--quantized-tokens", type=int, nargs="+", default=None,
                        help="token counts for the 4-bit model (default: --tokens)")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--quantized-dtype", choices=("float32", "float16"), default="float32",
                        help="scales and activations of the 4-bit model (default float32)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per case (default 5)")
    parser.add_argument("--compile", action="store_true", help="time both models under mx.compile")
    parser.add_argument("--quick", action="store_true",
                        help="hidden 512, intermediate 1408, 4-bit at 1 and 8 tokens only, 5 rounds")
    parser.add_argument("--timeout", type=float, default=7200.0, help="deadline of each launch, seconds")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate = 512, 1408
        args.quantized_tokens = [t for t in args.tokens if t <= 8]
    if args.quantized_tokens is None:
        args.quantized_tokens = args.tokens
    return args


class MLP(nn.Module):
    """Llama's feed-forward block: down(silu(gate(x)) * up(x))."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


def global_mlp(hidden: int, intermediate: int, quantized: bool, dtype: mx.Dtype) -> MLP:
    """The unsharded MLP, the same on every rank (seeded), evaluated."""
    mx.random.seed(0)
    layers = [nn.Linear(hidden, intermediate, bias=False), nn.Linear(hidden, intermediate, bias=False),
              nn.Linear(intermediate, hidden, bias=False)]
    for layer in layers:
        layer.set_dtype(dtype)
    if quantized:
        layers = [nn.QuantizedLinear.from_linear(layer, **QUANTIZATION) for layer in layers]
    model = MLP(*layers)
    mx.eval(model.parameters())
    return model


def sharded(model: MLP, shard_linear: Callable[..., nn.Module], group: Any) -> MLP:
    """``model`` sharded Megatron-style by a library's shard_linear, evaluated."""
    result = MLP(
        shard_linear(model.gate_proj, "all-to-sharded", group=group),
        shard_linear(model.up_proj, "all-to-sharded", group=group),
        shard_linear(model.down_proj, "sharded-to-all", group=group),
    )
    mx.eval(result.parameters())
    return result


def timed(model: Callable[[mx.array], mx.array], x: mx.array, group: mlxdist.Group) -> float:
    """One synchronised, evaluated forward pass, in seconds."""
    group.barrier()
    start = time.perf_counter()
    mx.eval(model(x))
    return time.perf_counter() - start


def run_rank(args: argparse.Namespace) -> None:
    """Measure every case on this rank; rank 0 prints the results as one tagged JSON line."""
    # A single process runs unlaunched: both libraries then make a size-1 group.
    group = mlxdist.init() if args.single else mlxdist.init(args.backend, strict=True)
    mlx_group = mx.distributed.init() if args.single else mx.distributed.init(backend=args.backend)
    results = []
    for fmt in args.formats:
        dtype = getattr(mx, args.quantized_dtype) if fmt == "4-bit" else mx.float16
        full = global_mlp(args.hidden, args.intermediate, quantized=fmt == "4-bit", dtype=dtype)
        models: dict[str, Callable[[mx.array], mx.array]] = {
            "mlxdist": sharded(full, mlxdist.nn.shard_linear, group),
            "mlx": sharded(full, mlx_distributed.shard_linear, mlx_group),
        }
        if args.compile:
            models = {name: mx.compile(model) for name, model in models.items()}
        del full
        for tokens in args.quantized_tokens if fmt == "4-bit" else args.tokens:
            x = mx.random.normal((tokens, args.hidden), key=mx.random.key(tokens)).astype(dtype)
            ours, theirs = models["mlxdist"](x), models["mlx"](x)
            if not mx.allclose(ours, theirs, rtol=1e-2, atol=1e-2).item():
                raise AssertionError(f"{fmt}, {tokens} tokens: mlxdist's output differs from mlx's")
            for model in models.values():
                timed(model, x, group)
            times = {name: np.empty(args.rounds) for name in models}
            for r in range(args.rounds):
                for name, model in models.items():
                    times[name][r] = timed(model, x, group)
            slowest = {name: slowest_rank(group, t) for name, t in times.items()}
            results.append({
                "format": fmt, "tokens": tokens, "ranks": group.size(),
                **{name: float(np.median(t)) for name, t in slowest.items()},
                # Each round times both back to back: the ratio within a round
                # is the least affected by other load on the machine.
                "ratio": float(np.median(slowest["mlxdist"] / slowest["mlx"])),
            })
    if group.rank() == 0:
        print(RESULT_TAG + json.dumps(results), flush=True)


def collect(args: argparse.Namespace, argv: Sequence[str], n: int) -> list[dict[str, Any]]:
    """Run ``n`` ranks of this script (one plain process for n = 1) and return rank 0's results."""
    command = [sys.executable, __file__, *argv, "--worker"]
    if n == 1:
        # mpirun fails a single rank that exits without MPI_Finalize, which MLX never calls.
        run = subprocess.run([*command, "--single"], capture_output=True, text=True, timeout=args.timeout)
        ok, output, codes = run.returncode == 0, run.stdout + run.stderr, [run.returncode]
    else:
        out = io.StringIO()
        result = launch(command, n=n, backend=args.backend, timeout=args.timeout, capture=True,
                        stdout=out, stderr=out)
        ok, output, codes = result.ok, out.getvalue(), result.returncodes
    lines = [line.split(RESULT_TAG, 1)[1] for line in output.splitlines() if RESULT_TAG in line]
    if not ok or not lines:
        sys.stderr.write(output)
        raise SystemExit(f"the {n}-rank run failed (exit codes {codes})")
    return json.loads(lines[0])


def report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    target = COMPILED_TARGET_RATIO if args.compile else TARGET_RATIO
    table = Table(title=(
        f"Llama MLP forward{' (compiled)' if args.compile else ''}, hidden {args.hidden}, "
        f"intermediate {args.intermediate}, {args.backend}, median of {args.rounds} rounds (slowest rank)"
    ))
    columns = ("weights", "tokens", "ranks", "mlxdist ms", "mlx ms", "mlxdist / mlx", f"<= {target}x")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        ratio = row["ratio"]
        table.add_row(
            row["format"], str(row["tokens"]), str(row["ranks"]), f"{row['mlxdist'] * 1e3:.2f}",
            f"{row['mlx'] * 1e3:.2f}", f"{ratio:.3f}", "yes" if ratio <= target else "NO",
        )
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        run_rank(args)
        return 0
    rows = [row for n in args.ranks for row in collect(args, argv, n)]
    rows.sort(key=lambda row: (FORMATS.index(row["format"]), row["tokens"], row["ranks"]))
    report(args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
