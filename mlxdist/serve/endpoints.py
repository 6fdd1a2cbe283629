"""The HTTP endpoints: OpenAI's chat and text completions, models, health, counters and metrics.

Each endpoint is a function of the request that reads the app's state
(``request.app.state``: the :class:`~mlxdist.serve.broker.Broker`, the
:class:`ServeConfig` and the tokenizer's worker thread). The front door
tokenizes (with the chat template, on that worker thread, off the event
loop) and detokenizes itself, so the ranks only ever see token ids.
:func:`build_app` puts the endpoints together with the access log, request
ids, CORS and the answer to unexpected errors (:mod:`mlxdist.serve.access`); each
choice's answer is put in OpenAI's shapes by :mod:`mlxdist.serve.answers`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Optional

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlxdist.serve.access import AccessLog, request_id
from mlxdist.serve.answers import Answer, delta, logprobs_field, message, usage
from mlxdist.serve.api_error import ApiError
from mlxdist.serve.broker import SHUTTING_DOWN, Broker, Pending
from mlxdist.serve.metrics import CONTENT_TYPE
from mlxdist.serve.options import ServeOptions
from mlxdist.serve.text import chat_prompt, text_prompt
from mlxdist.serve.validation import CompletionRequest, Sampling, fit_max_tokens, parse_request

__all__ = ["ServeConfig", "build_app"]

logger = logging.getLogger("mlxdist.serve.access")


@dataclass(frozen=True)
class ServeConfig:
    """What the endpoints need to know.

    Attributes:
        model_names: Names the ``model`` field may give (the first is reported).
        tokenizer: mlx-lm's tokenizer wrapper of the checkpoint.
        context: The model's context length in tokens.
        vocab_size: Token ids must be below it.
        eos_ids: End-of-sequence ids.
        options: The server's options (``max_tokens``, ``api_key``, ``max_body``, ``timeout``, ``cors_origins``).
    """

    model_names: tuple[str, ...]
    tokenizer: Any
    context: int
    vocab_size: int
    eos_ids: frozenset[int]
    options: ServeOptions


def _error(exc: ApiError) -> JSONResponse:
    headers = None if exc.retry_after is None else {"Retry-After": str(exc.retry_after)}
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _state(request: Request) -> tuple[Broker, ServeConfig]:
    return request.app.state.broker, request.app.state.config


async def _body(request: Request, limit: int) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body exceeds {limit} bytes", "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body exceeds {limit} bytes", "request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_type")
    return body


def _authorize(request: Request, api_key: Optional[str]) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", "invalid_api_key")


def _prompt_tokens(config: ServeConfig, request: CompletionRequest) -> list[int]:
    if request.chat:
        return chat_prompt(config.tokenizer, request)
    return text_prompt(config.tokenizer, request.prompt)


async def _admit(request: Request, chat: bool) -> tuple[CompletionRequest, Sampling, list[int], list[Pending]]:
    """Check, tokenize (off the event loop) and admit a completion request: one engine request per choice
    (choice ``i`` draws with seed ``seed + i``)."""
    broker, config = _state(request)
    options = config.options
    _authorize(request, options.api_key)
    parsed = parse_request(await _body(request, options.max_body), chat=chat, served=config.model_names,
                           vocab_size=config.vocab_size)
    loop = asyncio.get_running_loop()
    prompt = await loop.run_in_executor(request.app.state.tokenizing, _prompt_tokens, config, parsed)
    sampling = fit_max_tokens(parsed, len(prompt), context=config.context, cap=options.max_tokens)
    await broker.wait_admissible()
    rid, pendings = request_id(request), []
    try:
        for i in range(parsed.choices):
            choice = sampling if i == 0 else replace(sampling, seed=(sampling.seed + i) % (2**63))
            pendings.append(broker.admit(prompt, choice, rid=rid if i == 0 else f"{rid}-{i}"))
    except ApiError:
        for pending in pendings:
            broker.cancel(pending)
        raise
    return parsed, sampling, prompt, pendings


async def _events(broker: Broker, pending: Pending, answer: Answer) -> AsyncIterator[tuple[
        list[tuple[str, Any]], Optional[dict[str, Any]], Optional[str]]]:
    while True:
        event = await pending.events.get()
        if event.error is not None:
            raise event.error
        pieces, entry, finish = answer.add(event)
        if finish is not None and event.finish is None:
            broker.cancel(pending)  # a stop string ended it before the engine did
        yield pieces, entry, finish
        if finish is not None:
            return


async def _until_done(request: Request, broker: Broker, pending: Pending, answer: Answer) -> Optional[
        tuple[list[tuple[str, Any]], list[dict[str, Any]], str]]:
    """Every piece of a non-streamed request; None when the client went away first (it is then cancelled)."""
    async def collect() -> tuple[list[tuple[str, Any]], list[dict[str, Any]], str]:
        pieces, entries, finish = [], [], "length"
        async for new, entry, reason in _events(broker, pending, answer):
            pieces.extend(new)
            if entry is not None:
                entries.append(entry)
            finish = reason or finish
        return pieces, entries, finish

    async def disconnected() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    work = asyncio.ensure_future(collect())
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        gone = not work.done()
        if gone:  # (a cancelled task is done only once it ran again: never ask it for a result here)
            work.cancel()
            broker.cancel(pending)
    return None if gone else work.result()


async def _completion(request: Request, chat: bool) -> Response:
    broker, config = _state(request)
    try:
        parsed, sampling, prompt, pendings = await _admit(request, chat)
    except ApiError as exc:
        return _error(exc)
    answers = [Answer(config.tokenizer, config.eos_ids, parsed, sampling, prompt) for _ in pendings]
    head = {"id": ("chatcmpl-" if chat else "cmpl-") + pendings[0].rid, "created": int(time.time()),
            "model": config.model_names[0]}
    echo = config.tokenizer.decode(prompt) if parsed.echo and not isinstance(parsed.prompt, str) else (
        parsed.prompt if parsed.echo else "")
    if sampling.stream:
        return EventSourceResponse(_stream(broker, pendings, answers, sampling, head, echo), ping=15)
    waits = [asyncio.ensure_future(_until_done(request, broker, pending, answer))
             for pending, answer in zip(pendings, answers)]
    broker.answering += 1
    try:
        done = await asyncio.gather(*waits)
    except ApiError as exc:
        return _error(exc)
    finally:
        broker.answering -= 1
        for wait in waits:
            wait.cancel()  # (no-op for those that ended; the others drop their engine requests)
    if any(d is None for d in done):
        return Response(status_code=499)  # nobody reads it
    choices = []
    for index, (pieces, entries, finish) in enumerate(done):  # type: ignore[misc]
        choice: dict[str, Any] = {"index": index, "finish_reason": finish,
                                  "logprobs": logprobs_field(chat, entries) if sampling.logprobs >= 0 else None}
        if chat:
            choice["message"] = message(pieces)
        else:
            choice["text"] = echo + "".join(v for _, v in pieces)
        choices.append(choice)
    kind = "chat.completion" if chat else "text_completion"
    return JSONResponse({**head, "object": kind, "choices": choices, "usage": usage(pendings, answers)})


async def _stream(broker: Broker, pendings: list[Pending], answers: list[Answer], sampling: Sampling,
                  head: dict[str, Any], echo: str) -> AsyncIterator[dict[str, str]]:
    chat = answers[0].chat
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, delta: Any, finish: Optional[str] = None,
              entries: Optional[list[dict[str, Any]]] = None) -> dict:
        logprobs = None if entries is None else logprobs_field(chat, entries)
        if chat:
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        else:
            choice = {"index": index, "text": delta, "finish_reason": finish, "logprobs": logprobs}
        return {"data": json.dumps({**head, "object": kind, "choices": [choice]})}

    # Each choice's events, as they come, on one queue: (index, item) with item None once it ended.
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            async for item in _events(broker, pendings[index], answers[index]):
                merged.put_nowait((index, item))
        except ApiError as exc:
            merged.put_nowait((index, exc))
            return
        merged.put_nowait((index, None))

    pumps = [asyncio.ensure_future(pump(i)) for i in range(len(pendings))]
    broker.answering += 1
    try:
        for index in range(len(pendings)):
            if chat:
                yield chunk(index, {"role": "assistant", "content": ""})
            elif echo:
                yield chunk(index, echo)
        running = len(pendings)
        while running:
            index, item = await merged.get()
            if isinstance(item, ApiError):
                raise item
            if item is None:
                running -= 1
                continue
            pieces, entry, finish = item
            entries = None if entry is None else [entry]
            if chat:
                for i, (piece_kind, value) in enumerate(pieces):
                    yield chunk(index, delta(piece_kind, value), entries=entries if i == 0 else None)
                if entries is not None and not pieces:
                    yield chunk(index, {}, entries=entries)
            elif pieces or entries is not None:
                yield chunk(index, "".join(v for _, v in pieces), entries=entries)
            if finish is not None:
                yield chunk(index, {} if chat else "", finish)
        if sampling.include_usage:
            yield {"data": json.dumps({**head, "object": kind, "choices": [], "usage": usage(pendings, answers)})}
        yield {"data": "[DONE]"}
    except ApiError as exc:
        yield {"event": "error", "data": json.dumps(exc.body())}
        if exc.code == SHUTTING_DOWN:
            yield {"data": "[DONE]"}
    except Exception:  # the headers went out: the error is the stream's last event
        rid = head["id"].partition("-")[2]
        logger.exception("req-%s: unexpected error in a stream", rid)
        yield {"event": "error", "data": json.dumps(ApiError(
            500, f"internal error (request id req-{rid}; the server's log has the details)", "internal_error").body())}
    finally:
        broker.answering -= 1
        for task in pumps:
            task.cancel()
        for pending in pendings:
            broker.cancel(pending)  # the client went away (or it already ended: no-op)


async def chat_completions(request: Request) -> Response:
    """``POST /v1/chat/completions``."""
    return await _completion(request, chat=True)


async def completions(request: Request) -> Response:
    """``POST /v1/completions``."""
    return await _completion(request, chat=False)


def _not_ready(broker: Broker) -> Optional[ApiError]:
    """The 503 every readiness-reporting endpoint gives while the model cannot answer, else None."""
    if broker.state == "ready" and not broker.draining:
        return None
    why = "draining" if broker.draining else broker.state
    retry = None if broker.state == "failed" or broker.draining else 5
    return ApiError(503, f"the model is not ready ({why})", f"engine_{why.replace('-', '_')}", retry_after=retry)


async def models(request: Request) -> Response:
    """``GET /v1/models``: the served model; 503 (as ``/health``) until it can answer."""
    broker, config = _state(request)
    try:
        _authorize(request, config.options.api_key)
    except ApiError as exc:
        return _error(exc)
    problem = _not_ready(broker)
    if problem is not None:
        return _error(problem)
    return JSONResponse({"object": "list", "data": [
        {"id": config.model_names[0], "object": "model", "created": request.app.state.created,
         "owned_by": "mlxdist"}]})


async def health(request: Request) -> Response:
    """``GET /health``: the state, the plan and counters; 200 only while the model can answer."""
    broker, config = _state(request)
    body = {**broker.health(), "model": config.model_names[0], "draining": broker.draining}
    problem = _not_ready(broker)
    headers = None if problem is None or problem.retry_after is None else {"Retry-After": str(problem.retry_after)}
    return JSONResponse(body, status_code=200 if problem is None else 503, headers=headers)


async def stats(request: Request) -> Response:
    """``GET /stats``: every rank's counters."""
    broker, config = _state(request)
    try:
        _authorize(request, config.options.api_key)
        ranks = await broker.rank_stats(timeout=config.options.timeout + 5)
    except ApiError as exc:
        return _error(exc)
    return JSONResponse({"ranks": ranks, "cancelled_at": broker.cancelled_at})


