"""The README's table of broadcast, gather, scatter and all_to_all: ``python benchmarks/composed.py``.

Runs ``python -m mlxdist.bench`` on 2 local ranks of each backend for the four
operations (1 KiB to 32 MiB, factor 8) and prints one markdown row per
backend, operation and size: the median time of each implementation and the
ratios measured in the same run against what MLX users write by hand with
mx.distributed (an all_sum of the root's array and zeros elsewhere, or an
all_gather; see mlxdist.bench.implementations) and against mpi4py's
MPI_Bcast/Gather/Scatter/Alltoall. ``--json FILE ...`` prints the table of
existing runs instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import size_text

OPS = ("broadcast", "gather", "scatter", "all_to_all")
IMPLS = ("mlxdist-reg", "mlxdist-numpy", "mlxdist-mlx", "mx.distributed", "mpi4py")
ARGS = ["-b", "1K", "-e", "32M", "-f", "8", "-n", "10", "-w", "2", "-o", ",".join(OPS)]


def table(docs: list[dict]) -> str:
    """Markdown rows of the runs' medians and ratios."""
    lines = [
        "| backend | op | size | mlxdist-reg µs | mlxdist-numpy µs | mlxdist-mlx µs | by hand (mx.distributed) µs "
        "| mpi4py µs | reg ÷ by hand | numpy ÷ by hand | mlx ÷ by hand | reg ÷ mpi4py |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for doc in docs:
        backend = doc["header"]["backend"]
        times = {(r["op"], r["bytes"], r["impl"]): r["median_us"] for r in doc["rows"]}
        for op in OPS:
            for nbytes in sorted({b for (o, b, _) in times if o == op}):
                t = {impl: times.get((op, nbytes, impl)) for impl in IMPLS}
                cells = [f"{t[i]:.0f}" if t[i] else "n/a" for i in IMPLS]
                hand, mpi = t["mx.distributed"], t["mpi4py"]
                ratios = [f"{t[i] / hand:.2f}" if t[i] and hand else "n/a" for i in IMPLS[:3]]
                ratios.append(f"{t['mlxdist-reg'] / mpi:.1f}" if mpi else "n/a")
                lines.append(f"| {backend} | {op} | {size_text(nbytes)} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run (or read) the benchmarks and print the table; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", nargs="+", default=None, help="bench JSON files to read instead of running")
    args = parser.parse_args(argv)
    files = args.json
    if files is None:
        out = Path(tempfile.mkdtemp(prefix="mlxdist-composed-"))
        files = []
        for backend in ("mpi", "ring"):
            path = out / f"{backend}.json"
            cmd = [sys.executable, "-m", "mlxdist.bench", "--backend", backend, *ARGS, "--json", str(path)]
            subprocess.run(cmd, check=True)
            files.append(str(path))
    print(table([json.loads(Path(f).read_text()) for f in files]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
