"""A broker that outlives its world: requests in flight wait out a re-forming and resume on the new world.

When the world fails, :class:`ResumingBroker` keeps every request in flight
(with the tokens it has streamed so far), tells the supervisor, and answers
``/health`` with ``re-forming``. New requests wait for the new world up to a
bound, then get 503 with ``Retry-After``. When the new world's engine says
``ready``, each request is sent again as a ``resume``: its prompt followed by
the tokens already generated (prefilled again), the tokens still to generate,
and how many it drew (its sampler skips those draws). Its client's stream
just goes on. The supervisor decides whether a new world is formed at all;
when it is not (too few ranks left), the failure is final, as in
:class:`~mlxdist.serve.broker.Broker`.

Every event is one log line: the loss (ranks, how it was seen), the new plan
and how long re-forming took, and the first token after it with the time
split into teardown, start, load, plan, engine and resume.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from mlxdist.serve.api_error import ApiError
from mlxdist.serve.broker import _LINK_GRACE, Broker, Pending, logger
from mlxdist.serve.options import ServeOptions
from mlxdist.serve.validation import Sampling

__all__ = ["ResumingBroker", "Resumable"]

@dataclass
class Resumable:
    """What it takes to send a request again: its prompt, its ``submit`` fields, the tokens it streamed so far."""

    prompt: list[int]
    fields: dict[str, Any]
    tokens: list[int] = field(default_factory=list)


def _seen_through(reason: str, source: str) -> str:
    """How a loss was seen, in a word or three."""
    if "did not complete within" in reason or "DeadlineExceeded" in reason:
        return "deadline"
    if "killed by SIG" in reason:
        return "killed"
    if "was lost" in reason or "PeerLostError" in reason or "closed by the peer" in reason:
        return "peer loss"
    if "exited with" in reason:
        return "exit"
    return "link closed" if source == "link" else "failure"


class ResumingBroker(Broker):
    """A :class:`Broker` whose requests survive the loss of their world.

    Args:
        token: The job token every world's engine presents.
        options: The server's options (see :class:`Broker`; ``reform_wait``: seconds a
            new request waits for a re-forming world before 503).
        on_world_lost: Called (on the event loop) with ``(reason, ranks, how)``
            the first time a world is seen failing; the supervisor ends it.
    """

    def __init__(self, token: str, options: ServeOptions,
                 on_world_lost: Callable[[str, list[int], str], None]) -> None:
        super().__init__(token, options)
        self.admit_wait = options.reform_wait
        self.on_world_lost = on_world_lost
        self.records: dict[str, Resumable] = {}
        self.world = 1
        self.final = False
        self.ever_ready = False
        # The loss being recovered from (or the last one): ranks, how, and its timeline.
        self.loss: dict[str, Any] = {}
        # Where the current world's ranks run (hosts, ring addresses), added to its plan.
        self.placement: dict[str, Any] = {}
        self._awaiting_first_token = False

    # -- admission ---------------------------------------------------------------

    async def wait_admissible(self) -> None:
        """Wait while the model loads (see :meth:`Broker.wait_admissible`), or up to ``admit_wait`` s
        while the world re-forms.

        Raises:
            ApiError: 503 with ``Retry-After`` when the model is still loading or the world re-forming then.
        """
        await super().wait_admissible()
        if self.state == "ready" and self._writer is None and not (self.final or self.stopping):
            # Rank 0's link just closed: the loss is declared within the link's grace.
            end = time.monotonic() + _LINK_GRACE + 0.5
            while self.state == "ready" and self._writer is None and time.monotonic() < end:
                await asyncio.sleep(0.05)
        if self.state != "re-forming":
            return
        try:
            await asyncio.wait_for(self._ready_event().wait(), self.admit_wait)
        except asyncio.TimeoutError:
            if self.state == "re-forming":
                raise ApiError(503, f"the server is re-forming its world after losing rank(s) "
                               f"{self.loss.get('ranks', [])}; retry shortly", "re_forming",
                               retry_after=max(1, round(self.admit_wait))) from None

    def admit(self, prompt: list[int], sampling: Sampling, rid: Optional[str] = None) -> Pending:
        """Send a request to the engine, remembering what it takes to resume it (see :meth:`Broker.admit`)."""
        pending = super().admit(prompt, sampling, rid)
        self.records[pending.rid] = Resumable(list(prompt), sampling.link_fields())
        return pending

    def _finish(self, rid: str) -> None:
        super()._finish(rid)
        self.records.pop(rid, None)

    # -- the engine's messages -------------------------------------------------------

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "step":
            if self._awaiting_first_token and message["events"]:
                self._first_token()
            for rid, token, *_ in message["events"]:
                record = self.records.get(rid)
                if record is not None:
                    record.tokens.append(token)
        resuming = kind == "ready" and self.state == "re-forming"
        super()._dispatch(message)
        if kind == "ready":
            self.plan.update(self.placement)
        if resuming:
            self.metrics.re_formings.inc()
            self._resume_all()
        if self.state == "ready":
            self.ever_ready = True
            self._ready_event().set()

    def _resume_all(self) -> None:
        now = time.time()
        loss = self.loss
        loss["ready"] = now
        self.plan["re_formed"] = {"from_ranks": loss["from_ranks"], "lost_ranks": loss["ranks"], "how": loss["how"],
                                  "seconds": round(now - loss["seen"], 3), "seen_at": loss["seen"], "resumed": len(self.pending),
                                  "resumed_after_tokens": [len(self.records[rid].tokens) for rid in self.pending]}
        if "lost_hosts" in loss:
            self.plan["re_formed"]["lost_hosts"] = loss["lost_hosts"]
        where = f" on {', '.join(self.plan['hosts'])}" if self.plan.get("hosts") else ""
        logger.warning("mlxdist-serve: world %d ready on %d rank(s)%s: %s (%s); re-forming took %.2f s; "
                       "resuming %d request(s)", self.world, self.plan.get("ranks"), where, self.plan.get("mode"),
                       self.plan.get("reason"), now - loss["seen"], len(self.pending))
        self._awaiting_first_token = True
        for rid in list(self.pending):
            record = self.records[rid]
            self._send("resume", id=rid, **{**record.fields, "prompt": record.prompt + record.tokens,
                                            "max_tokens": record.fields["max_tokens"] - len(record.tokens),
                                            "drawn": len(record.tokens)})

    def _first_token(self) -> None:
        self._awaiting_first_token = False
        loss, now = self.loss, time.time()
        timing = self.plan.get("timing", {})
        parts = {"teardown": loss.get("ended", now) - loss["seen"],
                 "start": timing.get("initialized", now) - loss.get("started", now),
                 "load": timing.get("load", 0.0), "plan": timing.get("plan", 0.0),
                 "engine": loss["ready"] - timing.get("initialized", loss["ready"]) - timing.get("load", 0.0)
                 - timing.get("plan", 0.0),
                 "resume": now - loss["ready"]}
        loss["first_token"] = now
        loss["parts"] = {name: round(value, 3) for name, value in parts.items()}
        self.plan["re_formed"]["first_token_seconds"] = round(now - loss["seen"], 3)
        self.plan["re_formed"]["parts"] = loss["parts"]
        logger.warning("mlxdist-serve: first token after the loss: %.2f s after it was seen at %.3f (%s)",
                       now - loss["seen"], loss["seen"],
                       ", ".join(f"{name} {value:.2f} s" for name, value in parts.items()))

    # -- failure ---------------------------------------------------------------------

    def fail(self, reason: str, ranks: Optional[list[int]] = None, *, source: str = "engine") -> None:
        """The world failed: hold every request and tell the supervisor (final only once it says so).

        Args:
            reason: What failed.
            ranks: The ranks lost, as the launcher knows them.
            source: ``"engine"``, ``"link"`` or ``"job"`` (see :meth:`Broker.fail`).
        """
        if self.final:
            super().fail(reason, ranks, source=source)
            return
        picked = list(ranks or [])
        # A closed link counts once its world was ready (before, the launcher reports the loss; after a
        # loss, the closing link is the lost world's). A re-forming world's loss comes from the launcher.
        ignored = source == "link" and self.state != "ready"
        if ignored or (self.state == "re-forming" and (source != "job" or self.loss.get("world") == self.world)):
            if picked and source == "engine" and not self.loss.get("named"):
                self.loss.update(ranks=sorted(picked), named=True)
            elif picked and not self.loss.get("ranks"):
                self.loss.update(ranks=sorted(picked))
            return
        how = f"{_seen_through(reason, source)}; " + {
            "engine": "rank 0's engine reported it", "link": "rank 0's link closed",
            "job": "the launcher saw a rank end"}.get(source, source)
        self.loss = {"ranks": sorted(picked), "named": bool(picked) and source == "engine", "how": f"{how}: {reason}",
                     "seen": time.time(), "from_ranks": self.plan.get("ranks"), "world": self.world}
        self.state = "re-forming"
        self.reason = reason
        if self._ready is not None:
            self._ready.clear()
        logger.warning("mlxdist-serve: world %d lost rank(s) %s (%s); %d request(s) held", self.world,
                       self.loss["ranks"] or "?", self.loss["how"], len(self.pending))
        self.on_world_lost(reason, self.loss["ranks"], self.loss["how"])

    def give_up(self, reason: str, ranks: list[int]) -> None:
        """No new world will form: end every request with the error, final ``failed``."""
        self.final = True
        self.failed_ranks, self._named = list(ranks), True
        super().fail(reason, ranks, source="job")
        if self._ready is not None:
            self._ready.set()  # the requests waiting for a world get the failure now

    def note(self, **fields: Any) -> None:
        """Record what the supervisor knows of the current loss (``ended``, ``started``, ``lost_hosts``),
        the new world's number (``world``) and where its ranks run (``placement``: added to its plan)."""
        world = fields.pop("world", None)
        if world is not None:
            self.world = world
        placement = fields.pop("placement", None)
        if placement is not None:
            self.placement = dict(placement)
        self.loss.update(fields)

    def health(self) -> dict[str, Any]:
        """The ``/health`` body: ``re-forming`` (with the loss) while a new world forms."""
        body = super().health()
        body["world"] = self.world
        if self.state == "re-forming":
            body["re_forming"] = {"lost_ranks": self.loss.get("ranks"), "how": self.loss.get("how"),
                                  "since_seconds": round(time.time() - self.loss.get("seen", time.time()), 3)}
        return body
