"""Where the time of a small collective goes: ``python benchmarks/latency_breakdown.py``.

Two parts, for all_sum and for the send/recv ring shift (``--op``), on 2 ranks:

End to end, in interleaved rounds (median of the slowest rank, and its ratio to
mx.distributed):

- ``mpi4py`` (MPI only): MPI from the calling thread, the C floor;
- ``stream hop``: an empty task queued on MLX's CPU stream and waited for: the
  hand-off to the stream's scheduler thread and back that every MLX backend
  call pays (MLX's backends run on that thread); paid once per MLX call;
- ``direct C``: ``mlxdist_collective`` (or ``mlxdist_send``/``mlxdist_recv``)
  called straight from a loop on registered buffers: backend call + hop, the
  floor of every mlxdist path;
- ``registered``: the Group on registered buffers with ``out=`` (eager);
- ``numpy``: the Group on plain numpy arrays (eager; input staged or viewed,
  result a reused registered array);
- ``bridge``: the lazy path's one nanobind call per operation, then ``mx.eval``;
- ``mx.array (Group)``, ``mx.array (module)``: the lazy path through
  ``Group.all_sum`` and ``mlxdist.all_sum(x, group=g)`` (send/recv: the Group's
  ``send``/``recv_like``), then ``mx.eval``;
- ``mx.distributed``: MLX's Python bindings (graph build, eval, hop).

The pieces, on rank 0 with no communication (best of many short repeats): what
each path does per call besides the backend call (the gate's lock and
watchdog, the eager path's input and result buffers, each lazy build, and the
whole eager path around a no-op backend call), so the end-to-end differences
can be read as sums of named parts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np

import mlxdist
from mlxdist._c import bridge, lib
from mlxdist._c.handles import thread_stream
from mlxdist._paths import eager
from mlxdist._paths.lazy import FUNCTIONS
from mlxdist.bench.implementations import ring_shift
from mlxdist.bench.timing import slowest_rank
from mlxdist.buffers import MlxBuffer, registered_buffer, reusable
from mlxdist.dtypes import code_of_numpy
from mlxdist.group_record import record_of
from mlxdist.launch import launch

Call = Callable[[], object]


class Setup:
    """The arrays, handles and groups every timed call uses, made once."""

    def __init__(self, group: mlxdist.Group, count: int) -> None:
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.peer = (self.rank + 1) % self.size
        self.x = mlxdist.asarray(np.ones(count, np.float32))
        self.out = mlxdist.empty(count, np.float32)
        self.xb, self.ob = registered_buffer(self.x), registered_buffer(self.out)
        self.stream = thread_stream()
        self.record = record_of(group)
        self.handle = self.record.handle.value
        self.address = self.record.address
        self.mx_group = mx.distributed.init(backend=group.backend.value)
        self.xm = mx.ones(count)
        mx.eval(self.xm)
        self.plain = np.ones(count, np.float32)

    def shift(self, send: Callable[[int], Any], recv: Callable[[int], Any]) -> Any:
        """The ring shift: send to rank + 1, receive from rank - 1."""
        return ring_shift(self.rank, self.size, send, recv)


def _mpi4py(s: Setup, op: str) -> Call:
    from mpi4py import MPI

    comm, mpi_in, mpi_out = MPI.COMM_WORLD, np.ones(s.x.size, np.float32), np.empty(s.x.size, np.float32)
    if op == "all_sum":
        return lambda: comm.Allreduce(mpi_in, mpi_out)
    return lambda: s.shift(lambda dst: comm.Send(mpi_in, dst), lambda src: comm.Recv(mpi_out, src))


def all_sum_cases(s: Setup) -> dict[str, Call]:
    """The end-to-end all_sum calls."""
    g, xm, all_sum = s.group, s.xm, FUNCTIONS["all_sum"]
    return {
        "direct C": lambda: lib.mlxdist_collective(s.ob.value, s.xb.value, lib.MLXDIST_ALL_SUM, s.handle, s.stream),
        "registered": lambda: g.all_sum(s.x, out=s.out),
        "numpy": lambda: g.all_sum(s.plain),
        "bridge": lambda: mx.eval(bridge.collective(all_sum, xm, s.address, None)),
        "mx.array (Group)": lambda: mx.eval(g.all_sum(xm)),
        "mx.array (module)": lambda: mx.eval(mlxdist.all_sum(xm, group=g)),
        "mx.distributed": lambda: mx.eval(mx.distributed.all_sum(xm, group=s.mx_group)),
    }


def sendrecv_cases(s: Setup) -> dict[str, Call]:
    """The end-to-end send/recv ring shifts."""
    g, xm, mg = s.group, s.xm, s.mx_group
    send_fn, recv_fn = FUNCTIONS["send"], FUNCTIONS["recv_like"]

    def c_send(dst: int) -> int:
        return lib.mlxdist_send(s.xb.value, dst, s.handle, s.stream)

    def c_recv(src: int) -> int:
        return lib.mlxdist_recv(s.ob.value, src, s.handle, s.stream)

    return {
        "direct C": lambda: s.shift(c_send, c_recv),
        "registered": lambda: s.shift(lambda d: g.send(s.x, d), lambda r: g.recv_like(s.x, r, out=s.out)),
        "numpy": lambda: s.shift(lambda d: g.send(s.plain, d), lambda r: g.recv_like(s.plain, r)),
        "bridge": lambda: s.shift(lambda d: mx.eval(bridge.peer(send_fn, xm, d, s.address, None)),
                                  lambda r: mx.eval(bridge.peer(recv_fn, xm, r, s.address, None))),
        "mx.array (Group)": lambda: s.shift(lambda d: mx.eval(g.send(xm, d)), lambda r: mx.eval(g.recv_like(xm, r))),
        "mx.array (module)": lambda: s.shift(lambda d: mx.eval(mlxdist.send(xm, d, group=g)),
                                             lambda r: mx.eval(mlxdist.recv_like(xm, r, group=g))),
        "mx.distributed": lambda: s.shift(lambda d: mx.eval(mx.distributed.send(xm, d, group=mg)),
                                          lambda r: mx.eval(mx.distributed.recv_like(xm, r, group=mg))),
    }


def cases(s: Setup, op: str) -> dict[str, Call]:
    """Every timed end-to-end call of ``op``, each a complete iteration."""
    cpu = mx.default_stream(mx.cpu)
    timed: dict[str, Call] = {}
    if s.group.backend is mlxdist.Backend.MPI:
        timed["mpi4py"] = _mpi4py(s, op)
    timed["stream hop"] = lambda: mx.synchronize(cpu)
    timed.update(all_sum_cases(s) if op == "all_sum" else sendrecv_cases(s))
    return timed


def pieces(s: Setup) -> dict[str, Call]:
    """Per-call parts of the paths, each run alone with no communication."""
    g, xm, mg, code = s.group, s.xm, s.mx_group, code_of_numpy(s.plain.dtype)
    record = s.record
    dog = record.world.watchdog
    shape = s.plain.shape

    def locked() -> None:
        with record.lock:
            pass

    def staged() -> None:
        array = reusable.take(shape, code)
        np.copyto(array, s.plain)

    timed: dict[str, Call] = {
        "gate: lock": locked,
        "gate: watchdog enter+leave": lambda: dog.leave(dog.enter("all_sum", record, record, None)),
        "eager: view input in place (C handle)": lambda: MlxBuffer.wrap(s.plain, code),
        "eager: stage input (reused array + copy)": staged,
        "eager: new result buffer + numpy view": lambda: MlxBuffer.allocate(shape, code).numpy(),
        "eager: reused result": lambda: reusable.take(shape, code),
        "lazy build all_sum: bridge": lambda: bridge.collective(FUNCTIONS["all_sum"], xm, s.address, None),
        "lazy build all_sum: Group": lambda: g.all_sum(xm),
        "lazy build all_sum: module": lambda: mlxdist.all_sum(xm, group=g),
        "lazy build all_sum: mx.distributed": lambda: mx.distributed.all_sum(xm, group=mg),
        "lazy build send: bridge": lambda: bridge.peer(FUNCTIONS["send"], xm, s.peer, s.address, None),
        "lazy build send: Group": lambda: g.send(xm, s.peer),
        "lazy build send: mx.distributed": lambda: mx.distributed.send(xm, s.peer, group=mg),
        "lazy build recv_like: Group": lambda: g.recv_like(xm, s.peer),
        "lazy build recv_like: mx.distributed": lambda: mx.distributed.recv_like(xm, s.peer, group=mg),
    }
    if dog is None:
        del timed["gate: watchdog enter+leave"]
    return timed


class _NoBackend:
    """cmlx with the eager backend calls replaced by no-ops: what the eager
    path costs around the backend call."""

    def __getattr__(self, name: str) -> Any:
        return getattr(lib, name)

    @staticmethod
    def _none(*args: Any) -> int:
        return 0

    mlxdist_collective = mlxdist_send = mlxdist_recv = _none


def around_the_call(s: Setup) -> dict[str, Call]:
    """The eager path's Python around a no-op backend call (run under :func:`no_backend`)."""
    g, peer = s.group, s.peer
    return {
        "eager around the call: registered all_sum": lambda: g.all_sum(s.x, out=s.out),
        "eager around the call: numpy all_sum": lambda: g.all_sum(s.plain),
        "eager around the call: registered send": lambda: g.send(s.x, peer),
        "eager around the call: numpy send": lambda: g.send(s.plain, peer),
        "eager around the call: registered recv_like": lambda: g.recv_like(s.x, peer, out=s.out),
        "eager around the call: numpy recv_like": lambda: g.recv_like(s.plain, peer),
    }


