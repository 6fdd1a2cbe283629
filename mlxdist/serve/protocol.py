"""The link between the HTTP front door and the engine (rank 0): JSON lines with a fixed schema.

The front door listens on a local TCP port; rank 0's engine connects and
presents the job's token in its first line. Each message is one JSON object
on one line (``json.dumps`` never writes a raw newline), at most
:data:`MAX_LINE` bytes. Every message is checked against :data:`SCHEMAS`
when it is read: an unknown type, a missing or extra field, or a value of
the wrong type is a :class:`ProtocolError`, never something the other side
executes. Nothing is pickled.

Front door -> engine:

- ``submit``: ``id``, ``prompt`` (token ids), ``max_tokens``,
  ``temperature``, ``top_p``, ``top_k`` (0: off), ``min_p`` (0: off),
  ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty`` (0: off),
  ``seed``, ``logit_bias`` (token id string -> number), ``logprobs`` (-1: none;
  else how many most likely alternatives to report with each token).
- ``resume``: a request of a lost world, on the new one: the ``submit``
  fields (``prompt`` followed by the tokens already generated,
  ``max_tokens`` the ones still to generate) and ``drawn`` (how many the
  request drew before; its sampler skips their draws).
- ``cancel``: ``id``.
- ``stats_request``: ask every rank for its counters.
- ``shutdown``: end the job cleanly.

Engine -> front door:

- ``hello``: ``token`` (the job token), first.
- ``ready``: ``plan`` (mlxdist.lm's plan dict less rank 0's own fields: mode, experts, kinds, reason,
  family, layers, shares, rank_bytes, ...; and ranks, pids, timing).
- ``step``: ``events`` (one per request that produced a token:
  ``[id, token, finish]``, finish None, ``"stop"`` or ``"length"``; a request
  that asked for logprobs gets ``[id, token, finish, logprob, top]``, ``top``
  a list of ``[token, logprob]``, most likely first) and ``stats`` (rank 0's counters).
- ``stats``: ``ranks`` (each rank's counters).
- ``cached``: ``id``, ``tokens`` (the request starts from this many prompt
  tokens of the prompt cache; sent before its first ``step`` event, only when
  more than 0).
- ``rejected``: ``id``, ``message`` (the engine refused a request).
- ``failed``: ``message`` (the world failed; the job ends) and ``ranks`` (the
  ranks the failure names as lost, empty when it names none).
"""

from __future__ import annotations

import json
import socket
import threading
from typing import Any, Optional

from mlxdist.errors import CommunicationError

__all__ = ["MAX_LINE", "LINK_VARIABLE", "TOKEN_VARIABLE", "SCHEMAS", "ProtocolError", "check", "encode", "decode", "LinkClient"]

MAX_LINE = 4 * 1024 * 1024
# The ranks' environment: where rank 0 finds the front door's link, and the token it presents.
LINK_VARIABLE = "MLXDIST_SERVE_LINK"
TOKEN_VARIABLE = "MLXDIST_SERVE_TOKEN"

_INT = (int,)
_NUMBER = (int, float)
_STR = (str,)
_LIST = (list,)
_DICT = (dict,)

# message type -> {field: allowed Python types}; ``type`` is implicit.
SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    "submit": {
        "id": _STR,
        "prompt": _LIST,
        "max_tokens": _INT,
        "temperature": _NUMBER,
        "top_p": _NUMBER,
        "top_k": _INT,
        "min_p": _NUMBER,
        "repetition_penalty": _NUMBER,
        "presence_penalty": _NUMBER,
        "frequency_penalty": _NUMBER,
        "seed": _INT,
        "logit_bias": _DICT,
        "logprobs": _INT,
    },
    "cancel": {"id": _STR},
    "stats": {"ranks": _LIST},
    "stats_request": {},
    "shutdown": {},
    "hello": {"token": _STR},
    "ready": {"plan": _DICT},
    "step": {"events": _LIST, "stats": _DICT},
    "rejected": {"id": _STR, "message": _STR},
    "cached": {"id": _STR, "tokens": _INT},
    "failed": {"message": _STR, "ranks": _LIST},
}
SCHEMAS["resume"] = {**SCHEMAS["submit"], "drawn": _INT}


class ProtocolError(CommunicationError, ValueError):
    """A link message that does not follow the schema."""


