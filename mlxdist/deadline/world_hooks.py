"""Wiring a world to its watchdog: init's two hooks, per-group timeouts, and ``mx.eval`` under the deadline.

The world (:mod:`mlxdist.world`) owns its watchdog: it calls :func:`before_init`
and :func:`after_init`, which store the watchdog in ``WorldState.watchdog``;
everything else (the eager gate, the lazy path, :func:`set_timeout`,
:func:`evaluate`) reads it from the group's world.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

import mlx.core as mx
import numpy as np

from mlxdist.config import RingConfig
from mlxdist.deadline.rendezvous import (
    agree_over_backend,
    launch_environment,
    rank_and_size,
    rendezvous,
    ring_addresses,
)
from mlxdist.deadline.settings import UNSET, Settings, parse_timeout
from mlxdist.deadline.watchdog import Watchdog, group_size
from mlxdist.dtypes import code_of_mlx, code_of_numpy
from mlxdist.errors import CommunicationError, DistributedError, InitializationError
from mlxdist.group_record import GroupRecord, record_of

__all__ = ["attach", "before_init", "after_init", "set_timeout", "on_failure", "evaluate", "agree", "watched"]

# The backends whose world started its watchdog in this process (one world each).
_started: set[str] = set()


def attach(world: Any, dog: Watchdog, abandon_waits: Callable[[], Any] | None = None) -> None:
    """Make ``dog`` the watchdog of ``world`` and start it.

    Args:
        world: The world's shared state (``WorldState``).
        dog: Its watchdog.
        abandon_waits: What ends the backend's waits once its connections are
            shut down (the C layer's ``mlxdist_abandon_waits``).
    """
    world.watchdog = dog
    dog.abandon_waits = abandon_waits
    if dog.settings.check:
        # Every lazy build then takes the slow path, where it is checked.
        world.checked = True
        for record in list(world.groups):
            record.fast = False
    dog.run()


def set_timeout(group: Any, seconds: float | None) -> None:
    """Give ``group``'s operations their own deadline.

    Args:
        group: A multi-rank group of a world started by ``init``.
        seconds: Seconds per operation, or None for no deadline.

    Raises:
        InvalidArgumentError: seconds not positive and finite (a ValueError).
        ArgumentTypeError: seconds not a number (a TypeError).
        InitializationError: the group's world has no watchdog (size 1).
    """
    record = record_of(group)
    dog = record.world.watchdog
    if dog is None:
        raise InitializationError(f"{group!r} has no deadlines (a single-process group)")
    dog.overrides[id(record)] = parse_timeout(seconds, "seconds")


def on_failure(callback: Callable[[DistributedError], Any], group: Any) -> None:
    """Call ``callback(error)`` when ``group``'s world fails, as soon as this rank learns it.

    It runs on the watchdog's thread, before the calls still blocked in the
    backend are interrupted, and whatever the program's own threads are doing
    (one may be stuck in a call that cannot be interrupted and is about to end
    the process): the moment to tell the world outside, briefly. A world that
    already failed calls it at once.

    Args:
        callback: Takes the typed error (DeadlineExceeded, PeerLostError or
            MismatchError); what it raises is reported, not propagated.
        group: A multi-rank group of a world started by ``init``.

    Raises:
        InitializationError: the group's world has no watchdog (size 1).
    """
    record = record_of(group)
    dog = record.world.watchdog
    if dog is None:
        raise InitializationError(f"{group!r} has no deadlines (a single-process group)")
    with dog.lock:  # exactly once: either the failure's own call sees it, or it sees the failure
        dog.on_failure.append(callback)
        failure = dog.failure
    if failure is not None:
        callback(failure)


def agree(op: str, group: GroupRecord, world: Any, dtype: Any, shape: tuple[int, ...], peer: int | None) -> None:
    """The agreement check of an operation built without the eager gate (lazy or composed).

    Does nothing unless ``world``'s watchdog runs the check (see
    :meth:`Watchdog.check_build`).

    Args:
        op: The operation's name.
        group: The group it runs on.
        world: The group's world (its record's ``world``).
        dtype: An MLX dtype, a numpy dtype or an ``mlx_dtype`` code.
        shape: The operand's shape.
        peer: The peer of a send or receive, else None.

    Raises:
        MismatchError, DeadlineExceeded, PeerLostError: as for eager calls.
    """
    dog = world.watchdog
    if dog is None or not dog.settings.check:
        return
    if isinstance(dtype, int):
        code = dtype
    elif isinstance(dtype, mx.Dtype):
        code = code_of_mlx(dtype)
    else:
        code = code_of_numpy(np.dtype(dtype))
    dog.check_build(op, group, code, tuple(shape), peer)


def evaluate(*arrays: Any, group: Any, timeout: float | None = UNSET) -> None:
    """``mx.eval`` under ``group``'s world's deadline (``mlxdist.eval`` resolves ``group=None``).

    Args:
        *arrays: What ``mx.eval`` takes.
        group: The group whose world the collectives use.
        timeout: Seconds for this evaluation (the group's deadline by default).

    Raises:
        DeadlineExceeded, PeerLostError, MismatchError: as for eager calls.
        CommunicationError: another communication failure inside the evaluation.
    """
    with watched("eval", group=group, timeout=timeout):
        mx.eval(*arrays)


@contextlib.contextmanager
def watched(op: str, *, group: Any, timeout: float | None = UNSET) -> Iterator[None]:
    """Run a block that evaluates lazy collectives (``mx.eval`` inside a library) under the deadline.

    Args:
        op: The name the block gets in errors and reports (e.g. ``"serve step"``).
        group: The group whose world the collectives use.
        timeout: Seconds for the whole block (the group's deadline by default).

    Raises:
        DeadlineExceeded, PeerLostError, MismatchError: the world failed during
            the block, or had failed before it.
        CommunicationError: another communication failure inside the block.
    """
    record = record_of(group)
    dog = record.world.watchdog
    if dog is None:
        yield
        return
    entry = dog.enter(op, record, group)
    if timeout is not UNSET:
        seconds = parse_timeout(timeout, "timeout")
        entry.deadline = None if seconds is None else entry.start + seconds
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, DistributedError):
            raise
        typed = dog.translate(entry, exc)
        if typed is None:
            typed = CommunicationError(f"{op}: {exc}")
        raise typed from exc
    finally:
        dog.leave(entry)
    dog.raise_if_failed(op, group)


def before_init(backend: str | None, settings: Settings, ring: RingConfig | None = None) -> Watchdog | None:
    """Init's first hook, before the backend starts: the bounded rendezvous.

    When the launcher gave the side channel's address (``MLXDIST_STORE``), every
    rank joins it first, so a missing or duplicate rank or a wrong host count
    fails within the timeout with a typed error naming the rank, instead of
    blocking in the backend's own connect/accept.

    Args:
        backend: ``"ring"``, ``"mpi"`` or another backend's name (ignored), or None.
        settings: The world's settings.
        ring: The validated ring configuration, for ring.

    Returns:
        The watchdog to hand to :func:`after_init`, or None.

    Raises:
        InitializationError: the rendezvous failed.
    """
    if backend not in ("ring", "mpi") or backend in _started:
        return None
    if backend == "ring" and ring is None:
        return None
    launched = launch_environment()
    if launched is None:
        return None
    rank, size, hosts = rank_and_size(backend, ring)
    if size < 2:
        return None
    address, token = launched
    peers = ring_addresses(ring) if ring is not None else set()
    return rendezvous(backend, rank, size, settings, address, token, hosts, peers)


def after_init(
    group: Any,
    world: Any,
    pending: Watchdog | None,
    settings: Settings,
    ring: RingConfig | None = None,
    abandon_waits: Callable[[], Any] | None = None,
) -> None:
    """Init's second hook, once the backend formed the world: start its watchdog.

    Without a launcher-provided address, rank 0's side channel address and a
    fresh token are agreed over the backend itself.

    Args:
        group: The world group just formed.
        world: The object its groups share (``WorldState``); gets the watchdog.
        pending: What :func:`before_init` returned.
        settings: The world's settings.
        ring: The validated ring configuration, for ring.
        abandon_waits: Handed to the watchdog (see :func:`attach`).

    Raises:
        InitializationError: the side channel could not be formed.
    """
    backend = getattr(group.backend, "value", None)
    if world.watchdog is not None or backend not in ("ring", "mpi"):
        return
    size = group_size(group)
    rank = group.rank() if callable(group.rank) else group.rank
    if size < 2:
        return
    if pending is None:
        hosts = rank_and_size(backend, ring)[2] if backend == "ring" else None
        peers = ring_addresses(ring) if ring is not None else set()
        host = hosts[0].rpartition(":")[0] if hosts else os.environ.get("MLXDIST_STORE_HOST", "127.0.0.1")

        def exchange(mine: list[int]) -> list[list[int]]:
            rows = group.all_gather(np.array([mine], np.int64))
            return [list(map(int, row)) for row in rows]

        pending = agree_over_backend(backend, rank, size, settings, exchange, host, peers)
    elif (pending.rank, pending.size) != (rank, size):
        raise InitializationError(
            f"the backend formed rank {rank} of {size}, the launch environment said rank "
            f"{pending.rank} of {pending.size}")
    _started.add(backend)
    attach(world, pending, abandon_waits)
