"""The watchdog: one per world, it guards every blocking call of the world.

Every blocking call is registered (:meth:`Watchdog.enter`, :meth:`Watchdog.leave`);
a call still running at its deadline, a peer whose connection closes or whose
heartbeats stop, or a mismatch found by the agreement check fails the world on
every rank, and the calls still blocked are interrupted (see :mod:`mlxdist.deadline`).
"""

from __future__ import annotations

import atexit
import faulthandler
import itertools
import os
import sys
import threading
import time
from typing import Any, Callable, Mapping

from mlxdist._sidechannel import Link, Store
from mlxdist.deadline.teardown import shutdown_sockets, write_report
from mlxdist.deadline.settings import UNSET, Settings
from mlxdist.dtypes import name_of_code
from mlxdist.errors import (
    CommunicationError,
    DeadlineExceeded,
    DistributedError,
    MismatchError,
    PeerLostError,
)

_monotonic = time.monotonic

__all__ = ["JOB_ABORT_EXIT", "Watchdog", "group_size"]

JOB_ABORT_EXIT = 75
"""Exit status of a rank the watchdog ends because a blocked call cannot be interrupted."""

# After the world fails, how long a blocked call may take to return on its
# own before the process is ended (MPI cannot be interrupted; ring normally
# returns within milliseconds of its connections closing).
_GRACE = {"mpi": 0.2, "ring": 3.0}
_TICK = 0.05
_HEARTBEAT = 0.5
# How long a rank waits for the store to relay a failure it observed (so that
# every rank reports the same cause) before deciding alone.
_RELAY_WAIT = 1.0
# Interpreter exit after init is bounded by this many seconds (MPI
# finalisation or a group release waiting on a dead peer). The bound starts
# when init's exit hook runs: exit hooks registered before init run after it
# and count against it.
_EXIT_BOUND = 30.0
# Rank 0 serves the side channel: at exit it waits this long for the others to leave.
_DRAIN = 2.0


class _Active:
    """One blocking call in progress, registered with the watchdog."""

    __slots__ = ("op", "group", "seq", "start", "deadline", "in_check")

    def __init__(self, op: str, group: Any, seq: int, start: float, deadline: float | None) -> None:
        self.op = op
        self.group = group
        self.seq = seq
        self.start = start
        self.deadline = deadline
        self.in_check = False