def _is(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and not isinstance(value, bool)


def check(message: Any) -> dict[str, Any]:
    """Check a decoded message against :data:`SCHEMAS`.

    Args:
        message: The decoded JSON value.

    Returns:
        The message (a dict with exactly its type's fields).

    Raises:
        ProtocolError: not an object, unknown type, missing/extra fields or
            wrong value types (including token ids that are not non-negative ints).
    """
    if not isinstance(message, dict):
        raise ProtocolError(f"a link message must be a JSON object, got {type(message).__name__}")
    kind = message.get("type")
    schema = SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise ProtocolError(f"unknown link message type {kind!r}")
    fields = set(message) - {"type"}
    if fields != set(schema):
        raise ProtocolError(f"{kind} message has fields {sorted(fields)}, expected {sorted(schema)}")
    for name, types in schema.items():
        if not _is(message[name], types):
            raise ProtocolError(f"{kind}.{name} must be {'/'.join(t.__name__ for t in types)}")
    if kind in ("submit", "resume"):
        prompt = message["prompt"]
        if not prompt or not all(_is(t, _INT) and t >= 0 for t in prompt):
            raise ProtocolError("submit.prompt must be a non-empty list of non-negative ints")
        if not all(k.isdigit() and _is(v, _NUMBER) for k, v in message["logit_bias"].items()):
            raise ProtocolError("submit.logit_bias must map token id strings to numbers")
    if kind == "step":
        for event in message["events"]:
            if not (isinstance(event, list) and len(event) in (3, 5) and _is(event[0], _STR)
                    and _is(event[1], _INT) and (event[2] is None or _is(event[2], _STR))):
                raise ProtocolError(f"step event must be [id, token, finish(, logprob, top)], got {event!r}")
            if len(event) == 5 and not (_is(event[3], _NUMBER) and isinstance(event[4], list) and all(
                    isinstance(pair, list) and len(pair) == 2 and _is(pair[0], _INT) and _is(pair[1], _NUMBER)
                    for pair in event[4])):
                raise ProtocolError(f"step event logprobs must be a number and [[token, logprob], ...], got {event!r}")
    if kind == "failed" and not all(_is(r, _INT) and r >= 0 for r in message["ranks"]):
        raise ProtocolError("failed.ranks must be a list of non-negative ints")
    return message


def encode(kind: str, **fields: Any) -> bytes:
    """One message as a line of bytes (checked against its schema first).

    Raises:
        ProtocolError: the fields do not follow the schema.
    """
    message = check({"type": kind, **fields})
    line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_LINE:
        raise ProtocolError(f"{kind} message of {len(line)} bytes exceeds {MAX_LINE}")
    return line


def decode(line: bytes) -> dict[str, Any]:
    """A line of bytes -> a checked message.

    Raises:
        ProtocolError: not JSON, too long, or not following the schema.
    """
    if len(line) > MAX_LINE:
        raise ProtocolError(f"link line of {len(line)} bytes exceeds {MAX_LINE}")
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"link line is not JSON: {exc}") from None
    return check(value)


class LinkClient:
    """The engine's end of the link: a blocking socket to the front door.

    Args:
        address: ``"host:port"`` of the front door's link listener.
        token: The job token to present.
        timeout: Seconds to connect.

    Raises:
        CommunicationError: the front door cannot be reached.
    """

    def __init__(self, address: str, token: str, timeout: float = 30.0) -> None:
        host, _, port = address.rpartition(":")
        try:
            self._sock = socket.create_connection((host, int(port)), timeout=timeout)
        except (OSError, ValueError) as exc:
            raise CommunicationError(f"cannot reach the server's front door at {address}: {exc}") from exc
        self._sock.settimeout(None)
        self._reader = self._sock.makefile("rb")
        self._lock = threading.Lock()
        self.send("hello", token=token)

    def send(self, kind: str, **fields: Any) -> None:
        """Send one message (thread-safe).

        Raises:
            CommunicationError: the front door is gone.
        """
        line = encode(kind, **fields)
        with self._lock:
            try:
                self._sock.sendall(line)
            except OSError as exc:
                raise CommunicationError(f"the server's front door closed the link: {exc}") from exc

    def receive(self) -> Optional[dict[str, Any]]:
        """The next message, or None when the front door closed the link.

        Raises:
            ProtocolError: a line that does not follow the schema.
        """
        try:
            line = self._reader.readline(MAX_LINE + 1)
        except OSError:
            return None
        if not line:
            return None
        return decode(line)

    def close(self) -> None:
        """Close the link."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
