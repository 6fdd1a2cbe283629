"""OpenAI request bodies -> checked generation parameters; errors in OpenAI's shape.

Every way a body can be wrong is an :class:`ApiError` with its HTTP status
(the README's bad-input table lists them); nothing a client sends reaches the
ranks unchecked.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["ApiError", "Sampling", "ROLES", "parse_sampling", "parse_messages", "parse_prompt"]

ROLES = ("system", "developer", "user", "assistant", "tool")
_MAX_STOPS = 4
_MAX_BIASES = 300


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


def _bad(message: str, param: Optional[str], code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code, param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


@dataclass
class Sampling:
    """Checked generation parameters of one request."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logit_bias: dict[str, float] = field(default_factory=dict)


def check_model(body: dict[str, Any], served: tuple[str, ...]) -> None:
    """Raise 404 when ``body["model"]`` names a model this server does not serve (absent is fine)."""
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise _bad("'model' must be a string", "model", "invalid_type")
    if model not in served:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {served[0]!r}",
                       "model_not_found", "model")


def _logit_bias(body: dict[str, Any], vocab_size: int) -> dict[str, float]:
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if not isinstance(bias, dict) or len(bias) > _MAX_BIASES:
        raise _bad(f"'logit_bias' must be an object of at most {_MAX_BIASES} token ids", "logit_bias", "invalid_type")
    checked = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < vocab_size):
            raise _bad(f"'logit_bias' keys must be token ids below {vocab_size}, got {key!r}", "logit_bias")
        if not _is_number(value) or not -100 <= value <= 100:
            raise _bad(f"'logit_bias' values must be numbers in [-100, 100], got {value!r}", "logit_bias")
        checked[str(int(key))] = float(value)
    return checked


def parse_sampling(body: dict[str, Any], prompt_tokens: int, *, context: int, cap: int,
                   vocab_size: int) -> Sampling:
    """The generation parameters of a chat or text completion body.

    Args:
        body: The decoded JSON object.
        prompt_tokens: Length of the tokenized prompt.
        context: The model's context length (prompt plus generated tokens).
        cap: The server's ``--max-tokens``: larger requests are cut to it.
        vocab_size: Token ids (``logit_bias`` keys) must be below it.

    Returns:
        The parameters; ``max_tokens`` defaults to what fits, at most ``cap``.

    Raises:
        ApiError: 400 for wrong types or values, or a request beyond the context.
    """
    requested = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if requested is not None:
        if not _is_int(requested):
            raise _bad(f"'{name}' must be an integer", name, "invalid_type")
        if requested < 1:
            raise _bad(f"'{name}' must be at least 1, got {requested}", name)
    if prompt_tokens >= context or (requested is not None and prompt_tokens + requested > context):
        raise _bad(f"this model's context is {context} tokens; the prompt has {prompt_tokens} and "
                   f"{requested if requested is not None else 'at least 1'} more were requested",
                   "messages" if "messages" in body else "prompt", "context_length_exceeded")
    max_tokens = min(cap, context - prompt_tokens, requested if requested is not None else cap)
    temperature = body.get("temperature")
    if temperature is None:
        temperature = 1.0
    elif not _is_number(temperature):
        raise _bad("'temperature' must be a number", "temperature", "invalid_type")
    elif temperature < 0:
        raise _bad(f"'temperature' must be >= 0, got {temperature}", "temperature")
    top_p = body.get("top_p")
    if top_p is None:
        top_p = 1.0
    elif not _is_number(top_p):
        raise _bad("'top_p' must be a number", "top_p", "invalid_type")
    elif not 0 < top_p <= 1:
        raise _bad(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(31)
    elif not _is_int(seed):
        raise _bad("'seed' must be an integer", "seed", "invalid_type")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= _MAX_STOPS:
        stops = list(stop)
    else:
        raise _bad(f"'stop' must be a string or a list of at most {_MAX_STOPS} strings", "stop", "invalid_type")
    stops = [s for s in stops if s]
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise _bad("only n=1 is supported", "n")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise _bad("'stream_options' must be an object with a boolean 'include_usage'", "stream_options",
                   "invalid_type")
    return Sampling(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                    seed=int(seed) % (2**63), stop=stops, stream=stream,
                    include_usage=bool(options.get("include_usage", False)),
                    logit_bias=_logit_bias(body, vocab_size))


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _bad(f"{where}.content parts must be {{'type': 'text', 'text': str}}", "messages",
                           "invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise _bad(f"{where}.content must be a string or a list of text parts", "messages", "invalid_type")


def parse_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages of a body, as ``[{"role", "content"}]`` with text content.

    Raises:
        ApiError: 400 when missing, empty, not a list of objects, or with an unknown role.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _bad("'messages' must be a list of message objects", "messages", "invalid_type")
    if not messages:
        raise _bad("'messages' must hold at least one message", "messages")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object", "messages", "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role must be one of {list(ROLES)}, got {role!r}", "messages")
        checked.append({"role": "system" if role == "developer" else role,
                        "content": _content_text(message.get("content"), where)})
    return checked


def parse_prompt(body: dict[str, Any]) -> str | list[int]:
    """The prompt of a text completion: a string or a list of token ids (one prompt per request).

    Raises:
        ApiError: 400 when missing, empty, of the wrong type, or several prompts.
    """
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("'prompt' must not be empty", "prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if any(t < 0 for t in prompt):
            raise _bad("'prompt' token ids must be >= 0", "prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise _bad("one prompt per request: send several requests (they are batched together)", "prompt")
    raise _bad("'prompt' must be a non-empty string or list of token ids", "prompt", "invalid_type")
