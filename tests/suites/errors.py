"""Errors the C layer classifies where it raises them, on a live group.

A suite of the check harness (tests/support), run in process on the size-1
world and on 2 ranks of ring and MPI: each C-side failure of the eager gate
comes back as the class of its kind, only a communication failure would mark
the world failed, and the group keeps working after every one of them.
"""

from __future__ import annotations

import numpy as np

import mlxdist
from mlxdist.group_record import record_of
from mlxdist._c import ffi, gate, lib
from mlxdist.buffers import MlxBuffer
from support.checks import Checks


def run(checks: Checks) -> None:
    """C errors of each kind through the gate, then collectives that must still work."""
    g = checks.group
    n, rank = g.size(), g.rank()
    null = ffi.new("mlx_array*")[0]
    f32 = MlxBuffer.allocate((4,), lib.MLX_FLOAT32)
    i32 = MlxBuffer.allocate((4,), lib.MLX_INT32)
    f32_5 = MlxBuffer.allocate((5,), lib.MLX_FLOAT32)
    memory = np.zeros(6, np.float32)
    low, high = MlxBuffer.wrap(memory[0:4], lib.MLX_FLOAT32), MlxBuffer.wrap(memory[2:6], lib.MLX_FLOAT32)

    def gated(what: str, func, *args):  # type: ignore[no-untyped-def]
        return lambda: gate.call(record_of(g), what, func, *args)

    cases = [
        ("null input", mlxdist.InvalidArgumentError, "null array",
         gated("all_sum", lib.mlxdist_collective, f32.value, null, lib.MLXDIST_ALL_SUM)),
        ("null out", mlxdist.InvalidArgumentError, "null array",
         gated("all_sum", lib.mlxdist_collective, null, f32.value, lib.MLXDIST_ALL_SUM)),
        ("dtype of out", mlxdist.DtypeError, "dtype",
         gated("all_sum", lib.mlxdist_collective, f32.value, i32.value, lib.MLXDIST_ALL_SUM)),
        ("bytes of out", mlxdist.ShapeError, "bytes",
         gated("all_sum", lib.mlxdist_collective, f32_5.value, f32.value, lib.MLXDIST_ALL_SUM)),
        ("out partly overlapping x", mlxdist.InvalidArgumentError, "overlaps",
         gated("all_sum", lib.mlxdist_collective, high.value, low.value, lib.MLXDIST_ALL_SUM)),
        ("send out of range", mlxdist.InvalidRankError, "dst=",
         gated("send", lib.mlxdist_send, f32.value, n + 3)),
    ]
    for name, cls, match, call in cases:
        error = checks.expect_raises(f"kind/{name} is {cls.__name__}", cls, call, match)
        checks.expect(f"kind/{name} is not a CommunicationError", not isinstance(error, mlxdist.CommunicationError))
        checks.expect(f"kind/{name} leaves the world usable", record_of(g).world.lost is None, str(record_of(g).world.lost))
    checks.expect_equal("usable after the errors", g.all_sum(np.ones(3, np.float32)), np.full(3, n, np.float32))
    # The in-place all_gather idiom (MPI_IN_PLACE): out holds this rank's
    # input as its slice; the input is read before it is overwritten.
    out = mlxdist.zeros((2 * n,), np.int64)
    out[2 * rank : 2 * rank + 2] = [10 * rank, 10 * rank + 1]
    got = g.all_gather(out[2 * rank : 2 * rank + 2], out=out)
    checks.expect("in-place all_gather returns out", got is out)
    checks.expect_equal("in-place all_gather", out, np.array([[10 * r, 10 * r + 1] for r in range(n)]).ravel())
    checks.expect_equal("a later collective", g.all_max(np.array([rank], np.int32)), np.array([n - 1], np.int32))
