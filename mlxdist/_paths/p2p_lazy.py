"""broadcast, gather, scatter and all_to_all on the lazy path: mx.arrays in,
lazy mx.arrays out, built from the backend's lazy send/recv (and all_gather,
all_sum) inside MLX's graph.

Each is an ``mx.custom_function`` whose gradient is the transposed
collective, so results differentiate and compile like MLX's own:

- broadcast's transpose sums every rank's cotangent onto the root (the other
  ranks' inputs get zeros);
- gather's is a scatter from the root, scatter's a gather onto it;
- all_to_all's is all_to_all.

Forward-mode derivatives (jvp) apply the operation itself to the tangent.
An input no transformation traces (``is_tracer`` false: not under grad, jvp
or compile) needs no rule: its graph is built directly, without the custom
function's cost (tens of microseconds per call).
The trees (:mod:`mlxdist._paths.trees`) need no ordering beyond their data
dependencies: each rank receives before it sends. all_to_all all_gathers and
keeps its blocks: a lazy pairwise exchange would depend on the order MLX
happens to evaluate independent sends and receives in.
"""

from __future__ import annotations

from typing import Any, Callable

import mlx.core as mx

from mlxdist._c import bridge
from mlxdist._paths import lazy
from mlxdist._paths.trees import tree
from mlxdist.dtypes import code_of_mlx
from mlxdist.rules import composed_shape
from mlxdist.group_record import GroupRecord

__all__ = ["broadcast", "gather", "scatter", "all_to_all"]

Builder = Callable[[mx.array], mx.array]
# A bridge built before is_tracer existed (rebuild with pip install -e .)
# takes the custom function every time: right, only slower.
_is_tracer: Callable[[mx.array], bool] = getattr(bridge, "is_tracer", lambda x: True)


def _first(values: Any) -> mx.array:
    return values[0] if isinstance(values, (list, tuple)) else values


def _linear(forward: Builder, transpose: Callable[[mx.array, mx.array], mx.array]) -> Builder:
    """``forward`` as a linear MLX function: its vjp is ``transpose(primal,
    cotangent)``, its jvp ``forward`` of the tangent.

    The graph inside sees its input through stop_gradient: MLX's transforms
    then use only the custom rules, never those of the send and recv inside
    (which have none).
    """

    def opaque(a: mx.array) -> mx.array:
        return forward(mx.stop_gradient(a))

    function = mx.custom_function(opaque)
    function.vjp(lambda primals, cotangent, output: transpose(_first(primals), mx.stop_gradient(cotangent)))
    function.jvp(lambda primals, tangents: opaque(_first(tangents)))
    return function


def _cached(group: GroupRecord, key: tuple[Any, ...], make: Callable[[], Builder]) -> Builder:
    """The function of ``key`` (op, root, stream) for ``group``, made once: they
    depend on nothing else (shapes come from their arguments)."""
    functions = group.lazy_functions
    function = functions.get(key)
    if function is None:
        function = functions[key] = make()
    return function


def _after(value: mx.array, sends: list[mx.array]) -> mx.array:
    """``value``, evaluated only with ``sends`` (lazy sends must be part of the result)."""
    return mx.depends(value, sends) if sends else value


def _recv(group: GroupRecord, shape: tuple[int, ...], dtype: mx.Dtype, src: int, stream: Any) -> mx.array:
    return lazy.recv(group, shape, code_of_mlx(dtype), src, stream)


# -- the compositions, without gradients -------------------------------------


def _broadcast(group: GroupRecord, x: mx.array, root: int, stream: Any) -> mx.array:
    place = tree(group.size, root, group.rank, group.caps.neighbours_only)
    data = x if place.parent is None else _recv(group, tuple(x.shape), x.dtype, place.parent, stream)
    for child in place.children:
        data = lazy.send(group, data, child, stream)  # returns data, sending when evaluated
    return data


def _reduce_to_root(group: GroupRecord, x: mx.array, root: int, stream: Any) -> mx.array:
    total = lazy.collective(group, "all_sum", x, stream)
    return total if group.rank == root else _after(mx.zeros_like(x), [total])


def _blocks(x: mx.array, ranks: tuple[int, ...], rows: int) -> mx.array:
    if list(ranks) == list(range(ranks[0], ranks[0] + len(ranks))):
        return x[ranks[0] * rows : (ranks[-1] + 1) * rows]
    return mx.concatenate([x[r * rows : (r + 1) * rows] for r in ranks])


