"""Reproduce the README's performance table: ``python benchmarks/collectives.py``.

For each backend (ring and MPI, 2 local ranks) it runs ``python -m mlxdist.bench``
three times:

- ``latency``: all_sum and the send/recv ring shift, 1 KiB to 64 KiB, with many
  iterations (small messages are noisy);
- ``sweep``: the default sweep (every operation, 1 KiB to 64 MiB, float32, 5
  warm-up and 20 timed iterations), with a busbw plot;
- ``tp``: the tensor-parallel sizes (hidden 4096 x 1..512 tokens, float16 and bfloat16).

The raw rows go to ``<out>/<backend>-<run>.json`` and the summary to
``<out>/collectives.md``. Every figure is a ratio against mx.distributed (and
mpi4py on MPI) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

RUNS = {
    "latency": ["-b", "1K", "-e", "64K", "-o", "all_sum,sendrecv", "-w", "20", "-n", "200"],
    "sweep": [],
    "tp": ["--tp", "-o", "all_sum"],
}
IMPLS = ("mlxdist-reg", "mlxdist-numpy", "mlxdist-mlx", "mx.distributed", "mpi4py")
BANDWIDTH_SIZES = (1 << 20, 8 << 20, 64 << 20)


def run_bench(backend: str, run: str, out: Path, ranks: int) -> dict[str, Any]:
    """Run one mlxdist.bench job and return its JSON document.

    Args:
        backend: ``ring`` or ``mpi``.
        run: A key of :data:`RUNS`.
        out: The output directory.
        ranks: The number of local ranks.

    Returns:
        The document the bench wrote.

    Raises:
        subprocess.CalledProcessError: the bench failed (a rank died or a result was wrong).
    """
    target = out / f"{backend}-{run}.json"
    command = [sys.executable, "-m", "mlxdist.bench", "--backend", backend, "--nranks", str(ranks),
               *RUNS[run], "--json", str(target)]
    if run == "sweep":
        command += ["--plot", str(out / f"{backend}-busbw.png")]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)
    return json.loads(target.read_text())


def _index(doc: dict[str, Any]) -> dict[tuple, dict[str, Any]]:
    return {(r["op"], r["dtype"], r["bytes"], r["tokens"], r["impl"]): r for r in doc["rows"]}


def _cell(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ratio(a: dict | None, b: dict | None, key: str) -> str:
    if not a or not b or not b[key]:
        return "n/a"
    return f"{a[key] / b[key]:.2f}"


def _size(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"


def latency_table(docs: dict[str, dict[str, dict]]) -> list[str]:
    """Markdown rows: median latency of small all_sum and sendrecv, per backend."""
    lines = [
        "| backend | op | size | " + " | ".join(IMPLS) + " | reg / mx.distributed | reg / mpi4py |",
        "|---|---|---|" + "---|" * (len(IMPLS) + 2),
    ]
    for backend, runs in docs.items():
        rows = _index(runs["latency"])
        for op in ("all_sum", "sendrecv"):
            for nbytes in (1 << 10, 64 << 10):
                at = {impl: rows.get((op, "float32", nbytes, None, impl)) for impl in IMPLS}
                lines.append(_row(backend, op, nbytes, at, "median_us"))
    return lines


def _row(backend: str, op: str, nbytes: int, at: dict[str, Any], field: str, *digits: int) -> str:
    """One markdown row: ``field`` per implementation, then mlxdist-reg's ratios to the anchors."""
    cells = [_cell(r[field] if r else None, *digits) for r in at.values()]
    return (
        f"| {backend} | {op} | {_size(nbytes)} | " + " | ".join(cells)
        + f" | {_ratio(at['mlxdist-reg'], at['mx.distributed'], field)}"
        + f" | {_ratio(at['mlxdist-reg'], at['mpi4py'], field)} |"
    )


def bandwidth_table(docs: dict[str, dict[str, dict]]) -> list[str]:
    """Markdown rows: busbw of every operation at large sizes, per backend."""
    lines = [
        "| backend | op | size | " + " | ".join(IMPLS) + " | reg / mx.distributed | reg / mpi4py |",
        "|---|---|---|" + "---|" * (len(IMPLS) + 2),
    ]
    for backend, runs in docs.items():
        rows = _index(runs["sweep"])
        for op in runs["sweep"]["header"]["ops"]:
            for nbytes in BANDWIDTH_SIZES:
                at = {impl: rows.get((op, "float32", nbytes, None, impl)) for impl in IMPLS}
                if not any(at.values()):
                    continue
                lines.append(_row(backend, op, nbytes, at, "busbw_GBps", 3))
    return lines


def tensor_parallel_table(docs: dict[str, dict[str, dict]]) -> list[str]:
    """Markdown rows: all_sum median time at Llama decode/prefill sizes, per backend."""
    impls = ("mlxdist-reg", "mlxdist-mlx", "mx.distributed")
    lines = [
        "| backend | dtype | tokens | size | " + " | ".join(impls) + " | mlx / mx.distributed |",
        "|---|---|---|---|" + "---|" * (len(impls) + 1),
    ]
    for backend, runs in docs.items():
        rows = _index(runs["tp"])
        for r in (r for r in runs["tp"]["rows"] if r["impl"] == "mx.distributed"):
            at = {impl: rows.get((r["op"], r["dtype"], r["bytes"], r["tokens"], impl)) for impl in impls}
            cells = [_cell(x["median_us"] if x else None) for x in at.values()]
            lines.append(
                f"| {backend} | {r['dtype']} | {r['tokens']} | {_size(r['bytes'])} | " + " | ".join(cells)
                + f" | {_ratio(at['mlxdist-mlx'], at['mx.distributed'], 'median_us')} |"
            )
    return lines


def markdown(docs: dict[str, dict[str, dict]]) -> str:
    """The summary document, with the machine each backend ran on."""
    hosts = {b: runs["sweep"]["header"] for b, runs in docs.items()}
    parts = ["# mlxdist collective benchmarks", ""]
    for backend, h in hosts.items():
        parts.append(f"- {backend}: {h['ranks']} ranks on {h['host']} ({h['cores']} cores), MLX {h['mlx']}, "
                     f"{h['warmup']} warm-up + {h['iters']} timed iterations; times are the slowest rank's")
    parts += ["", "## Latency: median µs (lower is better)", "", *latency_table(docs),
              "", "## Bus bandwidth: GB/s (higher is better)", "", *bandwidth_table(docs),
              "", "## Tensor-parallel all_sum (hidden 4096): median µs", "", *tensor_parallel_table(docs), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and write the JSON files and the markdown summary.

    Args:
        argv: Command-line arguments.

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="ring,mpi", help="comma list (default ring,mpi)")
    parser.add_argument(
        "--runs", default=",".join(RUNS),
        help=f"comma list of {', '.join(RUNS)}; the others are read from earlier results in --out",
    )
    parser.add_argument("--nranks", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [r for r in args.runs.split(",") if r]
    docs: dict[str, dict[str, dict]] = {}
    for backend in args.backends.split(","):
        docs[backend] = {}
        for run in RUNS:
            saved = args.out / f"{backend}-{run}.json"
            if run in runs:
                docs[backend][run] = run_bench(backend, run, args.out, args.nranks)
            elif saved.exists():  # a run not repeated now keeps its last results
                docs[backend][run] = json.loads(saved.read_text())
    if all(set(d) == set(RUNS) for d in docs.values()):
        summary = markdown(docs)
        (args.out / "collectives.md").write_text(summary)
        print(summary)
    else:
        print(f"not all of {', '.join(RUNS)} have results for every backend: no summary written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
