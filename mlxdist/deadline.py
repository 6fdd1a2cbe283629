"""Deadlines, peer loss and the agreement check: no rank waits forever.

MLX's backends have no operation timeout and no abort. mlxdist adds both from
outside the engine, with one :class:`Watchdog` per world:

- a side channel (:mod:`mlxdist._sidechannel`) that init starts: rank 0 runs
  a small TCP store on the job's own address; every rank connects with the
  job token and sends heartbeats;
- every blocking call of the world is registered with the watchdog
  (:meth:`Watchdog.enter` and :meth:`Watchdog.leave`, from the eager gate and
  :func:`evaluate`): a call still running at its deadline, a peer whose connection closes or whose
  heartbeats stop, or a mismatch found by the agreement check fails the
  world on *every* rank;
- a failed world interrupts the calls still blocked in the backend. On ring,
  the backend's TCP connections (found through ``/proc/self/fd``, matched
  against the hostfile) are shut down, so MLX's own wait ends with "connection
  to a peer was lost" and :meth:`Watchdog.translate` gives the typed error
  raised in its place. On
  MPI a blocked call cannot be interrupted: the watchdog writes the report
  (rank, op, cause) to stderr and ends the process with
  :data:`JOB_ABORT_EXIT`; the launcher (or mpirun) then ends the job. The same
  happens on ring if a call does not return within a grace period after its
  connections were closed.

Errors: :class:`~mlxdist.errors.DeadlineExceeded` (a ``TimeoutError``),
:class:`~mlxdist.errors.PeerLostError` (a ``CommunicationError``) and
:class:`~mlxdist.errors.MismatchError` (a ``ValueError``), raised on every
live rank, naming the op, the group, the elapsed time and the ranks that did
not arrive when known. Once failed, a world's later operations raise the same
error at once; the process stays usable (save, then exit).

The lazy rule: an mx.array collective communicates inside ``mx.eval``. Evaluate
results of collectives with :func:`evaluate` (``mlxdist.eval``), which runs
``mx.eval`` registered in the same way and raises the typed errors; a bare
``mx.eval`` is still interrupted on ring (the connections are closed when the
world fails) but raises MLX's ``RuntimeError``.

Settings: ``init(timeout=...)`` or ``MLXDIST_TIMEOUT`` (seconds; ``none`` for
no deadline; default :data:`DEFAULT_TIMEOUT`), per group with
:func:`set_timeout`; ``init(check=True)`` or ``MLXDIST_CHECK=1`` for the
agreement check. The side channel's address comes from ``MLXDIST_STORE``
(``host:port``, with ``MLXDIST_JOB_TOKEN``; ``mlxdist.launch`` sets both), or
is agreed over the backend at init (rank 0 listens on its hostfile address
for ring, on ``MLXDIST_STORE_HOST`` or loopback for MPI).
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import itertools
import json
import os
import secrets
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterator, Mapping

from mlxdist._sidechannel import Link, Store
from mlxdist.errors import (
    ArgumentTypeError,
    CommunicationError,
    DeadlineExceeded,
    DistributedError,
    InitializationError,
    InvalidArgumentError,
    MismatchError,
    PeerLostError,
)

_monotonic = time.monotonic

__all__ = [
    "DEFAULT_TIMEOUT",
    "JOB_ABORT_EXIT",
    "UNSET",
    "Settings",
    "Watchdog",
    "settings_from",
    "before_init",
    "after_init",
    "set_timeout",
    "evaluate",
    "watched",
]

DEFAULT_TIMEOUT = 300.0
"""Seconds an operation may take when neither ``init`` nor the environment says."""

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

UNSET: Any = object()
"""The default of ``init(timeout=...)``: the environment decides."""


class Settings:
    """A world's deadline settings.

    Attributes:
        timeout: Seconds per operation (None: no deadline).
        check: Whether ranks agree on every operation before it runs.
    """

    __slots__ = ("timeout", "check")

    def __init__(self, timeout: float | None, check: bool) -> None:
        self.timeout = timeout
        self.check = check


def _parse_timeout(value: Any, source: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() in ("none", "off", "inf", ""):
            return None
        try:
            value = float(value)
        except ValueError:
            raise InvalidArgumentError(f"{source} must be a number of seconds or 'none', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{source} must be a number of seconds or None, got {type(value).__name__}")
    value = float(value)
    if not 0 < value < float("inf"):
        raise InvalidArgumentError(f"{source} must be > 0 seconds and finite (or None for no deadline), got {value!r}")
    return value


def settings_from(
    timeout: Any = UNSET, check: bool | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Resolve ``init``'s arguments against the environment.

    Args:
        timeout: Seconds, None for no deadline, or unset (then ``MLXDIST_TIMEOUT``,
            then :data:`DEFAULT_TIMEOUT`).
        check: The agreement check, or None (then ``MLXDIST_CHECK``).
        environ: The environment (``os.environ`` by default).

    Returns:
        The settings.

    Raises:
        InvalidArgumentError, ArgumentTypeError: a timeout that is not a positive number.
    """
    env = os.environ if environ is None else environ
    if timeout is UNSET:
        timeout = _parse_timeout(env["MLXDIST_TIMEOUT"], "MLXDIST_TIMEOUT") if "MLXDIST_TIMEOUT" in env else DEFAULT_TIMEOUT
    else:
        timeout = _parse_timeout(timeout, "timeout")
    if check is None:
        check = env.get("MLXDIST_CHECK", "").strip().lower() in ("1", "true", "yes", "on")
    return Settings(timeout, bool(check))