def _scatter(group: GroupRecord, x: mx.array, root: int, stream: Any) -> mx.array:
    """``x`` has the root's shape on every rank (only the root's values are read)."""
    rank, size = group.rank, group.size
    rows = x.shape[0] // size
    place = tree(size, root, rank, group.caps.neighbours_only)
    mine = place.members[rank]
    if rank == root:
        sends = [lazy.send(group, _blocks(x, place.members[c], rows), c, stream) for c in place.children]
        return _after(x[root * rows : (root + 1) * rows], sends)
    rest = tuple(x.shape[1:])
    payload = _recv(group, (len(mine) * rows,) + rest, x.dtype, place.parent, stream)  # type: ignore[arg-type]
    sends = []
    for child in place.children:
        start = mine.index(child) * rows
        sends.append(lazy.send(group, payload[start : start + len(place.members[child]) * rows], child, stream))
    return _after(payload[:rows], sends)


def _gather(group: GroupRecord, x: mx.array, root: int, stream: Any) -> mx.array:
    rank, size = group.rank, group.size
    part = x.reshape(1) if x.ndim == 0 else x
    rows, rest = part.shape[0], tuple(part.shape[1:])
    place = tree(size, root, rank, group.caps.neighbours_only)
    mine = place.members[rank]
    received = {}
    for child in place.children[::-1]:
        ranks = place.members[child]
        received[child] = _recv(group, (len(ranks) * rows,) + rest, x.dtype, child, stream)
    if rank == root:
        blocks = {root: part}
        for child, got in received.items():
            for i, r in enumerate(place.members[child]):
                blocks[r] = got[i * rows : (i + 1) * rows]
        return mx.concatenate([blocks[r] for r in range(size)])
    pieces = sorted([(0, part)] + [(mine.index(c), got) for c, got in received.items()], key=lambda p: p[0])
    payload = mx.concatenate([p for _, p in pieces]) if len(pieces) > 1 else part
    sent = lazy.send(group, payload, place.parent, stream)  # type: ignore[arg-type]
    return sent[:0]


def _all_to_all(group: GroupRecord, x: mx.array, stream: Any) -> mx.array:
    size, rank = group.size, group.rank
    rows = x.shape[0] // size
    gathered = lazy.collective(group, "all_gather", x, stream)
    # (sender, block, rows, ...): keep block ``rank`` of every sender.
    blocks = gathered.reshape((size, size, rows) + tuple(x.shape[1:]))[:, rank]
    return blocks.reshape(tuple(x.shape))


# -- the differentiable operations -------------------------------------------


def _differentiable(
    group: GroupRecord, key: tuple[Any, ...], x: mx.array, forward: Builder,
    transpose: Callable[[mx.array, mx.array], mx.array],
) -> mx.array:
    """``forward(x)``, through a cached custom function with ``transpose`` as its VJP
    when ``x`` is traced (a size-1 group returns ``x``)."""
    if group.size == 1:
        return x
    if not _is_tracer(x):
        return forward(x)
    return _cached(group, key, lambda: _linear(forward, transpose))(x)


def broadcast(group: GroupRecord, x: mx.array, root: int, stream: Any) -> mx.array:
    """The root's ``x`` on every rank, lazily (arguments validated by the caller)."""
    return _differentiable(
        group, ("broadcast", root, stream), x, lambda a: _broadcast(group, a, root, stream),
        lambda primal, cotangent: _reduce_to_root(group, cotangent, root, stream),
    )


def scatter(group: GroupRecord, x: mx.array, root: int, stream: Any) -> mx.array:
    """This rank's rows of the root's ``x``, lazily."""

    def transpose(primal: mx.array, cotangent: mx.array) -> mx.array:
        got = _gather(group, cotangent, root, stream)
        return got if group.rank == root else _after(mx.zeros(primal.shape, primal.dtype), [got])

    return _differentiable(group, ("scatter", root, stream), x, lambda a: _scatter(group, a, root, stream), transpose)


def gather(group: GroupRecord, x: mx.array, root: int, stream: Any) -> mx.array:
    """Every rank's ``x`` along axis 0 on the root, no rows elsewhere, lazily."""

    def transpose(primal: mx.array, cotangent: mx.array) -> mx.array:
        shape = tuple(primal.shape)
        if group.rank != root:
            full = composed_shape("gather", shape, group.size, True)
            cotangent = mx.broadcast_to(mx.zeros((), cotangent.dtype), full)  # a template: never read
        return _scatter(group, cotangent, root, stream).reshape(shape)

    return _differentiable(group, ("gather", root, stream), x, lambda a: _gather(group, a, root, stream), transpose)


def all_to_all(group: GroupRecord, x: mx.array, stream: Any) -> mx.array:
    """Block ``j`` to rank ``j``, the blocks received in rank order, lazily."""
    return _differentiable(
        group, ("all_to_all", stream), x, lambda a: _all_to_all(group, a, stream),
        lambda primal, c: _all_to_all(group, c, stream),
    )
