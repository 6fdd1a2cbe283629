"""Differentiable collectives for tensor-parallel layers.

mlxdist's collectives are eager: they evaluate their input and return a new
array, so MLX's autodiff cannot see through them. The two functions here wrap
the all-sum in ``mx.custom_function`` with the rules tensor parallelism needs:

- :func:`all_sum`: all-sum forward, identity backward (every rank computes the
  same loss from the summed output, so each partial sum receives the same
  cotangent).
- :func:`sum_gradients`: identity forward, all-sum backward (a replicated input
  feeds every rank's shard, so its gradient is the sum of the ranks' parts).

On a group of one process both are the identity and communicate nothing, so a
single-process model may also be compiled or vmapped.
"""

from __future__ import annotations

import weakref
from typing import Callable

import mlx.core as mx

from mlxdist.errors import TransformError
from mlxdist.group import Group
from mlxdist.world import world

__all__ = ["resolve_group", "all_sum", "sum_gradients"]

ArrayFunction = Callable[[mx.array], mx.array]

_TRANSFORM_HINT = (
    "mlxdist.nn's tensor-parallel layers communicate eagerly (the all-sum runs when "
    "the layer is called, or, for sum_gradients, when the backward pass reaches it), "
    "so a layer on a group of more than one process cannot run inside mx.compile or "
    "mx.vmap, nor be differentiated inside them. Compile or vmap the code between the "
    "sharded layers instead, or call the model uncompiled."
)


def resolve_group(group: Group | None) -> Group:
    """The group a layer works on: ``group``, or the world group when None.

    Args:
        group: An :class:`mlxdist.Group` or None.

    Returns:
        The group.

    Raises:
        TypeError: ``group`` is not an mlxdist group (for instance an
            ``mx.distributed.Group``).
    """
    if group is None:
        return world()
    if not isinstance(group, Group):
        raise TypeError(
            f"group must be an mlxdist.Group (from mlxdist.init() or mlxdist.world()), "
            f"got {type(group).__module__}.{type(group).__name__}"
        )
    return group


def _eager_all_sum(group: Group, x: mx.array, what: str) -> mx.array:
    try:
        return group.all_sum(x)
    except TransformError as exc:
        raise TransformError(f"{what}: {_TRANSFORM_HINT}") from exc


def _identity(x: mx.array) -> mx.array:
    return x


def _build_all_sum(group: Group) -> ArrayFunction:
    @mx.custom_function
    def summed(x: mx.array) -> mx.array:
        return _eager_all_sum(group, x, "all_sum (forward)")

    @summed.vjp
    def summed_vjp(primals: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
        return cotangent

    @summed.jvp
    def summed_jvp(primals: list[mx.array], tangents: list[mx.array]) -> list[mx.array]:
        return [_eager_all_sum(group, tangents[0], "all_sum (jvp)")]

    return summed


def _build_sum_gradients(group: Group) -> ArrayFunction:
    @mx.custom_function
    def passthrough(x: mx.array) -> mx.array:
        return x

    @passthrough.vjp
    def passthrough_vjp(primals: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
        return _eager_all_sum(group, cotangent, "sum_gradients (backward)")

    @passthrough.jvp
    def passthrough_jvp(primals: list[mx.array], tangents: list[mx.array]) -> list[mx.array]:
        return [tangents[0]]

    return passthrough


_all_sum_cache: "weakref.WeakKeyDictionary[Group, ArrayFunction]" = weakref.WeakKeyDictionary()
_sum_gradients_cache: "weakref.WeakKeyDictionary[Group, ArrayFunction]" = weakref.WeakKeyDictionary()


def _cached(
    cache: "weakref.WeakKeyDictionary[Group, ArrayFunction]",
    build: Callable[[Group], ArrayFunction],
    group: Group,
) -> ArrayFunction:
    if group.size == 1:
        return _identity
    function = cache.get(group)
    if function is None:
        function = cache[group] = build(group)
    return function


def all_sum(x: mx.array, group: Group | None = None) -> mx.array:
    """Sum ``x`` over the group's ranks, differentiably (identity backward).

    Unlike :func:`mlxdist.all_sum`, MLX's ``grad``, ``value_and_grad``,
    ``vjp`` and ``jvp`` see through it. Every rank must call it in the same
    order with the same shape and dtype.

    Args:
        x: An mlx array.
        group: The group (the world group when None).

    Returns:
        The element-wise sum over the ranks (``x`` itself on a size-1 group).

    Raises:
        TypeError: ``group`` is not an mlxdist group.
        TransformError: called inside ``mx.compile`` or ``mx.vmap`` on a group
            of more than one process.
        CommunicationError: the transport failed.
    """
    return _cached(_all_sum_cache, _build_all_sum, resolve_group(group))(x)


def sum_gradients(group: Group | None = None) -> ArrayFunction:
    """A function that is the identity forward and all-sums its gradient backward.

    Put it on the replicated input of column-parallel layers: each rank's
    shard contributes part of the input's gradient, and the all-sum gives
    every rank the whole of it.

    Args:
        group: The group (the world group when None).

    Returns:
        A function ``f(x) -> x`` whose vjp all-sums the cotangent over the
        group (the plain identity on a size-1 group). Its backward raises
        :class:`mlxdist.TransformError` when differentiated inside
        ``mx.compile`` or ``mx.vmap``.

    Raises:
        TypeError: ``group`` is not an mlxdist group.
    """
    return _cached(_sum_gradients_cache, _build_sum_gradients, resolve_group(group))
