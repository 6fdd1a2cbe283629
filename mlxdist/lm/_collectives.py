"""The collectives mlxdist.lm issues, in mx.distributed's calling style.

``rank``/``size`` and lazy ``send``/``recv_like``/``all_gather`` on an
:class:`mlxdist.Group`, written once so the rest of the package reads as
code written for ``mx.distributed``.
"""

from __future__ import annotations

import mlx.core as mx

from mlxdist.group import Group

__all__ = ["rank", "size", "send", "recv_like", "all_gather"]


def rank(group: Group) -> int:
    """This process's rank in ``group``."""
    value = group.rank
    return int(value() if callable(value) else value)


def size(group: Group) -> int:
    """The number of processes in ``group``."""
    value = group.size
    return int(value() if callable(value) else value)


def send(x: mx.array, dst: int, group: Group) -> mx.array:
    """Send ``x`` to ``dst``; returns an array to use as the send's dependency."""
    sent = group.send(x, dst)
    return x if sent is None else sent


def recv_like(x: mx.array, src: int, group: Group) -> mx.array:
    """An array shaped and typed as ``x``, received from ``src``."""
    return group.recv_like(x, src)


def all_gather(x: mx.array, group: Group) -> mx.array:
    """Every rank's ``x`` concatenated along axis 0."""
    return group.all_gather(x)
