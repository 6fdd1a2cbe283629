"""The battery: every operation of a Group against numpy references.

A suite of the check harness (tests/support): it runs in the pytest process on
the size-1 world and on 2 and 4 ranks of ring and MPI. Every rank can compute
every other rank's input (seeded by rank), so each result is compared with a
reference computed locally by numpy. Values are small integers, so sums are
exact in every dtype and any reduction order.

numpy inputs take the eager path (numpy out, ``out=``, registered buffers);
mx.array inputs the lazy one (a lazy mx.array of the input's dtype, evaluated
by the check).
"""

from __future__ import annotations

import gc
import threading
from typing import Any, Callable

import mlx.core as mx
import numpy as np

import mlxdist
from mlxdist.backends import CAPABILITIES
from support.checks import Checks, to_numpy

# name -> (numpy dtype or None when only mlx has it, mlx dtype)
DTYPES: dict[str, tuple[Any, mx.Dtype]] = {
    "bool": (np.bool_, mx.bool_),
    "int8": (np.int8, mx.int8),
    "int16": (np.int16, mx.int16),
    "int32": (np.int32, mx.int32),
    "int64": (np.int64, mx.int64),
    "uint8": (np.uint8, mx.uint8),
    "uint16": (np.uint16, mx.uint16),
    "uint32": (np.uint32, mx.uint32),
    "uint64": (np.uint64, mx.uint64),
    "float16": (np.float16, mx.float16),
    "bfloat16": (None, mx.bfloat16),
    "float32": (np.float32, mx.float32),
    "float64": (np.float64, mx.float64),
    "complex64": (np.complex64, mx.complex64),
}
OPS = ("all_sum", "all_max", "all_min", "all_gather", "sum_scatter")


def rank_data(dtype: str, shape: tuple[int, ...], rank: int, seed: int = 0) -> np.ndarray:
    """Rank ``rank``'s input: small integers in the dtype (bfloat16 as float32)."""
    rng = np.random.default_rng([seed, rank, len(shape), int(np.prod(shape))])
    np_dtype = DTYPES[dtype][0] or np.float32
    if dtype == "bool":
        return np.asarray(rng.integers(0, 2, shape).astype(np.bool_))
    low = 0 if dtype.startswith("uint") else -8
    values = rng.integers(low, 9, shape)
    if dtype == "complex64":
        values = values + 1j * rng.integers(-8, 9, shape)
    return np.asarray(values.astype(np_dtype))


def reference(op: str, inputs: list[np.ndarray], rank: int) -> np.ndarray:
    """numpy's answer for ``op`` over every rank's input, as rank ``rank`` sees it."""
    size = len(inputs)
    if size == 1:
        return inputs[0]
    stack = np.stack(inputs)
    dtype = inputs[0].dtype
    if op == "all_gather":
        return np.concatenate([np.atleast_1d(a) for a in inputs]) if inputs[0].ndim == 0 else np.concatenate(inputs)
    if op in ("all_sum", "sum_scatter"):
        # A bool "sum" is a logical or, as MLX's backends compute it.
        total = np.logical_or.reduce(stack) if dtype == np.bool_ else stack.sum(axis=0, dtype=dtype)
        if op == "all_sum":
            return total
        rows = inputs[0].shape[0] // size
        return total[rank * rows : (rank + 1) * rows]
    if op == "all_max":
        return np.maximum.reduce(stack)
    return np.minimum.reduce(stack)


def as_kind(data: np.ndarray, dtype: str, kind: str) -> Any:
    """``data`` as a numpy array, a registered buffer or an mx.array of ``dtype``."""
    if kind == "numpy":
        return data.copy()
    if kind == "registered":
        return mlxdist.asarray(data)
    return mx.array(data).astype(DTYPES[dtype][1])