# -- the watchdog -------------------------------------------------------------


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
        signature: tuple[str | None, tuple[int, ...] | None, int | None] | None = None,
    ) -> _Active:
        """Register a blocking call; raise at once if the world failed.

        Args:
            op: The operation (``all_sum``, ``send``, ``eval`` ...).
            group: The group object (for its timeout override), or None.
            description: The group (or its description), formatted only in messages.
            signature: ``(dtype, shape, peer)`` for the agreement check, or None
                to skip it.

        Returns:
            The registration, to pass to :meth:`leave`.

        Raises:
            DeadlineExceeded, PeerLostError, MismatchError: the world failed.
        """
        if self.failure is not None:
            self.raise_if_failed(op, description)
        if self.gone and group is not None and _group_size(group) == self.size:
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
        if signature is not None and self.settings.check and _group_size(group) == self.size:
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

    def _agree(self, entry: _Active, signature: tuple[Any, Any, Any]) -> None:
        dtype, shape, peer = signature
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
            self._fail(str(message.get("kind")), text)
        elif kind == "gone":
            rank = int(message["rank"])
            self.gone.add(rank)
            if message.get("clean") and self._busy_world_op():
                self._fail("lost", f"rank {rank} exited while this rank was waiting for it")
        elif kind == "eof":
            if not self._stop:
                self.gone.add(0)
                self._fail("lost", "rank 0 was lost: the side channel it serves closed "
                           "(process died, was killed or exited)")

    def _busy_world_op(self) -> bool:
        return bool(self.active)

    def _fail(self, kind: str, message: str) -> None:
        """Mark the world failed and interrupt whatever is blocked."""
        with self.changed:
            if self.failure is not None:
                return
            cls = {"deadline": DeadlineExceeded, "mismatch": MismatchError}.get(kind, PeerLostError)
            self.failure_kind = kind
            self.failure = cls(message)
            self.changed.notify_all()
        self.relayed.set()
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
            self._fail("deadline", message + " (rank 0's side channel did not answer)")

    def _interrupt(self) -> None:
        """End the calls blocked in the backend (see the module docstring)."""
        busy = list(self.active.values())
        if not busy:
            return
        if self.backend == "ring" and not self._interrupted:
            self._interrupted = True
            _shutdown_sockets(self.ring_peers)
            # Nothing can write into an abandoned call's buffers any more (its
            # connections are closed): end the waits MLX might never finish.
            from mlxdist._c import lib

            lib.mlxdist_abandon_waits()
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
            _write_report({
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


def _group_size(group: Any) -> int:
    size = getattr(group, "size", 0)
    return size() if callable(size) else int(size)


def _write_report(report: dict[str, Any]) -> None:
    """Write the first failure's report where the launcher reads it (``MLXDIST_REPORT``)."""
    path = os.environ.get("MLXDIST_REPORT")
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return  # another rank was first
    with os.fdopen(fd, "w") as f:
        json.dump(report, f)


def _shutdown_sockets(peers: set[tuple[str, int]]) -> int:
    """Shut down this process's TCP sockets connected to, or accepted on, ``peers``.

    The backend's worker threads then see their connections closed and fail
    the pending operations with MLX's own "connection to a peer was lost".

    Returns:
        How many sockets were shut down.
    """
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = int(name)
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            s = socket.socket(fileno=os.dup(fd))
        except (OSError, ValueError):
            continue
        try:
            if s.family != socket.AF_INET or s.type != socket.SOCK_STREAM:
                continue
            local = s.getsockname()
            try:
                remote = s.getpeername()
            except OSError:
                remote = None
            if remote in peers or (remote is not None and local in peers):
                s.shutdown(socket.SHUT_RDWR)
                count += 1
        except OSError:
            pass
        finally:
            s.close()
    return count


# -- worlds ---------------------------------------------------------------------

_watchdogs: dict[int, Watchdog] = {}


def set_timeout(group: Any, seconds: float | None) -> None:
    """Give ``group``'s operations their own deadline.

    Args:
        group: A multi-rank group of a world started by ``init``.
        seconds: Seconds per operation, or None for no deadline.

    Raises:
        InvalidArgumentError: seconds not positive and finite (a ValueError).
        ArgumentTypeError: seconds not a number (a TypeError).
        InitializationError: the group's world has no watchdog (size 1).
    """
    dog = _watchdogs.get(id(group._world))
    if dog is None:
        raise InitializationError(f"{group!r} has no deadlines (a single-process group)")
    dog.overrides[id(group)] = _parse_timeout(seconds, "seconds")


def evaluate(*arrays: Any, group: Any = None, timeout: float | None = UNSET) -> None:
    """``mx.eval`` under the world's deadline: the way to evaluate lazy collectives.

    Args:
        *arrays: What ``mx.eval`` takes.
        group: The group whose world the collectives use (the world group by default).
        timeout: Seconds for this evaluation (the group's deadline by default).

    Raises:
        DeadlineExceeded, PeerLostError, MismatchError: as for eager calls.
        CommunicationError: another communication failure inside the evaluation.
    """
    import mlx.core as mx

    with watched("eval", group=group, timeout=timeout):
        mx.eval(*arrays)


@contextlib.contextmanager
def watched(op: str, *, group: Any = None, timeout: float | None = UNSET) -> Iterator[None]:
    """Run a block that evaluates lazy collectives (``mx.eval`` inside a library) under the deadline.

    Args:
        op: The name the block gets in errors and reports (e.g. ``"decode step"``).
        group: The group whose world the collectives use (the world group by default).
        timeout: Seconds for the whole block (the group's deadline by default).

    Raises:
        DeadlineExceeded, PeerLostError, MismatchError: the world failed during
            the block, or had failed before it.
        CommunicationError: another communication failure inside the block.
    """
    if group is None:
        from mlxdist.world import world

        group = world()
    dog = _watchdogs.get(id(group._world))
    if dog is None:
        yield
        return
    entry = dog.enter(op, group, group)
    if timeout is not UNSET:
        seconds = _parse_timeout(timeout, "timeout")
        entry.deadline = None if seconds is None else entry.start + seconds
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, DistributedError):
            raise
        typed = dog.translate(entry, exc)
        if typed is None:
            typed = CommunicationError(f"{op}: {exc}")
        raise typed from exc
    finally:
        dog.leave(entry)
    dog.raise_if_failed(op, group)


# -- starting the side channel ---------------------------------------------------


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    return sock


def _split_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise InitializationError(f"MLXDIST_STORE must be host:port, got {text!r}")
    return host, int(port)


def rendezvous(
    backend: str,
    rank: int,
    size: int,
    settings: Settings,
    address: tuple[str, int],
    token: str,
    hosts: list[str] | None,
    ring_peers: set[tuple[str, int]],
) -> Watchdog:
    """Join the side channel before the backend starts; bounded by the timeout.

    Rank 0 listens on ``address`` (the job's own address) and waits for every
    rank; every rank connects with the token and waits until all joined.

    Returns:
        The world's watchdog (register it with :func:`attach` once the world exists).

    Raises:
        InitializationError: a rank missing, joined twice, with another world
            size, or rank 0 unreachable, naming the rank (and host).
    """
    dog = Watchdog(backend, rank, size, settings, ring_peers)
    timeout = settings.timeout
    if rank == 0:
        # Rank 0 must serve the store itself: connecting to whatever else
        # holds the port would only end in a confusing protocol failure.
        try:
            listener = _bind(*address)
        except OSError as exc:
            raise InitializationError(
                f"rank 0 cannot listen on the side channel's address {address[0]}:{address[1]} "
                f"(MLXDIST_STORE): {exc.strerror or exc}; another process holds the port, or the "
                "address is not this host's") from exc
        dog.store = Store(listener, size, token, timeout, _heartbeat_timeout(settings), hosts)
    try:
        dog.link = Link(address, rank, size, token, timeout, dog._on_message)
    except OSError as exc:
        raise InitializationError(
            f"rank {rank} cannot reach rank 0's side channel at {address[0]}:{address[1]} "
            f"within {timeout:g} s: {exc} (rank 0 missing or wrong address)") from exc
    reason = dog.link.wait_ready(None if timeout is None else timeout + 2.0)
    if reason is not None:
        dog.link.close()
        if dog.store is not None:
            dog.store.stop()
        raise InitializationError(f"rank {rank}: init failed: {reason}")
    return dog


def _heartbeat_timeout(settings: Settings) -> float | None:
    # Generous: a loaded machine can starve a heartbeat for seconds; a stalled
    # peer inside an operation is caught by the deadline first.
    return None if settings.timeout is None else max(5.0, 2 * settings.timeout)


def agree_over_backend(
    backend: str,
    rank: int,
    size: int,
    settings: Settings,
    exchange: Callable[[list[int]], list[list[int]]],
    host: str,
    ring_peers: set[tuple[str, int]],
) -> Watchdog:
    """Start the side channel of a world formed without ``MLXDIST_STORE``.

    Rank 0 listens on ``host`` (an address the job already uses), port chosen
    by the system, and the address and a fresh token travel over the backend
    itself (``exchange``: an all_gather of small integer lists).

    Returns:
        The world's watchdog.

    Raises:
        InitializationError: the side channel could not be formed.
    """
    listener = _bind(host, 0) if rank == 0 else None
    token_int = secrets.randbits(62) if rank == 0 else 0
    mine = [0, 0, 0, 0]
    if listener is not None:
        ip = int.from_bytes(socket.inet_aton(host), "big")
        mine = [ip, listener.getsockname()[1], token_int, 1]
    rows = exchange(mine)
    ip, port, token_int, _ = rows[0]
    address = (socket.inet_ntoa(int(ip).to_bytes(4, "big")), int(port))
    token = f"{token_int:x}"
    dog = Watchdog(backend, rank, size, settings, ring_peers)
    if listener is not None:
        dog.store = Store(listener, size, token, settings.timeout, _heartbeat_timeout(settings), None)
    try:
        dog.link = Link(address, rank, size, token, settings.timeout, dog._on_message)
    except OSError as exc:
        raise InitializationError(
            f"rank {rank} cannot reach rank 0's side channel at {address[0]}:{address[1]}: {exc} "
            "(for MPI across hosts set MLXDIST_STORE_HOST to rank 0's address)") from exc
    reason = dog.link.wait_ready(None if settings.timeout is None else settings.timeout + 2.0)
    if reason is not None:
        raise InitializationError(f"rank {rank}: side channel failed: {reason}")
    return dog


def attach(world: Any, dog: Watchdog) -> None:
    """Make ``dog`` the watchdog of ``world`` and start it."""
    _watchdogs[id(world)] = dog
    world.watchdog = dog
    if dog.settings.check:
        # Every lazy build then takes the slow path, where it is checked.
        world.checked = True
        for group in list(world.groups):
            group._fast = False
    dog.run()


def agree(op: str, group: Any, world: Any, dtype: Any, shape: tuple[int, ...], peer: int | None) -> None:
    """The agreement check for an operation built on the lazy path, at build time.

    Ranks of one program build their lazy collectives in the same order as
    they would call eager ones; with the check on, a build whose (op, dtype,
    shape, peer) differs from the other ranks' raises MismatchError on every
    rank before anything is sent. Does nothing unless the check is on.

    Raises:
        MismatchError, DeadlineExceeded, PeerLostError: as for eager calls.
    """
    dog = _watchdogs.get(id(world))
    if dog is None or not dog.settings.check:
        return
    name = str(dtype).removeprefix("mlx.core.")
    dog.leave(dog.enter(op, group, group, (name, tuple(shape), peer)))


def launch_environment(environ: Mapping[str, str] | None = None) -> tuple[tuple[str, int], str] | None:
    """The side channel's address and token from the launcher, if it set them.

    Raises:
        InitializationError: ``MLXDIST_STORE`` without ``MLXDIST_JOB_TOKEN``, or malformed.
    """
    env = os.environ if environ is None else environ
    store = env.get("MLXDIST_STORE")
    if not store:
        return None
    token = env.get("MLXDIST_JOB_TOKEN")
    if not token:
        raise InitializationError("MLXDIST_STORE is set but MLXDIST_JOB_TOKEN is not: the side channel "
                                  "accepts only connections that present the job token")
    return _split_address(store), token


def rank_and_size(backend: str, environ: Mapping[str, str] | None = None) -> tuple[int, int, list[str] | None]:
    """This process's rank, the world size and the hosts, read from the launch environment.

    Raises:
        InitializationError: the environment does not say (or the hostfile is unreadable).
    """
    env = os.environ if environ is None else environ
    if backend == "ring":
        try:
            with open(env["MLX_HOSTFILE"]) as f:
                hosts = json.load(f)
            rank = int(env["MLX_RANK"])
        except (KeyError, OSError, ValueError) as exc:
            raise InitializationError(f"cannot read the ring hostfile or rank: {exc}") from exc
        names = [h[0] if isinstance(h, list) and h else str(h) for h in hosts]
        if not 0 <= rank < len(names):
            raise InitializationError(f"MLX_RANK={rank} but the hostfile lists {len(names)} hosts")
        return rank, len(names), names
    for r, s in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
                 ("PMIX_RANK", "OMPI_COMM_WORLD_SIZE")):
        if r in env and s in env:
            return int(env[r]), int(env[s]), None
    raise InitializationError("cannot read this rank and the world size from the MPI environment")


