"""Request ids, the access log and the answer to unexpected errors, as one ASGI middleware.

Every HTTP request gets an id (``req-`` and 24 hex digits; the engine's
request id and the completion's ``id`` are built from it), sent back as
``x-request-id``. With ``--log-level info`` each request is one line of the
``mlxdist.serve.access`` logger: id, client, method, path, status, seconds.
An exception no endpoint answered becomes OpenAI's 500 body naming the
request id (the traceback goes to the log under the same id), and every
answer is counted in ``mlxdist_requests_total``.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any, Awaitable, Callable

from starlette.requests import Request

from mlxdist.serve.metrics import ServeMetrics

__all__ = ["AccessLog", "request_id"]

logger = logging.getLogger("mlxdist.serve.access")

_Send = Callable[[dict[str, Any]], Awaitable[None]]
_KNOWN = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/stats", "/metrics")


def request_id(request: Request) -> str:
    """The id :class:`AccessLog` gave this request (hex digits, without the ``req-`` prefix)."""
    return request.scope["state"]["request_id"]


class AccessLog:
    """The ASGI middleware (see the module docstring).

    Args:
        app: The wrapped ASGI app.
        metrics: Where answered requests are counted.
    """

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: _Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = rid
        began, status, started = time.monotonic(), 500, False

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", f"req-{rid}".encode())]}
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            logger.exception("req-%s: unexpected error on %s %s", rid, scope["method"], scope["path"])
            if started:
                raise
            status = 500
            body = json.dumps({"error": {"message": f"internal error (request id req-{rid}; the server's log "
                                                    "has the details)", "type": "server_error",
                                         "code": "internal_error", "param": None}}).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"), (b"x-request-id", f"req-{rid}".encode()),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
        finally:
            path = scope["path"]
            self.metrics.answered(path if path in _KNOWN else "other", status)
            client = scope.get("client") or ("-", 0)
            logger.info("req-%s %s %s %s %d %.3fs", rid, client[0], scope["method"], path, status,
                        time.monotonic() - began)
