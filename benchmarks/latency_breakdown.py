"""Where the time of a small all_sum goes: ``python benchmarks/latency_breakdown.py``.

Times a 1 KiB float32 all_sum on 2 ranks, in interleaved rounds, as:

- ``mpi4py`` (MPI only): MPI_Allreduce from the calling thread, the C floor;
- ``stream hop``: an empty task queued on MLX's CPU stream and waited for: the
  hand-off to the stream's scheduler thread and back that every MLX backend
  call pays (MLX's backends run on that thread);
- ``direct C``: ``mlxdist_collective`` called straight from a loop, no Python
  layer: backend call + hop;
- ``mlxdist registered``: ``Group.all_sum`` on registered buffers with ``out=``;
- ``mlxdist numpy``: ``Group.all_sum`` on a plain numpy array (its input
  viewed in place, a new registered result);
- ``bridge call``: the lazy path's one nanobind call, as
  ``mlxdist._paths.lazy`` makes it, then ``mx.eval``;
- ``mlxdist mx.array``: ``mlxdist.all_sum`` on an mx.array, then ``mx.eval``
  (the lazy path: graph build through mlx-c, eval, hop);
- ``mx.distributed``: MLX's Python bindings (graph build, eval, hop);

and prints each median (slowest rank) and its ratio to mx.distributed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

import mlxdist
from mlxdist._c import bridge, lib
from mlxdist._c.handles import thread_stream
from mlxdist._paths.lazy import FUNCTIONS
from mlxdist.buffers import registered_buffer
from mlxdist.bench.timing import slowest_rank
from mlxdist.launch import launch


def cases(group: mlxdist.Group, count: int) -> dict[str, Callable[[], object]]:
    """The timed calls, each a complete 1-iteration operation."""
    x = mlxdist.asarray(np.ones(count, np.float32))
    out = mlxdist.empty(count, np.float32)
    xb, ob = registered_buffer(x), registered_buffer(out)
    stream, handle = thread_stream(), group._handle.value
    mx_group = mx.distributed.init(backend=group.backend.value)
    xm = mx.ones(count)
    mx.eval(xm)
    plain = np.ones(count, np.float32)
    cpu = mx.default_stream(mx.cpu)
    all_sum, address = FUNCTIONS["all_sum"], group._address
    timed: dict[str, Callable[[], object]] = {}
    if group.backend is mlxdist.Backend.MPI:
        from mpi4py import MPI

        comm, mpi_in, mpi_out = MPI.COMM_WORLD, np.ones(count, np.float32), np.empty(count, np.float32)
        timed["mpi4py"] = lambda: comm.Allreduce(mpi_in, mpi_out)
    timed["stream hop"] = lambda: mx.synchronize(cpu)
    timed["direct C"] = lambda: lib.mlxdist_collective(ob.value, xb.value, lib.MLXDIST_ALL_SUM, handle, stream)
    timed["mlxdist registered"] = lambda: group.all_sum(x, out=out)
    timed["mlxdist numpy"] = lambda: group.all_sum(plain)
    timed["bridge call"] = lambda: mx.eval(bridge.collective(all_sum, xm, address, None))
    timed["mlxdist mx.array"] = lambda: mx.eval(mlxdist.all_sum(xm, group=group))
    timed["mx.distributed"] = lambda: mx.eval(mx.distributed.all_sum(xm, group=mx_group))
    return timed


def run_rank(args: argparse.Namespace) -> None:
    group = mlxdist.init(strict=True)
    timed = cases(group, args.bytes // 4)
    medians: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(args.rounds):
        for name, call in timed.items():
            for _ in range(50):
                call()
            times = np.empty(args.iters)
            group.barrier()
            for i in range(args.iters):
                start = time.perf_counter()
                call()
                times[i] = time.perf_counter() - start
            medians[name].append(float(np.median(slowest_rank(group, times))) * 1e6)
    if group.rank() == 0:
        anchor = statistics.median(medians["mx.distributed"])
        print(f"all_sum {args.bytes} B float32, {group.size()} ranks, {group.backend.value}; "
              f"median of {args.rounds} rounds x {args.iters} iterations (slowest rank)")
        for name, values in medians.items():
            value = statistics.median(values)
            print(f"  {name:20s} {value:8.1f} us   {value / anchor:5.2f}x mx.distributed")


def main(argv: Sequence[str] | None = None) -> int:
    """Run as a rank under a launcher, or start 2 ranks of this script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("ring", "mpi"), default="mpi")
    parser.add_argument("--bytes", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    if mlxdist.detect_backend() is not None:
        run_rank(args)
        return 0
    return launch([sys.executable, __file__, *argv], n=2, backend=args.backend, timeout=600).exit_code


if __name__ == "__main__":
    sys.exit(main())