def ring_addresses(hosts: list[str]) -> set[tuple[str, int]]:
    """Every ``(ip, port)`` of a ring hostfile."""
    out = set()
    for h in hosts:
        host, _, port = h.rpartition(":")
        if port.isdigit():
            out.add((host, int(port)))
    return out


# -- the hooks init and the eager gate call ------------------------------------

_started: set[str] = set()


def before_init(backend: str | None, settings: Settings) -> Watchdog | None:
    """Init's first hook, before the backend starts: the bounded rendezvous.

    When the launcher gave the side channel's address (``MLXDIST_STORE``), every
    rank joins it first, so a missing or duplicate rank or a wrong host count
    fails within the timeout with a typed error naming the rank, instead of
    blocking in the backend's own connect/accept.

    Args:
        backend: ``"ring"``, ``"mpi"`` or another backend's name (ignored), or None.
        settings: The world's settings.

    Returns:
        The watchdog to hand to :func:`after_init`, or None.

    Raises:
        InitializationError: the rendezvous failed.
    """
    if backend not in ("ring", "mpi") or backend in _started:
        return None
    launched = launch_environment()
    if launched is None:
        return None
    rank, size, hosts = rank_and_size(backend)
    if size < 2:
        return None
    address, token = launched
    peers = ring_addresses(hosts) if backend == "ring" and hosts else set()
    return rendezvous(backend, rank, size, settings, address, token, hosts, peers)