async def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus' text format (see :mod:`mlxdist.serve.metrics`)."""
    broker, _ = _state(request)
    return Response(broker.metrics.exposition(), media_type=CONTENT_TYPE)


async def _not_found(request: Request, exc: Exception) -> Response:
    return _error(ApiError(404, f"no route {request.method} {request.url.path}", "not_found"))


async def _bad_method(request: Request, exc: Exception) -> Response:
    return _error(ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                           "method_not_allowed", kind="invalid_request_error"))


ROUTES = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/stats", stats, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]


def build_app(broker: Broker, config: ServeConfig) -> Starlette:
    """The ASGI app: :data:`ROUTES` over ``broker``, with the access log and (``--cors-origins``) CORS.

    Args:
        broker: The link to the engine (started by the caller's lifespan).
        config: See :class:`ServeConfig`.

    Returns:
        A Starlette application; its state holds ``broker``, ``config``, ``created`` and
        ``tokenizing`` (the worker thread that tokenizes).
    """
    middleware = [Middleware(AccessLog, metrics=broker.metrics)]
    if config.options.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(config.options.cors_origins),
                                     allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"],
                                     expose_headers=["x-request-id"]))
    app = Starlette(routes=ROUTES, middleware=middleware,
                    exception_handlers={404: _not_found, 405: _bad_method})
    app.state.broker = broker
    app.state.config = config
    app.state.created = int(time.time())
    # One thread: the tokenizer is not used from two threads at once.
    app.state.tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlxdist-serve-tokenize")
    return app
