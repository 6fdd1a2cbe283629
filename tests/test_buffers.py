"""Registered buffers' lifetime, the cache of large released buffers, allocation failures."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import mlxdist
from mlxdist.buffers import MIN_BYTES, pool


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