def after_init(group: Any, world: Any, pending: Watchdog | None, settings: Settings) -> None:
    """Init's second hook, once the backend formed the world: start its watchdog.

    Without a launcher-provided address, rank 0's side channel address and a
    fresh token are agreed over the backend itself.

    Args:
        group: The world group just formed.
        world: The object its groups share.
        pending: What :func:`before_init` returned.
        settings: The world's settings.

    Raises:
        InitializationError: the side channel could not be formed.
    """
    backend = getattr(group.backend, "value", None)
    if id(world) in _watchdogs or backend not in ("ring", "mpi"):
        return
    size = _group_size(group)
    rank = group.rank() if callable(group.rank) else group.rank
    if size < 2:
        return
    if pending is None:
        import numpy as np

        hosts = rank_and_size(backend)[2] if backend == "ring" else None
        peers = ring_addresses(hosts) if hosts else set()
        host = hosts[0].rpartition(":")[0] if hosts else os.environ.get("MLXDIST_STORE_HOST", "127.0.0.1")

        def exchange(mine: list[int]) -> list[list[int]]:
            rows = group.all_gather(np.array([mine], np.int64))
            return [list(map(int, row)) for row in rows]

        pending = agree_over_backend(backend, rank, size, settings, exchange, host, peers)
    elif (pending.rank, pending.size) != (rank, size):
        raise InitializationError(
            f"the backend formed rank {rank} of {size}, the launch environment said rank "
            f"{pending.rank} of {pending.size}")
    _started.add(backend)
    attach(world, pending)


