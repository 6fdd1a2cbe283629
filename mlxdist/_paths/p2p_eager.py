"""broadcast, gather, scatter and all_to_all on the eager path (numpy and any
buffer in, numpy out), composed from the backend's send/recv along the
schedules of :mod:`mlxdist._paths.trees`.

MLX has none of the four on any backend. Each call validates everything
first (root, shapes, dtype, ``out=``), so an argument error on one rank sends
nothing, then runs the schedule with the eager path's blocking send/recv,
reading inputs in place and receiving straight into the result (or ``out=``)
wherever the rows a message carries are contiguous there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlxdist import deadline
from mlxdist._paths import eager
from mlxdist._paths.trees import exchange_rounds, tree
from mlxdist.buffers import MlxBuffer
from mlxdist.dtypes import code_of_numpy
from mlxdist.rules import composed_shape
from mlxdist.group_record import GroupRecord

__all__ = ["agree", "broadcast", "gather", "scatter", "all_to_all", "prepare", "SMALL_ALL_TO_ALL"]

# Up to this many bytes per rank, all_to_all is one all_gather (every rank
# receives size times the data, in one call) rather than 2 (size - 1) sends
# and receives: small messages cost their calls, not their bytes.
SMALL_ALL_TO_ALL = 64 << 10


def agree(group: GroupRecord, op: str, dtype: Any, shape: tuple[int, ...]) -> None:
    """The agreement check of a composed collective (with the check on): every
    rank must call the same operation, root, dtype and shape."""
    if group.world.checked:
        deadline.agree(op, group, group.world, dtype, shape, None)


def prepare(group: GroupRecord, op: str, x: Any, out: Any, root: int) -> tuple[np.ndarray, np.ndarray | None, int, tuple[int, ...]]:
    """Validate an eager composed call; returns (x, out, dtype code, result shape) as numpy."""
    group.live_handle()
    x = eager.as_numpy(x)
    out = eager.as_out(out)
    code = code_of_numpy(x.dtype)
    shape = composed_shape(op, x.shape, group.size, group.rank == root)
    if out is not None:
        eager.check_out(out, shape, code)
    name = op if op == "all_to_all" else f"{op}[root={root}]"
    agree(group, name, x.dtype, x.shape)
    return x, out, code, shape


def _returned(x: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return x
    if out is not x:
        np.copyto(out, x)
    return out


def _new(shape: tuple[int, ...], code: int, out: np.ndarray | None = None) -> np.ndarray:
    return out if out is not None else MlxBuffer.allocate(shape, code).numpy()


def _contiguous(ranks: tuple[int, ...]) -> bool:
    return list(ranks) == list(range(ranks[0], ranks[0] + len(ranks)))


def broadcast(group: GroupRecord, x: Any, root: int, out: Any) -> np.ndarray:
    """The root's ``x`` on every rank (the root returns ``x`` itself, or ``out``).

    Args:
        group: The group.
        x: The root's data; on the other ranks an array of the same shape
            and dtype (its values are not read).
        root: The root rank (validated by the caller).
        out: Optional array (or writable buffer) to receive into.
    """
    x, out, code, shape = prepare(group, "broadcast", x, out, root)
    rank, size = group.rank, group.size
    if size == 1:
        return _returned(x, out)
    place = tree(size, root, rank, group.caps.neighbours_only)
    if rank == root:
        data = _returned(x, out)
    else:
        data = eager.recv(group, shape, code, place.parent, out)  # type: ignore[arg-type]
    for child in place.children:
        eager.send(group, data, child)
    return data


def _blocks(x: np.ndarray, ranks: tuple[int, ...], rows: int) -> np.ndarray:
    """The rows of ``ranks``' blocks of ``x``, in that order (a view when contiguous)."""
    if _contiguous(ranks):
        return x[ranks[0] * rows : (ranks[-1] + 1) * rows]
    return np.concatenate([x[r * rows : (r + 1) * rows] for r in ranks])


def scatter(group: GroupRecord, x: Any, root: int, out: Any) -> np.ndarray:
    """Rank ``r`` receives rows ``[r * m, (r + 1) * m)`` of the root's ``x``, ``m = x.shape[0] // size``.

    Args:
        group: The group.
        x: The root's data; on the other ranks an array of the same shape and
            dtype (its values are not read).
        root: The root rank (validated by the caller).
        out: Optional array of the scattered shape.
    """
    x, out, code, shape = prepare(group, "scatter", x, out, root)
    rank, size = group.rank, group.size
    rows = shape[0]
    if size == 1:
        return _returned(x, out)
    place = tree(size, root, rank, group.caps.neighbours_only)
    mine = place.members[rank]
    if rank == root:
        for child in place.children:
            eager.send(group, _blocks(x, place.members[child], rows), child)
        return _returned(x[root * rows : (root + 1) * rows], out)
    if not place.children:
        return eager.recv(group, shape, code, place.parent, out)  # type: ignore[arg-type]
    payload = eager.recv(group, (len(mine) * rows,) + shape[1:], code, place.parent, None)  # type: ignore[arg-type]
    for child in place.children:
        start = mine.index(child) * rows
        eager.send(group, payload[start : start + len(place.members[child]) * rows], child)
    return _returned(payload[:rows], out)


