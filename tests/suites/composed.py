"""broadcast, gather, scatter, all_to_all and the object collectives against numpy.

A suite of the check harness (tests/support): it runs in the pytest process on
the size-1 world and on 2, 3 and 4 ranks of ring and MPI. Every rank computes
every other rank's input (battery.rank_data, seeded by rank), so each result
is compared with numpy's answer computed locally. Gradients of the lazy forms
are compared with the analytic transpose (computed by numpy from every
rank's cotangent), with and without mx.compile.
"""

from __future__ import annotations

import array
import functools
from typing import Any, Callable

import mlx.core as mx
import numpy as np

import mlxdist
from mlxdist import buffers
from mlxdist.errors import ArgumentTypeError, InvalidArgumentError, InvalidRankError, ShapeError
from mlxdist.objects import FRAME
from suites.battery import DTYPES, rank_data
from support.checks import Checks


def reference(op: str, inputs: list[np.ndarray], rank: int, root: int) -> np.ndarray:
    """numpy's answer for ``op`` with ``inputs[r]`` the input of rank ``r``."""
    size = len(inputs)
    if op == "broadcast" or size == 1:
        return inputs[root]
    if op == "gather":
        if rank != root:
            return np.zeros((0,) + inputs[0].shape[1:], inputs[0].dtype)
        return np.concatenate([np.atleast_1d(a) for a in inputs])
    rows = inputs[0].shape[0] // size
    if op == "scatter":
        return inputs[root][rank * rows : (rank + 1) * rows]
    return np.concatenate([a[rank * rows : (rank + 1) * rows] for a in inputs])  # all_to_all


