"""A cache of large result buffers, reused instead of freed.

A fresh large buffer costs its page faults on first touch: on this kind of
machine writing 64 MiB of new memory takes about as long as all-reducing it.
MLX's CPU allocator caches only 32 MiB in all, so mlxdist keeps the buffers of
dropped results (those of at least ``MIN_BYTES``) up to a byte limit and hands
them out again for the next result of the same shape and dtype.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Hashable

from mlxdist._handles import ArrayHandle

__all__ = ["MIN_BYTES", "BufferPool", "pool", "set_cache_limit"]

MIN_BYTES = 1 << 20


class BufferPool:
    """Released buffers by (shape, dtype), at most ``limit`` bytes in all.

    Args:
        limit: The most bytes kept; 0 keeps nothing.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._free: dict[Hashable, list[tuple[ArrayHandle, int]]] = defaultdict(list)
        self._lock = threading.Lock()

    def take(self, key: Hashable) -> ArrayHandle | None:
        """A released buffer for ``key``, or None."""
        with self._lock:
            entries = self._free.get(key)
            if not entries:
                return None
            handle, nbytes = entries.pop()
            self.held -= nbytes
            return handle

    def give(self, key: Hashable, handle: ArrayHandle, nbytes: int) -> None:
        """Keep a released buffer if it fits under the limit (else it is freed)."""
        with self._lock:
            if self.held + nbytes <= self.limit:
                self._free[key].append((handle, nbytes))
                self.held += nbytes

    def clear(self) -> None:
        """Free every kept buffer."""
        with self._lock:
            self._free.clear()
            self.held = 0


pool = BufferPool(512 << 20)


def set_cache_limit(limit: int) -> int:
    """Set how many bytes of released result buffers mlxdist keeps for reuse.

    Args:
        limit: The byte limit (default 512 MiB); 0 frees them all and keeps none.

    Returns:
        The previous limit.

    Raises:
        ValueError: a negative limit.
    """
    if limit < 0:
        raise ValueError(f"cache limit must be >= 0, got {limit}")
    previous, pool.limit = pool.limit, int(limit)
    if pool.held > pool.limit:
        pool.clear()
    return previous
