"""average_gradients and clip_grad_norm_sharded (mlxdist.nn.gradients).

In this process: bucket planning, argument errors, the size-1 group, and a
stand-in two-rank group that counts the all-reduces. On real ranks (ring and
MPI, 2 and 4): tests/workers/grad_ops.py checks values against numpy and
mlx's own average_gradients, and tests/workers/grad_train.py trains a small
transformer data-parallel against a single-process run.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.optimizers
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlxdist
from mlxdist.nn.gradients import (
    DEFAULT_ALL_REDUCE_SIZE,
    average_gradients,
    clip_grad_norm_sharded,
    plan_buckets,
)

from support.shared import worker_output


class TwinRanks(mlxdist.Group):
    """A stand-in group of two ranks holding the same data: all_sum doubles.

    It records the bytes of every all-reduce, so bucketing is visible. Buckets
    arrive as average_gradients sends them: registered numpy arrays, bfloat16
    ones as mx.arrays.
    """

    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls: list[int] = []

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 2

    def all_sum(self, x, *, stream=None, out=None):
        self.calls.append(x.nbytes)
        if isinstance(x, mx.array):
            return x * 2
        return np.multiply(x, 2, out=out)


def ten_arrays() -> list[mx.array]:
    """Ten float32 arrays of ten elements (400 bytes)."""
    rng = np.random.default_rng(0)
    return [mx.array(rng.standard_normal(10).astype(np.float32)) for _ in range(10)]


@pytest.fixture(scope="module")
def single() -> mlxdist.Group:
    """The single-process world of the pytest process."""
    group = mlxdist.init()
    assert group.size() == 1
    return group


# -- bucket planning ----------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "buckets"),
    [
        (DEFAULT_ALL_REDUCE_SIZE, [list(range(10))]),
        (200, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]),
        (199, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]),
        (0, [[i] for i in range(10)]),
    ],
)
def test_plan_buckets_fills_up_to_the_limit(limit: int, buckets: list[list[int]]) -> None:
    assert plan_buckets([40] * 10, ["f32"] * 10, limit) == buckets


def test_plan_buckets_separates_kinds_and_isolates_large_arrays() -> None:
    kinds = ["a", "b", "a", "a", "b", "a"]
    assert plan_buckets([10, 10, 500, 10, 10, 10], kinds, 100) == [[0], [2], [3, 5], [1, 4]]
    assert plan_buckets([], [], 100) == []


# -- counted all-reduces (stand-in group) -------------------------------------


@pytest.mark.parametrize(("limit", "calls"), [(None, 1), (200, 2), (0, 10)])
def test_one_all_reduce_per_bucket(limit: int | None, calls: int) -> None:
    group, leaves = TwinRanks(), ten_arrays()
    kwargs = {} if limit is None else {"all_reduce_size": limit}
    averaged = average_gradients(leaves, group, **kwargs)
    assert len(group.calls) == calls and sum(group.calls) == 400
    for got, want in zip(averaged, leaves):
        assert got.dtype == mx.float32 and mx.array_equal(got, want)


def test_cast_on_the_wire_halves_the_bytes() -> None:
    group, leaves = TwinRanks(), ten_arrays()
    averaged = average_gradients(leaves, group, communication_type="float16")
    assert group.calls == [200]
    for got, want in zip(averaged, leaves):
        assert got.dtype == mx.float32
        assert np.allclose(np.array(got), np.array(want), rtol=2**-11, atol=0)


def test_trees_keep_their_structure_and_dtypes() -> None:
    tree = {
        "layers": [{"w": mx.ones((2, 3)), "b": mx.zeros((3,), mx.float16)}],
        "pair": (mx.full((4,), 2.0, mx.bfloat16), mx.array(1.5, mx.float64)),
        "empty": mx.zeros((0, 2)),
    }
    group = TwinRanks()
    averaged = average_gradients(tree, group)
    assert len(group.calls) == 4  # one bucket per dtype; the empty array is not sent
    assert isinstance(averaged["pair"], tuple) and isinstance(averaged["layers"], list)
    for (key, got), (_, want) in zip(tree_flatten(averaged), tree_flatten(tree)):
        assert (got.shape, got.dtype) == (want.shape, want.dtype), key
        assert mx.array_equal(got, want), key


# -- size-1 group and errors --------------------------------------------------


def test_size_one_group_returns_the_input(single: mlxdist.Group) -> None:
    tree = {"w": mx.ones((3,))}
    assert average_gradients(tree) is tree
    assert average_gradients(tree, single, communication_type=mx.bfloat16) is tree


def test_clip_on_one_rank_matches_mlx(single: mlxdist.Group) -> None:
    rng = np.random.default_rng(1)
    tree = {"w": mx.array(rng.standard_normal((4, 5)).astype(np.float32)), "b": [mx.ones((5,))]}
    for max_norm in (0.1, 1e3):
        clipped, norm = clip_grad_norm_sharded(tree, max_norm, single)
        want_clipped, want_norm = mlx.optimizers.clip_grad_norm(tree, max_norm)
        assert np.isclose(norm.item(), want_norm.item(), rtol=1e-6)
        for (key, got), (_, want) in zip(tree_flatten(clipped), tree_flatten(want_clipped)):
            assert np.allclose(np.array(got), np.array(want), rtol=1e-6), key


@pytest.mark.parametrize(
    ("tree", "error", "words"),
    [
        ({"w": 1.0}, TypeError, "'w' is a float"),
        ({"w": np.ones(3, np.float32)}, TypeError, "not an mlx.core.array"),
        ([mx.ones(2), None], TypeError, "'1' is a NoneType"),
        ({"w": mx.array([1, 2])}, mlxdist.DtypeError, "int32"),
        (mx.array([True]), mlxdist.DtypeError, "bool"),
    ],
)
def test_leaves_must_be_floating_arrays(tree: Any, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        average_gradients(tree, TwinRanks())
    with pytest.raises(error, match=words):
        clip_grad_norm_sharded(tree, 1.0)


@pytest.mark.parametrize("size", [-1, -(2**40), 1.5, "32M", True])
def test_bucket_size_must_be_a_natural_number(size: Any) -> None:
    with pytest.raises(mlxdist.InvalidArgumentError, match="all_reduce_size"):
        average_gradients(ten_arrays(), TwinRanks(), all_reduce_size=size)


@pytest.mark.parametrize(
    "wire", [mx.int32, mx.uint16, mx.bool_, mx.complex64, "int8", "float8", np.float32, 3]
)
def test_communication_type_must_be_floating(wire: Any) -> None:
    with pytest.raises(mlxdist.DtypeError, match="communication_type"):
        average_gradients(ten_arrays(), TwinRanks(), communication_type=wire)


@pytest.mark.parametrize("max_norm", [-1.0, float("nan"), "1", None])
def test_max_norm_must_be_a_non_negative_number(max_norm: Any) -> None:
    with pytest.raises(mlxdist.InvalidArgumentError, match="max_norm"):
        clip_grad_norm_sharded({"w": mx.ones(2)}, max_norm)


def test_exported_from_mlxdist_nn() -> None:
    import mlxdist.nn

    assert mlxdist.nn.average_gradients is average_gradients
    assert mlxdist.nn.clip_grad_norm_sharded is clip_grad_norm_sharded


# -- real ranks ---------------------------------------------------------------


@pytest.mark.parametrize(("backend", "n"), [("ring", 2), ("mpi", 2), ("ring", 3)])
def test_average_and_clip_on_ranks(backend: str, n: int) -> None:
    # In the launch shared with the layer checks (tests/support/shared.py).
    output = worker_output("grad_ops.py", n, backend)
    assert sum("grad_ops rank" in line and ": ok" in line for line in output) == n


@pytest.mark.parametrize(("backend", "n"), [("ring", 2), ("mpi", 2), ("mpi", 4)])
def test_data_parallel_training_matches_one_process(backend: str, n: int) -> None:
    output = worker_output("grad_train.py", n, backend)
    assert sum("grad_train rank" in line for line in output) == n