def time_without_backend(timed: dict[str, Call]) -> dict[str, float]:
    """:func:`time_pieces` with the eager path's backend calls made no-ops."""
    saved = eager.lib
    eager.lib = _NoBackend()  # type: ignore[assignment]
    try:
        return time_pieces(timed)
    finally:
        eager.lib = saved


def time_rounds(group: mlxdist.Group, timed: dict[str, Call], rounds: int, iters: int) -> dict[str, float]:
    """Median over rounds of each call's median time (slowest rank), in us."""
    medians: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(rounds):
        for name, call in timed.items():
            for _ in range(50):
                call()
            times = np.empty(iters)
            group.barrier()
            for i in range(iters):
                start = time.perf_counter()
                call()
                times[i] = time.perf_counter() - start
            medians[name].append(float(np.median(slowest_rank(group, times))) * 1e6)
    return {name: statistics.median(values) for name, values in medians.items()}


def time_pieces(timed: dict[str, Call]) -> dict[str, float]:
    """Best per-call time of each piece, in us (short repeats dodge the load's preemptions)."""
    return {name: min(timeit.repeat(call, number=200, repeat=200)) / 200 * 1e6 for name, call in timed.items()}


def run_rank(args: argparse.Namespace) -> None:
    group = mlxdist.init(strict=True)
    setup = Setup(group, args.bytes // 4)
    results = time_rounds(group, cases(setup, args.op), args.rounds, args.iters)
    parts = {}
    if group.rank() == 0 and not args.no_pieces:
        parts = {**time_pieces(pieces(setup)), **time_without_backend(around_the_call(setup))}
    group.barrier()
    if group.rank() != 0:
        return
    anchor = results["mx.distributed"]
    print(f"{args.op} {args.bytes} B float32, {group.size()} ranks, {group.backend.value}; "
          f"median of {args.rounds} rounds x {args.iters} iterations (slowest rank)")
    for name, value in results.items():
        print(f"  {name:20s} {value:8.1f} us   {value / anchor:5.2f}x mx.distributed")
    if parts:
        print("pieces (rank 0, no communication, best of 200 x 200 calls)")
        for name, value in parts.items():
            print(f"  {name:42s} {value:6.2f} us")


def main(argv: Sequence[str] | None = None) -> int:
    """Run as a rank under a launcher, or start 2 ranks of this script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("ring", "mpi"), default="mpi")
    parser.add_argument("--op", choices=("all_sum", "sendrecv"), default="all_sum")
    parser.add_argument("--bytes", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-pieces", action="store_true", help="only the end-to-end times")
    args = parser.parse_args(argv)
    if mlxdist.detect_backend() is not None:
        run_rank(args)
        return 0
    return launch([sys.executable, __file__, *argv], n=2, backend=args.backend, timeout=600).exit_code


if __name__ == "__main__":
    sys.exit(main())
