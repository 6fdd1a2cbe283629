"""``python -m mlxdist.bench`` (console script ``mlxdist-bench``).

Under a launcher (``mlxdist.launch``, ``mlx.launch``, ``mpirun``) it uses the
ranks it was given; with no launcher it starts ``--nranks`` local ranks itself
(ring by default, ``--backend mpi``).
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import mlxdist
from mlxdist.backends import Backend, detect_backend
from mlxdist.bench.chain import run_chains
from mlxdist.bench.header import collect_header
from mlxdist.bench.implementations import make_implementations
from mlxdist.bench.options import BenchConfig, parse_args
from mlxdist.bench.progress import EventProgress, NullProgress, make_progress
from mlxdist.bench.report import render_tables, write_json
from mlxdist.bench.spawn import spawn_ranks
from mlxdist.bench.sweep import Progress, run_sweep, skips_as_dicts

__all__ = ["main", "run_rank", "finish"]


def finish(doc: dict[str, Any], stat: str, json_path: str | None, plot_path: str | None) -> int:
    """Report a finished sweep: table (unless JSON goes to stdout), JSON, plot.

    Args:
        doc: The sweep's document (header, rows, skipped).
        stat: Time statistic for the table.
        json_path: Where to write JSON (``-``: stdout instead of the table), or None.
        plot_path: Where to save the plot, or None.

    Returns:
        0 if every result was correct, 1 otherwise.
    """
    if json_path is not None:
        write_json(doc, json_path)
    if json_path != "-":
        render_tables(doc, stat)
    if plot_path:
        from mlxdist.bench.plot import plot_busbw  # matplotlib only when asked for

        plot_busbw(doc, plot_path)
    return 0 if all(row["wrong"] == 0 for row in doc["rows"]) else 1


def run_rank(config: BenchConfig, launched: Backend) -> int:
    """Run the sweep as one rank of a launched job.

    Args:
        config: The parsed command line.
        launched: The backend the launch environment names.

    Returns:
        The exit code (rank 0 reports; the others return 0).
    """
    if config.backend is not None and config.backend != launched.value:
        print(f"mlxdist.bench: --backend {config.backend} but the launcher started {launched.value} ranks",
              file=sys.stderr)
        return 2
    group = mlxdist.init(launched, strict=True)
    impls = make_implementations(config.impls, group)
    header = collect_header(config, group, [impl.name for impl in impls])
    progress: Progress
    if group.rank() != 0:
        progress = NullProgress()
    elif config.emit_events:
        progress = EventProgress()
    else:
        progress = make_progress(config.progress)
    if config.workload == "chain":
        rows, skips = run_chains(config, group, impls, progress)
    else:
        rows, skips = run_sweep(config, group, impls, progress)
    if group.rank() != 0:
        return 0
    doc = {"header": header, "rows": rows, "skipped": skips_as_dicts(skips)}
    if config.result_file:
        write_json(doc, config.result_file)
        return 0
    return finish(doc, config.stat, config.json, config.plot)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments (``sys.argv[1:]`` by default).

    Returns:
        0 when every rank finished and every result was correct.
    """
    config = parse_args(sys.argv[1:] if argv is None else argv)
    launched = detect_backend()
    if launched is not None:
        return run_rank(config, launched)
    try:
        code, doc = spawn_ranks(config)
    except FileNotFoundError as exc:
        print(f"mlxdist.bench: {exc}", file=sys.stderr)
        return 127
    if doc is None:
        return code
    return finish(doc, config.stat, config.json, config.plot)


if __name__ == "__main__":
    sys.exit(main())
