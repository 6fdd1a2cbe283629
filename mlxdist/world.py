"""Initialisation, the world group, and every module-level operation.

The module-level functions mirror mx.distributed's: ``group`` and ``stream``
are keyword-only with None defaults, ``group=None`` meaning the world group;
each is its :class:`mlxdist.Group` method on that group.
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np

from mlxdist import deadline
from mlxdist._c import lib
from mlxdist._c.gate import WorldState
from mlxdist._c.gate import check as check_rc  # (init has its own check= argument)
from mlxdist._c.handles import GroupHandle
from mlxdist._mpi import prepare as prepare_mpi
from mlxdist._mpi import take_stop_signal
from mlxdist._mpi import provides_thread_multiple
from mlxdist.config import ring_config
from mlxdist.backends import Backend, BackendLike, as_backend, detect_backend, is_available
from mlxdist.dtypes import DTypeLike
from mlxdist.errors import ArgumentTypeError, BackendUnavailableError, DistributedError, InitializationError
from mlxdist.group import ArrayLike, Group, StreamLike

__all__ = [
    "all_gather",
    "all_gather_object",
    "all_max",
    "all_min",
    "all_sum",
    "all_to_all",
    "barrier",
    "broadcast",
    "broadcast_object",
    "evaluate",
    "gather",
    "init",
    "recv",
    "recv_like",
    "resolve_group",
    "scatter",
    "send",
    "on_failure",
    "set_timeout",
    "sum_scatter",
    "world",
]

_state_lock = threading.Lock()
# One state per backend world: the world group and every group split from it
# share its fate and, unless the backend lets groups communicate at once, its
# lock (see Group).
_worlds: dict[Backend | None, WorldState] = {}
_world: Group | None = None


@atexit.register
def _close_groups() -> None:
    # Before C++ static destruction: MPI aborts the job when a communicator
    # is freed after MLX finalised MPI, which groups still alive then are.
    for state in list(_worlds.values()):
        for group in list(state.groups):
            group.close()


def init(
    backend: BackendLike = Backend.ANY,
    strict: bool = False,
    *,
    timeout: float | None = deadline.UNSET,
    check: bool | None = None,
) -> Group:
    """Join the distributed world and return its group.

    ``Backend.ANY`` follows the launch environment (see
    :func:`mlxdist.backends.detect_backend`): mpirun means MPI, an MLX
    hostfile and rank mean ring (jaccl or NCCL when their variables are set),
    and no launcher means a single-process group.

    Args:
        backend: A :class:`Backend` or its name.
        strict: Raise instead of falling back to a single-process group when
            the backend cannot form a world.
        timeout: Seconds each operation (and init itself) may take, None for
            no deadline; by default ``MLXDIST_TIMEOUT`` or 300 s (see
            :mod:`mlxdist.deadline`).
        check: Ranks agree on every operation before it runs (default
            ``MLXDIST_CHECK``).

    Returns:
        The world group. The first call also makes it the default group of the
        module-level functions.

    Raises:
        ArgumentTypeError: backend neither a Backend nor a string, or strict
            not a bool (TypeErrors).
        InvalidArgumentError: unknown backend name (a ValueError).
        BackendUnavailableError: MLX lacks the backend here (for MPI: no
            loadable Open MPI library).
        InitializationError: strict and no world could be formed; for MPI, the
            launcher and libmpi are different MPIs, or MPI was already
            initialised in the process (e.g. by mpi4py); a rank missing,
            duplicated or with another host count (named; see mlxdist.deadline).
        ValueError: a timeout that is not a positive number.
    """
    global _world
    if not isinstance(strict, bool):
        raise ArgumentTypeError(f"strict must be a bool, got {strict!r}")
    requested = as_backend(backend)
    chosen = detect_backend() if requested is Backend.ANY else requested
    if chosen is None and strict:
        raise InitializationError(
            "strict init found no launch environment (mpirun, MLX_HOSTFILE + MLX_RANK, "
            "jaccl or NCCL variables); start the ranks with mlxdist.launch, mlx.launch or mpirun"
        )
    if chosen is Backend.MPI:
        prepare_mpi()
        take_stop_signal()
    if chosen is not None and not is_available(chosen):
        raise BackendUnavailableError(f"the {chosen.value} backend is not available in this MLX build")
    ring = None
    if chosen is Backend.RING and (strict or "MLX_HOSTFILE" in os.environ or "MLX_RANK" in os.environ):
        ring = ring_config()
    settings = deadline.settings_from(timeout, check)
    handle = GroupHandle()
    # With no launcher, ring's non-strict init answers at once with a
    # single-process group, where MPI would start a singleton MPI job.
    name = (chosen or Backend.RING).value.encode()
    with _state_lock:
        pending = deadline.before_init(chosen and chosen.value, settings, ring)
        rc = lib.mlx_distributed_init(handle.out, strict, name)
        check_rc(rc, f"init({(chosen or Backend.ANY).value})", InitializationError)
        size = lib.mlx_distributed_group_size(handle.value)
        kind = chosen if size > 1 or chosen is Backend.MPI else None
        if strict and size == 1 and chosen not in (None, Backend.MPI):
            # MLX caches a failed non-strict init as a size-1 group; a ring,
            # jaccl or NCCL world always has several ranks.
            raise InitializationError(f"{chosen.value} formed no world of several ranks")
        state = _worlds.get(kind)
        if state is None:
            state = _worlds[kind] = WorldState(kind is Backend.MPI and size > 1 and provides_thread_multiple())
        group = Group(handle, kind, state)
        deadline.after_init(group, state, pending, settings, ring, lib.mlxdist_abandon_waits)
        if _world is None or _world.closed:
            _world = group
    return group


def world() -> Group:
    """The default group: the first :func:`init`'s, initialising with ANY if needed.

    Returns:
        The world group.
    """
    group = _world
    if group is None or group.closed:
        group = init()
    return group


def resolve_group(group: Group | None) -> Group:
    """``group``, or the world group when None (initialising it if needed).

    Raises:
        ArgumentTypeError: ``group`` is not an mlxdist Group (for instance
            an mx.distributed.Group).
    """
    if group is None:
        group = _world
        return group if group is not None and not group.closed else world()
    if not isinstance(group, Group):
        raise ArgumentTypeError(f"group must be an mlxdist.Group or None, got {type(group).__name__}")
    return group


def all_sum(x: ArrayLike, *, group: Group | None = None, stream: StreamLike = None, out: np.ndarray | None = None) -> ArrayLike:
    """:meth:`Group.all_sum` on ``group`` (the world group when None)."""
    return (group if type(group) is Group else resolve_group(group)).all_sum(x, stream=stream, out=out)


def all_max(x: ArrayLike, *, group: Group | None = None, stream: StreamLike = None, out: np.ndarray | None = None) -> ArrayLike:
    """:meth:`Group.all_max` on ``group`` (the world group when None)."""
    return (group if type(group) is Group else resolve_group(group)).all_max(x, stream=stream, out=out)


def all_min(x: ArrayLike, *, group: Group | None = None, stream: StreamLike = None, out: np.ndarray | None = None) -> ArrayLike:
    """:meth:`Group.all_min` on ``group`` (the world group when None)."""
    return (group if type(group) is Group else resolve_group(group)).all_min(x, stream=stream, out=out)


def all_gather(
    x: ArrayLike, *, group: Group | None = None, stream: StreamLike = None, out: np.ndarray | None = None
) -> ArrayLike:
    """:meth:`Group.all_gather` on ``group`` (the world group when None)."""
    return (group if type(group) is Group else resolve_group(group)).all_gather(x, stream=stream, out=out)


def sum_scatter(
    x: ArrayLike, *, group: Group | None = None, stream: StreamLike = None, out: np.ndarray | None = None
) -> ArrayLike:
    """:meth:`Group.sum_scatter` on ``group`` (the world group when None)."""
    return (group if type(group) is Group else resolve_group(group)).sum_scatter(x, stream=stream, out=out)


def send(x: ArrayLike, dst: int, *, group: Group | None = None, stream: StreamLike = None) -> mx.array | None:
    """:meth:`Group.send` on ``group`` (the world group when None)."""
    return (group if type(group) is Group else resolve_group(group)).send(x, dst, stream=stream)


def recv(
    shape: Sequence[int] | int,
    dtype: DTypeLike,
    src: int,
    *,
    group: Group | None = None,
    stream: StreamLike = None,
    out: np.ndarray | None = None,
) -> ArrayLike:
    """:meth:`Group.recv` on ``group`` (the world group when None)."""
    return (group if type(group) is Group else resolve_group(group)).recv(shape, dtype, src, stream=stream, out=out)


def recv_like(
    x: ArrayLike, src: int, *, group: Group | None = None, stream: StreamLike = None, out: np.ndarray | None = None
) -> ArrayLike:
    """:meth:`Group.recv_like` on ``group`` (the world group when None)."""
    return (group if type(group) is Group else resolve_group(group)).recv_like(x, src, stream=stream, out=out)


def barrier(*, group: Group | None = None) -> None:
    """:meth:`Group.barrier` on ``group`` (the world group when None)."""
    resolve_group(group).barrier()


def broadcast(
    x: ArrayLike, root: int = 0, *, group: Group | None = None, stream: StreamLike = None, out: Any = None
) -> ArrayLike:
    """:meth:`Group.broadcast` on ``group`` (the world group when None)."""
    return resolve_group(group).broadcast(x, root, stream=stream, out=out)


def gather(
    x: ArrayLike, root: int = 0, *, group: Group | None = None, stream: StreamLike = None, out: Any = None
) -> ArrayLike:
    """:meth:`Group.gather` on ``group`` (the world group when None)."""
    return resolve_group(group).gather(x, root, stream=stream, out=out)


def scatter(
    x: ArrayLike, root: int = 0, *, group: Group | None = None, stream: StreamLike = None, out: Any = None
) -> ArrayLike:
    """:meth:`Group.scatter` on ``group`` (the world group when None)."""
    return resolve_group(group).scatter(x, root, stream=stream, out=out)


def all_to_all(x: ArrayLike, *, group: Group | None = None, stream: StreamLike = None, out: Any = None) -> ArrayLike:
    """:meth:`Group.all_to_all` on ``group`` (the world group when None)."""
    return resolve_group(group).all_to_all(x, stream=stream, out=out)


def broadcast_object(obj: Any, root: int = 0, *, group: Group | None = None, pickle: bool = False) -> Any:
    """:meth:`Group.broadcast_object` on ``group`` (the world group when None)."""
    return resolve_group(group).broadcast_object(obj, root, pickle=pickle)


def all_gather_object(obj: Any, *, group: Group | None = None, pickle: bool = False) -> list[Any]:
    """:meth:`Group.all_gather_object` on ``group`` (the world group when None)."""
    return resolve_group(group).all_gather_object(obj, pickle=pickle)


def set_timeout(seconds: float | None, group: Group | None = None) -> None:
    """Give ``group``'s operations their own deadline (see :mod:`mlxdist.deadline`).

    Args:
        seconds: Seconds per operation, or None for no deadline.
        group: The group (the world group when None).

    Raises:
        ValueError: seconds not positive.
        InitializationError: a single-process group (it has no deadlines).
    """
    deadline.set_timeout(resolve_group(group), seconds)


def on_failure(callback: Callable[[DistributedError], Any], group: Group | None = None) -> None:
    """Call ``callback(error)`` once when ``group``'s world fails (see :func:`mlxdist.deadline.on_failure`).

    Args:
        callback: Takes the typed error; it runs on the watchdog's thread, before
            the blocked calls are interrupted, even while this rank's own threads
            are stuck: keep it short (tell clients, flag a checkpoint).
        group: The group (the world group when None).

    Raises:
        InitializationError: a single-process group (it has no deadlines).
    """
    deadline.on_failure(callback, resolve_group(group))


def evaluate(*arrays: object, group: Group | None = None, timeout: float | None = deadline.UNSET) -> None:
    """``mx.eval`` under the world's deadline: the way to evaluate lazy collectives (``mlxdist.eval``).

    Args:
        *arrays: What ``mx.eval`` takes.
        group: The group whose world the collectives use (the world group by default).
        timeout: Seconds for this evaluation (the group's deadline by default).

    Raises:
        DeadlineExceeded, PeerLostError, MismatchError: as for eager calls.
        CommunicationError: another communication failure inside the evaluation.
    """
    deadline.evaluate(*arrays, group=resolve_group(group), timeout=timeout)
