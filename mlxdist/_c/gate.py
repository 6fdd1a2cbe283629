"""The one gate for eager C calls: the world's lock and failure bookkeeping.

Errors become typed exceptions through :mod:`mlxdist._c.failures` (its
:func:`raise_last` and :func:`check` are re-exported here). :func:`call` runs
one eager backend call under its world's lock and its watchdog, which the world
that owns it hands over (``WorldState.watchdog``): a communication failure
ends the world (MLX's transports do not recover), so later calls fail at once
instead of waiting on a dead peer; every other kind of error leaves it usable.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Protocol

from mlxdist._c import last_error, lib
from mlxdist._c.failures import check, raise_last
from mlxdist._c.handles import GroupHandle, thread_stream
from mlxdist._c.signature import signature_of
from mlxdist.errors import CommunicationError, GroupClosedError

__all__ = ["WorldState", "Gated", "raise_last", "check", "call"]


class WorldState:
    """What the groups of one world share.

    Attributes:
        lock: Serializes the eager operations of the world's groups, unless
            ``concurrent_groups`` (then each group has its own lock).
        concurrent_groups: The backend lets different groups of the world
            communicate at the same time from different threads (MPI
            initialised with MPI_THREAD_MULTIPLE).
        lost: Once the transport failed, the failure that ended the world.
        groups: The world's live groups' records (each with a ``fast`` flag).
        checked: The agreement check is on (see :mod:`mlxdist.deadline`).
        watchdog: The world's deadline watchdog (None: no deadline, e.g. size 1),
            set by the world that owns it; anything with ``enter``, ``leave``,
            ``translate`` and ``settings.check`` (see :mod:`mlxdist.deadline`).
    """

    __slots__ = ("lock", "concurrent_groups", "lost", "groups", "checked", "watchdog")

    def __init__(self, concurrent_groups: bool = False) -> None:
        self.lock = threading.Lock()
        self.concurrent_groups = concurrent_groups
        self.lost: str | None = None
        self.groups: weakref.WeakSet[Any] = weakref.WeakSet()
        self.checked = False  # the agreement check is on
        self.watchdog: Any = None  # the world's mlxdist.deadline.Watchdog, once started

    def fail(self, reason: str) -> None:
        """End the world: every later operation of its groups raises at once."""
        self.lost = reason
        for group in list(self.groups):
            group.fast = False


class Gated(Protocol):
    """What the gate reads of a group (its record, :class:`mlxdist.group_record.GroupRecord`)."""

    handle: GroupHandle
    lock: threading.Lock
    world: WorldState
    closed: bool
    size: int


def call(group: Gated, what: str, func: Callable[..., int], *args: Any) -> None:
    """Run ``func(*args, group, stream)``, a blocking backend call, under the group's lock.

    Args:
        group: The group's record (its lock, handle and world).
        what: The operation, for messages.
        func: A cmlx function returning 0 or 1; cffi releases the GIL around it.
        *args: Its leading arguments.

    Raises:
        GroupClosedError: the group is closed.
        CommunicationError: the world already failed, or the transport failed now.
        DistributedError: the subclass the C layer reported.
    """
    world = group.world
    dog = world.watchdog
    with group.lock:
        if dog is None:
            _run(group, world, what, func, args)
            return
        # Deadline, peer loss and the agreement check around the call: the
        # watchdog turns a failure inside it into the typed error.
        entry = dog.enter(what, group, group, signature_of(what, args) if dog.settings.check else None)
        try:
            _run(group, world, what, func, args)
        except BaseException as exc:
            dog.leave(entry)
            typed = dog.translate(entry, exc)
            if typed is not None:
                raise typed from exc
            raise
        dog.leave(entry)


def _run(group: Gated, world: WorldState, what: str, func: Callable[..., int], args: tuple[Any, ...]) -> None:
    group_ptr = group.handle.current  # read under the lock: close() frees it under it
    if group_ptr is None or group.closed:
        raise GroupClosedError(f"{what}: the group is closed")
    if world.lost is not None:
        raise CommunicationError(f"{what}: this group's world already failed ({world.lost}); start the job again")
    rc = func(*args, group_ptr[0], thread_stream())
    if group.closed:
        group.handle.close()  # closed by another thread while this call ran
    if rc == 0:
        return
    if lib.mlxdist_last_error_kind() == lib.MLXDIST_ERROR_COMMUNICATION:
        world.fail(f"{what}: {last_error()}")
    raise_last(what)