def exchange(group: mlxdist.Group, send: Callable[[], Any], recv: Callable[[], Any]) -> tuple[Any, Any]:
    """Send right and receive from the left without deadlock (even ranks send
    first); lazy sends and receives are evaluated in that order.

    Returns:
        What was received, and what the send returned.
    """
    returned: list[Any] = []

    def do_send() -> None:
        sent = send()
        returned.append(sent)
        if sent is not None:
            mx.eval(sent)

    def do_recv() -> Any:
        got = recv()
        if isinstance(got, mx.array):
            mx.eval(got)
        return got

    if group.rank() % 2 == 0:
        do_send()
        return do_recv(), returned[0]
    got = do_recv()
    do_send()
    return got, returned[0]


class Battery:
    """The battery's checks on one group, recorded in a :class:`Checks`."""

    def __init__(self, checks: Checks) -> None:
        self.c = checks
        self.group = checks.group

    def expect(self, name: str, condition: bool, detail: str = "") -> None:
        self.c.expect(name, condition, detail)

    def expect_equal(self, name: str, got: Any, expected: np.ndarray, kind: str | None = None, dtype: Any = None) -> None:
        self.c.expect_equal(name, got, expected, kind=kind, dtype=dtype)

    def expect_raises(self, name: str, exc: Any, call: Callable[[], Any], match: str = "") -> None:
        self.c.expect_raises(name, exc, call, match)

    # -- collectives --------------------------------------------------------

    def shapes(self) -> list[tuple[int, ...]]:
        n = self.group.size()
        return [(), (1,), (7,), (2 * n, 3), (n, 2, 3), (0,)]

    def collectives(self, dtypes: list[str], kinds: tuple[str, ...], shapes: list[tuple[int, ...]]) -> None:
        g = self.group
        for dtype in dtypes:
            for shape in shapes:
                inputs = [rank_data(dtype, shape, r) for r in range(g.size())]
                for op in OPS:
                    if op == "sum_scatter" and (not shape or shape[0] % g.size()):
                        continue
                    expected = reference(op, inputs, g.rank())
                    for kind in kinds:
                        if kind != "mlx" and DTYPES[dtype][0] is None:
                            continue
                        x = as_kind(inputs[g.rank()], dtype, kind)
                        got = getattr(g, op)(x)
                        name = f"{op}/{dtype}/{kind}/{shape}"
                        if kind == "mlx":
                            # Lazy, and of the input's dtype (float64 stays float64).
                            self.expect_equal(name, got, expected, "mlx", DTYPES[dtype][1])
                        else:
                            self.expect_equal(name, got, expected, "numpy", x.dtype)

    def large(self, elements: int) -> None:
        g = self.group
        shape = (elements // g.size() * g.size(),)
        inputs = [rank_data("float32", shape, r, seed=1) for r in range(g.size())]
        for op in OPS:
            expected = reference(op, inputs, g.rank())
            got = getattr(g, op)(mlxdist.asarray(inputs[g.rank()]))
            self.expect_equal(f"large/{op}/{elements}", got, expected)
        got = g.all_sum(inputs[g.rank()])
        self.expect_equal(f"large/all_sum/numpy/{elements}", got, reference("all_sum", inputs, g.rank()))

    # -- registered buffers and out= ---------------------------------------

    def registered(self) -> None:
        g = self.group
        inputs = [rank_data("float32", (4 * g.size(), 3), r) for r in range(g.size())]
        mine = inputs[g.rank()]
        buf = mlxdist.asarray(mine)
        self.expect("registered/is_registered", mlxdist.is_registered(buf) and not mlxdist.is_registered(mine))
        self.expect("registered/asarray idempotent", mlxdist.asarray(buf) is buf)
        result = g.all_sum(buf)
        self.expect("registered/result registered", mlxdist.is_registered(result))
        self.expect_equal("registered/all_sum", result, reference("all_sum", inputs, g.rank()))
        # A collective's result is itself registered: it goes back in with no copy.
        again = g.all_max(result)
        self.expect_equal("registered/chain", again, reference("all_sum", inputs, g.rank()))
        in_place = g.all_sum(buf, out=buf)
        self.expect("registered/in place returns out", in_place is buf)
        self.expect_equal("registered/in place", buf, reference("all_sum", inputs, g.rank()))
        for op in ("all_gather", "sum_scatter", "all_min"):
            expected = reference(op, inputs, g.rank())
            for out in (mlxdist.empty(expected.shape, np.float32), np.empty(expected.shape, np.float32)):
                got = getattr(g, op)(mine, out=out)
                self.expect(f"registered/{op} out is returned", got is out)
                self.expect_equal(f"registered/{op}/out", out, expected)
        # Plain numpy memory: in place, strided input, read-only input, and an
        # out that overlaps the input without coinciding with it.
        plain = mine.copy()
        self.expect("plain/in place returns out", g.all_sum(plain, out=plain) is plain)
        self.expect_equal("plain/in place", plain, reference("all_sum", inputs, g.rank()))
        strided = np.zeros((2 * mine.shape[0], 3), np.float32)
        strided[::2] = mine
        self.expect_equal("plain/strided", g.all_sum(strided[::2]), reference("all_sum", inputs, g.rank()))
        frozen = mine.copy()
        frozen.flags.writeable = False
        self.expect_equal("plain/read-only", g.all_max(frozen), reference("all_max", inputs, g.rank()))
        flat = [rank_data("int32", (9,), r, seed=4) for r in range(g.size())]
        room = np.concatenate([flat[g.rank()], [0]]).astype(np.int32)
        got = g.all_sum(room[:-1], out=room[1:])
        self.expect_equal("plain/overlapping out", got, reference("all_sum", flat, g.rank()))
        self.in_place_gather()
        zeros = mlxdist.zeros((3, 2), np.int16)
        self.expect_equal("registered/zeros", zeros, np.zeros((3, 2), np.int16))
        self.expect("registered/empty dtype", mlxdist.empty(5, np.uint8).dtype == np.uint8)
        # The view keeps MLX's memory alive after every other reference is gone.
        view = g.all_sum(mlxdist.asarray(mine))[1:]
        gc.collect()
        junk = [mlxdist.zeros(mine.shape, np.float32) + 7 for _ in range(8)]
        self.expect_equal("registered/lifetime", view, reference("all_sum", inputs, g.rank())[1:])
        del junk

    def reused(self) -> None:
        """The numpy path's results come from reused registered arrays: none
        ever aliases a result (or a view, or a buffer export of one) the
        caller still holds, and a dropped one comes back."""
        g = self.group
        shape = (16,)
        inputs = [[rank_data("float32", shape, r, seed=40 + i) for r in range(g.size())] for i in range(6)]
        expected = [reference("all_sum", i, g.rank()) for i in inputs]
        held = [g.all_sum(i[g.rank()]) for i in inputs[:2]]
        view = g.all_sum(inputs[2][g.rank()])[2:9]
        exported = memoryview(g.all_sum(inputs[3][g.rank()]))
        later = [g.all_sum(i[g.rank()]) for i in inputs[4:]] + [g.all_sum(np.zeros(shape, np.float32)) for _ in range(6)]
        kept = [*held, view, np.asarray(exported)]
        self.expect("reused/no result aliases a held one",
                    not any(np.shares_memory(a, b) for a in kept for b in later))
        for i, got in enumerate(held):
            self.expect_equal(f"reused/held result {i}", got, expected[i])
        self.expect_equal("reused/held view", view, expected[2][2:9])
        self.expect_equal("reused/held buffer export", np.asarray(exported), expected[3])
        for i, got in enumerate(later[:2]):
            self.expect_equal(f"reused/later result {i}", got, expected[4 + i])
        if g.size() == 1:
            return  # a size-1 group returns its input
        if "send" in CAPABILITIES[g.backend].native:
            # Received arrays come from the same reused arrays.
            template = np.zeros(shape, np.float32)
            received = [exchange(g, lambda i=i: g.send(inputs[i][g.rank()], (g.rank() + 1) % g.size()),
                                 lambda: g.recv_like(template, (g.rank() - 1) % g.size()))[0] for i in range(3)]
            self.expect("reused/received arrays are distinct",
                        not any(np.shares_memory(a, b) for a in received + kept for b in received if a is not b))
            for i, got in enumerate(received):
                self.expect_equal(f"reused/received {i}", got, inputs[i][(g.rank() - 1) % g.size()])
        # A shape of its own, registered input (nothing staged): the one array comes back once dropped.
        x = mlxdist.asarray(np.ones(5, np.float32))
        first = g.all_sum(x)
        address = first.ctypes.data
        del first
        self.expect("reused/a dropped result comes back", g.all_sum(x).ctypes.data == address)

    def in_place_gather(self) -> None:
        """all_gather into an out= holding this rank's input as its slice (the
        MPI_IN_PLACE idiom): the input is read before it is overwritten."""
        g = self.group
        n, rows = g.size(), 3
        inputs = [rank_data("int32", (rows, 2), r, seed=5) for r in range(n)]
        expected = reference("all_gather", inputs, g.rank())
        for label, out in (("registered", mlxdist.zeros((n * rows, 2), np.int32)), ("plain", np.zeros((n * rows, 2), np.int32))):
            mine = out[g.rank() * rows : (g.rank() + 1) * rows]
            mine[...] = inputs[g.rank()]
            got = g.all_gather(mine, out=out)
            self.expect(f"in-place all_gather/{label} returns out", got is out)
            self.expect_equal(f"in-place all_gather/{label}", out, expected)
        # The group is usable afterwards.
        self.expect_equal("in-place all_gather/then all_sum", g.all_sum(np.ones(3, np.int32)), np.full(3, n, np.int32))

    # -- point to point -----------------------------------------------------

    def point_to_point(self, dtypes: list[str]) -> None:
        g = self.group
        if g.size() == 1:
            return
        right, left = (g.rank() + 1) % g.size(), (g.rank() - 1) % g.size()
        for dtype in dtypes:
            for kind in ("numpy", "mlx"):
                if kind == "numpy" and DTYPES[dtype][0] is None:
                    continue
                shape = (3, 5)
                mine = rank_data(dtype, shape, g.rank(), seed=2)
                from_left = rank_data(dtype, shape, left, seed=2)
                x = as_kind(mine, dtype, kind)
                dtype_arg = DTYPES[dtype][1] if kind == "mlx" else DTYPES[dtype][0]
                want = DTYPES[dtype][1] if kind == "mlx" else x.dtype
                got, sent = exchange(g, lambda: g.send(x, right), lambda: g.recv(shape, dtype_arg, left))
                self.expect_equal(f"p2p/recv/{dtype}/{kind}", got, from_left, kind, want)
                # As mx.distributed: an mx.array send returns an array (of
                # x's shape and dtype); a numpy send returns None once sent.
                if kind == "mlx":
                    self.expect(f"p2p/send returns an mx.array/{dtype}",
                                isinstance(sent, mx.array) and (sent.shape, sent.dtype) == (x.shape, x.dtype))
                else:
                    self.expect(f"p2p/numpy send returns None/{dtype}", sent is None)
                got, _ = exchange(g, lambda: g.send(x, right), lambda: g.recv_like(x, left))
                self.expect_equal(f"p2p/recv_like/{dtype}/{kind}", got, from_left, kind, want)
        # Receiving straight into a registered buffer.
        mine = rank_data("int32", (6,), g.rank(), seed=3)
        out = mlxdist.empty((6,), np.int32)
        got, _ = exchange(g, lambda: g.send(mine, right), lambda: g.recv((6,), np.int32, left, out=out))
        self.expect("p2p/recv out is returned", got is out)
        self.expect_equal("p2p/recv out", out, rank_data("int32", (6,), left, seed=3))

    # -- threads ------------------------------------------------------------

    def threads(self, n_threads: int = 4, rounds: int = 20) -> None:
        """Eager collectives from several threads at once (one world lock
        serializes them; every one is the same operation, so any order matches
        across ranks). Lazy ones from a second thread: tests/suites/lazy.py."""
        g = self.group
        expected = np.full(64, sum(r + 1 for r in range(g.size())), np.int32)
        errors: list[str] = []

        def work() -> None:
            try:
                for i in range(rounds):
                    x = np.full(64, g.rank() + 1, np.int32)
                    got = g.all_sum(x if i % 2 else mlxdist.asarray(x))
                    if not np.array_equal(to_numpy(got), expected):
                        errors.append(f"wrong sum {to_numpy(got)[:4]}")
            except Exception as e:  # noqa: BLE001 - reported as a failure
                errors.append(f"{type(e).__name__}: {e}")

        workers = [threading.Thread(target=work) for _ in range(n_threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(120)
        self.expect("threads/all finished", not any(t.is_alive() for t in workers))
        self.expect("threads/results", not errors, "; ".join(errors[:3]))

    # -- misuse -------------------------------------------------------------

    def misuse(self) -> None:
        g = self.group
        E = mlxdist
        x = np.ones(4, np.float32)
        self.expect_raises("err/complex128", E.DtypeError, lambda: g.all_sum(np.ones(3, np.complex128)), "complex128")
        self.expect_raises("err/object", E.DtypeError, lambda: g.all_sum(np.array([1, "a"], dtype=object)), "object")
        self.expect_raises("err/byte order", E.DtypeError, lambda: g.all_sum(np.ones(3, ">f4")), "byte order")
        self.expect_raises("err/list", TypeError, lambda: g.all_sum([1.0, 2.0]), "list")
        self.expect_raises("err/out shape", E.ShapeError, lambda: g.all_sum(x, out=np.empty(5, np.float32)), "shape")
        self.expect_raises("err/out dtype", E.DtypeError, lambda: g.all_sum(x, out=np.empty(4, np.int32)), "dtype")
        self.expect_raises("err/out read-only", E.InvalidArgumentError, lambda: g.all_sum(x, out=np.broadcast_to(x, (4,))), "read-only")
        self.expect_raises("err/scatter scalar", E.ShapeError, lambda: g.sum_scatter(np.float32(1) * np.ones(())), "divisible")
        self.expect_raises("err/scatter mlx scalar", E.ShapeError, lambda: g.sum_scatter(mx.array(1.0)), "divisible")
        self.expect_raises("err/out= with mlx", E.InvalidArgumentError, lambda: g.all_sum(mx.ones(4), out=x), "out=")
        self.expect_raises("err/stream= with numpy", E.InvalidArgumentError, lambda: g.all_sum(x, stream=mx.cpu), "stream=")
        self.expect_raises("err/bad stream", E.ArgumentTypeError, lambda: g.all_sum(mx.ones(4), stream="cpu"), "stream")
        self.expect_raises("err/bad stream is a TypeError", TypeError, lambda: g.all_gather(mx.ones(4), stream=[mx.cpu]))
        if g.size() > 1:
            self.expect_raises("err/scatter divisible", E.ShapeError, lambda: g.sum_scatter(np.ones(g.size() + 1)), "divisible")
        if g.size() > 1:
            self.recv_misuse()
        for peer in (g.size(), -1, g.rank()):
            self.expect_raises(f"err/send {peer}", E.InvalidRankError, lambda: g.send(x, peer))
            self.expect_raises(f"err/recv {peer}", E.InvalidRankError, lambda: g.recv((4,), np.float32, peer))
            self.expect_raises(f"err/mlx send {peer}", E.InvalidRankError, lambda: g.send(mx.ones(4), peer))
            self.expect_raises(f"err/mlx recv {peer}", E.InvalidRankError, lambda: g.recv((4,), mx.float32, peer))
        if g.size() == 1:
            self.expect_raises("err/size-1 send", E.InvalidRankError, lambda: g.send(x, 0), "size 1")
            self.expect_raises("err/size-1 recv_like", E.InvalidRankError, lambda: g.recv_like(x, 0), "size 1")
        self.rest_of_misuse()

    def recv_misuse(self) -> None:
        g, E = self.group, mlxdist
        self.expect_raises("err/recv shape", E.ShapeError, lambda: g.recv((-1, 2), np.float32, (g.rank() + 1) % g.size()), "-1")
        self.expect_raises("err/recv dtype", E.DtypeError, lambda: g.recv((2,), "complex128", (g.rank() + 1) % g.size()), "complex128")
        self.expect_raises("err/recv dtype name", E.DtypeError, lambda: g.recv((2,), "no-such-type", (g.rank() + 1) % g.size()))

    def rest_of_misuse(self) -> None:
        g, E = self.group, mlxdist
        x = np.ones(4, np.float32)
        self.expect_raises("err/split color", E.InvalidArgumentError, lambda: g.split(-1), "color")
        if g.backend is mlxdist.Backend.RING:
            self.expect_raises("err/ring split", E.UnsupportedOperationError, lambda: g.split(0), "split")
            if g.size() > 3:
                self.expect_raises("err/ring neighbour", E.UnsupportedOperationError, lambda: g.send(x, (g.rank() + 2) % g.size()), "neighbour")
        if g.backend is None:
            self.expect_raises("err/size-1 split", E.UnsupportedOperationError, lambda: g.split(0))
        closed = mlxdist.init(g.backend or "any")
        closed.close()
        closed.close()
        self.expect("err/closed flag", closed.closed)
        whole = np.ones(2 * g.size(), np.float32)  # sum_scatter's rows divide among the ranks
        for op in ("all_sum", "all_gather", "sum_scatter", "all_max", "all_min"):
            self.expect_raises(f"err/closed {op}", E.GroupClosedError, lambda: getattr(closed, op)(whole), "closed")
            self.expect_raises(f"err/closed mlx {op}", E.GroupClosedError, lambda: getattr(closed, op)(mx.array(whole)),
                               "closed")
        self.expect_raises("err/closed split", E.GroupClosedError, lambda: closed.split(0), "closed")
        # The group is still usable after every error above.
        self.expect_equal("err/still usable", g.all_sum(np.ones(2, np.int64)), np.full(2, g.size(), np.int64))

    # -- split (MPI) --------------------------------------------------------

    def split(self) -> None:
        g = self.group
        if g.backend is not mlxdist.Backend.MPI or g.size() == 1:
            return
        color = g.rank() % 2
        with g.split(color) as sub:
            members = [r for r in range(g.size()) if r % 2 == color]
            self.expect("split/size", sub.size() == len(members), f"{sub.size()} vs {members}")
            self.expect("split/rank", sub.rank() == members.index(g.rank()))
            got = sub.all_sum(np.array([g.rank()], np.int64))
            self.expect_equal("split/all_sum", got, np.array([sum(members)], np.int64))
            gathered = sub.all_gather(np.array([g.rank()], np.int32))
            self.expect_equal("split/all_gather", gathered, np.array(members, np.int32))
            lazy = sub.all_sum(mx.array([g.rank()], mx.int64))
            self.expect_equal("split/lazy all_sum", lazy, np.array([sum(members)], np.int64), "mlx", mx.int64)
        self.expect("split/closed by with", sub.closed)
        # key orders the subgroup: reversed keys reverse the ranks.
        rev = g.split(0, key=g.size() - g.rank())
        self.expect("split/key", rev.rank() == g.size() - 1 - g.rank(), f"rank {rev.rank()}")
        gathered = rev.all_gather(np.array([g.rank()], np.int32))
        self.expect_equal("split/key gather", gathered, np.arange(g.size() - 1, -1, -1, dtype=np.int32))


def run(checks: Checks) -> None:
    """Every check of the battery on ``checks.group``.

    Options: ``depth=thorough`` (default) runs every dtype on every shape;
    ``depth=core`` runs every dtype on a scalar and a 2-d shape (rings of 3 or
    more ranks on two cores are slow: MLX's ring transport spins while it
    waits); ``depth=misuse`` runs only the refusals (a 4-rank ring's
    neighbour rule among them).
    ``large=N``: elements of the large buffers (default 8 Mi).
    """
    battery = Battery(checks)
    group = checks.group
    every = list(DTYPES)
    depth = checks.option("depth", "thorough")
    if depth == "misuse":
        battery.misuse()
        return
    thorough = depth == "thorough"
    shapes = battery.shapes() if thorough else [(), (2 * group.size(), 3)]
    battery.collectives(every, ("numpy", "mlx"), shapes)
    battery.collectives(["float32", "int64"], ("registered",), battery.shapes())
    battery.large(int(checks.option("large", str(8 * 1024 * 1024))))
    battery.large(1 << 20)
    battery.registered()
    battery.reused()
    battery.point_to_point(every)
    battery.threads()
    battery.split()
    battery.misuse()
