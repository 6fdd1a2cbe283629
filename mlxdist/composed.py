"""Module-level broadcast, gather, scatter, all_to_all and object collectives.

As the other module-level functions: ``group`` and ``stream`` keyword-only,
``group=None`` meaning the world group. See :class:`mlxdist.Group`.
"""

from __future__ import annotations

from typing import Any

from mlxdist.group import ArrayLike, Group, StreamLike
from mlxdist.world import resolve_group

__all__ = ["broadcast", "gather", "scatter", "all_to_all", "broadcast_object", "all_gather_object"]


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
