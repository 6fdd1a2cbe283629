"""The implementations compared, each able to prepare one operation for timing.

- ``mlxdist-reg``: mlxdist with registered buffers (``mlxdist.empty`` and ``out=``);
- ``mlxdist-numpy``: mlxdist with plain numpy arrays;
- ``mlxdist-mlx``: mlxdist with mx.arrays: the lazy path, so each iteration
  builds the operation and then evaluates it, exactly as ``mx.distributed``;
- ``mx.distributed``: the same engine through MLX's own bindings, evaluating each result;
  MLX has no broadcast, gather, scatter or all_to_all, so for those it runs
  what MLX users write by hand: an all_sum of the root's array and zeros
  elsewhere (broadcast, scatter: then this rank's rows), an all_gather (gather;
  all_to_all: then this rank's blocks);
- ``mpi4py``: MPI through mpi4py with numpy buffers (on the MPI backend only).

The send/recv ring shift is the same exchange for all of them: each rank
sends its array to ``rank + 1`` and receives from ``rank - 1``, even ranks
sending first, so blocking sends cannot deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx
import numpy as np

import mlxdist
from mlxdist.backends import Backend, capabilities
from mlxdist.bench.workload import ROOT, Message

__all__ = [
    "MX_DTYPES",
    "Prepared",
    "Implementation",
    "MlxdistImpl",
    "MxDistributedImpl",
    "Mpi4pyImpl",
    "make_implementations",
]

MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class Prepared:
    """One operation ready to time.

    Attributes:
        run: Performs one complete iteration and returns its result.
        values: Turns a result into a float32 numpy array for checking.
    """

    run: Callable[[], Any]
    values: Callable[[Any], np.ndarray]


def _as_float32(result: Any) -> np.ndarray:
    # Every benchmarked dtype converts to float32 exactly.
    if isinstance(result, mx.array):
        return np.asarray(result.astype(mx.float32))
    return np.asarray(result, dtype=np.float32)


def ring_shift(rank: int, size: int, send: Callable[[int], Any], recv: Callable[[int], Any]) -> Any:
    """Send to ``rank + 1`` and receive from ``rank - 1``, even ranks sending first.

    Args:
        rank: This rank.
        size: The number of ranks.
        send: Sends this rank's array to the given rank.
        recv: Receives from the given rank and returns what arrived.

    Returns:
        What ``recv`` returned.
    """
    dst, src = (rank + 1) % size, (rank - 1) % size
    if rank % 2 == 0:
        send(dst)
        return recv(src)
    received = recv(src)
    send(dst)
    return received


class Implementation:
    """Base of the implementations: a name, what it cannot run, and how to prepare an op."""

    name = ""

    def unsupported(self, op: str, dtype: str) -> str | None:
        """Why this implementation cannot run ``op`` on ``dtype``, or None if it can.

        Args:
            op: The operation.
            dtype: The dtype name.

        Returns:
            A reason, or None.
        """
        return None

    def prepare(self, msg: Message, values: np.ndarray) -> Prepared:
        """Allocate the arrays of ``msg`` holding ``values`` and return the timed call.

        Args:
            msg: The operation and sizes.
            values: This rank's input as float32.

        Returns:
            The :class:`Prepared` operation.
        """
        raise NotImplementedError

    def lazy_all_sum(self) -> Callable[[mx.array], mx.array] | None:
        """A lazy all_sum (mx.array in, unevaluated mx.array out), or None for eager implementations.

        The decode chain (:mod:`mlxdist.bench.chain`) strings these together.
        """
        return None


class MlxdistImpl(Implementation):
    """mlxdist's Group, fed registered buffers, plain numpy arrays or mx.arrays.

    Args:
        group: The mlxdist world group.
        buffers: ``"registered"``, ``"numpy"`` or ``"mlx"``.
    """

    _NAMES = {"registered": "mlxdist-reg", "numpy": "mlxdist-numpy", "mlx": "mlxdist-mlx"}

    def __init__(self, group: mlxdist.Group, buffers: str) -> None:
        self.group = group
        self.buffers = buffers
        self.name = self._NAMES[buffers]

    def unsupported(self, op: str, dtype: str) -> str | None:
        if self.buffers != "mlx" and dtype not in _NUMPY_DTYPES:
            return "numpy has no bfloat16"
        return None

    def _array(self, values: np.ndarray, dtype: str) -> Any:
        if self.buffers == "mlx":
            x = mx.array(values).astype(MX_DTYPES[dtype])
            mx.eval(x)
            return x
        if self.buffers == "registered":
            return mlxdist.asarray(values.astype(_NUMPY_DTYPES[dtype]))
        return values.astype(_NUMPY_DTYPES[dtype])

    def prepare(self, msg: Message, values: np.ndarray) -> Prepared:
        group = self.group
        x = self._array(values, msg.dtype)
        if self.buffers == "mlx":
            return self._prepare_lazy(msg, x)
        out = None
        if self.buffers == "registered":
            # gather's other ranks receive nothing; a broadcast lands in place.
            empty = msg.op == "gather" and group.rank() != ROOT and group.size() > 1
            out = x if msg.op == "broadcast" else mlxdist.empty(0 if empty else msg.output_count, _NUMPY_DTYPES[msg.dtype])
        if msg.op == "sendrecv":

            def receive(src: int) -> Any:
                return group.recv_like(x, src, out=out)

            return Prepared(lambda: ring_shift(group.rank(), group.size(), lambda dst: group.send(x, dst), receive),
                            _as_float32)
        collective = getattr(group, msg.op)
        if out is None:
            return Prepared(lambda: collective(x), _as_float32)
        return Prepared(lambda: collective(x, out=out), _as_float32)

    def lazy_all_sum(self) -> Callable[[mx.array], mx.array] | None:
        if self.buffers != "mlx":
            return None
        group = self.group
        # The module-level function, as models call mx.distributed.all_sum.
        return lambda x: mlxdist.all_sum(x, group=group)

    def _prepare_lazy(self, msg: Message, x: mx.array) -> Prepared:
        """mx.arrays: build the lazy operation, then evaluate it (as :class:`MxDistributedImpl`)."""
        group = self.group
        if msg.op == "sendrecv":

            def send(dst: int) -> None:
                mx.eval(group.send(x, dst))

            def receive(src: int) -> mx.array:
                received = group.recv_like(x, src)
                mx.eval(received)
                return received

            return Prepared(lambda: ring_shift(group.rank(), group.size(), send, receive), _as_float32)
        collective = getattr(group, msg.op)

        def run() -> mx.array:
            result = collective(x)
            mx.eval(result)
            return result

        return Prepared(run, _as_float32)


class MxDistributedImpl(Implementation):
    """MLX's own Python bindings over the same process-wide group.

    Args:
        backend: The backend mlxdist initialised; None for the single-process
            group, which is ring's non-strict fallback in both libraries.
    """

    name = "mx.distributed"

    def __init__(self, backend: Backend | None) -> None:
        self.backend = backend
        self.group = mx.distributed.init(backend=(backend or Backend.RING).value)

    # What the hand-written forms of the operations MLX lacks are built from.
    _BY_HAND = {"broadcast": "all_sum", "scatter": "all_sum", "gather": "all_gather", "all_to_all": "all_gather"}

    def unsupported(self, op: str, dtype: str) -> str | None:
        needs = "send" if op == "sendrecv" else self._BY_HAND.get(op, op)
        if capabilities(self.backend).status(needs) != "native":
            where = f"{self.backend.value} backend" if self.backend else "single-process group"
            return f"MLX's {where} has no {needs}"
        return None

    def lazy_all_sum(self) -> Callable[[mx.array], mx.array] | None:
        group = self.group
        return lambda x: mx.distributed.all_sum(x, group=group)

    def prepare(self, msg: Message, values: np.ndarray) -> Prepared:
        group = self.group
        x = mx.array(values).astype(MX_DTYPES[msg.dtype])
        mx.eval(x)
        if msg.op == "sendrecv":

            def send(dst: int) -> None:
                mx.eval(mx.distributed.send(x, dst, group=group))

            def receive(src: int) -> mx.array:
                received = mx.distributed.recv_like(x, src, group=group)
                mx.eval(received)
                return received

            return Prepared(lambda: ring_shift(group.rank(), group.size(), send, receive), _as_float32)
        if msg.op in self._BY_HAND:
            return self._by_hand(msg, x)
        collective = getattr(mx.distributed, msg.op)

        def run() -> mx.array:
            result = collective(x, group=group)
            mx.eval(result)
            return result

        return Prepared(run, _as_float32)

    def _by_hand(self, msg: Message, x: mx.array) -> Prepared:
        """broadcast, gather, scatter and all_to_all as MLX users write them today."""
        group, op = self.group, msg.op
        rank, size = group.rank(), group.size()
        mine = x if rank == ROOT else mx.zeros_like(x)
        mx.eval(mine)
        block = msg.input_count // size

        def build() -> mx.array:
            if op == "broadcast":
                return mx.distributed.all_sum(mine, group=group)
            if op == "scatter":
                return mx.distributed.all_sum(mine, group=group)[rank * block : (rank + 1) * block]
            gathered = mx.distributed.all_gather(x, group=group)
            if op == "gather":
                return gathered
            return gathered.reshape(size, size, block)[:, rank].reshape(-1)

        def run() -> mx.array:
            result = build()
            mx.eval(result)
            return result

        def values(result: mx.array) -> np.ndarray:
            if op == "gather" and rank != ROOT and size > 1:
                return np.zeros(0, np.float32)  # every rank gathered; only the root's counts
            return _as_float32(result)

        return Prepared(run, values)


class Mpi4pyImpl(Implementation):
    """MPI's C library through mpi4py with numpy buffers: the floor under MLX's MPI backend.

    Import it only under MPI: mpi4py initialises MPI on import (after MLX's
    MPI backend did, it attaches to the same MPI_COMM_WORLD).
    """

    name = "mpi4py"

    def __init__(self) -> None:
        from mpi4py import MPI

        self.mpi = MPI
        self.comm = MPI.COMM_WORLD

    def unsupported(self, op: str, dtype: str) -> str | None:
        if dtype != "float32":
            return f"MPI has no {dtype} type"
        return None

    def prepare(self, msg: Message, values: np.ndarray) -> Prepared:
        comm, MPI = self.comm, self.mpi
        x = values.astype(np.float32)
        out = np.empty(msg.output_count, np.float32)
        reductions = {"all_sum": MPI.SUM, "all_max": MPI.MAX, "all_min": MPI.MIN}
        rank, size = comm.Get_rank(), comm.Get_size()

        def receive(src: int) -> np.ndarray:
            comm.Recv(out, source=src)
            return out

        # One branch per operation, chosen here: the timed call does no dispatch.
        if msg.op in reductions:
            op = reductions[msg.op]

            def run() -> np.ndarray:
                comm.Allreduce(x, out, op=op)
                return out

        elif msg.op == "all_gather":

            def run() -> np.ndarray:
                comm.Allgather(x, out)
                return out

        elif msg.op == "sum_scatter":

            def run() -> np.ndarray:
                comm.Reduce_scatter_block(x, out, op=MPI.SUM)
                return out

        elif msg.op == "broadcast":
            buffer = x if rank == ROOT else out

            def run() -> np.ndarray:
                comm.Bcast(buffer, root=ROOT)
                return buffer

        elif msg.op == "gather":
            into = out if rank == ROOT else None

            def run() -> np.ndarray:
                comm.Gather(x, into, root=ROOT)
                return out if rank == ROOT or size == 1 else np.zeros(0, np.float32)

        elif msg.op == "scatter":

            def run() -> np.ndarray:
                comm.Scatter(x, out, root=ROOT)
                return out

        elif msg.op == "all_to_all":

            def run() -> np.ndarray:
                comm.Alltoall(x, out)
                return out

        else:

            def run() -> np.ndarray:
                return ring_shift(rank, size, lambda dst: comm.Send(x, dest=dst), receive)

        return Prepared(run, _as_float32)


def make_implementations(names: tuple[str, ...], group: mlxdist.Group) -> list[Implementation]:
    """The implementations named, in the order given, that can run on ``group``'s backend.

    Args:
        names: Implementation names (see :data:`mlxdist.bench.options.IMPLEMENTATIONS`).
        group: The initialised mlxdist world group.

    Returns:
        The implementations; ``mpi4py`` is left out unless the backend is MPI.
    """
    makers: dict[str, Callable[[], Implementation]] = {
        "mlxdist-reg": lambda: MlxdistImpl(group, "registered"),
        "mlxdist-numpy": lambda: MlxdistImpl(group, "numpy"),
        "mlxdist-mlx": lambda: MlxdistImpl(group, "mlx"),
        "mx.distributed": lambda: MxDistributedImpl(group.backend),
        "mpi4py": Mpi4pyImpl,
    }
    return [makers[n]() for n in names if n != "mpi4py" or group.backend is Backend.MPI]
