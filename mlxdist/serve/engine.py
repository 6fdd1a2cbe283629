"""The rank side of the server: every rank decodes the same batch, step by step.

Rank 0 reads requests and cancellations from the front door's link. Before
each step it hands the step's work to every rank with a broadcast of a JSON
value (new requests with their token ids, sampling parameters and the prompt
cache entry each starts from, requests to drop, prompt cache entries to
forget, whether to report counters or stop), so all ranks insert and remove
the same requests in the same order and run the same batched forward
(mlx-lm's :class:`~mlx_lm.generate.BatchGenerator` over the sharded model).
A finished request's cache is kept on every rank (its shard) under the
request's id, and so is a cancelled one's (the prompt and the tokens made
before the cancel: the cancel is applied at the same step on every rank, so
every rank keeps the same tokens); rank 0's
:class:`~mlxdist.serve.prompt_cache.CacheIndex` decides which entry later
requests reuse and which are dropped. A request with ``n`` choices is ``n``
engine requests with the same prompt: each looks the cache up on its own and
reuses the entry it finds (the entry stays whole, so every choice can start
from it), and each one's cache is stored when it finishes. New requests that
share a longer prefix than any entry holds get one (rank 0 plans it with the
step's work): every rank prefills the prefix once, or copies it out of a
running request's cache, before the requests start from it.
Rank 0 then sends the step's tokens to the front door. Every collective, the
model's included, runs under mlxdist's per-operation deadline: a rank that
dies or stalls fails the step on every live rank, and rank 0 tells the front
door before the job ends.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any, Optional

import mlx.core as mx
import numpy as np

import mlxdist
from mlxdist.deadline import watched
from mlxdist.errors import DistributedError, InvalidArgumentError
from mlxdist.group import Group
from mlxdist.serve.failures import lost_ranks
from mlxdist.serve.prompt_cache import DEFAULT_BYTES, CacheIndex, CacheStore, Reuse, always_trimmable, plan_sharing
from mlxdist.serve.protocol import LinkClient, ProtocolError
from mlxdist.serve.sampling import LOWEST_LOGPROB, processors_for, sampler_for

__all__ = ["Engine", "IDLE_DEADLINE", "default_prefill_batch"]

# Seconds (at least) the ranks of an idle server wait for work.
IDLE_DEADLINE = 60.0

logger = logging.getLogger("mlxdist.serve")


def _logprobs(logprobs: mx.array, token: int, top: int) -> list[Any]:
    """``[logprob of token, [[token, logprob], ...] of the top most likely]`` from a step's logprobs."""
    values = logprobs.astype(mx.float32)
    chosen = max(float(values[token].item()), LOWEST_LOGPROB)
    if top == 0:
        return [chosen, []]
    order = mx.argsort(-values)[:top].tolist()
    picked = values[mx.array(order)].tolist()
    return [chosen, [[int(t), max(float(v), LOWEST_LOGPROB)] for t, v in zip(order, picked)]]


def default_prefill_batch() -> int:
    """New prompts prefilled together by default: 8 on a GPU (mlx-lm's default), 1 on the CPU.

    A batched prefill's forward costs what its prompts cost one after the other
    on the CPU (it is bound by compute), and every prompt in it waits for the
    longest: one at a time, each request starts decoding as soon as its own
    prompt is in, and the mean time to first token halves for 8 at once.
    """
    return 8 if mx.default_device().type == mx.DeviceType.gpu else 1


