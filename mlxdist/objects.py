"""Object collectives: ``broadcast_object`` and ``all_gather_object``.

What travels is JSON (None, bool, int, float, str, lists, and dicts with str
keys, nested) or bytes (bytes, bytearray, memoryview: received as bytes).
Anything else is an ``ArgumentTypeError`` naming where in the object it
was found, unless ``pickle=True`` is passed (by every rank): then everything but
bytes is pickled. JSON is checked strictly, so nothing changes on the way
(a tuple would come back a list, an int key a str): those need pickle.

Each message starts with a fixed frame of :data:`FRAME` bytes: a 16-byte
header (length, kind) and the first bytes of the payload. Small objects (a
request dict per decode step) travel in that one eager collective; larger
ones send the rest in a second, sized from the headers. A rank whose object
cannot be encoded still takes part, sending an error frame, so every rank
raises the same typed error and the world stays in step. Both run on the
eager path: under the deadline, and with the agreement check on, checked as
one operation.
"""

from __future__ import annotations

import json
import pickle as pickle_module
import struct
from typing import Any

import numpy as np

from mlxdist import deadline
from mlxdist.errors import ArgumentTypeError
from mlxdist.group_record import GroupRecord
from mlxdist.rules import check_root

__all__ = ["FRAME", "broadcast_object", "all_gather_object", "encode", "decode"]

FRAME = 4096
_HEADER = struct.Struct("<QB7x")
_INLINE = FRAME - _HEADER.size
JSON, BYTES, PICKLE, ERROR = 0, 1, 2, 3


def _check_json(value: Any, path: str, depth: int = 0) -> None:
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return
    if depth > 500:
        raise ArgumentTypeError(f"{path} nests more than 500 levels deep (a cycle?)")
    if kind is list:
        for i, item in enumerate(value):
            _check_json(item, f"{path}[{i}]", depth + 1)
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise ArgumentTypeError(
                    f"{path} has the key {key!r} ({type(key).__name__}): JSON keys are str; pass pickle=True to pickle it"
                )
            _check_json(item, f"{path}[{key!r}]", depth + 1)
        return
    raise ArgumentTypeError(
        f"{path} is a {kind.__name__}, not a JSON value (None, bool, int, float, str, list, dict with str "
        "keys) or bytes; pass pickle=True to pickle it"
    )


def encode(obj: Any, use_pickle: bool) -> tuple[int, Any]:
    """``(kind, payload)`` of an object: bytes as they are, JSON as UTF-8, else pickled if allowed.

    Raises:
        ArgumentTypeError: not JSON or bytes, and pickle not allowed.
    """
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return BYTES, obj
    if use_pickle:
        return PICKLE, pickle_module.dumps(obj, protocol=pickle_module.HIGHEST_PROTOCOL)
    _check_json(obj, "the object")
    return JSON, json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def decode(kind: int, payload: bytes | bytearray) -> Any:
    """The object of an :func:`encode` ``(kind, payload)``."""
    if kind == BYTES:
        return bytes(payload)
    if kind == PICKLE:
        return pickle_module.loads(payload)
    return json.loads(payload)


def _checked_pickle(use_pickle: Any) -> bool:
    if not isinstance(use_pickle, bool):
        raise ArgumentTypeError(f"pickle must be a bool, got {use_pickle!r}")
    return use_pickle


def _frame(obj: Any, use_pickle: bool) -> tuple[np.ndarray, np.ndarray]:
    """This rank's frame and the rest of its payload (as uint8 views)."""
    try:
        kind, payload = encode(obj, use_pickle)
    except ArgumentTypeError as exc:
        kind, payload = ERROR, str(exc).encode()
    data = np.frombuffer(payload, np.uint8) if len(payload) else np.zeros(0, np.uint8)
    frame = np.zeros(FRAME, np.uint8)
    frame[: _HEADER.size] = np.frombuffer(_HEADER.pack(data.size, kind), np.uint8)
    head = min(data.size, _INLINE)
    frame[_HEADER.size : _HEADER.size + head] = data[:head]
    return frame, data[head:]


def _assemble(frame: np.ndarray, rest: np.ndarray | None) -> bytes:
    """The payload of a frame and the rest of it, copied once into one bytes."""
    length = _HEADER.unpack_from(frame)[0]
    head = memoryview(frame[_HEADER.size : _HEADER.size + min(length, _INLINE)])
    if length <= _INLINE or rest is None:
        return bytes(head)
    return b"".join((head, memoryview(rest[: length - _INLINE])))


def _kind(frame: np.ndarray) -> int:
    return _HEADER.unpack_from(frame)[1]


def _agree(record: GroupRecord, op: str) -> None:
    if record.world.checked:
        deadline.agree(op, record, record.world, np.uint8, (FRAME,), None)


def broadcast_object(group: Any, record: GroupRecord, obj: Any, root: Any, use_pickle: Any) -> Any:
    """The root's ``obj`` on every rank (see :meth:`mlxdist.Group.broadcast_object`).

    ``group`` is the Group (its broadcast), ``record`` its record.
    """
    use_pickle = _checked_pickle(use_pickle)
    root = check_root(root, record.size)
    record.live_handle()
    if record.size == 1:
        try:
            encode(obj, use_pickle)  # the same errors as on several ranks
        except ArgumentTypeError as exc:
            raise ArgumentTypeError(f"broadcast_object: rank {root}'s object: {exc}") from None
        return obj
    _agree(record, f"broadcast_object[root={root}, pickle={use_pickle}]")
    is_root = record.rank == root
    frame, rest = _frame(obj, use_pickle) if is_root else (np.zeros(FRAME, np.uint8), None)
    frame = group.broadcast(frame, root)
    length, kind = _HEADER.unpack_from(frame)
    if length > _INLINE:
        rest = group.broadcast(rest if is_root else np.empty(length - _INLINE, np.uint8), root)
    if kind == ERROR:
        raise ArgumentTypeError(f"broadcast_object: rank {root}'s object: {_assemble(frame, rest).decode()}")
    if is_root:
        return obj
    return decode(kind, _assemble(frame, rest))


def all_gather_object(group: Any, record: GroupRecord, obj: Any, use_pickle: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (see :meth:`mlxdist.Group.all_gather_object`).

    ``group`` is the Group (its all_gather), ``record`` its record.
    """
    use_pickle = _checked_pickle(use_pickle)
    record.live_handle()
    if record.size == 1:
        try:
            encode(obj, use_pickle)
        except ArgumentTypeError as exc:
            raise ArgumentTypeError(f"all_gather_object: rank 0: {exc}") from None
        return [obj]
    _agree(record, f"all_gather_object[pickle={use_pickle}]")
    size, rank = record.size, record.rank
    frame, rest = _frame(obj, use_pickle)
    frames = group.all_gather(frame).reshape(size, FRAME)
    lengths = [_HEADER.unpack_from(f)[0] for f in frames]
    longest = max(lengths) - _INLINE
    rests: list[np.ndarray | None] = [None] * size
    if longest > 0:
        padded = rest
        if rest.size < longest:
            padded = np.zeros(longest, np.uint8)
            padded[: rest.size] = rest
        rests = list(group.all_gather(padded).reshape(size, longest))
    failed = [r for r in range(size) if _kind(frames[r]) == ERROR]
    if failed:
        reasons = "; ".join(f"rank {r}: {_assemble(frames[r], rests[r]).decode()}" for r in failed)
        raise ArgumentTypeError(f"all_gather_object: {reasons}")
    return [obj if r == rank else decode(_kind(frames[r]), _assemble(frames[r], rests[r])) for r in range(size)]
