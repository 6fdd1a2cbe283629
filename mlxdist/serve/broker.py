"""The front door's end of the engine link: requests out, token events back, failure to everyone.

The broker lives on the front door's event loop. It accepts one engine
connection (rank 0, presenting the job token), turns each HTTP request into
a ``submit`` with a fresh id, routes the engine's token events to that
request's queue, and when the world fails (the engine says so, its link
closes, the job ends, or it stops answering while requests run) ends every
request in flight with the error at once. A request that arrives while the
model loads waits for it (up to ``--start-deadline`` from the start); one that
arrives while the server drains (SIGTERM) gets 503.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from mlxdist.serve.api_error import ApiError
from mlxdist.serve.metrics import ServeMetrics
from mlxdist.serve.options import ServeOptions
from mlxdist.serve.protocol import MAX_LINE, ProtocolError, decode, encode
from mlxdist.serve.validation import Sampling

__all__ = ["Broker", "Pending", "Event"]

logger = logging.getLogger("mlxdist.serve")

# Seconds a closed engine link waits for the job's own report before failing the requests.
_LINK_GRACE = 1.0
# The error that ends the streams still open when a drain's time is up (they then send [DONE]).
SHUTTING_DOWN = "server_shutting_down"


@dataclass
class Event:
    """One thing that happened to a request: a token (with its finish reason), or an error."""

    token: Optional[int] = None
    finish: Optional[str] = None
    error: Optional[ApiError] = None
    logprob: Optional[float] = None
    top: Optional[list[list[float]]] = None


@dataclass
class Pending:
    """A request in flight: the events the engine sends for it arrive on ``events``."""

    rid: str
    prompt_tokens: int
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    received: int = 0
    done: bool = False
    admitted: float = field(default_factory=time.monotonic)
    last_token: float = 0.0
    cached_tokens: int = 0


class Broker:
    """Requests to the engine and its events back, on the front door's event loop.

    Args:
        token: The job token the engine must present.
        options: The server's options (``max_inflight``: requests admitted at
            once, more get 429; ``stall``: seconds without a word from the
            engine, while requests run, after which the world is declared
            failed; ``start_deadline``: how long requests wait for the model to load).

    Attributes:
        state: ``"loading"``, ``"ready"`` or ``"failed"``.
        stopping: Set once :meth:`shutdown` began (the job's end is then expected).
        draining: Set once :meth:`drain` began (new requests get 503).
        metrics: The front door's Prometheus metrics.
        answering: Responses in progress (a stream before its last event, a
            non-streamed answer before its body).
    """

    def __init__(self, token: str, options: ServeOptions) -> None:
        self.token = token
        self.max_inflight = options.max_inflight
        self.stall = options.stall
        self.start_deadline = options.start_deadline
        self.born = time.monotonic()
        self.draining = False
        self.metrics = ServeMetrics(in_flight=lambda: len(self.pending),
                                    queued=lambda: sum(1 for p in self.pending.values() if not p.received),
                                    ranks_up=lambda: int(self.plan.get("ranks", 0)) if self.state == "ready" else 0)
        self._ready: Optional[asyncio.Event] = None
        self.state = "loading"
        self.plan: dict[str, Any] = {}
        self.reason: Optional[str] = None
        self.failed_ranks: list[int] = []
        self._named = False
        self.stats: dict[str, Any] = {}
        self.pending: dict[str, Pending] = {}
        self.answering = 0
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
            self._ready_event().set()
        elif kind == "step":
            self.stats = message["stats"]
            now = time.monotonic()
            for rid, token, finish, *logprobs in message["events"]:
                pending = self.pending.get(rid)
                if pending is not None:
                    if pending.received:
                        self.metrics.inter_token.observe(now - pending.last_token)
                    else:
                        self.metrics.ttft.observe(now - pending.admitted)
                    pending.received += 1
                    pending.last_token = now
                    self.metrics.generated_tokens.inc()
                    event = Event(token=token, finish=finish)
                    if logprobs:
                        event.logprob, event.top = logprobs
                    pending.events.put_nowait(event)
                    if finish is not None:
                        self._finish(rid)
        elif kind == "cached":
            pending = self.pending.get(message["id"])
            if pending is not None:
                pending.cached_tokens = message["tokens"]
            if message["tokens"] > 0:
                self.metrics.prompt_cache_hit(message["tokens"])
        elif kind == "stats":
            if self._stats_wait is not None and not self._stats_wait.done():
                self._stats_wait.set_result(message["ranks"])
        elif kind == "rejected":
            pending = self.pending.get(message["id"])
            if pending is not None:
                pending.events.put_nowait(Event(error=ApiError(400, message["message"], "invalid_value", "prompt")))
                self._finish(message["id"])
        elif kind == "failed":
            self.fail(message["message"], message["ranks"])

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
            ranks: The ranks lost: as rank 0's engine names them (its ``failed``
                message), or as the launcher knows them.
            source: ``"engine"`` (rank 0 said why), ``"link"`` (its link closed)
                or ``"job"`` (the launcher's report, added to the reason).
        """
        # The peer a rank's error names beats the launcher's account (whose first exit is
        # often the rank that noticed).
        if ranks and (source == "engine" or not self._named):
            self.failed_ranks, self._named = sorted(ranks), True
        if self.state == "failed":
            if source == "job":
                self.reason = f"{self.reason}; {reason}"
            return
        self.state = "failed"
        self.reason = reason
        logger.error("mlxdist-serve: failed: %s", reason)
        self._end_all(ApiError(503, f"the model's ranks failed: {reason}", "engine_failed"))
        self.failed.set()
        self._ready_event().set()  # the requests waiting for the model get the failure now

    def _end_all(self, error: ApiError) -> None:
        for rid in list(self.pending):
            self.pending[rid].events.put_nowait(Event(error=error))
            self._finish(rid)

    # -- what the HTTP side calls -------------------------------------------------

    def _ready_event(self) -> asyncio.Event:
        if self._ready is None:
            self._ready = asyncio.Event()
            if self.state != "loading":
                self._ready.set()
        return self._ready

    async def wait_admissible(self) -> None:
        """Wait while the model loads, up to ``start_deadline`` seconds after the front door started.

        Raises:
            ApiError: 503 with ``Retry-After`` when the model has still not loaded then.
        """
        if self.state != "loading":
            return
        left = self.born + self.start_deadline - time.monotonic()
        try:
            await asyncio.wait_for(self._ready_event().wait(), max(0.0, left))
        except asyncio.TimeoutError:
            raise ApiError(503, "the model is still loading; retry shortly", "engine_loading",
                           retry_after=10) from None

    def admit(self, prompt: list[int], sampling: Sampling, rid: Optional[str] = None) -> Pending:
        """Send a request to the engine.

        Args:
            prompt: Its token ids.
            sampling: Its checked parameters (``max_tokens`` fitted).
            rid: Its id (hex; the access log's), or None for a fresh one.

        Returns:
            Its :class:`Pending` (await its events).

        Raises:
            ApiError: 503 while loading, draining or after a failure, 429 beyond the queue bound.
        """
        if self.draining or self.stopping:
            raise ApiError(503, "the server is shutting down", SHUTTING_DOWN)
        if self.state == "loading":
            raise ApiError(503, "the model is still loading", "engine_loading", retry_after=10)
        if self.state == "failed":
            raise ApiError(503, f"the model's ranks failed: {self.reason}", "engine_failed")
        if len(self.pending) >= self.max_inflight:
            raise ApiError(429, f"the server is at its bound of {self.max_inflight} requests in flight; "
                           "retry later", "rate_limit_exceeded")
        pending = Pending(rid=rid or uuid.uuid4().hex, prompt_tokens=len(prompt))
        self._send("submit", id=pending.rid, prompt=list(prompt), **sampling.link_fields())
        self.pending[pending.rid] = pending
        self.metrics.prompt_tokens.inc(len(prompt))
        return pending

    async def drain(self, timeout: float) -> None:
        """Stop admitting; let the requests in flight finish for up to ``timeout`` s, then end them.

        The ones still running then get a 503 ``server_shutting_down`` (their
        streams end with an error event and ``[DONE]``).
        """
        self.draining = True
        end = time.monotonic() + timeout
        while self.pending and time.monotonic() < end:
            await asyncio.sleep(0.05)
        if self.pending:
            logger.warning("mlxdist-serve: drain time is up: ending %d request(s)", len(self.pending))
            for pending in list(self.pending.values()):
                self.cancel(pending, error=ApiError(503, f"the server is shutting down (it drained for "
                                                         f"{timeout:g} s)", SHUTTING_DOWN))

    def cancel(self, pending: Pending, error: Optional[ApiError] = None) -> None:
        """Drop a request on every rank (at the engine's next step); no-op once it ended.

        Args:
            pending: The request.
            error: Also end its events with this error (else its reader has gone).
        """
        if pending.done:
            return
        if error is not None:
            pending.events.put_nowait(Event(error=error))
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
