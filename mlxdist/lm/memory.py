"""Memory accounting: parameter bytes and this process's resident set."""

from __future__ import annotations

import resource
import sys

import mlx.nn as nn
from mlx.utils import tree_flatten

__all__ = ["parameter_bytes", "rss_bytes", "peak_rss_bytes"]


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters as held by this process (lazy ones counted at their size)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """This process's resident set size now (0 where the platform does not say)."""
    return _status_bytes("VmRSS") or 0


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux's ``VmHWM`` starts afresh at exec; ``ru_maxrss`` (the fallback, on
    macOS) also counts the parent's resident set at fork.
    """
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
