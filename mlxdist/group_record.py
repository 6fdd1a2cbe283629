"""What a :class:`mlxdist.Group` is to the layers beneath it: one typed record.

The paths (:mod:`mlxdist._paths`), the C gate and the deadline receive a
:class:`GroupRecord` (its handle, rank, size, capabilities, world and lock,
and the flags the hot paths read) rather than reaching into a Group. A Group
makes its record once, when it is made; code above the Group that must hand a
group to those layers looks its record up with :func:`record_of`.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from mlxdist._c import ffi, lib
from mlxdist._c.gate import WorldState, raise_last
from mlxdist._c.handles import GroupHandle
from mlxdist.backends import Backend, Capabilities, capabilities, composed
from mlxdist.errors import ArgumentTypeError, GroupClosedError

__all__ = ["GroupRecord", "record_of", "register"]


class GroupRecord:
    """A group's handle and the facts about it that do not change, plus its two flags.

    Attributes:
        handle: The owned C group handle.
        address: The ``mlx_distributed_group`` ctx, as the bridge takes it.
        rank: This process's rank in the group.
        size: The number of processes.
        backend: The backend, or None for the single-process group.
        caps: The backend's capabilities.
        world: The state the world's groups share.
        lock: Serializes this group's eager operations (the world's lock
            unless the backend lets groups communicate concurrently).
        composed: The operations composed always, and those composed for bool
            arrays only (:func:`mlxdist.backends.composed`).
        bool_ok: Bool reductions go to the backend as they are.
        peers: The ranks send and recv reach (ints, checked once here).
        lazy_functions: The lazy composed collectives' custom functions, by (op, root, stream).
        closed: ``close()`` was called.
        fast: mx.array operations may go straight to the bridge: open, the
            world not failed, the agreement check off.
    """

    __slots__ = (
        "handle",
        "address",
        "rank",
        "size",
        "backend",
        "caps",
        "world",
        "lock",
        "composed",
        "bool_ok",
        "peers",
        "lazy_functions",
        "closed",
        "fast",
        "__weakref__",
    )

    def __init__(
        self,
        handle: GroupHandle,
        backend: Backend | None,
        world: WorldState,
    ) -> None:
        self.handle = handle
        self.backend = backend
        self.caps: Capabilities = capabilities(backend)
        self.world = world
        self.lock: threading.Lock = threading.Lock() if world.concurrent_groups else world.lock
        self.closed = False
        self.fast = world.lost is None and not world.checked
        self.address = int(ffi.cast("uintptr_t", handle.value.ctx))
        self.rank: int = lib.mlx_distributed_group_rank(handle.value)
        self.size: int = lib.mlx_distributed_group_size(handle.value)
        if self.rank < 0 or self.size < 1:
            raise_last("group")
        self.composed = composed(self.caps, self.size)
        self.bool_ok = "all_sum" not in self.composed[1]
        self.peers = frozenset(self._reachable())
        self.lazy_functions: dict[Any, Any] = {}
        world.groups.add(self)

    def _reachable(self) -> list[int]:
        if "send" not in self.caps.native or self.size == 1:
            return []
        return [
            peer for peer in range(self.size)
            if peer != self.rank
            and (not self.caps.neighbours_only or (peer - self.rank) % self.size in (1, self.size - 1))
        ]

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"rank={self.rank}, size={self.size}"
        name = self.backend.value if self.backend else "none"
        return f"Group(backend={name}, {state})"

    def live_handle(self) -> Any:
        """The C handle, for a call.

        Raises:
            GroupClosedError: the group is closed.
        """
        if self.closed:
            raise GroupClosedError("the group is closed")
        return self.handle.value

    def close(self) -> None:
        """Mark the group closed and free its handle, now or when the eager call running ends."""
        self.closed = True
        self.fast = False
        if self.lock.acquire(blocking=False):
            try:
                self.handle.close()
            finally:
                self.lock.release()


_records: "weakref.WeakKeyDictionary[Any, GroupRecord]" = weakref.WeakKeyDictionary()


def register(group: Any, record: GroupRecord) -> None:
    """Make ``record`` what :func:`record_of` returns for ``group`` (its Group, once).

    Args:
        group: The Group.
        record: Its record.
    """
    _records[group] = record


def record_of(group: Any) -> GroupRecord:
    """The record of a :class:`mlxdist.Group`.

    Args:
        group: The Group.

    Returns:
        Its :class:`GroupRecord`.

    Raises:
        ArgumentTypeError: ``group`` is not an mlxdist Group (for instance an
            mx.distributed.Group).
    """
    try:
        return _records[group]
    except (KeyError, TypeError):
        raise ArgumentTypeError(f"group must be an mlxdist.Group, got {type(group).__name__}") from None
