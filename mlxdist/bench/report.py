"""Reporting a finished sweep: the terminal table and the JSON document."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from mlxdist.bench.header import header_lines
from mlxdist.bench.options import format_size

__all__ = ["MLXDIST_PREFERENCE", "ratio_row", "render_tables", "write_json"]

# The mlxdist variant the ratio column shows: the first of these that ran.
MLXDIST_PREFERENCE = ("mlxdist-reg", "mlxdist-mlx", "mlxdist-numpy")


def _impl_order(rows: list[dict[str, Any]], header: dict[str, Any]) -> list[str]:
    ran = {r["impl"] for r in rows}
    return [name for name in header["implementations"] if name in ran]


def _sections(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[tuple[int, Any], dict[str, dict]]]:
    """Rows grouped by (op, dtype), then by (bytes, tokens), then by implementation."""
    sections: dict[tuple[str, str], dict[tuple[int, Any], dict[str, dict]]] = {}
    for row in rows:
        by_size = sections.setdefault((row["op"], row["dtype"]), {})
        by_size.setdefault((row["bytes"], row["tokens"]), {})[row["impl"]] = row
    return sections


def ratio_row(by_impl: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The row whose ratio to mx.distributed the table shows, per :data:`MLXDIST_PREFERENCE`.

    Args:
        by_impl: One message's rows, by implementation.

    Returns:
        The preferred mlxdist row with a ratio, or None.
    """
    for name in MLXDIST_PREFERENCE:
        row = by_impl.get(name)
        if row is not None and row.get("ratio_vs_mx") is not None:
            return row
    return None


def _console(stream: TextIO) -> Any:
    from rich.console import Console

    # Off a terminal rich assumes 80 columns; a file gets the table unwrapped.
    return Console(file=stream, width=None if stream.isatty() else 240, highlight=False)


def render_tables(doc: dict[str, Any], stat: str = "median", stream: TextIO | None = None) -> None:
    """Print the header block and the tables: one per operation and dtype of a
    sweep, or the decode-chain table.

    Args:
        doc: The run's JSON document (header, rows, skipped).
        stat: ``"median"`` or ``"p99"``: the time shown.
        stream: Where to print (stdout by default).
    """
    console = _console(stream or sys.stdout)
    header, rows = doc["header"], doc["rows"]
    for line in header_lines(header):
        console.print(line, markup=False)
    impls = _impl_order(rows, header)
    if header["mode"] == "chain":
        console.print(_chain_table(rows, impls, stat))
    else:
        _sweep_tables(console, rows, impls, stat, header)
    for skip in doc.get("skipped", []):
        console.print(f"# skipped {skip['impl']} {skip['op']} {skip['dtype']}: {skip['reason']}", markup=False)
    total_wrong = sum(r["wrong"] for r in rows)
    console.print(f"# Out of bounds values : {total_wrong} {'OK' if total_wrong == 0 else 'FAILED'}", markup=False)


def _chain_table(rows: list[dict[str, Any]], impls: list[str], stat: str) -> Any:
    """The decode-chain table: one line per variant and dtype, time per chain and per all_sum."""
    from rich import box
    from rich.table import Table

    caption = (
        f"time: {stat} µs per chain (slowest rank); µs/op: that time / length; "
        "mlxdist / mx: median time ratio (< 1: mlxdist faster)"
    )
    table = Table(title="decode chain", title_justify="left", caption=caption, caption_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("chain", "dtype", "hidden", "length"):
        table.add_column(name, justify="left" if name == "chain" else "right")
    for name in impls:
        table.add_column(f"{name}\n{stat} µs", justify="right")
        table.add_column("µs/op", justify="right")
    table.add_column("#wrong", justify="right")
    table.add_column("mlxdist\n/ mx", justify="right")
    by_chain: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_chain.setdefault((row["op"], row["dtype"]), {})[row["impl"]] = row
    for (variant, dtype), by_impl in by_chain.items():
        first = next(iter(by_impl.values()))
        cells = [variant, dtype, str(first["count"]), str(first["length"])]
        for name in impls:
            row = by_impl.get(name)
            cells += [f"{row[f'{stat}_us']:.1f}", f"{row['per_op_us']:.2f}"] if row else ["n/a", "n/a"]
        table.add_row(*cells, *_check_cells(by_impl))
    return table


def _check_cells(by_impl: dict[str, dict[str, Any]]) -> list[str]:
    """The "#wrong" and "mlxdist / mx" cells of one table row."""
    wrong = sum(r["wrong"] for r in by_impl.values())
    ratio = ratio_row(by_impl)
    return [f"[bold red]{wrong}[/]" if wrong else "0", f"{ratio['ratio_vs_mx']:.2f}" if ratio else "n/a"]


def _sweep_tables(console: Any, rows: list[dict[str, Any]], impls: list[str], stat: str,
                  header: dict[str, Any]) -> None:
    """One table per operation and dtype of a sweep."""
    from rich import box
    from rich.table import Table

    tensor_parallel = header["mode"] == "tensor-parallel"
    for (op, dtype), by_size in _sections(rows).items():
        ratio_impls = sorted({r["impl"] for s in by_size.values() if (r := ratio_row(s))}, key=impls.index)
        caption = (
            f"time: {stat} µs over {header['iters']} iterations (slowest rank); busbw GB/s from the median; "
            f"ratio: {' or '.join(ratio_impls) or 'mlxdist'} median time / mx.distributed (< 1: mlxdist faster)"
        )
        table = Table(title=f"{op} {dtype}", title_justify="left", caption=caption,
                      caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("size", justify="right")
        table.add_column("tokens" if tensor_parallel else "count", justify="right")
        for name in impls:
            table.add_column(f"{name}\n{stat} µs", justify="right")
            table.add_column("busbw", justify="right")
        table.add_column("#wrong", justify="right")
        table.add_column("mlxdist\n/ mx", justify="right")
        for (nbytes, tokens), by_impl in by_size.items():
            any_row = next(iter(by_impl.values()))
            cells = [format_size(nbytes), str(tokens if tensor_parallel else any_row["count"])]
            for name in impls:
                row = by_impl.get(name)
                cells += [f"{row[f'{stat}_us']:.1f}", f"{row['busbw_GBps']:.3g}"] if row else ["n/a", "n/a"]
            table.add_row(*cells, *_check_cells(by_impl))
        console.print(table)


def write_json(doc: dict[str, Any], path: str) -> None:
    """Write the document as JSON to ``path`` (``-``: stdout).

    Args:
        doc: The sweep's JSON document.
        path: A file name, or ``-``.
    """
    text = json.dumps(doc, indent=1) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with open(path, "w") as f:
        f.write(text)
