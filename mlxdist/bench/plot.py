"""Plot busbw against message size, one line per implementation."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["plot_busbw"]


def _size_label(nbytes: float) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g}{unit}"
    return f"{nbytes:g}"


def plot_busbw(doc: dict[str, Any], path: str) -> None:
    """Save a PNG with one panel per (operation, dtype): busbw against size.

    Args:
        doc: The sweep's JSON document.
        path: The image file to write.

    Raises:
        ValueError: the document has no rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = doc["rows"]
    if not rows:
        raise ValueError("nothing to plot: the sweep has no rows")
    panels = list(dict.fromkeys((r["op"], r["dtype"]) for r in rows))
    impls = [n for n in doc["header"]["implementations"] if any(r["impl"] == n for r in rows)]
    columns = min(3, len(panels))
    lines = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(5 * columns, 3.6 * lines), squeeze=False)
    for ax, (op, dtype) in zip(axes.flat, panels):
        for name in impls:
            points = sorted((r["bytes"], r["busbw_GBps"]) for r in rows
                            if (r["op"], r["dtype"], r["impl"]) == (op, dtype, name))
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _size_label(x)))
        ax.set_title(f"{op} {dtype}")
        ax.set_xlabel("size (bytes)")
        ax.set_ylabel("busbw (GB/s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    header = doc["header"]
    fig.suptitle(f"mlxdist.bench: {header['backend']}, {header['ranks']} ranks, {header['host']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
