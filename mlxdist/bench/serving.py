"""What a serving benchmark measures: each streamed request's timings as the client saw
them (completions and multi-turn chat turns), their summary per concurrency level, and
the round-by-round ratios between two servers run interleaved (``benchmarks/bench_serve.py`` drives the servers and the load)."""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["OURS", "THEIRS", "COMPLETION_KEYS", "CHAT_KEYS", "LATE_TURN", "Request", "Turn", "prompt_text", "words",
           "summarise", "summarise_chat", "compare"]

OURS, THEIRS = "mlxdist-serve", "mlx_lm.server"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
COMPLETION_KEYS = ("ttft_s", "decode_tps", "aggregate_tps", "latency_p50_s", "latency_p99_s")
CHAT_KEYS = ("ttft_first_s", "ttft_s", "aggregate_tps", "cached_share", "latency_p50_s", "latency_p99_s")
# The first chat turn whose time to first token the target is about (1-based).
LATE_TURN = 4


class Timed:
    """What the client timed of one stream: ``start``, ``first`` and ``end`` (seconds from the level's start)."""

    start: float
    first: float
    end: float

    @property
    def ttft(self) -> float:
        """Seconds to the first token."""
        return self.first - self.start

    @property
    def latency(self) -> float:
        """Seconds from the request to its last token."""
        return self.end - self.start


@dataclass
class Request(Timed):
    """One streamed completion as the client saw it (seconds from the level's start)."""

    prompt_index: int
    start: float
    first: float
    end: float
    tokens: int
    text: str
    error: Optional[str] = None

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


def compare(per_round: dict[str, list[dict]], concurrency: list[int],
            keys: Sequence[str] = COMPLETION_KEYS) -> list[dict]:
    """Per concurrency: each server's medians over rounds (and ranges), and mlxdist's round-by-round ratios.

    Args:
        per_round: Each server's rounds, each ``{concurrency: summary}``
            (:func:`summarise` or :func:`summarise_chat`).
        concurrency: The levels.
        keys: The summary's figures to compare (:data:`COMPLETION_KEYS` or :data:`CHAT_KEYS`).

    Returns:
        One row per level: each server's medians, ``range`` (min and max over
        rounds), errors and requests, and ``ratio``/``ratio_range`` (the median,
        min and max of :data:`OURS` over :data:`THEIRS` round by round).
    """
    rows = []
    for c in concurrency:
        row: dict[str, Any] = {"concurrency": c}
        for name, rounds in per_round.items():
            levels = [r[c] for r in rounds]
            row[name] = {key: _median_over_rounds(levels, key) for key in keys}
            row[name]["range"] = {key: [min(level[key] for level in levels), max(level[key] for level in levels)]
                                  for key in keys}
            row[name]["errors"] = sum(len(level["errors"]) for level in levels)
            row[name]["requests"] = sum(level["requests"] for level in levels)
        if OURS in per_round and THEIRS in per_round:
            pairs = list(zip(per_round[OURS], per_round[THEIRS]))
            ratios = {key: [ours[c][key] / theirs[c][key] if theirs[c][key] else float("nan")
                            for ours, theirs in pairs] for key in keys}
            row["ratio"] = {key: median(values) for key, values in ratios.items()}
            row["ratio_range"] = {key: [min(values), max(values)] for key, values in ratios.items()}
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


def words(seed: tuple[int, ...], count: int) -> str:
    """``count`` two-letter words drawn from ``seed``.

    Args:
        seed: Seeds numpy's generator.
        count: How many words.

    Returns:
        The words, space-separated.
    """
    rng = np.random.default_rng(list(seed))
    return " ".join("".join(rng.choice(list(LETTERS), 2)) for _ in range(count))


@dataclass
class Turn(Timed):
    """One streamed chat turn as the client saw it (seconds from the level's start)."""

    user: int
    turn: int
    start: float
    first: float
    end: float
    tokens: int
    prompt_tokens: int
    cached_tokens: int
    text: str
    error: Optional[str] = None


def summarise_chat(turns: list[Turn], wall: float) -> dict[str, Any]:
    """One level of chats: late and first turns' time to first token, throughput, cached share.

    Args:
        turns: Every turn of the level.
        wall: The level's seconds, first turn to last token.

    Returns:
        Requests, errors, tokens, ``ttft_s`` (median over turns from
        :data:`LATE_TURN` on), ``ttft_first_s`` (first turns), aggregate tokens
        per second, ``cached_share`` (cached over prompt tokens of the turns
        after the first), latency percentiles (50, 99) and ``wall_s``.
    """
    good = [t for t in turns if t.error is None]
    late = [t.ttft for t in good if t.turn + 1 >= LATE_TURN]
    first = [t.ttft for t in good if t.turn == 0]
    later = [t for t in good if t.turn > 0]
    latencies = np.array([t.latency for t in good]) if good else np.array([float("nan")])
    prompt = sum(t.prompt_tokens for t in later)
    return {
        "requests": len(turns),
        "errors": [t.error for t in turns if t.error is not None],
        "tokens": sum(t.tokens for t in good),
        "ttft_s": median(late) if late else float("nan"),
        "ttft_first_s": median(first) if first else float("nan"),
        "aggregate_tps": sum(t.tokens for t in good) / wall,
        "cached_share": sum(t.cached_tokens for t in later) / prompt if prompt else float("nan"),
        "latency_p50_s": float(np.percentile(latencies, 50)),
        "latency_p99_s": float(np.percentile(latencies, 99)),
        "wall_s": wall,
    }
