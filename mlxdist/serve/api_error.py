"""Errors answered in OpenAI's shape: ``{"error": {"message", "type", "code", "param"}}``."""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["ApiError"]


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "code", "param"}}``.

    Args:
        status: HTTP status.
        message: What was wrong, for the client.
        code: A short machine-readable code.
        param: The request field at fault, if one is.
        kind: OpenAI's error type (by default from the status).
        retry_after: Seconds the client should wait before retrying (sent as
            ``Retry-After``), or None.
    """

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}

    def __init__(self, status: int, message: str, code: str, param: Optional[str] = None,
                 kind: Optional[str] = None, retry_after: Optional[int] = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.kind = kind or self.TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {"error": {"message": self.message, "type": self.kind, "code": self.code, "param": self.param}}
