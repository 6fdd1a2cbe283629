"""The lazy path (mx.array in, lazy mx.array out) against mx.distributed, in one process.

A suite of the check harness (tests/support): it runs in the pytest process on
the size-1 world and on 2 and 4 ranks of ring and MPI. mlxdist and
mx.distributed share MLX's engine, so ``mx.distributed.init`` returns the same
world, and every result of mlxdist is compared with what mx.distributed gives
for the same call: values and dtypes, gradients, mx.compile, mx.vmap, streams,
threads, and (where MLX raises) the same error. Where MLX lacks an operation
(sum_scatter on ring and MPI, bool reductions on MPI) the reference is
composed from mx.distributed's all_sum, or computed by numpy.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import mlx.core as mx
import numpy as np

import mlxdist
from mlxdist._c import bridge
from mlxdist.backends import capabilities
from suites.battery import DTYPES, rank_data, reference
from support.checks import Checks, to_numpy

COLLECTIVES = ("all_sum", "all_max", "all_min", "all_gather", "sum_scatter")
VALUE_DTYPES = ("float32", "float16", "bfloat16", "float64", "int32", "uint8", "bool", "complex64")


def status(y: mx.array) -> int:
    """The graph node's status: 0 until MLX schedules it for evaluation."""
    return bridge.node(y)[1]


