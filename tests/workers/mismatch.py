"""Ranks call different things at the same point.

argv: case timeout check(0|1) [numpy|mlx]: the eager path, or the lazy one
(mx.arrays, results evaluated by mlxdist.eval)

Prints ``RESULT <rank> <error class> <message>`` on a typed error,
``DONE <rank> <value>`` when the call returned (check off: the documented
wrong answer), then exits 3 (typed error) or 0.
"""

import sys

import mlx.core as mx
import numpy as np

import mlxdist

case, timeout, check = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
lazy = len(sys.argv) > 4 and sys.argv[4] == "mlx"
# Init gets room for the ranks' start-up skew on a loaded machine; the
# operations get the short deadline under test.
group = mlxdist.init(strict=True, timeout=60, check=check)
mlxdist.set_timeout(timeout, group)
rank, size = group.rank(), group.size()
group.barrier()
xp = mx if lazy else np  # the same calls on mx.arrays are lazy builds
four = xp.arange(4, dtype=xp.float32) + rank


def call():
    if case == "op":  # all_sum against all_max
        return group.all_sum(four) if rank == 0 else group.all_max(four)
    if case == "shape":  # (4,) against (8,)
        return group.all_sum(four if rank == 0 else xp.zeros(8, xp.float32))
    if case == "dtype":  # float32 against float64
        return group.all_sum(four if rank == 0 else four.astype(xp.float64))
    if case == "gather":  # all_sum against all_gather
        return group.all_sum(four) if rank == 0 else group.all_gather(four)
    if case == "recv_larger":  # send (4,), receive (8,)
        if rank == 0:
            return group.send(four, 1)
        if rank == 1:
            return group.recv((8,), xp.float32, 0)
        return group.barrier()
    if case == "both_send":  # 0 and 1 both send, nobody receives
        if rank in (0, 1):
            return group.send(four, 1 - rank)
        return group.barrier()
    if case == "collective_vs_send":
        return group.all_sum(four) if rank == 0 else group.send(four, 0) if rank == 1 else group.all_sum(four)
    if case == "root":  # broadcast from 0 against broadcast from 1
        return group.broadcast(four, 0 if rank == 0 else 1)
    if case == "scatter_shape":  # scatter (4,) against (8,)
        return group.scatter(four if rank == 0 else xp.zeros(8, xp.float32), 0)
    raise SystemExit(f"unknown case {case}")


try:
    got = call()
    if lazy and got is not None:
        mlxdist.eval(got, group=group)
except mlxdist.DistributedError as exc:
    print(f"RESULT {rank} {type(exc).__name__} {exc}", flush=True)
    sys.exit(3)
print(f"DONE {rank} {None if got is None else got.tolist()}", flush=True)