class Watchdog:
    """Guards every blocking call of one world.

    Built by :func:`before_init` or :func:`after_init`; the eager gate registers
    each C call with :meth:`enter` and :meth:`leave`, :func:`evaluate` each ``mx.eval``.

    Args:
        backend: ``"ring"`` or ``"mpi"``.
        rank: This rank in the world.
        size: The world size.
        settings: Timeout and check.
        ring_peers: For ring, every ``(ip, port)`` of the hostfile: the
            backend's sockets are the ones connected to or accepted on these.

    Attributes:
        abandon_waits: Called once the ring's connections were shut down, to end
            the waits the backend might never finish (the world that owns the
            watchdog hands in the C layer's ``mlxdist_abandon_waits``).
        on_failure: Called with the failure when the world fails, before the
            blocked calls are interrupted (see :func:`mlxdist.deadline.on_failure`).
    """

    def __init__(
        self, backend: str, rank: int, size: int, settings: Settings, ring_peers: set[tuple[str, int]]
    ) -> None:
        self.backend = backend
        self.rank = rank
        self.size = size
        self.settings = settings
        self.ring_peers = ring_peers
        self.link: Link | None = None
        self.store: Store | None = None
        self.failure: DistributedError | None = None
        self.failure_kind: str | None = None
        self.gone: set[int] = set()
        self.seq = 0
        self._counter = itertools.count(1)
        self.active: dict[int, _Active] = {}
        self.overrides: dict[int, float | None] = {}
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.check_reply: dict[int, bool] = {}
        self.relayed = threading.Event()
        self._stop = False
        self._interrupted = False
        self.abandon_waits: Callable[[], Any] | None = None
        self.on_failure: list[Callable[[DistributedError], Any]] = []

    # -- life ----------------------------------------------------------------

    def run(self) -> None:
        """Start the timer thread and the side channel reader."""
        assert self.link is not None
        self.link.start_reader()
        threading.Thread(target=self._tick, name="mlxdist-watchdog", daemon=True).start()
        atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        # A clean exit: peers must not wait for this rank any more, and this
        # process's own teardown (MPI finalisation, group release) must not
        # block forever on a peer that is gone.
        self._stop = True
        if self.link is not None:
            self.link.send({"t": "bye"})
        faulthandler.dump_traceback_later(_EXIT_BOUND, exit=True)
        if self.store is not None:
            self.store.drain(_DRAIN)

    # -- registration of calls ----------------------------------------------

    def raise_if_failed(self, op: str = "operation", description: Any = None) -> None:
        """Raise the world's failure, if it failed, naming ``op`` (the call refused)."""
        failure = self.failure
        if failure is not None:
            where = "" if description is None else f" on {description!r}"
            raise type(failure)(f"{op}{where} on rank {self.rank}: this world already failed: {failure}")

    def enter(
        self,
        op: str,
        group: Any,
        description: Any,
        signature: tuple[int, tuple[int, ...] | None, int | None] | None = None,
    ) -> _Active:
        """Register a blocking call; raise at once if the world failed.

        Args:
            op: The operation (``all_sum``, ``send``, ``eval`` ...).
            group: The group object (for its timeout override), or None.
            description: The group (or its description), formatted only in messages.
            signature: ``(dtype code, shape, peer)`` for the agreement check, or
                None to skip it.

        Returns:
            The registration, to pass to :meth:`leave`.

        Raises:
            DeadlineExceeded, PeerLostError, MismatchError: the world failed.
        """
        if self.failure is not None:
            self.raise_if_failed(op, description)
        if self.gone and group is not None and group_size(group) == self.size:
            raise PeerLostError(
                f"{op} on {description}: rank(s) {sorted(self.gone)} already left the job; "
                "the operation could never complete"
            )
        timeout = self.settings.timeout
        if self.overrides and group is not None:
            override = self.overrides.get(id(group), UNSET)
            if override is not UNSET:
                timeout = override
        now = _monotonic()
        # Lock-free: next() on the counter and the dict's item assignment are
        # each atomic under the GIL, and readers copy the dict's values in one
        # step (list(...)). This runs around every eager call.
        seq = self.seq = next(self._counter)
        entry = _Active(op, description, seq, now, None if timeout is None else now + timeout)
        self.active[id(entry)] = entry
        if signature is not None and self.settings.check and group_size(group) == self.size:
            entry.in_check = True
            try:
                self._agree(entry, signature)
            except BaseException:
                self.leave(entry)
                raise
            entry.in_check = False
        return entry

    def leave(self, entry: _Active) -> None:
        """Unregister a call."""
        self.active.pop(id(entry), None)

    def translate(self, entry: _Active, exc: BaseException) -> DistributedError | None:
        """The typed error to raise in place of ``exc`` (a failure inside a registered call).

        When the backend reports a lost connection before the side channel has
        said why, this waits briefly for the cause, so every rank names the
        same culprit.

        Returns:
            The error to raise, or None to let ``exc`` through.
        """
        if not (isinstance(exc, CommunicationError) or type(exc) is RuntimeError):
            return None
        if self.failure is None:
            if self.link is not None:
                self.link.send({"t": "abort", "kind": "lost", "culprit": None, "seq": entry.seq, "op": entry.op,
                                "message": f"rank {self.rank}'s {entry.op} #{entry.seq} failed in the backend: {exc}"})
            self.relayed.wait(_RELAY_WAIT)
        if self.failure is None:
            return None
        return self._error_for(entry, self.failure_kind or "lost", str(self.failure))

    # -- agreement check -------------------------------------------------------

    def check_build(self, op: str, group: Any, dtype_code: int, shape: tuple[int, ...], peer: int | None) -> None:
        """The agreement check for an operation built on the lazy path, at build time.

        Ranks of one program build their lazy collectives in the same order as
        they would call eager ones; with the check on, a build whose (op, dtype,
        shape, peer) differs from the other ranks' raises MismatchError on every
        rank before anything is sent. Does nothing unless the check is on.

        Raises:
            MismatchError, DeadlineExceeded, PeerLostError: as for eager calls.
        """
        if self.settings.check:
            self.leave(self.enter(op, group, group, (dtype_code, tuple(shape), peer)))

    def _agree(self, entry: _Active, signature: tuple[Any, Any, Any]) -> None:
        code, shape, peer = signature
        dtype = name_of_code(code)
        assert self.link is not None
        with self.lock:
            self.check_reply.pop(entry.seq, None)
        self.link.send({"t": "chk", "seq": entry.seq, "op": entry.op, "dtype": dtype,
                        "shape": None if shape is None else list(shape), "peer": peer})
        with self.changed:
            while entry.seq not in self.check_reply and self.failure is None:
                remaining = None if entry.deadline is None else entry.deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self.changed.wait(_TICK if remaining is None else min(_TICK, remaining))
            ok = self.check_reply.pop(entry.seq, None)
        if ok:
            return
        if self.failure is None:
            # The deadline passed while waiting for the others to arrive.
            self._expire(entry, time.monotonic())
        assert self.failure is not None
        raise self._error_for(entry, self.failure_kind or "deadline", str(self.failure))

    # -- failure ---------------------------------------------------------------

    def _error_for(self, entry: _Active, kind: str, cause: str) -> DistributedError:
        elapsed = time.monotonic() - entry.start
        cls = {"deadline": DeadlineExceeded, "mismatch": MismatchError}.get(kind, PeerLostError)
        return cls(f"{entry.op} #{entry.seq} on {entry.group} failed on rank {self.rank} after "
                   f"{elapsed:.2f} s: {cause}")

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if os.environ.get("MLXDIST_DEBUG"):
            print(f"DEBUG {self.rank} {time.time():.3f} {message}", file=sys.stderr, flush=True)
        if kind == "chk_ok":
            with self.changed:
                self.check_reply[int(message["seq"])] = True
                self.changed.notify_all()
        elif kind == "abort":
            text = str(message.get("message"))
            missing, silent = message.get("missing") or [], message.get("silent") or []
            if missing:
                text += f"; ranks not arrived: {missing}"
            if silent:
                text += f"; ranks not responding: {silent}"
            culprit = message.get("culprit")
            # A rank whose heartbeats stopped is the one at fault; ranks that had not arrived but still beat
            # are waiting behind it (e.g. blocked in an earlier collective with the stopped rank).
            lost = sorted((set(silent) or set(missing)) | ({int(culprit)} if culprit is not None else set()))
            self._fail(str(message.get("kind")), text, lost, message)
        elif kind == "gone":
            rank = int(message["rank"])
            self.gone.add(rank)
            if message.get("clean") and self._busy_world_op():
                self._fail("lost", f"rank {rank} exited while this rank was waiting for it", [rank])
        elif kind == "eof":
            if not self._stop:
                self.gone.add(0)
                self._fail("lost", "rank 0 was lost: the side channel it serves closed "
                           "(process died, was killed or exited)", [0])

    def _busy_world_op(self) -> bool:
        return bool(self.active)

    def _fail(self, kind: str, message: str, lost: list[int] | None = None,
              about: Mapping[str, Any] | None = None) -> None:
        """Mark the world failed, report it to the launcher and interrupt whatever is blocked.

        Args:
            kind: ``"deadline"``, ``"lost"`` or ``"mismatch"``.
            message: The cause.
            lost: The ranks known to be lost or stalled.
            about: The abort message (its ``op`` and ``seq``), if one said so.
        """
        with self.changed:
            if self.failure is not None:
                return
            cls = {"deadline": DeadlineExceeded, "mismatch": MismatchError}.get(kind, PeerLostError)
            self.failure_kind = kind
            self.failure = cls(message)
            callbacks = list(self.on_failure)  # those added from now on see the failure set
            self.changed.notify_all()
        # Before the interruption: the interrupted call raises, and a program that
        # handles the error may exit at once, ending this thread before it wrote.
        about = about or {}
        write_report({"rank": self.rank, "op": about.get("op"), "seq": about.get("seq"), "kind": kind,
                      "message": message, "lost": list(lost or [])})
        self.relayed.set()
        for callback in callbacks:
            try:
                callback(self.failure)
            except Exception as exc:  # a program's callback must not stop the interruption
                sys.stderr.write(f"mlxdist: rank {self.rank}: an on_failure callback raised {exc!r}\n")
        self._interrupt()

    def _expire(self, entry: _Active, now: float) -> None:
        """``entry`` passed its deadline: tell every rank, wait for the relayed cause."""
        message = (f"{entry.op} #{entry.seq} on {entry.group} on rank {self.rank} did not complete "
                   f"within {entry.deadline - entry.start if entry.deadline else 0:g} s")
        sent = self.link is not None and self.link.send(
            {"t": "abort", "kind": "deadline", "culprit": None, "seq": entry.seq, "op": entry.op,
             "message": message})
        if sent:
            self.relayed.wait(_RELAY_WAIT)
        if self.failure is None:
            self._fail("deadline", message + " (rank 0's side channel did not answer)", None,
                       {"op": entry.op, "seq": entry.seq})

    def _interrupt(self) -> None:
        """End the calls blocked in the backend (see the module docstring)."""
        busy = list(self.active.values())
        if not busy:
            return
        if self.backend == "mpi":
            # MPI's runtime ends the whole job as soon as it sees the lost rank
            # go, often before the grace below: say now what this rank waited on.
            entry = busy[0]
            sys.stderr.write(f"mlxdist: rank {self.rank}: {entry.op} #{entry.seq} on {entry.group!r} waits on "
                             f"a failed world: {self.failure}\n")
            sys.stderr.flush()
        if self.backend == "ring" and not self._interrupted:
            self._interrupted = True
            shutdown_sockets(self.ring_peers)
            # Nothing can write into an abandoned call's buffers any more (its
            # connections are closed): end the waits MLX might never finish.
            if self.abandon_waits is not None:
                self.abandon_waits()
        threading.Thread(target=self._end_if_stuck, args=(busy,), name="mlxdist-abort", daemon=True).start()

    def _end_if_stuck(self, busy: list[_Active]) -> None:
        time.sleep(_GRACE.get(self.backend, 1.0))
        with self.lock:
            stuck = [e for e in busy if id(e) in self.active and not self._waiting_in_check(e)]
        if not stuck:
            return
        entry = stuck[0]
        try:
            line = (f"mlxdist: rank {self.rank}: {entry.op} #{entry.seq} on {entry.group!r} cannot be "
                    f"interrupted ({self.backend}): {self.failure}; ending this rank with exit status "
                    f"{JOB_ABORT_EXIT}")
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            write_report({
                "rank": self.rank, "op": entry.op, "seq": entry.seq, "group": repr(entry.group),
                "kind": self.failure_kind, "message": str(self.failure),
                "elapsed": round(time.monotonic() - entry.start, 3),
            })
        finally:
            os._exit(JOB_ABORT_EXIT)

    @staticmethod
    def _waiting_in_check(entry: _Active) -> bool:
        # A call still in the agreement check is a Python wait: it raises by itself.
        return entry.in_check

    def _tick(self) -> None:
        # This thread may be frozen at any point of interpreter exit: it keeps
        # no reference to a group between iterations (a group kept alive would
        # skip MPI's finalisation at exit).
        last_beat = 0.0
        while not self._stop:
            time.sleep(_TICK)
            now = time.monotonic()
            self._expire_due(now)
            if now - last_beat >= _HEARTBEAT and self.link is not None:
                last_beat = now
                self.link.send(self._beat(now))

    def _expire_due(self, now: float) -> None:
        expired = [e for e in list(self.active.values()) if e.deadline is not None and now > e.deadline]
        if expired and self.failure is None:
            self._expire(expired[0], now)

    def _beat(self, now: float) -> dict[str, Any]:
        current = max(list(self.active.values()), key=lambda e: e.seq, default=None)
        if current is None:
            return {"t": "hb", "seq": self.seq, "op": None, "busy": 0.0}
        return {"t": "hb", "seq": self.seq, "op": current.op, "busy": round(now - current.start, 3)}


def group_size(group: Any) -> int:
    """A group's size, whether ``size`` is a method or a number."""
    size = getattr(group, "size", 0)
    return size() if callable(size) else int(size)