def gather(group: GroupRecord, x: Any, root: int, out: Any) -> np.ndarray:
    """Every rank's ``x`` concatenated along axis 0 in rank order, on the root.

    The other ranks return an array of no rows, ``(0,) + x.shape[1:]``. A
    scalar part is one row (as all_gather).

    Args:
        group: The group.
        x: This rank's part; the same shape and dtype on every rank.
        root: The root rank (validated by the caller).
        out: Optional array of this rank's result shape.
    """
    x, out, code, shape = prepare(group, "gather", x, out, root)
    rank, size = group.rank, group.size
    if size == 1:
        return _returned(x, out)
    part = x.reshape(1) if x.ndim == 0 else x
    rows = part.shape[0]
    place = tree(size, root, rank, group.caps.neighbours_only)
    mine = place.members[rank]
    children = place.children[::-1]  # the smallest subtree (done first) first
    if rank == root:
        result = _new(shape, code, out)
        np.copyto(result[root * rows : (root + 1) * rows], part)
        for child in children:
            ranks = place.members[child]
            if _contiguous(ranks):
                eager.recv(group, (len(ranks) * rows,) + part.shape[1:], code, child,
                           result[ranks[0] * rows : (ranks[-1] + 1) * rows])
                continue
            got = eager.recv(group, (len(ranks) * rows,) + part.shape[1:], code, child, None)
            for i, r in enumerate(ranks):
                np.copyto(result[r * rows : (r + 1) * rows], got[i * rows : (i + 1) * rows])
        return result
    if children:
        payload = MlxBuffer.allocate((len(mine) * rows,) + part.shape[1:], code).numpy()
        np.copyto(payload[:rows], part)
        for child in children:
            start, count = mine.index(child) * rows, len(place.members[child]) * rows
            eager.recv(group, (count,) + part.shape[1:], code, child, payload[start : start + count])
        part = payload
    eager.send(group, part, place.parent)  # type: ignore[arg-type]
    return _new(shape, code, out)


def all_to_all(group: GroupRecord, x: Any, out: Any) -> np.ndarray:
    """Block ``j`` of axis 0 to rank ``j``; the blocks received, in rank order.

    Any-to-any backends (MPI) and two ranks exchange pairwise
    (:func:`mlxdist._paths.trees.exchange_rounds`); ring beyond two ranks,
    and every backend up to :data:`SMALL_ALL_TO_ALL` bytes, all_gathers and
    keeps its blocks.

    Args:
        group: The group.
        x: ``size`` blocks of ``x.shape[0] // size`` rows; the same shape and
            dtype on every rank.
        out: Optional array of ``x``'s shape (it may be ``x``: read first).
    """
    x, out, code, shape = prepare(group, "all_to_all", x, out, 0)
    rank, size = group.rank, group.size
    if size == 1:
        return _returned(x, out)
    rows = shape[0] // size
    if out is not None and np.shares_memory(out, x):
        x = x.copy()  # written over as it is read: read a copy, as MPI_IN_PLACE
    result = _new(shape, code, out)
    if (group.caps.neighbours_only and size > 2) or x.nbytes <= SMALL_ALL_TO_ALL:
        gathered = eager.collective(group, "all_gather", x, None)
        # (sender, block, rows, ...): block ``rank`` of every sender, in one copy
        # (block by block into an ``out`` that no reshape can view).
        blocks = gathered.reshape((size, size, rows) + shape[1:])[:, rank]
        if result.flags.c_contiguous:
            np.copyto(result.reshape((size, rows) + shape[1:]), blocks)
        else:
            for j in range(size):
                np.copyto(result[j * rows : (j + 1) * rows], blocks[j])
        return result
    np.copyto(result[rank * rows : (rank + 1) * rows], x[rank * rows : (rank + 1) * rows])
    for dst, src, send_first in exchange_rounds(size, rank):
        block, into = x[dst * rows : (dst + 1) * rows], result[src * rows : (src + 1) * rows]
        if send_first:
            eager.send(group, block, dst)
        eager.recv(group, block.shape, code, src, into)
        if not send_first:
            eager.send(group, block, dst)
    return result
