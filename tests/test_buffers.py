"""Registered buffers' lifetime, the cache of large released buffers, allocation failures."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlxdist
from mlxdist.buffers import MIN_BYTES, ReusePool, pool
from mlxdist.dtypes import code_of_numpy


def big(value: float) -> np.ndarray:
    return np.full(MIN_BYTES // 4, value, np.float32)


def test_released_large_buffers_are_reused_only_once_dropped():
    first = mlxdist.asarray(big(1))
    address = first.ctypes.data
    alive = mlxdist.asarray(big(2))
    assert alive.ctypes.data != address  # first is still referenced
    del first
    gc.collect()
    again = mlxdist.asarray(big(3))
    assert again.ctypes.data == address
    np.testing.assert_array_equal(again, big(3))
    np.testing.assert_array_equal(alive, big(2))


def test_a_view_keeps_its_buffer_out_of_the_cache():
    view = mlxdist.asarray(big(4))[10:20]
    gc.collect()
    others = [mlxdist.asarray(big(5)) for _ in range(3)]
    np.testing.assert_array_equal(view, np.full(10, 4, np.float32))
    assert all(not np.shares_memory(view, o) for o in others)


def test_cache_limit():
    previous = mlxdist.set_cache_limit(0)
    try:
        assert pool.held == 0
        buf = mlxdist.asarray(big(6))
        del buf
        gc.collect()
        assert pool.held == 0
        with pytest.raises(ValueError):
            mlxdist.set_cache_limit(-1)
    finally:
        assert mlxdist.set_cache_limit(previous) == 0


def test_small_buffers_bypass_the_cache():
    held = pool.held
    small = mlxdist.asarray(np.ones(16, np.float32))
    del small
    gc.collect()
    assert pool.held == held


def test_an_impossible_allocation_raises_allocation_error():
    # 4 TiB: MLX's allocator refuses, and the C side reports it as MEMORY.
    with pytest.raises(mlxdist.AllocationError, match="allocate") as info:
        mlxdist.empty((2**20, 2**20), np.float32)
    assert isinstance(info.value, MemoryError)
    with pytest.raises(MemoryError):
        mlxdist.zeros((2**21, 2**20), np.int64)
    # Nothing was lost: a small buffer still comes.
    assert mlxdist.zeros(4, np.float32).sum() == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["take", "view", "export", "drop"]), st.integers(0, 7)), max_size=40))
def test_reused_arrays_never_alias_an_array_still_held(steps):
    # The eager path's results come from a ReusePool: whatever the caller keeps
    # (the array, a view of it, a buffer export), a later take never hands out
    # its memory; dropped arrays do come back.
    arrays = ReusePool(per_key=3)
    code = code_of_numpy(np.dtype(np.float32))
    held: list[object] = []
    for action, index in steps:
        if action == "take":
            array = arrays.take((4,), code)
            assert mlxdist.is_registered(array)
            assert not any(np.shares_memory(array, np.asarray(h)) for h in held)
            array.fill(len(held))
            held.append(array)
        elif held and action == "view":
            held[index % len(held)] = np.asarray(held[index % len(held)])[1:3]
        elif held and action == "export":
            held[index % len(held)] = memoryview(np.asarray(held[index % len(held)]))
        elif held:
            del held[index % len(held)]
    first = arrays.take((2,), code)
    address = first.ctypes.data
    del first
    assert arrays.take((2,), code).ctypes.data == address
