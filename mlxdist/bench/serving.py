"""What a serving benchmark measures: each streamed request's timings as the client saw
them, their summary per concurrency level, and the round-by-round ratios between two
servers run interleaved (``benchmarks/bench_serve.py`` drives the servers and the load)."""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median
from typing import Any, Optional

import numpy as np

__all__ = ["OURS", "THEIRS", "Request", "prompt_text", "summarise", "compare"]

OURS, THEIRS = "mlxdist-serve", "mlx_lm.server"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass
class Request:
    """One streamed completion as the client saw it (seconds from the level's start)."""

    prompt_index: int
    start: float
    first: float
    end: float
    tokens: int
    text: str
    error: Optional[str] = None

    @property
    def ttft(self) -> float:
        """Seconds to the first token."""
        return self.first - self.start

    @property
    def latency(self) -> float:
        """Seconds from the request to its last token."""
        return self.end - self.start

    @property
    def decode_tps(self) -> float:
        """Tokens per second after the first (NaN for fewer than two tokens)."""
        span = self.end - self.first
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else float("nan")



def summarise(requests: list[Request], wall: float) -> dict[str, Any]:
    """One concurrency level of one round.

    Args:
        requests: Every request of the level.
        wall: The level's seconds, first request to last token.

    Returns:
        Requests, errors, tokens, median time to first token and decode rate,
        aggregate tokens per second, latency percentiles (50, 99) and ``wall_s``.
    """
    good = [r for r in requests if r.error is None]
    latencies = np.array([r.latency for r in good]) if good else np.array([float("nan")])
    return {
        "requests": len(requests),
        "errors": [r.error for r in requests if r.error is not None],
        "tokens": sum(r.tokens for r in good),
        "ttft_s": median(r.ttft for r in good) if good else float("nan"),
        "decode_tps": float(np.nanmedian([r.decode_tps for r in good])) if good else float("nan"),
        "aggregate_tps": sum(r.tokens for r in good) / wall,
        "latency_p50_s": float(np.percentile(latencies, 50)),
        "latency_p99_s": float(np.percentile(latencies, 99)),
        "wall_s": wall,
    }



def _median_over_rounds(rounds: list[dict], key: str) -> float:
    values = [r[key] for r in rounds if r[key] == r[key]]
    return median(values) if values else float("nan")


def compare(per_round: dict[str, list[dict]], concurrency: list[int]) -> list[dict]:
    """Per concurrency: each server's medians over rounds, and mlxdist's round-by-round ratios.

    Args:
        per_round: Each server's rounds, each ``{concurrency: summarise(...)}``.
        concurrency: The levels.

    Returns:
        One row per level: each server's medians, errors and requests, and
        ``ratio`` (the median of :data:`OURS` over :data:`THEIRS` round by round).
    """
    keys = ("ttft_s", "decode_tps", "aggregate_tps", "latency_p50_s", "latency_p99_s")
    rows = []
    for c in concurrency:
        row: dict[str, Any] = {"concurrency": c}
        for name, rounds in per_round.items():
            levels = [r[c] for r in rounds]
            row[name] = {key: _median_over_rounds(levels, key) for key in keys}
            row[name]["errors"] = sum(len(level["errors"]) for level in levels)
            row[name]["requests"] = sum(level["requests"] for level in levels)
        if OURS in per_round and THEIRS in per_round:
            pairs = list(zip(per_round[OURS], per_round[THEIRS]))
            row["ratio"] = {
                key: median(ours[c][key] / theirs[c][key] for ours, theirs in pairs) for key in keys
            }
        rows.append(row)
    return rows


def prompt_text(index: int, words: int) -> str:
    """The ``index``-th prompt: ``words`` two-letter words; prompts differ from their first word.

    Args:
        index: Which prompt (seeds the rest of its words).
        words: How many words.

    Returns:
        The prompt.
    """
    rng = np.random.default_rng(index)
    first = LETTERS[index // 26 % 26] + LETTERS[index % 26]
    rest = ["".join(rng.choice(list(LETTERS), 2)) for _ in range(words - 1)]
    return " ".join([first, *rest])
