"""Reproduce the README's collective tables: ``python benchmarks/collectives.py``.

For each backend (ring and MPI, 2 local ranks) it runs ``python -m mlxdist.bench``
``--repeat`` times (default 3) for each of:

- ``chain``: the decode chain, 64 chained all_sums of float16 x 4096 with one
  eval, plain and with ``* 0.5`` between them (``--workload chain``);
- ``latency``: all_sum and the send/recv ring shift at 1 KiB and 64 KiB, with
  many iterations (small messages are noisy);
- ``bandwidth``: all_sum and all_gather, 1 to 64 MiB, with a busbw plot;
- ``tp`` (only when asked for with ``--runs``): the tensor-parallel sizes
  (hidden 4096 x 1..512 tokens, float16 and bfloat16).

Every figure is a ratio against mx.distributed (and mpi4py on MPI) measured in
the same run; the summary gives each ratio's median over the repeats and its
range. The raw rows go to ``<out>/<backend>-<run>-<i>.json`` and the summary
to ``<out>/collectives.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

from common import size_text

RUNS = {
    "chain": ["--workload", "chain", "-w", "3", "-n", "120", "--rounds", "120"],
    "latency": ["-b", "1K", "-e", "64K", "-f", "64", "-o", "all_sum,sendrecv", "-w", "50", "-n", "1000",
                "--rounds", "20"],
    # One iteration per round: load from elsewhere comes in bursts longer than a 64 MiB operation.
    "bandwidth": ["-b", "1M", "-e", "64M", "-f", "8", "-o", "all_sum,all_gather", "-w", "3", "-n", "24",
                  "--rounds", "24"],
    "tp": ["--tp", "-o", "all_sum"],
}
DEFAULT_RUNS = ("chain", "latency", "bandwidth")
IMPLS = ("mlxdist-reg", "mlxdist-numpy", "mlxdist-mlx", "mx.distributed", "mpi4py")
# The mlxdist paths whose ratios to mx.distributed the tables show.
PATHS = ("mlxdist-mlx", "mlxdist-numpy", "mlxdist-reg")
REFERENCE = "mx.distributed"

Docs = dict[str, dict[str, list[dict[str, Any]]]]  # backend -> run -> one document per repeat


def command_for(backend: str, run: str, target: Path, ranks: int) -> list[str]:
    """The ``mlxdist.bench`` command line of one run (rows to ``target``)."""
    command = [sys.executable, "-m", "mlxdist.bench", "--backend", backend, "--nranks", str(ranks),
               *RUNS[run], "--json", str(target), "--no-progress"]
    if run == "bandwidth":
        command += ["--plot", str(target.with_suffix(".png"))]
    return command


def run_bench(backend: str, run: str, repeat: int, out: Path, ranks: int) -> dict[str, Any]:
    """Run one mlxdist.bench job and return its JSON document.

    Raises:
        subprocess.CalledProcessError: the bench failed (a rank died or a result was wrong).
    """
    target = out / f"{backend}-{run}-{repeat}.json"
    command = command_for(backend, run, target, ranks)
    print("$", " ".join(["python", *command[1:]]), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(target.read_text())


def _index(doc: dict[str, Any]) -> dict[tuple, dict[str, Any]]:
    return {(r["op"], r["dtype"], r["bytes"], r.get("tokens"), r["impl"]): r for r in doc["rows"]}


def _values(docs: Iterable[dict[str, Any]], key: tuple, impl: str, field: str) -> list[float]:
    """``field`` of one cell in every repeat that has it."""
    found = []
    for doc in docs:
        row = _index(doc).get((*key, impl))
        if row is not None and row[field]:
            found.append(float(row[field]))
    return found


def _ratios(docs: list[dict[str, Any]], key: tuple, impl: str, field: str) -> list[float]:
    """Per repeat, ``field`` of ``impl`` over mx.distributed's, from the same run."""
    ratios = []
    for doc in docs:
        rows = _index(doc)
        row, anchor = rows.get((*key, impl)), rows.get((*key, REFERENCE))
        if row and anchor and anchor[field]:
            ratios.append(row[field] / anchor[field])
    return ratios


def _spread(values: list[float], digits: int = 2) -> str:
    """``median [min–max]`` of the repeats, or the one value, or n/a."""
    if not values:
        return "n/a"
    mid = f"{statistics.median(values):.{digits}f}"
    if len(values) == 1:
        return mid
    return f"{mid} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def _median(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f}" if values else "n/a"


def chain_table(docs: Docs) -> list[str]:
    """Markdown rows: the decode chain per backend, ms per chain and mlxdist's ratio."""
    lines = [
        "| backend | chain | mx.distributed, ms | mlxdist, ms | mlxdist ÷ mx.distributed |",
        "|---|---|---|---|---|",
    ]
    for backend, runs in docs.items():
        repeats = runs.get("chain", [])
        if not repeats:
            continue
        for row in (r for r in repeats[0]["rows"] if r["impl"] == REFERENCE):
            key = (row["op"], row["dtype"], row["bytes"], None)
            ms = {impl: [v / 1e3 for v in _values(repeats, key, impl, "median_us")] for impl in
                  (REFERENCE, "mlxdist-mlx")}
            scaled = " × 0.5" if row["op"] != "chain" else ""
            name = f"{row['length']} × all_sum{scaled}, {row['dtype']}[{row['count']}]"
            lines.append(
                f"| {backend} | {name} | {_median(ms[REFERENCE], 2)} | {_median(ms['mlxdist-mlx'], 2)} "
                f"| {_spread(_ratios(repeats, key, 'mlxdist-mlx', 'median_us'))} |"
            )
    return lines


