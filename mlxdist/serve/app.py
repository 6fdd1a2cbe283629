"""The HTTP front door: OpenAI's chat and text completion endpoints, models, health and counters.

A Starlette app over a :class:`~mlxdist.serve.broker.Broker`. It tokenizes
(with the chat template) and detokenizes itself, so the ranks only ever see
token ids. It can run in the process that supervises the ranks or in rank 0.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlxdist.serve.broker import Broker, Pending
from mlxdist.serve.requests import ApiError, Sampling, check_model, parse_messages, parse_prompt, parse_sampling
from mlxdist.serve.text import TextAssembler, chat_prompt, text_prompt

__all__ = ["ServeConfig", "build_app"]


@dataclass
class ServeConfig:
    """What the front door needs to know.

    Attributes:
        model_names: Names the ``model`` field may give (the first is reported).
        tokenizer: mlx-lm's tokenizer wrapper of the checkpoint.
        context: The model's context length in tokens.
        vocab_size: Token ids must be below it.
        eos_ids: End-of-sequence ids.
        max_tokens: Server-side cap on generated tokens per request.
        api_key: Bearer token required on ``/v1`` and ``/stats``, or None.
        max_body: Largest request body in bytes (413 beyond).
        timeout: The per-operation deadline (bounds waits for counters).
    """

    model_names: tuple[str, ...]
    tokenizer: Any
    context: int
    vocab_size: int
    eos_ids: set[int]
    max_tokens: int
    api_key: Optional[str]
    max_body: int
    timeout: float


def _error(exc: ApiError) -> JSONResponse:
    headers = None if exc.retry_after is None else {"Retry-After": str(exc.retry_after)}
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _body(request: Request, config: ServeConfig) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > config.max_body:
        raise ApiError(413, f"the request body exceeds {config.max_body} bytes", "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > config.max_body:
            raise ApiError(413, f"the request body exceeds {config.max_body} bytes", "request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_type")
    return body


def _authorize(request: Request, config: ServeConfig) -> None:
    if config.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), config.api_key.encode()):
        raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", "invalid_api_key")


def build_app(broker: Broker, config: ServeConfig) -> Starlette:
    """The ASGI app.

    Args:
        broker: The link to the engine (started by the caller's lifespan).
        config: See :class:`ServeConfig`.

    Returns:
        A Starlette application.
    """
    created = int(time.time())

    async def events(pending: Pending, assembler: TextAssembler) -> AsyncIterator[tuple[str, Optional[str]]]:
        while True:
            event = await pending.events.get()
            if event.error is not None:
                raise event.error
            assert event.token is not None
            piece, finish = assembler.add(event.token, event.finish)
            if finish is not None and event.finish is None:
                broker.cancel(pending)  # a stop string ended it before the engine did
            yield piece, finish
            if finish is not None:
                return

    def usage(pending: Pending, assembler: TextAssembler) -> dict[str, Any]:
        return {"prompt_tokens": pending.prompt_tokens, "completion_tokens": assembler.tokens,
                "total_tokens": pending.prompt_tokens + assembler.tokens,
                "prompt_tokens_details": {"cached_tokens": pending.cached_tokens}}

    async def until_done(request: Request, pending: Pending, assembler: TextAssembler) -> tuple[str, str]:
        async def collect() -> tuple[str, str]:
            text, finish = [], "length"
            async for piece, reason in events(pending, assembler):
                text.append(piece)
                finish = reason or finish
            return "".join(text), finish

        async def disconnected() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)

        work = asyncio.ensure_future(collect())
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                broker.cancel(pending)
        return work.result()

    async def complete(request: Request, chat: bool) -> Response:
        try:
            _authorize(request, config)
            body = await _body(request, config)
            check_model(body, config.model_names)
            if chat:
                prompt = chat_prompt(config.tokenizer, parse_messages(body))
            else:
                prompt = text_prompt(config.tokenizer, parse_prompt(body), config.vocab_size)
            sampling = parse_sampling(body, len(prompt), context=config.context, cap=config.max_tokens,
                                      vocab_size=config.vocab_size)
            await broker.wait_admissible()
            pending = broker.admit(prompt, sampling)
        except ApiError as exc:
            return _error(exc)
        assembler = TextAssembler(config.tokenizer, sampling.stop, config.eos_ids)
        rid = ("chatcmpl-" if chat else "cmpl-") + pending.rid
        head = {"id": rid, "created": int(time.time()), "model": config.model_names[0]}
        if sampling.stream:
            return EventSourceResponse(_stream(pending, assembler, sampling, head, chat), ping=15)
        try:
            text, finish = await until_done(request, pending, assembler)
        except ApiError as exc:
            return _error(exc)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        kind = "chat.completion" if chat else "text_completion"
        return JSONResponse({**head, "object": kind, "choices": [choice], "usage": usage(pending, assembler)})

    async def _stream(pending: Pending, assembler: TextAssembler, sampling: Sampling, head: dict[str, Any],
                      chat: bool) -> AsyncIterator[dict[str, str]]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: Optional[str], finish: Optional[str], first: bool = False) -> dict[str, str]:
            if chat:
                delta: dict[str, Any] = {} if piece is None else {"content": piece}
                if first:
                    delta["role"] = "assistant"
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
            return {"data": json.dumps({**head, "object": kind, "choices": [choice]})}

        try:
            if chat:
                yield chunk("", None, first=True)
            async for piece, finish in events(pending, assembler):
                if piece:
                    yield chunk(piece, None)
                if finish is not None:
                    yield chunk(None, finish)
            if sampling.include_usage:
                yield {"data": json.dumps({**head, "object": kind, "choices": [],
                                           "usage": usage(pending, assembler)})}
            yield {"data": "[DONE]"}
        except ApiError as exc:
            yield {"event": "error", "data": json.dumps(exc.body())}
        finally:
            broker.cancel(pending)  # the client went away (or it already ended: no-op)

    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    async def models(request: Request) -> Response:
        try:
            _authorize(request, config)
        except ApiError as exc:
            return _error(exc)
        return JSONResponse({"object": "list", "data": [
            {"id": config.model_names[0], "object": "model", "created": created, "owned_by": "mlxdist"}]})

    async def health(request: Request) -> Response:
        body = {**broker.health(), "model": config.model_names[0]}
        return JSONResponse(body, status_code=200 if broker.state == "ready" else 503)

    async def stats(request: Request) -> Response:
        try:
            _authorize(request, config)
            ranks = await broker.rank_stats(timeout=config.timeout + 5)
        except ApiError as exc:
            return _error(exc)
        return JSONResponse({"ranks": ranks, "cancelled_at": broker.cancelled_at})

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(ApiError(404, f"no route {request.method} {request.url.path}", "not_found"))

    async def bad_method(request: Request, exc: Exception) -> Response:
        return _error(ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                               "method_not_allowed", kind="invalid_request_error"))

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method})

