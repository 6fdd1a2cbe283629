"""The bad-input battery: every misuse gets the right answer or its typed error.

A suite of the check harness (tests/support), run in process on the size-1
world and on 2 ranks of ring and MPI (one launch each). Each case either

- computes the right answer (checked against numpy, whose reference every rank
  computes locally), or
- raises the documented class, which also subclasses the matching builtin
  (TypeError, ValueError, MemoryError, NotImplementedError) and
  :class:`mlxdist.DistributedError`,

and after every case a collective still works (the world is not poisoned).
Symmetric cases are made by every rank. Asymmetric ones (only rank 0 makes
the bad call) must be refused before anything is sent: the follow-up
collective would otherwise pair with what rank 0 sent and come out wrong (or
the launch deadline would end a hang). Each rank prints one
``MISUSE rank=R cases=N`` line. (The cases are lambdas called at once, inside
the loop that binds their variables.)
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import mlx.core as mx
import numpy as np

import mlxdist
from mlxdist.group_record import record_of
import mlxdist.nn
from mlxdist.errors import (
    AllocationError,
    ArgumentTypeError,
    DistributedError,
    DtypeError,
    GroupClosedError,
    InvalidArgumentError,
    InvalidRankError,
    ShapeError,
    UnsupportedOperationError,
)
from support.checks import Checks

# The builtin each documented class must also be.
BUILTIN: dict[type, type] = {
    ArgumentTypeError: TypeError,
    DtypeError: TypeError,
    InvalidArgumentError: ValueError,
    InvalidRankError: ValueError,
    ShapeError: ValueError,
    GroupClosedError: ValueError,
    AllocationError: MemoryError,
    UnsupportedOperationError: NotImplementedError,
}
OPS = ("all_sum", "all_max", "all_min", "all_gather", "sum_scatter")
# More bytes than any address space: no allocation can succeed, whatever the
# overcommit policy (2**40 float32 might, virtually, with overcommit on).
HUGE = (2**31 - 1, 2**31 - 1)
NOT_ARRAYS: tuple[Any, ...] = ([1.0, 2.0], 3, 2.5, None, "abc", {"a": 1}, object())


class Misuse:
    """The cases, with the bookkeeping every case shares."""

    def __init__(self, checks: Checks) -> None:
        self.checks = checks
        self.group = checks.group
        self.rank = self.group.rank()
        self.size = self.group.size()
        self.cases = 0
        self.follow_ups = 0

    # -- bookkeeping ----------------------------------------------------------

    def alive(self, after: str) -> None:
        """A collective after a case: right, and the world not marked failed."""
        self.follow_ups += 1
        n, g = self.size, self.group
        x = np.array([self.rank + 1, self.follow_ups], np.int64)
        self.checks.expect_equal(f"{after}: then all_sum works", g.all_sum(x), [n * (n + 1) // 2, n * self.follow_ups])
        self.checks.expect(f"{after}: world not failed", record_of(g).world.lost is None, str(record_of(g).world.lost))

    def refused(self, name: str, cls: type, call: Callable[[], Any], match: str = "", follow: bool = True) -> None:
        """``call()`` raises ``cls`` (a DistributedError and its builtin), then the group works."""
        self.cases += 1
        error = self.checks.expect_raises(f"{name} -> {cls.__name__}", cls, call, match)
        if error is not None:
            builtin = BUILTIN[cls]
            self.checks.expect(
                f"{name}: is a {builtin.__name__} and a DistributedError",
                isinstance(error, builtin) and isinstance(error, DistributedError),
                type(error).__mro__.__repr__(),
            )
        if follow:
            self.alive(name)

    def right(
        self, name: str, call: Callable[[], Any], expected: Any, dtype: Any = None, kind: str | None = None
    ) -> Any:
        """``call()`` returns ``expected`` (numpy's answer), then the group works."""
        self.cases += 1
        try:
            got = call()
        except Exception as e:  # noqa: BLE001 - a failure of the case
            self.checks.expect(name, False, f"raised {type(e).__name__}: {e}")
            self.alive(name)
            return None
        self.checks.expect_equal(name, got, expected, dtype=dtype, kind=kind)
        self.alive(name)
        return got

    def only_rank0(self, name: str, cls: type, call: Callable[[], Any], match: str = "") -> None:
        """A bad call on rank 0 alone: refused before anything is sent."""
        if self.rank == 0:
            self.refused(f"rank 0 alone: {name}", cls, call, match, follow=False)
        self.alive(f"rank 0 alone: {name}")

    # -- data -----------------------------------------------------------------

    def data(self, rank: int, shape: tuple[int, ...] = (4,), dtype: Any = np.int32) -> np.ndarray:
        """Rank ``rank``'s input: small integers any rank can compute."""
        return (np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) % 7 + 3 * rank).astype(dtype)

    def reference(self, op: str, shape: tuple[int, ...] = (4,), dtype: Any = np.int32) -> np.ndarray:
        """numpy's answer for ``op`` over every rank's :meth:`data`."""
        return self._ref_of(op, lambda r: self.data(r, shape, dtype))

    # -- the cases ------------------------------------------------------------

    def not_arrays(self) -> None:
        """Lists, numbers, None, strings... where an array goes: ArgumentTypeError."""
        g = self.group
        for op in OPS:
            for bad in NOT_ARRAYS:
                what = type(bad).__name__
                self.refused(f"Group.{op}({what})", ArgumentTypeError, lambda: getattr(g, op)(bad), "expected")
                self.refused(f"mlxdist.{op}({what})", ArgumentTypeError, lambda: getattr(mlxdist, op)(bad), "expected")
        for bad in ([1, 2], None, 7):
            what = type(bad).__name__
            peer = (self.rank + 1) % self.size
            self.refused(
                f"send({what})", ArgumentTypeError if self.size > 1 else InvalidRankError, lambda: g.send(bad, peer)
            )
            self.refused(
                f"recv_like({what})",
                ArgumentTypeError if self.size > 1 else InvalidRankError,
                lambda: g.recv_like(bad, peer),
            )
        # Asymmetric: the peer never calls; nothing may be sent.
        if self.size > 1:
            self.only_rank0("send(list)", ArgumentTypeError, lambda: g.send([1.0], 1))

    def dtypes(self) -> None:
        """Dtypes MLX cannot move are DtypeErrors; those it can keep their dtype."""
        g = self.group
        bad = {
            "object": np.array([1, "a"], dtype=object),
            "complex128": np.ones(3, np.complex128),
            "longdouble": np.ones(3, np.longdouble),
            "unicode": np.array(["ab", "c"]),
            "datetime": np.array(["2020-01-01"], dtype="datetime64[D]"),
            "structured": np.zeros(2, dtype=[("a", np.int32), ("b", np.float32)]),
            "big-endian": np.ones(3, ">i4"),
        }
        for name, x in bad.items():
            for op in OPS:
                if op == "sum_scatter" and x.shape[0] % self.size:
                    continue
                self.refused(f"{op} of {name}", DtypeError, lambda: getattr(g, op)(x))
        if self.size > 1:
            self.only_rank0("send of complex128", DtypeError, lambda: g.send(np.ones(2, np.complex128), 1))
        # float64: kept on both paths (mx.distributed keeps it).
        for op in ("all_sum", "all_max", "all_gather"):
            ref = self.reference(op, (4,), np.float64) + 0.25
            if op == "all_sum":
                ref = ref + 0.25 * (self.size - 1)
            x = self.data(self.rank, (4,), np.float64) + 0.25
            self.right(
                f"{op} of mx float64 stays float64",
                lambda: getattr(g, op)(mx.array(x, dtype=mx.float64)),
                ref,
                dtype=mx.float64,
            )
            self.right(f"{op} of numpy float64 stays float64", lambda: getattr(g, op)(x), ref, dtype=np.float64)
        # bool reductions: or / max / min (MPI has no arithmetic on bools).
        flags = np.array([True, False, self.rank == 0, self.rank == 1])
        everyone = [np.array([True, False, r == 0, r == 1]) for r in range(self.size)]
        for op, ref in (
            ("all_sum", np.any(everyone, 0)),
            ("all_max", np.any(everyone, 0)),
            ("all_min", np.all(everyone, 0)),
        ):
            self.right(f"{op} of numpy bool", lambda: getattr(g, op)(flags), ref, dtype=np.bool_)
            self.right(f"{op} of mx bool", lambda: getattr(g, op)(mx.array(flags)), ref, dtype=mx.bool_)

    def layouts(self) -> None:
        """Non-contiguous, Fortran-ordered, empty, 0-d and scalar inputs: right answers."""
        g = self.group
        for op in OPS:
            wide = self.data(self.rank, (4, 6))
            self.right(
                f"{op} of a strided view",
                lambda: getattr(g, op)(wide[:, ::2]),
                self._ref_of(op, lambda r: self.data(r, (4, 6))[:, ::2]),
            )
            self.right(
                f"{op} of a transpose",
                lambda: getattr(g, op)(wide.T),
                self._ref_of(op, lambda r: self.data(r, (4, 6)).T),
            )
            self.right(
                f"{op} of a Fortran array",
                lambda: getattr(g, op)(np.asfortranarray(wide)),
                self._ref_of(op, lambda r: self.data(r, (4, 6))),
            )
            self.right(
                f"{op} of an empty array",
                lambda: getattr(g, op)(np.zeros((0, 3), np.float32)),
                self._ref_of(op, lambda r: np.zeros((0, 3), np.float32)),
            )
            self.right(
                f"{op} of a reversed view",
                lambda: getattr(g, op)(wide[::-1]),
                self._ref_of(op, lambda r: self.data(r, (4, 6))[::-1]),
            )
            frozen = self.data(self.rank, (4, 6))
            frozen.flags.writeable = False
            self.right(
                f"{op} of a read-only array",
                lambda: getattr(g, op)(frozen),
                self._ref_of(op, lambda r: self.data(r, (4, 6))),
            )
            raw = np.zeros(4 * 6 * 4 + 1, np.uint8)
            odd = raw[1:].view(np.int32).reshape(4, 6)  # misaligned for int32
            odd[:] = wide
            self.right(
                f"{op} of a misaligned array",
                lambda: getattr(g, op)(odd),
                self._ref_of(op, lambda r: self.data(r, (4, 6))),
            )
            self.right(
                f"{op} of bytes viewed read-only",
                lambda: getattr(g, op)(np.frombuffer(wide.tobytes(), np.int32).reshape(4, 6)),
                self._ref_of(op, lambda r: self.data(r, (4, 6))),
            )
        for op in ("all_sum", "all_max", "all_min", "all_gather"):
            self.right(
                f"{op} of a 0-d array",
                lambda: getattr(g, op)(np.array(self.rank + 1, np.int16)),
                self._ref_of(op, lambda r: np.array(r + 1, np.int16)),
            )
            self.right(
                f"{op} of a numpy scalar",
                lambda: getattr(g, op)(np.int16(self.rank + 1)),
                self._ref_of(op, lambda r: np.array(r + 1, np.int16)),
            )
        self.refused(
            "sum_scatter of a 0-d array", ShapeError, lambda: g.sum_scatter(np.array(1.0, np.float32)), "dimension"
        )
        self.refused("lazy sum_scatter of a 0-d array", ShapeError, lambda: g.sum_scatter(mx.array(1.0)), "dimension")
        if self.size > 1:
            self.refused(
                "sum_scatter of an indivisible axis",
                ShapeError,
                lambda: g.sum_scatter(np.ones(self.size + 1, np.float32)),
                "divisible",
            )
            self.refused(
                "lazy sum_scatter of an indivisible axis",
                ShapeError,
                lambda: g.sum_scatter(mx.ones(self.size + 1)),
                "divisible",
            )
            self.only_rank0(
                "sum_scatter of an indivisible axis",
                ShapeError,
                lambda: g.sum_scatter(np.ones(self.size + 1, np.float32)),
            )
        # A result axis past MLX's 32-bit dimensions (no bytes: a zero-width array).
        rows = 2**31 // self.size + 1 if self.size > 1 else 2**31
        if self.size > 1:
            huge = np.zeros((rows, 0), np.float32)
            self.refused("all_gather past int32 rows", ShapeError, lambda: g.all_gather(huge), "32-bit")
            self.refused(
                "lazy all_gather past int32 rows", ShapeError, lambda: g.all_gather(mx.zeros((rows, 0))), "32-bit"
            )
            self.only_rank0("all_gather past int32 rows", ShapeError, lambda: g.all_gather(huge))

    def _ref_of(self, op: str, make: Callable[[int], np.ndarray]) -> np.ndarray:
        """numpy's answer for ``op`` when rank ``r``'s input is ``make(r)``."""
        inputs = [make(r) for r in range(self.size)]
        if self.size == 1:
            return inputs[0]  # a size-1 group passes its input through, as MLX's does
        if op == "all_sum":
            return np.sum(inputs, axis=0).astype(inputs[0].dtype)
        if op == "all_max":
            return np.max(inputs, axis=0)
        if op == "all_min":
            return np.min(inputs, axis=0)
        if op == "all_gather":
            return np.concatenate([np.atleast_1d(x) for x in inputs])
        total = np.sum(inputs, axis=0).astype(inputs[0].dtype)
        n = total.shape[0] // self.size
        return total[self.rank * n : (self.rank + 1) * n]

    def outs(self) -> None:
        """``out=``: wrong shape, dtype, kind, read-only: refused before anything is sent;
        strided, overlapping and in-place outs: right answers."""
        g = self.group
        x = self.data(self.rank, (4,))
        cases = [
            ("wrong shape", ShapeError, lambda op: np.zeros(5, np.int32)),
            ("wrong dtype", DtypeError, lambda op: np.zeros(self._out_len(op), np.int64)),
            ("read-only", InvalidArgumentError, lambda op: self._read_only(self._out_len(op))),
            ("a list", ArgumentTypeError, lambda op: [0] * self._out_len(op)),
            ("an mx.array", ArgumentTypeError, lambda op: mx.zeros(self._out_len(op), mx.int32)),
        ]
        for op in OPS:
            if op == "sum_scatter" and 4 % self.size:
                continue
            for name, cls, make in cases:
                self.refused(f"{op} out= {name}", cls, lambda: getattr(g, op)(x, out=make(op)), "out")
                if self.size > 1:
                    self.only_rank0(f"{op} out= {name}", cls, lambda: getattr(g, op)(x, out=make(op)), "out")
            self.refused(
                f"{op} of an mx.array with out=",
                InvalidArgumentError,
                lambda: getattr(g, op)(mx.array(x), out=np.zeros(self._out_len(op), np.int32)),
                "out",
            )
            # A strided (non-contiguous) out: written through a copy.
            big = np.full(2 * self._out_len(op), -1, np.int32)
            ref = self.reference(op)
            got = self.right(f"{op} into a strided out", lambda: getattr(g, op)(x, out=big[::2]), ref)
            self.checks.expect(f"{op} strided out left the gaps alone", bool(np.all(big[1::2] == -1)))
            del got
        # out overlapping x, for a reduction: a partial overlap and x itself.
        memory = np.zeros(6, np.int32)
        memory[0:4] = x
        self.right(
            "all_sum with out partly overlapping x",
            lambda: g.all_sum(memory[0:4], out=memory[2:6]),
            self.reference("all_sum"),
        )
        y = x.copy()
        self.right("all_sum in place (out=x)", lambda: g.all_sum(y, out=y), self.reference("all_sum"))
        self.checks.expect_equal("all_sum in place wrote x", y, self.reference("all_sum"))
        # The in-place all_gather idiom, plain numpy and registered memory.
        for name, alloc in (("numpy", np.zeros), ("registered", mlxdist.zeros)):
            out = alloc(4 * self.size, np.int32)
            out[4 * self.rank : 4 * self.rank + 4] = x
            self.right(
                f"in-place all_gather ({name})",
                lambda: g.all_gather(out[4 * self.rank : 4 * self.rank + 4], out=out),
                self.reference("all_gather"),
            )
        # Only rank 0 gathers in place; the other passes a separate out: both right.
        out = np.zeros(4 * self.size, np.int32)
        if self.rank == 0:
            out[0:4] = x
            mine = out[0:4]
        else:
            mine = x
        self.right(
            "in-place all_gather on rank 0 alone", lambda: g.all_gather(mine, out=out), self.reference("all_gather")
        )
        # recv's out
        if self.size > 1:
            peer = 1 - self.rank if self.size == 2 else (self.rank + 1) % self.size
            for name, cls, bad in (
                ("wrong shape", ShapeError, np.zeros(5, np.int32)),
                ("wrong dtype", DtypeError, np.zeros(4, np.float32)),
                ("read-only", InvalidArgumentError, self._read_only(4)),
            ):
                self.only_rank0(f"recv out= {name}", cls, lambda: g.recv((4,), np.int32, peer, out=bad), "out")

    def _out_len(self, op: str) -> int:
        return 4 * self.size if op == "all_gather" else 4 // self.size if op == "sum_scatter" else 4

    @staticmethod
    def _read_only(n: int) -> np.ndarray:
        a = np.zeros(n, np.int32)
        a.flags.writeable = False
        return a

    def streams(self) -> None:
        """``stream=``: numpy inputs take none; mx.arrays take a Stream or Device."""
        g = self.group
        for op in OPS:
            if op == "sum_scatter" and 4 % self.size:
                continue
            self.refused(
                f"{op} of numpy with stream=",
                InvalidArgumentError,
                lambda: getattr(g, op)(np.ones(4, np.float32), stream=mx.cpu),
                "stream",
            )
            self.refused(
                f"{op} of mx with stream='cpu'",
                ArgumentTypeError,
                lambda: getattr(g, op)(mx.ones(4), stream="cpu"),
                "stream",
            )
            self.refused(
                f"{op} of mx with stream=0", ArgumentTypeError, lambda: getattr(g, op)(mx.ones(4), stream=0), "stream"
            )
            if not mx.is_available(mx.gpu):
                self.refused(
                    f"{op} of mx with stream=mx.gpu (no GPU here)",
                    InvalidArgumentError,
                    lambda: getattr(g, op)(mx.ones(4), stream=mx.gpu),
                    "device",
                )
            self.right(
                f"{op} of mx with stream=mx.cpu",
                lambda: getattr(g, op)(mx.array(self.data(self.rank)), stream=mx.cpu),
                self.reference(op),
                kind="mlx",
            )

    def peers(self) -> None:
        """Ranks for send/recv: not integers, out of range, this rank, size 1."""
        g = self.group
        x = np.ones(2, np.float32)
        bad_peers = [True, False, -1, self.size, 2**70, 1.0, "1", None, self.rank]
        for peer in bad_peers:
            what = repr(peer) if peer is not self.rank or isinstance(peer, bool) else "self"
            self.refused(f"send to {what}", InvalidRankError, lambda: g.send(x, peer))
            self.refused(f"lazy send to {what}", InvalidRankError, lambda: g.send(mx.array(x), peer))
            self.refused(f"recv from {what}", InvalidRankError, lambda: g.recv((2,), np.float32, peer))
            self.refused(f"lazy recv from {what}", InvalidRankError, lambda: g.recv((2,), mx.float32, peer))
            self.refused(f"recv_like from {what}", InvalidRankError, lambda: g.recv_like(x, peer))
            self.refused(f"mlxdist.send to {what}", InvalidRankError, lambda: mlxdist.send(x, peer))
            self.refused(f"mlxdist.recv from {what}", InvalidRankError, lambda: mlxdist.recv((2,), np.float32, peer))
        if self.size > 1:
            self.only_rank0("send to True", InvalidRankError, lambda: g.send(x, True))
            self.only_rank0("send to self", InvalidRankError, lambda: g.send(x, 0))
            # A numpy integer is a rank.
            self.cases += 1
            if self.rank == 0:
                g.send(x * 5, np.int64(1))
            elif self.rank == 1:
                got = g.recv(np.int32(2), np.float32, np.int64(0))
                self.checks.expect_equal("recv from a numpy integer rank", got, x * 5)
            self.alive("send/recv numpy integer ranks")

    def recv_args(self) -> None:
        """recv's shape and dtype: refused on the receiving rank alone, before it waits."""
        g = self.group
        peer = (self.rank + 1) % self.size if self.size > 1 else 0
        shapes = [(-1,), (2, -3), (1.5,), "abc", None, (True,), (2**31,), [[2]], (2**16,) * 4]
        for shape in shapes:
            cls = ShapeError if self.size > 1 else InvalidRankError
            self.refused(f"recv shape {shape!r}", cls, lambda: g.recv(shape, np.float32, peer))
            self.refused(f"lazy recv shape {shape!r}", cls, lambda: g.recv(shape, mx.float32, peer))
        for dtype in (None, "notadtype", object, np.complex128, 3.5, "U4"):
            cls = DtypeError if self.size > 1 else InvalidRankError
            self.refused(f"recv dtype {dtype!r}", cls, lambda: g.recv((2,), dtype, peer))
        cls = InvalidArgumentError if self.size > 1 else InvalidRankError
        self.refused(
            "recv of an mlx dtype with out=", cls, lambda: g.recv((2,), mx.float32, peer, out=np.zeros(2, np.float32))
        )
        self.refused("recv of a numpy dtype with stream=", cls, lambda: g.recv((2,), np.float32, peer, stream=mx.cpu))
        self.refused(
            "recv_like of an mx.array with out=",
            cls,
            lambda: g.recv_like(mx.ones(2), peer, out=np.zeros(2, np.float32)),
        )
        self.refused("send of numpy with stream=", cls, lambda: g.send(np.ones(2), peer, stream=mx.cpu))
        if self.size > 1:
            self.only_rank0(
                "send of numpy with stream=",
                InvalidArgumentError,
                lambda: g.send(np.ones(2), 1, stream=mx.cpu),
                "stream",
            )
            self.only_rank0("recv dtype None", DtypeError, lambda: g.recv((2,), None, 1), "dtype")
            self.only_rank0("recv negative shape", ShapeError, lambda: g.recv((-2,), np.float32, 1), "-2")
            # A receive too large to allocate: MemoryError-typed, before waiting on the peer.
            self.only_rank0(
                "recv of 2**62 elements", AllocationError, lambda: g.recv(HUGE, np.float32, 1), "allocate"
            )

    def split_args(self) -> None:
        """split's color and key; split where the backend has none."""
        g = self.group
        can_split = g.backend is not None and "split" in record_of(g).caps.native
        for color in (-1, 2**40, "a", True, 1.5, None):
            self.refused(f"split(color={color!r})", InvalidArgumentError, lambda: g.split(color), "color")
        for key in (-2, 2**40, "k", 0.5):
            self.refused(f"split(0, key={key!r})", InvalidArgumentError, lambda: g.split(0, key), "key")
        if not can_split:
            self.refused("split where the backend cannot", UnsupportedOperationError, lambda: g.split(0), "split")
        else:
            sub = g.split(self.rank % 2, key=self.size - self.rank)
            members = [r for r in range(self.size) if r % 2 == self.rank % 2]
            self.right(
                "split with a key reorders",
                lambda: sub.all_gather(np.array([self.rank], np.int32)),
                sorted(members, reverse=True),
            )
            sub.close()
            self.refused("a closed split group", GroupClosedError, lambda: sub.all_sum(np.ones(1)), "closed")
            self.refused("a closed split group (lazy)", GroupClosedError, lambda: sub.all_sum(mx.ones(1)), "closed")

    def closed_groups(self) -> None:
        """A second handle on the world, closed: every operation says so."""
        other = mlxdist.init()
        other.close()
        other.close()  # idempotent
        peer = (self.rank + 1) % self.size
        for op in OPS:
            self.refused(
                f"{op} on a closed group", GroupClosedError, lambda: getattr(other, op)(np.ones(self.size)), "closed"
            )
            self.refused(
                f"{op} on a closed group (lazy)",
                GroupClosedError,
                lambda: getattr(other, op)(mx.ones(self.size)),
                "closed",
            )
        self.refused("barrier on a closed group", GroupClosedError, other.barrier, "closed")
        if other.backend is not None and "split" in record_of(other).caps.native:
            self.refused("split of a closed group", GroupClosedError, lambda: other.split(0), "closed")
        if self.size > 1:
            self.refused("send on a closed group", GroupClosedError, lambda: other.send(np.ones(1), peer), "closed")
            self.refused(
                "recv on a closed group", GroupClosedError, lambda: other.recv((1,), np.float32, peer), "closed"
            )

    def groups_and_init(self) -> None:
        """group= and init()'s arguments."""
        bad_groups = ["world", 1, object()]
        try:
            bad_groups.append(mx.distributed.init())
        except Exception:  # noqa: BLE001 - mx.distributed's group is only one more bad kind
            pass
        for bad in bad_groups:
            what = type(bad).__name__
            for op in OPS:
                self.refused(
                    f"mlxdist.{op}(group={what})",
                    ArgumentTypeError,
                    lambda: getattr(mlxdist, op)(np.ones(4), group=bad),
                    "group",
                )
            self.refused(
                f"mlxdist.barrier(group={what})", ArgumentTypeError, lambda: mlxdist.barrier(group=bad), "group"
            )
            self.refused(
                f"mlxdist.send(group={what})",
                ArgumentTypeError,
                lambda: mlxdist.send(np.ones(1), 0, group=bad),
                "group",
            )
            self.refused(
                f"mlxdist.recv(group={what})",
                ArgumentTypeError,
                lambda: mlxdist.recv((1,), np.float32, 0, group=bad),
                "group",
            )
            self.refused(
                f"nn.average_gradients(group={what})",
                ArgumentTypeError,
                lambda: mlxdist.nn.average_gradients({"w": mx.ones(2)}, group=bad),
                "group",
            )
        self.refused(
            "init('carrier-pigeon')", InvalidArgumentError, lambda: mlxdist.init("carrier-pigeon"), "unknown backend"
        )
        self.refused("init('')", InvalidArgumentError, lambda: mlxdist.init(""), "backend")
        for bad in (123, None, 1.5, ["ring"]):
            self.refused(f"init({bad!r})", ArgumentTypeError, lambda: mlxdist.init(bad), "backend")
            self.refused(f"is_available({bad!r})", ArgumentTypeError, lambda: mlxdist.is_available(bad), "backend")
        for bad in (123, "MLX_RANK", ["MLX_RANK"]):
            self.refused(f"detect_backend({bad!r})", ArgumentTypeError, lambda: mlxdist.detect_backend(bad), "environ")
        for bad in ("yes", 1, None):
            self.refused(f"init(strict={bad!r})", ArgumentTypeError, lambda: mlxdist.init(strict=bad), "strict")
        again = mlxdist.init()
        self.checks.expect("init() again: the same world", (again.rank(), again.size()) == (self.rank, self.size))
        self.right(
            "init() again: its group works", lambda: again.all_sum(np.ones(2, np.int8)), np.full(2, self.size, np.int8)
        )

    def buffers(self) -> None:
        """empty/zeros/asarray/set_cache_limit arguments."""
        for make in (mlxdist.empty, mlxdist.zeros):
            name = make.__name__
            for shape in (-1, (2, -1), "ab", 1.5, (True,), None, (2**31,), (2**16,) * 4, (2**21,) * 3):
                self.refused(f"{name}({shape!r})", ShapeError, lambda: make(shape), "shape")
            for dtype in (None, "notadtype", object, np.complex128, mx.float32, 2):
                self.refused(f"{name}(4, {dtype!r})", DtypeError, lambda: make(4, dtype), "dtype")
            self.refused(
                f"{name} of 2**62 float32", AllocationError, lambda: make(HUGE, np.float32), "allocate"
            )
        self.right("zeros(3, int16)", lambda: mlxdist.zeros(3, np.int16), np.zeros(3, np.int16), dtype=np.int16)
        for bad, cls in (
            (None, DtypeError),
            ("abc", DtypeError),
            ([1, "a"], DtypeError),
            (mx.ones(2, mx.bfloat16), DtypeError),
            (np.ones(2, np.complex128), DtypeError),
            ({"a": 1}, DtypeError),
        ):
            self.refused(f"asarray({type(bad).__name__})", cls, lambda: mlxdist.asarray(bad), "")
        self.right("asarray(list)", lambda: mlxdist.asarray([1, 2, 3]), np.array([1, 2, 3]))
        self.right("asarray(strided)", lambda: mlxdist.asarray(np.arange(10.0)[::3]), np.arange(10.0)[::3])
        self.right("asarray(mx.array)", lambda: mlxdist.asarray(mx.arange(3)), np.arange(3, dtype=np.int32))
        self.checks.expect("is_registered(list) is False", mlxdist.is_registered([1]) is False)
        for bad, cls in (
            (-1, InvalidArgumentError),
            ("big", ArgumentTypeError),
            (1.5, ArgumentTypeError),
            (None, ArgumentTypeError),
            (True, ArgumentTypeError),
        ):
            self.refused(f"set_cache_limit({bad!r})", cls, lambda: mlxdist.set_cache_limit(bad), "limit")
        previous = mlxdist.set_cache_limit(np.int64(1 << 20))
        self.checks.expect("set_cache_limit(np.int64) returns the previous limit", previous == 512 << 20, str(previous))
        mlxdist.set_cache_limit(previous)
        self.cases += 1

    def gradients(self) -> None:
        """nn.average_gradients' arguments; a right average afterwards."""
        grads = {"w": mx.array(self.data(self.rank, (3,), np.float32)), "b": [mx.ones(2) * (self.rank + 1)]}
        avg = mlxdist.nn.average_gradients
        self.refused("average_gradients of numpy leaves", ArgumentTypeError, lambda: avg({"w": np.ones(2)}), "leaf")
        self.refused("average_gradients of int leaves", DtypeError, lambda: avg({"w": mx.ones(2, mx.int32)}), "dtype")
        for bad in (-1, "big", 1.5, None, True):
            cls = InvalidArgumentError
            self.refused(
                f"average_gradients(all_reduce_size={bad!r})",
                cls,
                lambda: avg(grads, all_reduce_size=bad),
                "all_reduce_size",
            )
        for bad in (mx.int32, "nope", 3, np.float32):
            self.refused(
                f"average_gradients(communication_type={bad!r})",
                DtypeError,
                lambda: avg(grads, communication_type=bad),
                "communication_type",
            )
        for bad in (-1.0, "1", None, float("nan"), True):
            self.refused(
                f"clip_grad_norm_sharded(max_norm={bad!r})",
                InvalidArgumentError,
                lambda: mlxdist.nn.clip_grad_norm_sharded(grads, bad),
                "max_norm",
            )
        self.refused(
            "clip_grad_norm_sharded of a list leaf",
            ArgumentTypeError,
            lambda: mlxdist.nn.clip_grad_norm_sharded({"w": [1.0]}, 1.0),
            "leaf",
        )
        self.refused("sum_gradients(group='x')", ArgumentTypeError, lambda: mlxdist.nn.sum_gradients("x"), "group")
        n = self.size
        expected_w = np.mean([self.data(r, (3,), np.float32) for r in range(n)], axis=0)
        expected_b = np.full(2, (n + 1) / 2, np.float32)
        self.cases += 1
        out = avg(grads, all_reduce_size=0)
        self.checks.expect_equal("average_gradients after the misuse", out["w"], expected_w, tolerance=1e-6)
        self.checks.expect_equal("average_gradients (list leaf)", out["b"][0], expected_b, tolerance=1e-6)
        self.alive("average_gradients")

    def threads(self, n_threads: int = 8, rounds: int = 5) -> None:
        """8 threads on one group, each issuing the same collectives (any
        interleaving matches across ranks); bad calls in between do not disturb them."""
        g = self.group
        errors: list[str] = []
        expected = np.full(16, self.size * (self.size + 1) // 2, np.int32)

        def work(i: int) -> None:
            try:
                for _ in range(rounds):
                    got = g.all_sum(np.full(16, self.rank + 1, np.int32))
                    if not np.array_equal(got, expected):
                        errors.append(f"thread {i}: {got[:3]}")
                    try:
                        g.all_sum([1, 2])
                        errors.append(f"thread {i}: a list was accepted")
                    except ArgumentTypeError:
                        pass
            except Exception as e:  # noqa: BLE001 - reported as a failure
                errors.append(f"thread {i}: {type(e).__name__}: {e}")

        workers = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(60)
        self.cases += 1
        self.checks.expect("8 threads finished", not any(t.is_alive() for t in workers))
        self.checks.expect("8 threads on one group: right sums, typed errors", not errors, "; ".join(errors[:3]))
        self.alive("8 threads")


def run(checks: Checks) -> None:
    """Every misuse case, then a summary line with the number of cases."""
    m = Misuse(checks)
    m.not_arrays()
    m.dtypes()
    m.layouts()
    m.outs()
    m.streams()
    m.peers()
    m.recv_args()
    m.split_args()
    m.closed_groups()
    m.groups_and_init()
    m.buffers()
    m.gradients()
    m.threads()
    print(f"MISUSE rank={m.rank} size={m.size} cases={m.cases}", flush=True)
