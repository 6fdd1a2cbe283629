"""The store rank 0 serves: joins, heartbeats, aborts relayed to every rank, the agreement check."""

from __future__ import annotations

import hmac
import json
import select
import socket
import threading
import time
from typing import Any

from mlxdist._sidechannel.protocol import MAX_LINE, describe_call, encode

__all__ = ["Store"]


class _Peer:
    """The store's view of one connected rank."""

    __slots__ = ("sock", "buffer", "rank", "last_seen", "state", "clean", "pid", "beating")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.rank: int | None = None
        self.last_seen = time.monotonic()
        self.state: dict[str, Any] = {"seq": 0, "op": None, "busy": 0.0}
        self.clean = False
        self.pid = 0
        self.beating = False


class Store:
    """Rank 0's end: accepts the ranks, relays aborts, runs the agreement check.

    Args:
        sock: A bound, listening socket (on the job's address only).
        size: The number of ranks in the world.
        token: The job token every connection must present.
        join_timeout: Seconds to wait for every rank to join.
        heartbeat_timeout: A joined rank silent this long is reported lost
            (None: only a closed connection counts).
    """

    def __init__(
        self,
        sock: socket.socket,
        size: int,
        token: str,
        join_timeout: float | None,
        heartbeat_timeout: float | None,
        hosts: list[str] | None = None,
    ) -> None:
        self.sock = sock
        self.size = size
        self.token = token
        self.hosts = hosts
        self.join_deadline = None if join_timeout is None else time.monotonic() + join_timeout
        self.join_timeout = join_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.peers: dict[socket.socket, _Peer] = {}
        self.ranks: dict[int, _Peer] = {}
        self.ready = False
        self.failed = False
        self.pending: dict[int, dict[str, Any]] = {}
        # A rank's report of a failure with no known culprit waits briefly for
        # a lost connection that would name one.
        self.deferred: tuple[float, dict[str, Any]] | None = None
        self._stop = False
        sock.setblocking(False)
        self.thread = threading.Thread(target=self._serve, name="mlxdist-store", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop serving (the thread exits at its next wake-up)."""
        self._stop = True

    # -- sending --------------------------------------------------------

    def _send(self, peer: _Peer, message: dict[str, Any]) -> None:
        try:
            peer.sock.setblocking(True)
            peer.sock.settimeout(1.0)
            peer.sock.sendall(encode(message))
        except OSError:
            pass
        finally:
            try:
                peer.sock.setblocking(False)
            except OSError:
                pass

    def _broadcast(self, message: dict[str, Any]) -> None:
        # Rank 0 (this process) last: the others hear first, before rank 0
        # can act on the message and exit.
        for rank, peer in sorted(self.ranks.items(), key=lambda item: item[0] == 0):
            self._send(peer, message)

    def drain(self, timeout: float) -> None:
        """Wait (at rank 0's exit) until the other ranks disconnected, or ``timeout``.

        The store lives in rank 0's process: leaving early would cut the others
        off before they heard the last abort, or make them see rank 0 as lost.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.thread.is_alive():
            now = time.monotonic()
            # A stopped rank never leaves: only ranks still heard from count.
            if not any(r != 0 and now - p.last_seen < 1.0 for r, p in list(self.ranks.items())):
                return
            time.sleep(0.01)

    def _abort(self, kind: str, message: str, culprit: int | None, seq: int | None = None) -> None:
        if self.failed:
            return
        self.failed = True
        missing, silent = self._missing(seq)
        self._broadcast(
            {"t": "abort", "kind": kind, "message": message, "culprit": culprit,
             "missing": missing, "silent": silent}
        )

    def _missing(self, seq: int | None) -> tuple[list[int], list[int]]:
        """Ranks that had not reached op ``seq`` and ranks whose heartbeats stopped."""
        now = time.monotonic()
        missing = [] if seq is None else sorted(
            r for r, p in self.ranks.items() if p.state.get("seq", 0) < seq
        )
        missing += [r for r in range(self.size) if r not in self.ranks and r not in missing]
        silent = sorted(r for r, p in self.ranks.items() if p.beating and now - p.last_seen > 1.5)
        return sorted(missing), silent

    # -- serving --------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop:
            socks = [self.sock] + list(self.peers)
            try:
                readable, _, _ = select.select(socks, [], [], 0.1)
            except (OSError, ValueError):
                readable = [s for s in socks if s.fileno() >= 0]
                if not readable:
                    return
                continue
            for s in readable:
                if s is self.sock:
                    self._accept()
                else:
                    self._read(s)
            self._timers()

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peers[conn] = _Peer(conn)

    def _drop(self, peer: _Peer) -> None:
        self.peers.pop(peer.sock, None)
        try:
            peer.sock.close()
        except OSError:
            pass
        rank = peer.rank
        if rank is None or self.ranks.get(rank) is not peer:
            return
        del self.ranks[rank]
        if not self.ready:
            self._init_fail(f"rank {rank} disconnected during init")
            return
        if not peer.clean:
            self._abort(
                "lost", f"rank {rank} was lost: its connection closed without a clean exit "
                "(process died or was killed)", rank,
            )
        self._broadcast({"t": "gone", "rank": rank, "clean": peer.clean})

    def _read(self, s: socket.socket) -> None:
        peer = self.peers.get(s)
        if peer is None:
            return
        try:
            data = s.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(peer)
            return
        peer.buffer += data
        peer.last_seen = time.monotonic()
        while b"\n" in peer.buffer:
            line, peer.buffer = peer.buffer.split(b"\n", 1)
            try:
                message = json.loads(line)
                if not isinstance(message, dict):
                    raise ValueError
            except ValueError:
                self._reject(peer)
                return
            if peer.rank is None:
                if not self._hello(peer, message):
                    return
            else:
                self._handle(peer, message)
        if len(peer.buffer) > MAX_LINE:
            self._reject(peer)

    def _reject(self, peer: _Peer) -> None:
        """Close a connection that broke the protocol; a joined rank counts as lost."""
        self._drop(peer)

    def _hello(self, peer: _Peer, message: dict[str, Any]) -> bool:
        token = message.get("token")
        if message.get("t") != "hello" or not isinstance(token, str) or not hmac.compare_digest(
            token.encode(), self.token.encode()
        ):
            self._drop(peer)
            return False
        rank, size = message.get("rank"), message.get("size")
        peer.pid = int(message.get("pid") or 0)
        if not isinstance(rank, int) or not 0 <= rank < self.size or size != self.size:
            self._send(peer, {"t": "fail", "message": (
                f"a rank joined as rank {rank} of {size}, but rank 0 has a world of {self.size} "
                "ranks (wrong host count or rank)")})
            self._init_fail(f"a rank (pid {peer.pid}) joined as rank {rank} of {size}; "
                            f"rank 0 has a world of {self.size} ranks (wrong host count or rank)")
            self._drop(peer)
            return False
        if rank in self.ranks:
            other = self.ranks[rank]
            self._init_fail(f"rank {rank} joined twice (pids {other.pid} and {peer.pid}): duplicate rank")
            self._send(peer, {"t": "fail", "message": f"rank {rank} joined twice (pids {other.pid} "
                              f"and {peer.pid}): duplicate rank"})
            self._drop(peer)
            return False
        if self.ready or self.failed:
            self._send(peer, {"t": "fail", "message": f"rank {rank} joined a world that already started"})
            self._drop(peer)
            return False
        peer.rank = rank
        self.ranks[rank] = peer
        if len(self.ranks) == self.size:
            self.ready = True
            self._broadcast({"t": "ready"})
        return True

    def _init_fail(self, message: str) -> None:
        if self.failed or self.ready:
            return
        self.failed = True
        self._broadcast({"t": "fail", "message": message})

    def _handle(self, peer: _Peer, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "hb":
            peer.state = message
            peer.beating = True
        elif kind == "bye":
            peer.clean = True
        elif kind == "abort":
            seq = message.get("seq")
            if isinstance(seq, int) and seq > peer.state.get("seq", 0):
                # The reporting rank reached the op it reports (its heartbeat may lag).
                peer.state = dict(peer.state, seq=seq)
            if message.get("kind") == "lost" and message.get("culprit") is None:
                if self.deferred is None:
                    self.deferred = (time.monotonic(), message)
            else:
                self._abort(str(message.get("kind")), str(message.get("message")), message.get("culprit"), seq)
        elif kind == "chk":
            peer.state = {"seq": message.get("seq", 0), "op": message.get("op"), "busy": 0.0}
            self.pending[peer.rank] = message  # type: ignore[index]
            self._agree(peer.rank)  # type: ignore[arg-type]

    def _timers(self) -> None:
        now = time.monotonic()
        if self.deferred is not None and now - self.deferred[0] > 0.3:
            message = self.deferred[1]
            self.deferred = None
            self._abort("lost", str(message.get("message")), None, message.get("seq"))
        if not self.ready and not self.failed and self.join_deadline is not None and now > self.join_deadline:
            absent = [r for r in range(self.size) if r not in self.ranks]
            where = ""
            if self.hosts:
                where = " (" + ", ".join(f"rank {r} at {self.hosts[r]}" for r in absent if r < len(self.hosts)) + ")"
            self._init_fail(
                f"ranks {absent} did not join within {self.join_timeout:g} s{where}: "
                f"{len(self.ranks)} of {self.size} ranks joined (missing process or wrong host count)"
            )
        if self.ready and not self.failed and self.heartbeat_timeout is not None:
            for rank, peer in list(self.ranks.items()):
                # Counted from a rank's first heartbeat (the backend's own init
                # comes between joining and the first one).
                if peer.beating and now - peer.last_seen > self.heartbeat_timeout:
                    self._abort("lost", f"rank {rank} stopped responding (no heartbeat for "
                                f"{now - peer.last_seen:.1f} s: stopped, stalled or partitioned)", rank)
                    break

    # -- agreement check ------------------------------------------------

    def _agree(self, rank: int) -> None:
        if self.failed:
            return
        mine = self.pending[rank]
        peer = mine.get("peer")
        if peer is not None:
            other = self.pending.get(peer)
            if other is None:
                return
            if other.get("peer") is None:
                self._mismatch([rank, peer])
                return
            if other.get("peer") != rank:
                return  # it waits on a third rank first
            ops = {mine["op"], other["op"]}
            if ops != {"send", "recv"} or mine.get("dtype") != other.get("dtype") or list(
                mine.get("shape") or []
            ) != list(other.get("shape") or []):
                self._mismatch([rank, peer])
                return
            for r in (rank, peer):
                entry = self.pending.pop(r)
                self._send(self.ranks[r], {"t": "chk_ok", "seq": entry["seq"]})
            return
        # A collective: every rank must post the same thing.
        for r, entry in self.pending.items():
            if entry.get("peer") is not None and entry["peer"] == rank:
                self._mismatch([rank, r])
                return
        if len(self.pending) < self.size:
            return
        first = self.pending[0]
        key = (first["op"], first.get("dtype"), list(first.get("shape") or []), first.get("peer"))
        if any(
            (e["op"], e.get("dtype"), list(e.get("shape") or []), e.get("peer")) != key
            for e in self.pending.values()
        ):
            self._mismatch(sorted(self.pending))
            return
        entries = dict(self.pending)
        self.pending.clear()
        for r, entry in entries.items():
            self._send(self.ranks[r], {"t": "chk_ok", "seq": entry["seq"]})

    def _mismatch(self, ranks: list[int]) -> None:
        calls = "; ".join(
            f"rank {r} called {describe_call(self.pending.get(r))} as op #{self.pending[r]['seq']}"
            if r in self.pending else f"rank {r} called nothing yet"
            for r in sorted(set(ranks) | set(self.pending))
        )
        self._abort("mismatch", f"ranks called different operations: {calls}", None)
