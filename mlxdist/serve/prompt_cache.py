"""The prompt cache: the KV cache of earlier requests, reused for the longest shared token prefix.

Every rank keeps its own entries (:class:`CacheStore`): under TP or PP each
holds only its shard of the KV, as mlx-lm's cache objects
(:func:`mlx_lm.models.cache.make_prompt_cache` and what the model's
``make_cache`` builds), filled by the batch generator and taken out of it when
a request finishes. Which entry a new request starts from, how many of its
tokens are reused, and which entries are dropped are decided once, on rank 0
(:class:`CacheIndex`), and handed to every rank with the step's work, so every
rank resumes from the same prefix. The index is a least-recently-used list
bounded in bytes: an entry's size is the largest of its shards (the ranks
agree on it when it is stored), so no rank holds more than the bound.

Requests that arrive together often share a long prefix no entry holds yet
(a system prompt, a document several questions are about): rank 0 then plans
the prefix once (:func:`plan_sharing`), as an entry of its own that every
rank prefills before the requests start from it, or copies out of a running
request whose cache already holds it, as vLLM's automatic prefix caching
shares blocks between running sequences.

Entries live in the ranks' processes: a world that re-forms starts new ones
with empty caches, and no entry of a lost world can be used.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlxdist.errors import InvalidArgumentError

__all__ = ["DEFAULT_BYTES", "MIN_SHARED_GAIN", "CacheIndex", "CacheStore", "Reuse", "Share", "always_trimmable",
           "cache_nbytes", "plan_sharing", "shared_copy"]

# Bytes of cached KV each rank may hold by default (``--prompt-cache-bytes``).
DEFAULT_BYTES = 1 << 30
# Prompt tokens a shared prefix must spare the new requests (beyond its own
# prefill) before it is worth an entry and a step's extra work.
MIN_SHARED_GAIN = 32


@dataclass(frozen=True)
class Reuse:
    """Rank 0's decision for a new request: start from ``entry``'s first ``tokens`` tokens."""

    entry: str
    tokens: int


@dataclass
class _Entry:
    tokens: np.ndarray
    nbytes: int
    trimmable: bool


def cache_nbytes(cache: list[Any]) -> int:
    """Bytes held by one sequence's cache (its layers' arrays).

    Args:
        cache: mlx-lm cache objects, one per layer.

    Returns:
        The total of their ``nbytes``.
    """
    return int(sum(c.nbytes for c in cache))


def always_trimmable(cache: list[Any]) -> bool:
    """Whether every layer's cache can be cut shorter however many tokens it holds.

    A local-window layer's cache (:class:`~mlx_lm.models.cache.RotatingKVCache`)
    can be cut only until it wraps, and a recurrent layer's state never: a
    plan made before the cache exists must not count on either.

    Args:
        cache: mlx-lm cache objects, one per layer (a fresh one is enough).

    Returns:
        True when every layer's cache (every part of a ``CacheList``) is one that stays trimmable.
    """
    from mlx_lm.models.cache import CacheList, RotatingKVCache

    def stays(c: Any) -> bool:
        if isinstance(c, CacheList):
            return all(stays(part) for part in c.caches)
        return not isinstance(c, RotatingKVCache) and bool(c.is_trimmable())

    return all(stays(c) for c in cache)


def shared_copy(cache: list[Any]) -> list[Any]:
    """A copy of a cache whose bookkeeping (offsets) is its own and whose arrays are shared.

    Trimming the copy leaves the original whole. The arrays themselves are
    never written through: the batch generator merges a request's cache into
    new batch arrays before it extends them.

    Args:
        cache: mlx-lm cache objects, one per layer.

    Returns:
        The copy.
    """
    arrays = [a for _, a in tree_flatten([c.state for c in cache]) if isinstance(a, mx.array)]
    return copy.deepcopy(cache, {id(a): a for a in arrays})


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


@dataclass(frozen=True)
class Share:
    """Rank 0's decision to make one entry for several new requests' shared prefix.

    Attributes:
        entry: The new entry's key.
        tokens: The token ids it will hold: prefilled on every rank when
            ``source`` is None (on top of ``base``, when given), else exactly
            what ``source``'s cache holds now.
        source: A running request whose cache is copied out, or None.
        base: The prompt cache entry the prefill starts from, or None.
    """

    entry: str
    tokens: tuple[int, ...]
    source: Optional[str] = None
    base: Optional[Reuse] = None


def plan_sharing(
    prompts: Sequence[Sequence[int]],
    reused: Sequence[Optional[Reuse]],
    running: Mapping[str, Sequence[int]],
    *,
    trimmable: bool,
    key: str,
    min_gain: int = MIN_SHARED_GAIN,
) -> tuple[list[Share], list[Optional[Reuse]]]:
    """The entries that spare new requests the prefill of a prefix they share, and who uses which.

    A new request shares with a running request when that one's cache already
    holds a longer prefix of its prompt than the prompt cache gives it (the
    entry is a copy: no compute). New requests that share a prefix with each
    other share an entry prefilled once (on top of the longest prefix the
    prompt cache gives any of them). Every request still computes its
    prompt's last token.

    Args:
        prompts: The new requests' token ids, in arrival order.
        reused: What each already takes from the prompt cache (None: nothing).
        running: For running requests, the token ids their caches hold now.
        trimmable: Whether caches can be cut shorter (on every rank). When not,
            a request only starts from an entry it uses whole.
        key: The prefix of the new entries' keys (unique per step).
        min_gain: Prompt tokens an entry must spare, net of its own prefill.

    Returns:
        The entries to make, in order, and for each new request its new reuse
        (None: keep what it had).

    Raises:
        InvalidArgumentError: ``reused`` and ``prompts`` differ in length.
    """
    if len(reused) != len(prompts):
        raise InvalidArgumentError(f"{len(prompts)} prompts but {len(reused)} reuse decisions")
    arrays = [np.asarray(p, dtype=np.int64) for p in prompts]
    had = [0 if r is None else r.tokens for r in reused]
    shares: list[Share] = []
    choice: list[Optional[Reuse]] = [None] * len(prompts)

    def usable(common: int, held: int, prompt: np.ndarray) -> int:
        """Tokens a prompt can take from an entry holding ``held`` tokens, ``common`` of them shared."""
        take = min(common, len(prompt) - 1)
        return take if trimmable or take == held else 0

    # Copies of running requests' caches: free, so any gain counts.
    held = {rid: np.asarray(tokens, dtype=np.int64) for rid, tokens in running.items() if len(tokens)}
    copies: dict[str, str] = {}
    for i, prompt in enumerate(arrays):
        best, source = had[i], None
        for rid, tokens in held.items():
            take = usable(_common_prefix(tokens, prompt), len(tokens), prompt)
            if take > best:
                best, source = take, rid
        if source is not None and best - had[i] >= min_gain:
            if source not in copies:
                copies[source] = f"{key}-{len(shares)}"
                shares.append(Share(copies[source], tuple(int(t) for t in held[source]), source))
            choice[i] = Reuse(copies[source], best)

    def start_of(members: list[int], length: int) -> Optional[Reuse]:
        """The longest cached prefix among the members, cut to the shared length: where a prefill starts."""
        best = max((reused[j] for j in members if reused[j] is not None), key=lambda r: r.tokens, default=None)
        if best is not None and best.tokens > length:
            best = Reuse(best.entry, length) if trimmable else None
        return best

    # Prefixes the rest share with each other: sorted, neighbours share the longest prefixes.
    rest = sorted((i for i in range(len(arrays)) if choice[i] is None), key=lambda i: arrays[i].tolist())
    while len(rest) >= 2:
        plan: Optional[tuple[int, int, int, int]] = None  # (gain, length, first, last) over ``rest``
        for a in range(len(rest) - 1):
            length = _common_prefix(arrays[rest[a]], arrays[rest[a + 1]])
            if length == 0:
                continue
            first, last = a, a + 1
            while first > 0 and _common_prefix(arrays[rest[first - 1]], arrays[rest[a]]) >= length:
                first -= 1
            while last + 1 < len(rest) and _common_prefix(arrays[rest[last + 1]], arrays[rest[a]]) >= length:
                last += 1
            # Every member computes its last prompt token: the entry stops before the shortest one's.
            length = min(length, min(len(arrays[rest[j]]) for j in range(first, last + 1)) - 1)
            if length <= 0:
                continue
            base = start_of(rest[first:last + 1], length)
            gain = (sum(max(0, length - had[rest[j]]) for j in range(first, last + 1))
                    - (length - (base.tokens if base else 0)))
            if plan is None or gain > plan[0]:
                plan = (gain, length, first, last)
        if plan is None or plan[0] < min_gain:
            break
        _, length, first, last = plan
        members = rest[first:last + 1]
        base = start_of(members, length)
        entry = f"{key}-{len(shares)}"
        shares.append(Share(entry, tuple(int(t) for t in arrays[members[0]][:length]), None, base))
        for i in members:
            if length > had[i]:
                choice[i] = Reuse(entry, length)
        rest = rest[:first] + rest[last + 1:]
    return shares, choice


class CacheIndex:
    """Rank 0's view of the cached prefixes: which to reuse and which to drop.

    Args:
        max_bytes: The bound on the entries' bytes (per rank: each entry counts
            the size of its largest shard). 0 disables the cache.

    Raises:
        InvalidArgumentError: ``max_bytes`` is negative.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise InvalidArgumentError(f"the prompt cache's bound must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def lookup(self, prompt: list[int]) -> Optional[Reuse]:
        """The entry sharing the longest prefix with ``prompt``, and how much of it to reuse.

        At least the prompt's last token is always computed afresh (its logits
        start the generation). An entry whose cache cannot be trimmed is only
        reused whole. A hit makes the entry the most recently used.

        Args:
            prompt: The new request's token ids.

        Returns:
            The reuse, or None when no entry shares a token.
        """
        if not self._entries or len(prompt) < 2:
            return None
        tokens = np.asarray(prompt, dtype=np.int64)
        best: Optional[Reuse] = None
        for key, entry in self._entries.items():
            common = min(_common_prefix(entry.tokens, tokens), len(tokens) - 1)
            if not entry.trimmable and common < len(entry.tokens):
                continue
            if common > 0 and (best is None or common > best.tokens):
                best = Reuse(key, common)
        if best is not None:
            self._entries.move_to_end(best.entry)
        return best

    def add(self, key: str, tokens: list[int], nbytes: int, *, trimmable: bool) -> list[str]:
        """Record a stored entry; the entries to drop (this one too, when it can never fit).

        An entry holding a prefix of the new one's tokens is dropped when the new
        one can be trimmed (it serves every prompt the shorter one would); then the
        least recently used go until the entries fit the bound.

        Args:
            key: The entry's name (the same on every rank).
            tokens: The token ids its cache holds.
            nbytes: Its size (the largest shard's).
            trimmable: Whether every shard's cache can be trimmed.

        Returns:
            The keys every rank must drop, in order.
        """
        if nbytes > self.max_bytes or not tokens:
            return [key]
        drop = [key] if key in self._entries else []
        if drop:
            self.nbytes -= self._entries.pop(key).nbytes
        new = np.asarray(tokens, dtype=np.int64)
        if trimmable:
            for other, entry in list(self._entries.items()):
                if len(entry.tokens) <= len(new) and _common_prefix(entry.tokens, new) == len(entry.tokens):
                    self.nbytes -= self._entries.pop(other).nbytes
                    drop.append(other)
        self._entries[key] = _Entry(new, nbytes, trimmable)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            other, entry = self._entries.popitem(last=False)
            self.nbytes -= entry.nbytes
            drop.append(other)
        return drop


class CacheStore:
    """One rank's cached entries (its shards of the KV), as rank 0's decisions say.

    Attributes:
        entries: Entry key -> the per-layer mlx-lm cache objects and the
            number of tokens they hold.
    """

    def __init__(self) -> None:
        self.entries: dict[str, tuple[list[Any], int]] = {}
        self._bytes: dict[str, int] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of every entry on this rank."""
        return sum(self._bytes.values())

    def put(self, key: str, cache: list[Any], tokens: int) -> int:
        """Keep a finished request's cache (holding ``tokens`` tokens) under ``key``; its bytes here."""
        mx.eval([c.state for c in cache])  # a copy out of the batch: let the batch's arrays go
        self.entries[key] = (cache, tokens)
        self._bytes[key] = cache_nbytes(cache)
        return self._bytes[key]

    def drop(self, keys: list[str]) -> None:
        """Forget these entries (unknown keys are ignored)."""
        for key in keys:
            self.entries.pop(key, None)
            self._bytes.pop(key, None)

    def take(self, reuse: Reuse) -> list[Any]:
        """A cache holding the first ``reuse.tokens`` tokens of an entry (the entry stays whole).

        Raises:
            InvalidArgumentError: the entry is unknown, shorter than asked, or
                cannot be cut to the length (rank 0's index and this rank disagree).
        """
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        stored = self.entries.get(reuse.entry)
        if stored is None:
            raise InvalidArgumentError(f"prompt cache entry {reuse.entry!r} is not on this rank")
        cache, held = shared_copy(stored[0]), stored[1]
        extra = held - reuse.tokens
        if extra < 0 or (extra > 0 and not can_trim_prompt_cache(cache)):
            raise InvalidArgumentError(f"prompt cache entry {reuse.entry!r} holds {held} tokens and cannot give "
                                       f"{reuse.tokens}")
        if extra:
            trim_prompt_cache(cache, extra)
        return cache

    def trimmable(self, key: str) -> bool:
        """Whether the entry's cache can be cut shorter on this rank."""
        from mlx_lm.models.cache import can_trim_prompt_cache

        return can_trim_prompt_cache(self.entries[key][0])
