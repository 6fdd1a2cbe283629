"""The front door's end of the engine link: requests out, token events back, failure to everyone.

The broker lives on the front door's event loop. It accepts one engine
connection (rank 0, presenting the job token), turns each HTTP request into
a ``submit`` with a fresh id, routes the engine's token events to that
request's queue, and when the world fails (the engine says so, its link
closes, the job ends, or it stops answering while requests run) ends every
request in flight with the error at once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from mlxdist.serve.protocol import MAX_LINE, ProtocolError, decode, encode
from mlxdist.serve.requests import ApiError, Sampling

__all__ = ["Broker", "Pending", "Event"]

logger = logging.getLogger("mlxdist.serve")

# Seconds a closed engine link waits for the job's own report before failing the requests.
_LINK_GRACE = 1.0
# How mlxdist's errors and the launcher's reports name the ranks at fault.
_RANKS = (
    re.compile(r"ranks not (?:responding|arrived): \[([0-9, ]+)\]"),
    re.compile(r"rank\(s\) \[([0-9, ]+)\]"),
    re.compile(r"rank ([0-9]+) (?:was lost|was killed|exited|died|left|stopped)"),
)


@dataclass
class Event:
    """One thing that happened to a request: a token (with its finish reason), or an error."""

    token: Optional[int] = None
    finish: Optional[str] = None
    error: Optional[ApiError] = None


@dataclass
class Pending:
    """A request in flight: the events the engine sends for it arrive on ``events``."""

    rid: str
    prompt_tokens: int
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    received: int = 0
    done: bool = False
    cached_tokens: int = 0


def lost_ranks(message: str, own_rank: Optional[int] = None) -> list[int]:
    """The ranks a failure message names (best effort), without the reporting rank itself."""
    for pattern in _RANKS:  # the most specific naming first
        ranks = {int(r) for match in pattern.finditer(message) for r in re.findall(r"[0-9]+", match.group(1))}
        ranks.discard(-1 if own_rank is None else own_rank)
        if ranks:
            return sorted(ranks)
    return []


class Broker:
    """Requests to the engine and its events back, on the front door's event loop.

    Args:
        token: The job token the engine must present.
        max_inflight: Requests admitted at once (decoding plus waiting); more get 429.
        stall: Seconds without a word from the engine, while requests run,
            after which the world is declared failed.

    Attributes:
        state: ``"loading"``, ``"ready"`` or ``"failed"``.
        stopping: Set once :meth:`shutdown` began (the job's end is then expected).
    """

    def __init__(self, token: str, *, max_inflight: int, stall: float) -> None:
        self.token = token
        self.max_inflight = max_inflight
        self.stall = stall
        self.state = "loading"
        self.plan: dict[str, Any] = {}
        self.reason: Optional[str] = None
        self.failed_ranks: list[int] = []
        self._named = False
        self.stats: dict[str, Any] = {}
        self.pending: dict[str, Pending] = {}
        self.cancelled_at: dict[str, int] = {}
        self.failed = asyncio.Event()
        self._writer: Optional[asyncio.StreamWriter] = None
        self._link_task: Optional[asyncio.Task] = None
        # Engine links accepted so far: a closed link's failure is only its own world's.
        self._links = 0
        self._server: Optional[asyncio.base_events.Server] = None
        self._stats_wait: Optional[asyncio.Future] = None
        self._heard = time.monotonic()
        self.stopping = False
        self._tasks: set[asyncio.Task] = set()

    # -- the link --------------------------------------------------------------

    async def start(self, sock: socket.socket) -> None:
        """Accept the engine on an already listening socket; watch for a silent engine."""
        self._server = await asyncio.start_server(self._accept, sock=sock, limit=MAX_LINE + 1)
        task = asyncio.get_running_loop().create_task(self._watch())
        self._tasks.add(task)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = decode(await asyncio.wait_for(reader.readline(), timeout=10))
            if hello["type"] != "hello" or not hmac.compare_digest(hello["token"], self.token):
                raise ProtocolError("wrong token")
        except (ProtocolError, asyncio.TimeoutError, ValueError, OSError):
            writer.close()
            return
        if self._writer is not None or self.state == "failed":
            writer.close()
            return
        self._writer = writer
        self._links += 1
        link = self._links
        self._link_task = asyncio.current_task()
        self._heard = time.monotonic()
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                self._heard = time.monotonic()
                self._dispatch(decode(line))
        except (ProtocolError, ValueError, OSError, asyncio.IncompleteReadError) as exc:
            logger.error("mlxdist-serve: engine link error: %s", exc)
        finally:
            self._writer = None
            writer.close()
        if not self.stopping and self.state != "failed":
            # The launcher usually names the rank within a moment: let it speak first.
            asyncio.get_running_loop().call_later(_LINK_GRACE, self._link_closed, link)

    def _link_closed(self, link: int) -> None:
        # A later world's engine may have connected during the grace: this loss is then old news.
        if link == self._links:
            self.fail("rank 0's engine closed its link to the front door", None, source="link")

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "ready":
            self.plan = message["plan"]
            self.state = "ready"
        elif kind == "step":
            self.stats = message["stats"]
            for rid, token, finish in message["events"]:
                pending = self.pending.get(rid)
                if pending is not None:
                    pending.received += 1
                    pending.events.put_nowait(Event(token=token, finish=finish))
                    if finish is not None:
                        self._finish(rid)
        elif kind == "cached":
            pending = self.pending.get(message["id"])
            if pending is not None:
                pending.cached_tokens = message["tokens"]
        elif kind == "stats":
            if self._stats_wait is not None and not self._stats_wait.done():
                self._stats_wait.set_result(message["ranks"])
        elif kind == "rejected":
            pending = self.pending.get(message["id"])
            if pending is not None:
                pending.events.put_nowait(Event(error=ApiError(400, message["message"], "invalid_value", "prompt")))
                self._finish(message["id"])
        elif kind == "failed":
            self.fail(message["message"])

    async def _watch(self) -> None:
        while not self.failed.is_set():
            await asyncio.sleep(1.0)
            if self.pending and self.state == "ready" and time.monotonic() - self._heard > self.stall:
                self.fail(f"rank 0's engine sent nothing for {self.stall:g} s while requests were running")

    def _send(self, kind: str, **fields: Any) -> None:
        if self._writer is None:
            raise ApiError(503, "the engine is not connected", "engine_unavailable")
        self._writer.write(encode(kind, **fields))

    def _finish(self, rid: str) -> None:
        pending = self.pending.pop(rid, None)
        if pending is not None:
            pending.done = True

    # -- failure ---------------------------------------------------------------

    def fail(self, reason: str, ranks: Optional[list[int]] = None, *, source: str = "engine") -> None:
        """Mark the world failed and end every request in flight with a 503 naming the cause.

        Args:
            reason: What failed (naming the rank when known).
            ranks: The ranks lost, as the launcher knows them; else read from ``reason``.
            source: ``"engine"`` (rank 0 said why), ``"link"`` (its link closed)
                or ``"job"`` (the launcher's report, added to the reason).
        """
        named = lost_ranks(reason, own_rank=0 if reason.startswith("rank 0:") else None)
        # The peer a rank's error names beats the launcher's account (whose first exit is
        # often the rank that noticed); the launcher's own list beats reading its lines.
        picked = named if source == "engine" else (ranks or named)
        if picked and (source == "engine" or not self._named):
            self.failed_ranks, self._named = sorted(picked), True
        if self.state == "failed":
            if source == "job":
                self.reason = f"{self.reason}; {reason}"
            return
        self.state = "failed"
        self.reason = reason
        logger.error("mlxdist-serve: failed: %s", reason)
        error = ApiError(503, f"the model's ranks failed: {reason}", "engine_failed")
        for rid in list(self.pending):
            self.pending[rid].events.put_nowait(Event(error=error))
            self._finish(rid)
        self.failed.set()

    # -- what the HTTP side calls -------------------------------------------------

    async def wait_admissible(self) -> None:
        """Wait until a request can be admitted (at once here; a broker that re-forms worlds waits)."""

    def admit(self, prompt: list[int], sampling: Sampling) -> Pending:
        """Send a request to the engine.

        Returns:
            Its :class:`Pending` (await its events).

        Raises:
            ApiError: 503 while loading or after a failure, 429 beyond the queue bound.
        """
        if self.state == "loading":
            raise ApiError(503, "the model is still loading", "engine_loading")
        if self.state == "failed":
            raise ApiError(503, f"the model's ranks failed: {self.reason}", "engine_failed")
        if len(self.pending) >= self.max_inflight:
            raise ApiError(429, f"the server is at its bound of {self.max_inflight} requests in flight; "
                           "retry later", "rate_limit_exceeded")
        pending = Pending(rid=uuid.uuid4().hex, prompt_tokens=len(prompt))
        self._send("submit", id=pending.rid, prompt=list(prompt), max_tokens=sampling.max_tokens,
                   temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
                   logit_bias=sampling.logit_bias)
        self.pending[pending.rid] = pending
        return pending

    def cancel(self, pending: Pending) -> None:
        """Drop a request on every rank (at the engine's next step); no-op once it ended."""
        if pending.done:
            return
        self._finish(pending.rid)
        self.cancelled_at[pending.rid] = pending.received
        try:
            self._send("cancel", id=pending.rid)
        except ApiError:
            pass

    async def rank_stats(self, timeout: float) -> list[dict[str, Any]]:
        """Every rank's counters (steps, forwards, tokens, the last cancellation).

        Raises:
            ApiError: 503 when the engine is not ready or does not answer in ``timeout``.
        """
        if self.state != "ready":
            raise ApiError(503, f"the engine is {self.state}", "engine_unavailable")
        if self._stats_wait is None or self._stats_wait.done():
            self._stats_wait = asyncio.get_running_loop().create_future()
            self._send("stats_request")
        try:
            return await asyncio.wait_for(asyncio.shield(self._stats_wait), timeout)
        except asyncio.TimeoutError:
            raise ApiError(503, "the engine did not report its counters in time", "engine_unavailable") from None

    async def shutdown(self) -> None:
        """Ask the engine to end the job cleanly, and stop accepting."""
        self.stopping = True
        if self._writer is not None:
            try:
                self._send("shutdown")
                await self._writer.drain()
            except (ApiError, OSError):
                pass
            self._writer.close()
        if self._link_task is not None:
            # Let the link's reader see the close and end before the loop does.
            await asyncio.wait({self._link_task}, timeout=2)
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()

    def health(self) -> dict[str, Any]:
        """The ``/health`` body."""
        body: dict[str, Any] = {"state": self.state, "plan": self.plan, "in_flight": len(self.pending),
                                "stats": self.stats}
        if self.state == "failed":
            body["reason"] = self.reason
            body["failed_ranks"] = self.failed_ranks
        return body