# mlx_dtype codes in mlx-c's order, for the agreement check's messages.
_DTYPES = ("bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
           "float16", "float32", "float64", "bfloat16", "complex64")


def signature_of(op: str, args: tuple[Any, ...]) -> tuple[str | None, tuple[int, ...] | None, int | None]:
    """``(dtype, shape, peer)`` of an eager gate call, from its C arguments.

    The operand is the last ``mlx_array`` argument (the input of a collective
    or send, the output buffer of a recv); the peer is the integer after it for
    send/recv. A graph recv passes ``(result, dims, dtype code, src)``.
    """
    from mlxdist._c import ffi, lib

    array_type = ffi.typeof("mlx_array")
    arrays = [a for a in args if isinstance(a, ffi.CData) and ffi.typeof(a) is array_type]
    ints = [a for a in args if isinstance(a, int)]
    peer = ints[-1] if op in ("send", "recv") and ints else None
    if arrays:
        arr = arrays[-1]
        ndim = lib.mlx_array_ndim(arr)
        dims = lib.mlx_array_shape(arr)
        shape = tuple(dims[i] for i in range(ndim))
        code = lib.mlx_array_dtype(arr)
    else:
        dims_list = next((a for a in args if isinstance(a, list)), [])
        shape, code = tuple(dims_list), (ints[0] if ints else -1)
    dtype = _DTYPES[code] if 0 <= code < len(_DTYPES) else str(code)
    return dtype, shape, peer