def outcome(make: Callable[[], Any]) -> tuple[str, Any]:
    """``("value", evaluated result)`` or ``("raised", (type name, message))``."""
    try:
        value = make()
        mx.eval(value)
        return "value", value
    except Exception as exc:  # noqa: BLE001 - the behaviour being compared
        return "raised", (type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")


class Lazy:
    """The lazy-path checks on one rank, with mx.distributed's group beside mlxdist's."""

    def __init__(self, checks: Checks) -> None:
        self.c = checks
        self.g = checks.group
        backend = self.g.backend.value if self.g.backend else "ring"
        # The same engine: with a launcher this is the launched world, without
        # one the same single-process group mlxdist.init() formed.
        self.mxg = mx.distributed.init(strict=self.g.backend is not None, backend=backend)
        self.rank, self.size = self.g.rank(), self.g.size()
        self.right, self.left = (self.rank + 1) % self.size, (self.rank - 1) % self.size

    # -- helpers -------------------------------------------------------------

    def mx_op(self, op: str, x: mx.array, **kw: Any) -> mx.array:
        """mx.distributed's ``op``, composed from its all_sum where MLX lacks it."""
        if op == "sum_scatter" and "sum_scatter" not in capabilities(self.g.backend).native:
            rows = x.shape[0] // self.size
            return mx.distributed.all_sum(x, group=self.mxg, **kw)[self.rank * rows : (self.rank + 1) * rows]
        return getattr(mx.distributed, op)(x, group=self.mxg, **kw)

    def same(self, name: str, ours: Callable[[], Any], theirs: Callable[[], Any]) -> None:
        """mlxdist and mx.distributed behave alike: equal results, or the same error."""
        a, b = outcome(ours), outcome(theirs)
        if a[0] != b[0]:
            self.c.expect(name, False, f"mlxdist {a}, mx.distributed {b}")
        elif a[0] == "raised":
            self.c.expect(name, a[1] == b[1], f"mlxdist raised {a[1]}, mx.distributed {b[1]}")
        else:
            self.equal(name, a[1], b[1])

    def equal(self, name: str, got: Any, want: Any) -> None:
        """Equal trees of mx.arrays: structure, dtypes, shapes and values."""
        if isinstance(want, (tuple, list)):
            ok = isinstance(got, (tuple, list)) and len(got) == len(want)
            if self.c.expect(f"{name} structure", ok, f"{type(got).__name__} vs {type(want).__name__}"):
                for i, (a, b) in enumerate(zip(got, want)):
                    self.equal(f"{name}[{i}]", a, b)
            return
        self.c.expect_equal(name, got, want, kind="mlx", dtype=want.dtype)

    def sync(self) -> None:
        """Line the ranks up (an eager barrier)."""
        self.g.barrier()

    # -- groups ---------------------------------------------------------------

    def groups(self) -> None:
        c, g = self.c, self.g
        c.expect("group rank()/size() are methods equal to mx.distributed's",
                 (g.rank(), g.size()) == (self.mxg.rank(), self.mxg.size()),
                 f"{(g.rank(), g.size())} vs {(self.mxg.rank(), self.mxg.size())}")
        c.expect_raises("group=mx.distributed.Group is refused (a TypeError)", mlxdist.ArgumentTypeError,
                        lambda: mlxdist.all_sum(mx.ones(2), group=self.mxg), "mlxdist.Group")
        c.expect_raises("a bad stream is an ArgumentTypeError", mlxdist.ArgumentTypeError,
                        lambda: mlxdist.all_sum(mx.ones(2), stream="cpu"), "stream")
        c.expect_raises("a bad stream is a TypeError (as mx.distributed)", TypeError,
                        lambda: mlxdist.all_gather(mx.ones(2), stream=object()))
        c.expect_raises("mx.distributed refuses a bad stream with TypeError too", TypeError,
                        lambda: mx.distributed.all_gather(mx.ones(2), stream=object()))

    # -- values ----------------------------------------------------------------

    def values(self) -> None:
        n, caps = self.size, capabilities(self.g.backend)
        shape = (2 * n, 3)
        for dtype in VALUE_DTYPES:
            inputs = [rank_data(dtype, shape, r, seed=7) for r in range(n)]
            mx_dtype = DTYPES[dtype][1]
            x = mx.array(inputs[self.rank]).astype(mx_dtype)
            mx.eval(x)
            for op in COLLECTIVES:
                name = f"values/{op}/{dtype}"
                ours = getattr(mlxdist, op)(x)
                self.c.expect(f"{name} returns an mx.array of the input's dtype",
                              isinstance(ours, mx.array) and ours.dtype == mx_dtype, f"{type(ours)} {ours.dtype}")
                if n > 1:
                    self.c.expect(f"{name} is lazy", status(ours) == 0)
                else:
                    # One process: the input itself, as mx.distributed returns it.
                    self.c.expect(f"{name} is the input node on one rank",
                                  bridge.node(ours)[0] == bridge.node(x)[0] == bridge.node(self.mx_op(op, x))[0])
                if dtype == "bool" and not caps.bool_reductions and op != "all_gather":
                    # MPI has no arithmetic on MPI_C_BOOL: mx.distributed aborts
                    # the job; mlxdist fills in. numpy is the reference.
                    self.c.expect_equal(name, ours, reference(op, inputs, self.rank), kind="mlx", dtype=mx.bool_)
                else:
                    want = self.mx_op(op, x)
                    self.equal(name, ours, want)
                    self.c.expect_equal(f"{name} vs numpy", ours, reference(op, inputs, self.rank), dtype=mx_dtype)
        # The Group methods are the same operations.
        x = mx.arange(2 * n, dtype=mx.int32) + self.rank
        self.equal("values/Group.all_sum", self.g.all_sum(x), self.mx_op("all_sum", x))

    # -- laziness ---------------------------------------------------------------

    def laziness(self) -> None:
        """Building an op communicates nothing: rank 0 builds mlxdist's all_sum
        before an mx.distributed all_sum the others build first; built eagerly,
        rank 0's would meet the others' mx.distributed one and mix the data."""
        if self.size == 1:
            return
        n, r = self.size, self.rank
        a_in = mx.full((8,), float(r + 1))
        b_in = mx.full((8,), float(100 * (r + 1)))
        mx.eval(a_in, b_in)
        if r == 0:
            a = mlxdist.all_sum(a_in)
            b = mx.distributed.all_sum(b_in, group=self.mxg)
            mx.eval(b)
            self.c.expect("laziness/not evaluated by another eval", status(a) == 0)
        else:
            b = mx.distributed.all_sum(b_in, group=self.mxg)
            mx.eval(b)
            a = mlxdist.all_sum(a_in)
        mx.eval(a)
        total = n * (n + 1) / 2
        self.c.expect_equal("laziness/own sum", a, np.full(8, total, np.float32))
        self.c.expect_equal("laziness/mx.distributed's sum", b, np.full(8, 100 * total, np.float32))
        self.sync()

    # -- point to point -----------------------------------------------------------

    def point_to_point(self) -> None:
        c = self.c
        if self.size == 1:
            x = mx.ones(3)
            c.expect_raises("p2p/send on one rank", mlxdist.InvalidRankError, lambda: mlxdist.send(x, 0))
            c.expect_raises("p2p/recv on one rank", mlxdist.InvalidRankError, lambda: mlxdist.recv((3,), mx.float32, 0))
            c.expect_raises("p2p/mx.distributed refuses too", Exception, lambda: mx.eval(mx.distributed.send(x, 0, group=self.mxg)))
            return
        shape = (3, 4)
        for dtype in ("float32", "bfloat16", "int64"):
            mine = mx.array(rank_data(dtype, shape, self.rank, seed=8)).astype(DTYPES[dtype][1])
            from_left = rank_data(dtype, shape, self.left, seed=8)
            mx.eval(mine)
            # A receive built before an all_sum and evaluated after it: built
            # eagerly it would block every rank before anyone sent.
            got = mlxdist.recv_like(mine, self.left)
            got2 = mlxdist.recv(shape, DTYPES[dtype][1], self.left)
            c.expect(f"p2p/{dtype} recv_like and recv are lazy", status(got) == 0 and status(got2) == 0)
            between = mlxdist.all_sum(mx.ones(2))
            mx.eval(between)
            c.expect_equal(f"p2p/{dtype} all_sum between", between, np.full(2, self.size, np.float32))
            sent = mlxdist.send(mine, self.right)
            ref = mx.distributed.send(mine, self.right, group=self.mxg)  # built, never evaluated
            c.expect(f"p2p/{dtype} send returns a lazy mx.array like mx.distributed's",
                     isinstance(sent, mx.array) and status(sent) == 0
                     and (sent.shape, sent.dtype) == (ref.shape, ref.dtype), f"{sent.shape} {sent.dtype}")
            # y = send(x, dst) as a dependency, as pipeline models use it.
            after = mx.depends(mine * 2, sent)
            for first in (0, 1):
                if self.rank % 2 == first:
                    mx.eval(after)
                else:
                    mx.eval(got)
            self.c.expect_equal(f"p2p/{dtype} mx.depends on send", after, to_numpy(mine) * 2, dtype=mine.dtype)
            c.expect_equal(f"p2p/{dtype} recv_like", got, from_left, kind="mlx", dtype=DTYPES[dtype][1])
            for first in (0, 1):
                if self.rank % 2 == first:
                    mx.eval(mlxdist.send(mine, self.right))
                else:
                    mx.eval(got2)
            c.expect_equal(f"p2p/{dtype} recv", got2, from_left, kind="mlx", dtype=DTYPES[dtype][1])
        self.sync()

    # -- gradients ----------------------------------------------------------------------

    def grads(self) -> None:
        r = self.rank
        w = mx.arange(8 * self.size, dtype=mx.float32).reshape(2 * self.size, 4) * (r + 1)
        x = mx.ones((2 * self.size, 4)) * (r + 2)
        mx.eval(w, x)
        for op in ("all_sum", "all_gather", "sum_scatter"):

            def loss(fn: Callable[[mx.array], mx.array], op: str = op) -> Callable[[mx.array], mx.array]:
                def f(v: mx.array) -> mx.array:
                    y = fn(v)
                    weights = mx.concatenate([w] * (y.shape[0] // w.shape[0])) if y.shape[0] >= w.shape[0] else w[: y.shape[0]]
                    return (y * weights).sum() + (fn(v * v)).sum()

                return f

            ours = loss(lambda v, op=op: getattr(mlxdist, op)(v))
            theirs = loss(lambda v, op=op: self.mx_op(op, v))
            self.same(f"grad/{op}", lambda: mx.grad(ours)(x), lambda: mx.grad(theirs)(x))
            self.same(f"value_and_grad/{op}", lambda: mx.value_and_grad(ours)(x), lambda: mx.value_and_grad(theirs)(x))
        if self.size == 1:
            return
        # Through send: MLX has no VJP for Send; mlxdist raises as it does
        # (while the graph is built: nothing is communicated).
        self.same("grad/send", lambda: mx.grad(lambda v: mlxdist.send(v * 2, self.right).sum())(x),
                  lambda: mx.grad(lambda v: mx.distributed.send(v * 2, self.right, group=self.mxg).sum())(x))
        # Through recv: the received values flow into the gradient.
        results = []
        for recv_like in (mlxdist.recv_like, lambda v, src: mx.distributed.recv_like(v, src, group=self.mxg)):
            grad = mx.grad(lambda v, recv_like=recv_like: (recv_like(v, self.left) * v).sum())
            result: Any = None
            for first in (0, 1):
                if self.rank % 2 == first:
                    mx.eval(mlxdist.send(x + r, self.right))
                else:
                    result = outcome(lambda grad=grad: grad(x))
            results.append(result)
        ours, theirs = results
        self.c.expect("grad/recv_like behaves as mx.distributed's", ours[0] == theirs[0], f"{ours} vs {theirs}")
        if ours[0] == theirs[0] == "value":
            self.equal("grad/recv_like", ours[1], theirs[1])
            self.c.expect_equal("grad/recv_like is the received data", ours[1], np.full(x.shape, 2 * self.left + 2, np.float32))
        self.sync()

    # -- mx.compile ------------------------------------------------------------------------

    def compiled(self) -> None:
        traces = {"mlxdist": 0, "mx": 0}

        def ours(v: mx.array) -> mx.array:
            traces["mlxdist"] += 1
            return mlxdist.all_sum(v * 2) + 1

        def theirs(v: mx.array) -> mx.array:
            traces["mx"] += 1
            return mx.distributed.all_sum(v * 2, group=self.mxg) + 1

        ours_c, theirs_c = mx.compile(ours), mx.compile(theirs)
        for n in (4, 4, 7):
            v = mx.arange(n, dtype=mx.float32) + self.rank
            self.same(f"compile/all_sum ({n})", lambda: ours_c(v), lambda: theirs_c(v))
        self.c.expect("compile/traced once per shape, as mx.distributed", traces["mlxdist"] == traces["mx"] == 2, str(traces))
        v = mx.arange(4 * self.size, dtype=mx.float32).reshape(2 * self.size, 2) + self.rank
        for op in COLLECTIVES:
            f = mx.compile(lambda a, op=op: getattr(mlxdist, op)(a * a).sum() * 3)
            g = mx.compile(lambda a, op=op: self.mx_op(op, a * a).sum() * 3)
            self.same(f"compile/{op}", lambda: f(v), lambda: g(v))
            fg = mx.compile(mx.grad(lambda a, op=op: (getattr(mlxdist, op)(a) ** 2).sum()))
            gg = mx.compile(mx.grad(lambda a, op=op: (self.mx_op(op, a) ** 2).sum()))
            self.same(f"compile(grad)/{op}", lambda: fg(v), lambda: gg(v))

    # -- mx.vmap ---------------------------------------------------------------------------

    def vmapped(self) -> None:
        v = mx.arange(8 * self.size**2, dtype=mx.float32).reshape(2 * self.size, 4 * self.size) + self.rank
        for op in COLLECTIVES:
            for axis in (0, 1):
                self.same(f"vmap/{op}/in_axes={axis}",
                          lambda op=op, axis=axis: mx.vmap(lambda a: getattr(mlxdist, op)(a), in_axes=axis)(v),
                          lambda op=op, axis=axis: mx.vmap(lambda a: self.mx_op(op, a), in_axes=axis)(v))

    # -- streams ---------------------------------------------------------------------------

    def streams(self) -> None:
        x = mx.ones((3,)) * (self.rank + 1)
        mx.eval(x)
        own = mx.new_stream(mx.cpu)
        self.same("stream/new_stream", lambda: mlxdist.all_sum(x, stream=own), lambda: mx.distributed.all_sum(x, group=self.mxg, stream=own))
        self.same("stream/mx.cpu", lambda: mlxdist.all_gather(x, stream=mx.cpu), lambda: mx.distributed.all_gather(x, group=self.mxg, stream=mx.cpu))
        # A stream made on another thread has no command encoder on this one:
        # an op really placed there fails at evaluation, for MLX as for mlxdist.
        box: dict[str, mx.Stream] = {}
        maker = threading.Thread(target=lambda: box.setdefault("stream", mx.new_stream(mx.cpu)))
        maker.start()
        maker.join(30)
        foreign = box["stream"]
        self.same("stream/placed on the given stream", lambda: mlxdist.all_sum(x, stream=foreign),
                  lambda: mx.distributed.all_sum(x, group=self.mxg, stream=foreign))
        if self.size > 1:
            self.c.expect_raises("stream/placed on the given stream (raises)", RuntimeError,
                                 lambda: mx.eval(mlxdist.all_max(x, stream=foreign)), "no Stream")
        self.sync()

    # -- threads -----------------------------------------------------------------------------

    def second_thread(self) -> None:
        """The lazy path from a second thread (its own default stream), one
        thread at a time per rank, as MLX's CPU backends allow."""
        results: dict[str, Any] = {}

        def work() -> None:
            try:
                x = mx.ones((5,)) * (self.rank + 1)
                results["ours"] = outcome(lambda: (mlxdist.all_sum(x), mlxdist.all_gather(x), mlxdist.sum_scatter(mx.ones((self.size, 2)))))
                results["theirs"] = outcome(lambda: (self.mx_op("all_sum", x), self.mx_op("all_gather", x), self.mx_op("sum_scatter", mx.ones((self.size, 2)))))
            except BaseException as exc:  # noqa: BLE001 - reported below
                results["error"] = repr(exc)

        worker = threading.Thread(target=work)
        worker.start()
        worker.join(120)
        self.c.expect("thread/finished", not worker.is_alive() and "error" not in results, str(results.get("error")))
        ours, theirs = results.get("ours"), results.get("theirs")
        if self.c.expect("thread/evaluated", ours is not None and ours[0] == theirs[0] == "value", f"{ours} {theirs}"):
            self.equal("thread/values", list(ours[1]), list(theirs[1]))
        # Built on another thread with the default stream, evaluated here: the
        # default stream is the one mx.distributed picks, so the outcome (a
        # value, or MLX's error for a stream of another thread) is the same.
        built: dict[str, mx.array] = {}

        def build() -> None:
            x = mx.ones((3,)) * (self.rank + 1)
            built["ours"] = mlxdist.all_sum(x)
            built["theirs"] = mx.distributed.all_sum(x, group=self.mxg)

        builder = threading.Thread(target=build)
        builder.start()
        builder.join(30)
        self.same("thread/built on another thread, evaluated here", lambda: built["ours"], lambda: built["theirs"])
        self.same("thread/main thread still works", lambda: mlxdist.all_sum(mx.ones(2)), lambda: self.mx_op("all_sum", mx.ones(2)))
        self.sync()


def run(checks: Checks) -> None:
    """Every lazy-path check on ``checks.group``."""
    suite = Lazy(checks)
    suite.groups()
    suite.values()
    suite.laziness()
    suite.point_to_point()
    suite.grads()
    suite.compiled()
    suite.vmapped()
    suite.streams()
    suite.second_thread()