def _paths_header(unit: str) -> list[str]:
    """The header of a table with one column per implementation and one ratio per mlxdist path."""
    return [
        "| backend | op | size | " + " | ".join(f"{i}, {unit}" for i in IMPLS) + " | "
        + " | ".join(f"{p} ÷ mx" for p in PATHS) + " |",
        "|---|---|---|" + "---|" * (len(IMPLS) + len(PATHS)),
    ]


def _paths_cells(repeats: list[dict[str, Any]], op: str, nbytes: int, field: str, digits: int) -> list[str]:
    """Each implementation's median ``field`` and each mlxdist path's ratio, for one message."""
    key = (op, "float32", nbytes, None)
    values = [_median(_values(repeats, key, impl, field), digits) for impl in IMPLS]
    return values + [_spread(_ratios(repeats, key, path, field)) for path in PATHS]


def latency_table(docs: Docs) -> list[str]:
    """Markdown rows: median latency per implementation and each mlxdist path's ratio."""
    lines = _paths_header("µs")
    for backend, runs in docs.items():
        repeats = runs.get("latency", [])
        for op in ("all_sum", "sendrecv"):
            for nbytes in (1 << 10, 64 << 10):
                cells = _paths_cells(repeats, op, nbytes, "median_us", 1)
                if any(c != "n/a" for c in cells[: len(IMPLS)]):
                    lines.append(f"| {backend} | {op} | {size_text(nbytes)} | " + " | ".join(cells) + " |")
    return lines


def bandwidth_table(docs: Docs) -> list[str]:
    """Markdown rows: busbw per implementation at 1 to 64 MiB and each mlxdist path's ratio."""
    lines = _paths_header("GB/s")
    for backend, runs in docs.items():
        repeats = runs.get("bandwidth", [])
        if not repeats:
            continue
        sizes = sorted({r["bytes"] for r in repeats[0]["rows"]})
        for op in repeats[0]["header"]["ops"]:
            for nbytes in sizes:
                cells = _paths_cells(repeats, op, nbytes, "busbw_GBps", 2)
                lines.append(f"| {backend} | {op} | {size_text(nbytes)} | " + " | ".join(cells) + " |")
    return lines


def tensor_parallel_table(docs: Docs) -> list[str]:
    """Markdown rows: all_sum median time at Llama decode/prefill sizes, per backend."""
    impls = ("mlxdist-reg", "mlxdist-mlx", REFERENCE)
    lines = [
        "| backend | dtype | tokens | size | " + " | ".join(f"{i}, µs" for i in impls) + " | mlx ÷ mx |",
        "|---|---|---|---|" + "---|" * (len(impls) + 1),
    ]
    for backend, runs in docs.items():
        repeats = runs.get("tp", [])
        if not repeats:
            continue
        for row in (r for r in repeats[0]["rows"] if r["impl"] == REFERENCE):
            key = (row["op"], row["dtype"], row["bytes"], row["tokens"])
            times = [_median(_values(repeats, key, impl, "median_us")) for impl in impls]
            lines.append(
                f"| {backend} | {row['dtype']} | {row['tokens']} | {size_text(row['bytes'])} | " + " | ".join(times)
                + f" | {_spread(_ratios(repeats, key, 'mlxdist-mlx', 'median_us'))} |"
            )
    return lines


def markdown(docs: Docs) -> str:
    """The summary document, with the machine each backend ran on."""
    parts = ["# mlxdist collective benchmarks", ""]
    for backend, runs in docs.items():
        some = next(iter(d[0] for d in runs.values() if d))
        h = some["header"]
        counts = ", ".join(f"{run} × {len(d)}" for run, d in runs.items() if d)
        parts.append(f"- {backend}: {h['ranks']} ranks on {h['host']} ({h['cores']} cores), MLX {h['mlx']}; "
                     f"runs: {counts}; times are the slowest rank's; ratios: median [range] over the runs")
    sections = (
        ("Decode chain: ms per chain (lower is better)", chain_table),
        ("Latency: median µs (lower is better)", latency_table),
        ("Bus bandwidth: GB/s (higher is better)", bandwidth_table),
        ("Tensor-parallel all_sum (hidden 4096): median µs", tensor_parallel_table),
    )
    for title, table in sections:
        rows = table(docs)
        if len(rows) > 2:
            parts += ["", f"## {title}", "", *rows]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and write the JSON files and the markdown summary.

    Args:
        argv: Command-line arguments.

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="mpi,ring", help="comma list (default mpi,ring)")
    parser.add_argument(
        "--runs", default=",".join(DEFAULT_RUNS),
        help=f"comma list of {', '.join(RUNS)} (default {','.join(DEFAULT_RUNS)})",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each (default 3)")
    parser.add_argument("--nranks", type=int, default=2)
    parser.add_argument("--summarize", action="store_true",
                        help="run nothing: summarize the JSON files already in --out")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        parser.error(f"unknown runs {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    backends = args.backends.split(",")
    docs: Docs = {b: {run: [] for run in runs} for b in backends}
    if args.summarize:
        for backend in backends:
            for run in runs:
                files = sorted(args.out.glob(f"{backend}-{run}-*.json"))
                docs[backend][run] = [json.loads(f.read_text()) for f in files]
    else:
        # Repeats outermost, so a burst of load from elsewhere hits one repeat
        # of everything rather than every repeat of one run.
        for repeat in range(args.repeat):
            for backend in backends:
                for run in runs:
                    docs[backend][run].append(run_bench(backend, run, repeat, args.out, args.nranks))
    summary = markdown(docs)
    (args.out / "collectives.md").write_text(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