class _CountingModel:
    """The model, counting its forward passes (prefill chunks and decode steps alike)."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.forwards = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.forwards += 1
        return self._model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class Engine:
    """One rank's serving loop.

    Args:
        model: The sharded mlx-lm model (:func:`mlxdist.lm.load`).
        group: The group it is sharded over.
        plan: The description sent to the front door (mlxdist.lm's plan: mode, experts, family, shares, ...).
        link: Rank 0's link to the front door (None on the other ranks).
        max_concurrent: Requests decoded together; more wait in the batch queue.
        prefill_batch: New prompts prefilled together in one forward (default
            :func:`default_prefill_batch`).
        eos_ids: Token ids that end a request.
        vocab_size: Token ids must be below it.
        timeout: Seconds each step (its collectives and forward) may take.
        prompt_cache_bytes: Bound on the prompt cache's bytes per rank (0: no cache).
    """

    def __init__(
        self,
        model: Any,
        group: Group,
        plan: dict[str, Any],
        *,
        link: Optional[LinkClient],
        max_concurrent: int,
        prefill_batch: Optional[int] = None,
        eos_ids: list[int],
        vocab_size: int,
        timeout: Optional[float],
        prompt_cache_bytes: int = DEFAULT_BYTES,
    ) -> None:
        from mlx_lm.generate import BatchGenerator

        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.plan = plan
        self.link = link
        self.vocab_size = vocab_size
        self.timeout = timeout
        # Rank 0 offers work at least this often, so idle ranks never wait out the deadline.
        self.idle_tick = 0.5 if timeout is None else min(0.5, timeout / 4)
        # While no request runs, the ranks wait for work under a longer deadline: a rank slowed
        # down (a busy machine) fails no one then, and a stalled one is still found by the first
        # step that has work (under ``timeout``) or by the front door's stall bound.
        self.idle_timeout = None if timeout is None else max(IDLE_DEADLINE, 4 * timeout)
        self.model = _CountingModel(model)
        self.generator = BatchGenerator(
            self.model,
            stop_tokens=[[int(e)] for e in eos_ids],
            completion_batch_size=max_concurrent,
            prefill_batch_size=min(prefill_batch or default_prefill_batch(), max_concurrent),
        )
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.step = 0
        self.uid_of: dict[str, int] = {}
        self.id_of: dict[int, str] = {}
        self.generated: dict[str, int] = {}
        # Prompt tokens each running request took from the prompt cache.
        self.reused: dict[str, int] = {}
        # Requests that asked for logprobs: how many alternatives each reports.
        self.top_logprobs: dict[str, int] = {}
        self.counters = {"steps": 0, "forwards": 0, "generated_tokens": 0, "requests": 0, "cancelled": 0,
                         "prompt_cache_hits": 0, "cached_tokens": 0, "shared_prefixes": 0, "shared_prefill_tokens": 0}
        # The prompt cache: every rank's own shards; rank 0 decides (the index) and hands out drops.
        self.caching = prompt_cache_bytes > 0
        self.store = CacheStore()
        self.index = CacheIndex(prompt_cache_bytes) if self.rank == 0 and self.caching else None
        self.evict: list[str] = []
        # Whether a forward mlx-lm started is still running.
        self.in_flight = False
        # Whether every rank's caches stay trimmable (agreed when the ranks meet): shared prefixes
        # are planned to be cut only then.
        self.trimmable = False
        # What the last cancellation looked like on this rank (for /stats).
        self.last_cancel: dict[str, Any] = {}

    # -- rank 0: the link ------------------------------------------------------

    def _read_link(self) -> None:
        assert self.link is not None
        while True:
            try:
                message = self.link.receive()
            except ProtocolError as exc:
                logger.error("mlxdist-serve: dropping a malformed link message: %s", exc)
                continue
            if message is None:
                self.inbox.put({"type": "shutdown"})
                return
            self.inbox.put(message)

    def _collect(self) -> dict[str, Any]:
        """Rank 0: this step's work, waiting up to the idle tick when nothing is running."""
        work = self._gather()
        if self.index is not None and work["submit"]:
            work["share"] = self._plan_sharing(work["submit"])
        return work

    def _plan_sharing(self, submits: list[dict[str, Any]]) -> list[list[Any]]:
        """Rank 0: the shared prefixes worth an entry; points the new requests at them."""
        held = self.generator.extract_cache(list(self.id_of)) if self.id_of else {}
        running = {}
        for uid, (_, tokens) in held.items():
            rid = self.id_of[uid]
            if len(tokens) > self.reused[rid]:  # it computed some of its prompt (a queued one holds only its reuse)
                running[rid] = list(tokens)
        valid = [s for s in submits if self._problem(s) is None]
        shares, choice = plan_sharing(
            [s["prompt"] for s in valid], [None if s["reuse"] is None else Reuse(*s["reuse"]) for s in valid],
            running, trimmable=self.trimmable, key=f"shared-{self.step}")
        for submit, reuse in zip(valid, choice):
            if reuse is not None:
                submit["reuse"] = [reuse.entry, reuse.tokens]
        return [[s.entry, list(s.tokens), s.source, None if s.base is None else [s.base.entry, s.base.tokens]]
                for s in shares]

    def _gather(self) -> dict[str, Any]:
        work: dict[str, Any] = {"step": self.step, "submit": [], "cancel": [], "stats": False, "stop": False,
                                "evict": self.evict, "share": []}
        self.evict = []
        wait = self.idle_tick if not self.uid_of else 0.0
        deadline = time.monotonic() + wait
        while True:
            try:
                message = self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return work
            kind = message["type"]
            if kind in ("submit", "resume"):
                reuse = self.index.lookup(message["prompt"]) if self.index is not None else None
                work["submit"].append({"drawn": 0, **{k: v for k, v in message.items() if k != "type"},
                                       "reuse": None if reuse is None else [reuse.entry, reuse.tokens]})
            elif kind == "cancel":
                work["cancel"].append([message["id"], self.step])
            elif kind == "stats_request":
                work["stats"] = True
            elif kind == "shutdown":
                work["stop"] = True
            deadline = time.monotonic()  # take what else is queued, then go

    def _send(self, kind: str, **fields: Any) -> None:
        if self.link is None:
            return
        try:
            self.link.send(kind, **fields)
        except DistributedError:
            self.inbox.put({"type": "shutdown"})

    # -- every rank ------------------------------------------------------------

    def _problem(self, request: dict[str, Any]) -> Optional[str]:
        """Why every rank must skip a request (rank 0 says it to the front door), or None."""
        rid = request["id"]
        problem = None
        if rid in self.uid_of:
            problem = f"request id {rid!r} is already running"
        elif any(t >= self.vocab_size for t in request["prompt"]) or any(
                int(t) >= self.vocab_size for t in request["logit_bias"]):
            problem = f"token ids must be below the vocabulary size {self.vocab_size}"
        elif (request["max_tokens"] < 1 or request["temperature"] < 0 or not 0 < request["top_p"] <= 1
              or request["top_k"] < 0 or not 0 <= request["min_p"] <= 1 or request["repetition_penalty"] < 0):
            problem = ("max_tokens must be >= 1, temperature >= 0, top_p in (0, 1], top_k >= 0, min_p in [0, 1] "
                       "and repetition_penalty >= 0")
        return problem

    def _submit(self, request: dict[str, Any]) -> None:
        rid = request["id"]
        problem = self._problem(request)
        if problem is not None:  # every rank skips it alike; rank 0 says why
            self._send("rejected", id=rid, message=problem)
            return
        prompt = request["prompt"]
        cached, caches = 0, None
        if request.get("reuse"):
            entry, cached = request["reuse"]
            caches = [self.store.take(Reuse(entry, cached))]
            self.counters["prompt_cache_hits"] += 1
            self.counters["cached_tokens"] += cached
        (uid,) = self.generator.insert([prompt[cached:]], max_tokens=[request["max_tokens"]],
                                       samplers=[sampler_for(request)],
                                       logits_processors=[processors_for(request, self.vocab_size)],
                                       caches=caches, all_tokens=[prompt[:cached]])
        if cached:
            self._send("cached", id=rid, tokens=cached)
        if request["logprobs"] >= 0:
            self.top_logprobs[rid] = request["logprobs"]
        self.uid_of[rid], self.id_of[uid] = uid, rid
        self.generated[rid] = 0
        self.reused[rid] = cached
        self.counters["requests"] += 1

    def _cancel(self, rid: str, received_at: int) -> Optional[tuple[str, list[Any], list[int]]]:
        """Drop a request; ``(rid, cache, tokens)`` to keep when it built on what it reused, else None."""
        uid = self.uid_of.pop(rid, None)
        if uid is None:
            return None  # already finished
        held = self.generator.remove([uid], return_prompt_caches=self.caching).get(uid)
        del self.id_of[uid]
        self.top_logprobs.pop(rid, None)
        self.counters["cancelled"] += 1
        self.last_cancel = {"id": rid, "tokens": self.generated.pop(rid), "received_step": received_at,
                            "removed_step": self.step}
        reused = self.reused.pop(rid)
        if held is None or len(held[1]) <= reused:
            return None  # caching off, or still queued: it holds nothing beyond the entry it started from
        cache, tokens = held
        return rid, cache, list(tokens)

    def _stats(self) -> dict[str, Any]:
        return {"rank": self.rank, "pid": os.getpid(), "active": len(self.uid_of), **self.counters,
                "forwards": self.model.forwards, "last_cancel": self.last_cancel,
                "prompt_cache_entries": len(self.store.entries), "prompt_cache_bytes": self.store.nbytes}

    def _keep(self, kept: list[tuple[str, list[Any], list[int]]]) -> None:
        """Store requests' caches ``(rid, cache, the tokens it holds)`` on every rank; rank 0 indexes
        them and picks what to drop.

        The ranks agree on each entry's size (the largest shard) and on whether
        every shard can be trimmed, so rank 0's bound holds on every rank.
        """
        facts = []
        for rid, cache, tokens in kept:
            size = self.store.put(rid, cache, len(tokens))
            facts += [size, 0 if self.store.trimmable(rid) else 1]
        agreed = np.asarray(mlxdist.all_max(np.asarray(facts, dtype=np.int64), group=self.group)).tolist()
        if self.index is None:
            return
        for k, (rid, _, tokens) in enumerate(kept):
            self.evict += self.index.add(rid, tokens, int(agreed[2 * k]), trimmable=not agreed[2 * k + 1])

    def _share(self, shares: list[list[Any]]) -> None:
        """Make rank 0's shared-prefix entries: prefilled here, or copied out of a running request's cache."""
        kept = []
        for entry, tokens, source, base in shares:
            if source is not None:
                uid = self.uid_of[source]
                cache, held = self.generator.extract_cache([uid])[uid]
                if list(held) != tokens:
                    raise InvalidArgumentError(f"rank {self.rank}: request {source!r}'s cache holds {len(held)} tokens, "
                                            f"rank 0 planned a shared prefix of {len(tokens)} from it")
            else:
                cache = self._prefill(tokens, None if base is None else Reuse(*base))
            kept.append((entry, cache, tokens))
            self.counters["shared_prefixes"] += 1
        if kept:
            self._keep(kept)

    def _prefill(self, tokens: list[int], base: Optional[Reuse]) -> list[Any]:
        """A cache holding ``tokens``: prefilled on every rank (on top of a prompt cache entry's prefix)."""
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model) if base is None else self.store.take(base)
        start, step = (0 if base is None else base.tokens), self.generator.prefill_step_size
        with watched("serve prefix", group=self.group, timeout=self.timeout), mx.stream(self.generator.stream):
            for at in range(start, len(tokens), step):
                self.model(mx.array(tokens[at:at + step])[None], cache=cache)
                mx.eval([c.state for c in cache])
        self.counters["shared_prefill_tokens"] += len(tokens) - start
        return cache

    def _decode(self) -> list[list[Any]]:
        """One step of the batch (a prefill chunk and/or one decode forward); the tokens it produced."""
        with watched("serve step", group=self.group, timeout=self.timeout):
            _, responses = self.generator.next()
        # mlx-lm leaves the next forward running (its collectives included): this step's tokens
        # go out while it runs, and it ends before the next collective (:meth:`_settle`).
        self.in_flight = True
        events, finished = [], []
        for response in responses:
            rid = self.id_of.get(response.uid)
            if rid is None:
                continue
            self.generated[rid] += 1
            self.counters["generated_tokens"] += 1
            event = [rid, int(response.token), response.finish_reason]
            if rid in self.top_logprobs and self.link is not None:  # only rank 0 reports them
                event += _logprobs(response.logprobs, int(response.token), self.top_logprobs[rid])
            if response.finish_reason is not None:
                del self.uid_of[rid], self.id_of[response.uid], self.generated[rid], self.reused[rid]
                self.top_logprobs.pop(rid, None)
                if self.caching and response.prompt_cache is not None:
                    finished.append((rid, response.prompt_cache, list(response.all_tokens)))
            events.append(event)
        if finished:
            self._settle()
            self._keep(finished)
        return events

    def _settle(self) -> None:
        """Wait for the forward mlx-lm left running: no other collective may start before it ends."""
        if self.in_flight:
            with watched("serve step", group=self.group, timeout=self.timeout):
                mx.synchronize(self.generator.stream)
            self.in_flight = False

    def run(self) -> None:
        """Serve until the front door says stop (or goes away).

        Raises:
            DeadlineExceeded, PeerLostError, CommunicationError: the world
                failed (rank 0 has told the front door).
        """
        if self.link is not None:
            threading.Thread(target=self._read_link, name="mlxdist-serve-link", daemon=True).start()
        # Ranks finish loading and building their engines at different times: they meet
        # under the start's deadline, and only then serve under the per-step one.
        from mlx_lm.models.cache import make_prompt_cache

        met = mlxdist.all_gather_object([os.getpid(), always_trimmable(make_prompt_cache(self.model))],
                                        group=self.group)
        self.trimmable = all(trims for _, trims in met)
        self._send("ready", plan={**self.plan, "ranks": self.size, "pids": [pid for pid, _ in met]})
        deadline: Any = "start"
        try:
            while True:
                work = self._collect() if self.rank == 0 else None
                # Each rank bounds its own wait: the short deadline while requests run, and on
                # rank 0 also for a hand-off that carries work (a rank stalled as a request
                # arrives is found within it); the others wait for work under the idle one.
                busy = bool(self.uid_of) or (work is not None and any(
                    work[key] for key in ("submit", "cancel", "stats", "stop", "evict")))
                wanted = self.timeout if busy else self.idle_timeout
                if self.size > 1 and wanted != deadline:
                    mlxdist.set_timeout(wanted, self.group)
                    deadline = wanted
                self._settle()
                work = mlxdist.broadcast_object(work, 0, group=self.group)
                self.step = work["step"] + 1
                self.counters["steps"] += 1
                if work["stop"]:
                    return
                self.store.drop(work["evict"])
                self._share(work["share"])
                for request in work["submit"]:
                    self._submit(request)
                cancelled = [self._cancel(rid, received_at) for rid, received_at in work["cancel"]]
                kept = [entry for entry in cancelled if entry is not None]
                if kept:
                    self._keep(kept)
                if work["stats"]:
                    self._send("stats", ranks=mlxdist.all_gather_object(self._stats(), group=self.group))
                if self.uid_of:
                    events = self._decode()
                    if events:
                        self._send("step", events=events, stats=self._stats())
        except DistributedError as exc:
            self._send("failed", message=f"rank {self.rank}: {type(exc).__name__}: {exc}",
                       ranks=lost_ranks(exc, self.rank))
            raise
        finally:
            self.generator.close()