class Composed:
    """The checks on one rank."""

    def __init__(self, checks: Checks) -> None:
        self.c = checks
        self.g = checks.group
        self.rank, self.size = self.g.rank(), self.g.size()
        self.roots = sorted({0, self.size - 1})

    def shape_of(self, op: str, rows: int = 2) -> tuple[int, ...]:
        return (rows * self.size, 3) if op in ("scatter", "all_to_all") else (rows, 3)

    def call(self, op: str, x: Any, root: int, **kw: Any) -> Any:
        if op == "all_to_all":
            return self.g.all_to_all(x, **kw)
        return getattr(self.g, op)(x, root, **kw)

    def inputs(self, dtype: str, shape: tuple[int, ...], seed: int = 1) -> list[np.ndarray]:
        return [rank_data(dtype, shape, r, seed) for r in range(self.size)]

    # -- values ---------------------------------------------------------------

    def values(self) -> None:
        """Every dtype on both paths (bfloat16 through mlx only), every op, both roots."""
        for op in ("broadcast", "gather", "scatter", "all_to_all"):
            for root in self.roots if op != "all_to_all" else [0]:
                for name, (np_dtype, mlx_dtype) in DTYPES.items():
                    data = self.inputs(name, self.shape_of(op))
                    want = reference(op, data, self.rank, root)
                    x = mx.array(data[self.rank]).astype(mlx_dtype)
                    got = self.call(op, x, root)
                    self.c.expect_equal(f"{op}(root={root}) mlx {name}", got, want, kind="mlx", dtype=mlx_dtype)
                    if np_dtype is not None:
                        got = self.call(op, data[self.rank], root)
                        self.c.expect_equal(f"{op}(root={root}) numpy {name}", got, want, kind="numpy", dtype=np_dtype)
        # Scalars, a larger message, the module-level functions.
        for root in self.roots:
            data = self.inputs("float32", ())
            self.c.expect_equal("broadcast scalar", mlxdist.broadcast(data[self.rank], root), data[root])
            self.c.expect_equal("gather scalar", mlxdist.gather(mx.array(data[self.rank]), root),
                                reference("gather", data, self.rank, root))
            big = self.inputs("float32", (self.size * 65536,), seed=2)
            for op in ("broadcast", "scatter", "gather"):
                self.c.expect_equal(f"{op} 1 MiB", getattr(mlxdist, op)(big[self.rank], root),
                                    reference(op, big, self.rank, root))
        big = self.inputs("int64", (self.size * 32768,), seed=3)
        self.c.expect_equal("all_to_all 1 MiB", mlxdist.all_to_all(big[self.rank]), reference("all_to_all", big, self.rank, 0))

    def outs(self) -> None:
        """``out=``: numpy arrays, writable buffers, in place; results land in them."""
        for op in ("broadcast", "gather", "scatter", "all_to_all"):
            root = self.roots[-1]
            data = self.inputs("int32", self.shape_of(op))
            want = reference(op, data, self.rank, root)
            out = np.full(want.shape, -1, np.int32)
            got = self.call(op, data[self.rank], root, out=out)
            self.c.expect(f"{op} out= is returned", got is out)
            self.c.expect_equal(f"{op} out= values", out, want)
            if not want.size:
                # (no memoryview has a zero-length shape of two dimensions; the call keeps the ranks in step)
                self.c.expect_equal(f"{op} without out=", self.call(op, data[self.rank], root), want)
                continue
            raw = bytearray(want.nbytes)
            view = memoryview(raw).cast("B").cast("i", want.shape)
            got = self.call(op, data[self.rank], root, out=view)
            self.c.expect(f"{op} out=memoryview shares its memory", np.shares_memory(got, np.frombuffer(raw, np.uint8)))
            self.c.expect_equal(f"{op} out=memoryview values", np.frombuffer(raw, np.int32).reshape(want.shape), want)
        for op in ("all_to_all", "broadcast", "scatter"):
            data = self.inputs("float32", self.shape_of(op))
            want = reference(op, data, self.rank, 0)
            backing = np.zeros((2 * want.shape[0],) + want.shape[1:], np.float32)
            self.call(op, data[self.rank], 0, out=backing[::2])
            self.c.expect_equal(f"{op} into a strided out=", backing[::2], want)
        data = self.inputs("float64", self.shape_of("all_to_all"))
        x = data[self.rank].copy()
        self.c.expect_equal("all_to_all in place", self.g.all_to_all(x, out=x), reference("all_to_all", data, self.rank, 0))

    # -- buffers and DLPack -----------------------------------------------------

    def buffers_in(self) -> None:
        """bytes, bytearray, memoryview, array.array and DLPack tensors go in
        without a copy; results are numpy; a GPU tensor is a typed error."""
        copies: list[Any] = []
        original = buffers.MlxBuffer.__dict__["copy_of"]

        def counted(cls: type, data: np.ndarray, code: int) -> Any:
            copies.append(data.shape)
            return original.__func__(cls, data, code)

        buffers.MlxBuffer.copy_of = classmethod(counted)  # type: ignore[method-assign,assignment]
        try:
            self._buffers_in()
        finally:
            buffers.MlxBuffer.copy_of = original  # type: ignore[method-assign]
        self.c.expect("buffers went in without a copy", not copies, f"copies of {copies}")

    def _buffers_in(self) -> None:
        rows = 4 * self.size
        data = [np.arange(rows, dtype=np.float32) * (r + 1) for r in range(self.size)]
        mine = data[self.rank]
        kinds: dict[str, Callable[[], Any]] = {
            "bytes": lambda: mine.tobytes(),
            "bytearray": lambda: bytearray(mine.tobytes()),
            "memoryview": lambda: memoryview(mine),
            "array.array": lambda: array.array("f", mine.tolist()),
            "DLPack": lambda: _DLPackOnly(mine.copy()),
        }
        for kind, make in kinds.items():
            as_float = kind in ("bytes", "bytearray")
            decode = (lambda a: np.asarray(a).view(np.float32)) if as_float else np.asarray
            for op in ("broadcast", "scatter", "all_to_all") + (() if as_float else ("all_sum",)):
                root = self.roots[-1]
                x = make()
                want = reference(op, data, self.rank, root) if op != "all_sum" else sum(data)
                got = self.call(op, x, root) if op != "all_sum" else self.g.all_sum(x)
                ok = self.c.expect(f"{op}({kind}) gives numpy", type(got) is np.ndarray, type(got).__name__)
                if ok:
                    self.c.expect_equal(f"{op}({kind}) values", decode(got), want)
        # Results sharing memory: the root's broadcast is its input; a DLPack out= is written in place.
        root = self.roots[-1]
        tensor = _DLPackOnly(data[self.rank].copy())
        got = self.g.broadcast(tensor, root)
        if self.rank == root:
            self.c.expect("the root's broadcast of a tensor is its memory", np.shares_memory(got, tensor.memory))
        out = _DLPackOnly(np.zeros(rows, np.float32))
        got = self.g.broadcast(tensor, root, out=out)
        self.c.expect("broadcast out=tensor shares its memory", np.shares_memory(got, out.memory))
        self.c.expect_equal("broadcast out=tensor values", out.memory, data[root])
        out = _DLPackOnly(np.zeros(rows, np.float32))
        self.g.all_to_all(tensor, out=out)
        self.c.expect_equal("all_to_all out=tensor values", out.memory, reference("all_to_all", data, self.rank, 0))
        self.c.expect("DLPack was asked for every tensor", tensor.exports >= 2 and out.exports == 1,
                      f"{tensor.exports} and {out.exports} exports")
        view = memoryview(bytearray(data[self.rank].tobytes())).cast("f")
        got = self.g.broadcast(view, root)
        if self.rank == root:
            self.c.expect("the root's broadcast of a memoryview is its memory", np.shares_memory(got, np.asarray(view)))
        gpu = _DLPackOnly(data[self.rank], device=(2, 1))
        self.c.expect_raises("a GPU DLPack tensor", InvalidArgumentError, lambda: self.g.broadcast(gpu, root), "cuda:1")
        self.c.expect_raises("a GPU DLPack tensor (all_sum)", InvalidArgumentError, lambda: self.g.all_sum(gpu), "cuda:1")
        self.c.expect_raises("a str", ArgumentTypeError, lambda: self.g.broadcast("abc", root), "expected")

    # -- errors -----------------------------------------------------------------

    def errors(self) -> None:
        """Typed errors before anything is sent; the world works afterwards."""
        g, x = self.g, np.arange(2 * self.size, dtype=np.float32)
        for bad in (-1, self.size, True, "0", None, 1.0):
            for op in ("broadcast", "gather", "scatter"):
                for kind, value in (("numpy", x), ("mlx", mx.array(x))):
                    self.c.expect_raises(f"{op}({kind}, root={bad!r})", InvalidRankError,
                                         lambda: getattr(g, op)(value, bad), "root")
        for op in ("scatter", "all_to_all"):
            for kind, value in (("numpy", np.ones(2 * self.size + 1)), ("mlx", mx.ones(2 * self.size + 1)), ("scalar", np.float32(1))):
                if self.size == 1 and kind != "scalar":
                    continue
                self.c.expect_raises(f"{op} of an indivisible {kind}", ShapeError, lambda: self.call(op, value, 0), "divisible")
        self.c.expect_raises("broadcast out= wrong shape", ShapeError, lambda: g.broadcast(x, 0, out=np.zeros(3, np.float32)), "out")
        self.c.expect_raises("broadcast out= an mx.array", InvalidArgumentError,
                             lambda: g.broadcast(mx.array(x), 0, out=np.zeros_like(x)), "out")
        self.c.expect_raises("broadcast out= an mx.array buffer", ArgumentTypeError,
                             lambda: g.broadcast(x, 0, out=mx.zeros(x.shape)), "out")
        self.c.expect_raises("broadcast stream= with numpy", InvalidArgumentError,
                             lambda: g.broadcast(x, 0, stream=mx.cpu), "stream")
        self.c.expect_raises("broadcast out= read-only", InvalidArgumentError,
                             lambda: g.broadcast(x, 0, out=memoryview(bytes(x.nbytes)).cast("f")), "read-only")
        if self.size > 1 and self.rank == 0:
            # Only rank 0 makes these calls: nothing may be sent.
            self.c.expect_raises("rank 0 alone: bad root", InvalidRankError, lambda: g.broadcast(x, self.size), "root")
            self.c.expect_raises("rank 0 alone: bad shape", ShapeError, lambda: g.scatter(np.ones(self.size + 1), 0), "divisible")
        data = self.inputs("int16", (3,))
        self.c.expect_equal("broadcast after the errors", g.broadcast(data[self.rank], self.roots[-1]), data[self.roots[-1]])

    # -- gradients --------------------------------------------------------------

    def gradients(self) -> None:
        """The gradient of each lazy form is the transposed collective
        (broadcast: sum onto the root; gather <-> scatter; all_to_all: itself),
        with and without mx.compile; jvp applies the operation to the tangent."""
        for op in ("broadcast", "gather", "scatter", "all_to_all"):
            root = self.roots[-1]
            shape = self.shape_of(op)
            xs = self.inputs("float32", shape, seed=5)
            out_shapes = [reference(op, xs, r, root).shape for r in range(self.size)]
            weights = [rank_data("float32", out_shapes[r], r, seed=6) for r in range(self.size)]
            want = self._transpose(op, weights, root, shape)
            w = mx.array(weights[self.rank])

            def loss(a: mx.array) -> mx.array:
                return (self.call(op, a, root) * w).sum()

            x = mx.array(xs[self.rank])
            self.c.expect_equal(f"grad {op}", mx.grad(loss)(x), want, tolerance=1e-5)
            # Of an input derived inside the traced function (traced too).
            self.c.expect_equal(f"grad {op} of 3 x", mx.grad(lambda a: loss(a * 3))(x), want * 3, tolerance=1e-4)
            self.c.expect_equal(f"grad {op} compiled", mx.compile(mx.grad(loss))(x), want, tolerance=1e-5)
            tangent = [rank_data("float32", shape, r, seed=7) for r in range(self.size)]
            _, (jvp,) = mx.jvp(lambda a: self.call(op, a, root), [x], [mx.array(tangent[self.rank])])
            self.c.expect_equal(f"jvp {op}", jvp, reference(op, tangent, self.rank, root), tolerance=1e-5)
            compiled = mx.compile(lambda a: self.call(op, a, root) * 2)
            self.c.expect_equal(f"compiled {op}", compiled(x), reference(op, xs, self.rank, root) * 2, tolerance=1e-5)

    def _transpose(self, op: str, weights: list[np.ndarray], root: int, shape: tuple[int, ...]) -> np.ndarray:
        """numpy's gradient of sum(w_r * op(x)_r) over ranks, for this rank's x."""
        rank, size = self.rank, self.size
        if size == 1:
            return weights[0].reshape(shape)
        if op == "broadcast":
            return sum(weights) if rank == root else np.zeros(shape, np.float32)
        if op == "scatter":
            return np.concatenate(weights) if rank == root else np.zeros(shape, np.float32)
        rows = shape[0] if op == "gather" else shape[0] // size
        if op == "gather":
            return weights[root][rank * rows : (rank + 1) * rows]
        return np.concatenate([w[rank * rows : (rank + 1) * rows] for w in weights])

    # -- objects ----------------------------------------------------------------

    def objects(self) -> None:
        """Nested JSON and bytes (up to 64 MiB) round-trip; non-JSON without
        pickle is a typed error on every rank; the world works afterwards."""
        big = int(self.c.option("object_mib", "64")) << 20
        value = {"step": 7, "nested": [1, 2.5, None, True, {"s": "ü", "l": []}], "r": "x" * 10}
        for root in self.roots:
            mine = dict(value, rank=self.rank)
            got = mlxdist.broadcast_object(mine, root)
            self.c.expect(f"broadcast_object JSON from {root}", got == dict(value, rank=root), repr(got)[:200])
            for n in (0, 1, FRAME - 16, FRAME - 15, 3 * FRAME + 5) + ((big,) if root == self.roots[-1] else ()):
                payload = _pattern(n, root)
                got = self.g.broadcast_object(payload if self.rank == root else None, root)
                self.c.expect(f"broadcast_object {n} bytes from {root}", got == payload, f"{type(got)} {len(got)}")
        everyone = mlxdist.all_gather_object({"rank": self.rank, "pad": "p" * (3000 * self.rank)})
        self.c.expect("all_gather_object JSON", everyone == [{"rank": r, "pad": "p" * (3000 * r)} for r in range(self.size)])
        gather_big = big if self.size <= 2 else big // 16
        for n in (5, FRAME, gather_big):
            got = mlxdist.all_gather_object(_pattern(n + self.rank, self.rank))
            self.c.expect(f"all_gather_object ~{n} bytes", got == [_pattern(n + r, r) for r in range(self.size)])
        got = mlxdist.broadcast_object((1, {2, 3}), self.roots[-1], pickle=True)
        self.c.expect("broadcast_object pickle=True", got == (1, {2, 3}), repr(got))
        self.c.expect_raises("broadcast_object of a tuple", ArgumentTypeError,
                             lambda: mlxdist.broadcast_object((1, 2) if self.rank == 0 else None, 0), "tuple")
        self.c.expect_raises("broadcast_object of an int key", ArgumentTypeError,
                             lambda: mlxdist.broadcast_object({1: 2}, 0), "key")
        bad_rank = self.size - 1
        self.c.expect_raises("all_gather_object of a set on one rank", ArgumentTypeError,
                             lambda: mlxdist.all_gather_object({1} if self.rank == bad_rank else [1]), f"rank {bad_rank}")
        self.c.expect_raises("pickle='yes'", ArgumentTypeError, lambda: mlxdist.broadcast_object(1, 0, pickle="yes"), "pickle")
        self.c.expect_raises("broadcast_object root=size", InvalidRankError, lambda: mlxdist.broadcast_object(1, self.size), "root")
        self.c.expect("objects after the errors", mlxdist.all_gather_object(self.rank) == list(range(self.size)))


@functools.lru_cache(maxsize=8)
def _pattern(n: int, seed: int) -> bytes:
    return (bytes([seed % 251]) + bytes(range(251))) * (n // 252) + bytes(range(n % 252))


class _DLPackOnly:
    """A tensor that only speaks DLPack. The producer is numpy's own
    (``ndarray.__dlpack__``: the capsules, their versions and deleters are numpy's);
    this class hides the ndarray's type so the eager path must take the DLPack route.

    Attributes:
        memory: The numpy array whose memory the tensor exports (to check sharing and results).
        exports: How many times a consumer asked for a capsule.
    """

    def __init__(self, data: np.ndarray, device: tuple[int, int] = (1, 0)) -> None:
        self.memory, self._device, self.exports = data, device, 0

    def __dlpack__(self, **kwargs: Any) -> Any:
        self.exports += 1
        return self.memory.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self._device


def run(checks: Checks) -> None:
    """Every check of this suite."""
    suite = Composed(checks)
    suite.values()
    suite.outs()
    suite.buffers_in()
    suite.errors()
    suite.gradients()
    suite.objects()
