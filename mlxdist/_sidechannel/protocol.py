"""The side channel's wire format: one JSON object per line, and how a check entry reads."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["HELLO_TIMEOUT", "MAX_LINE", "encode", "describe_call"]


# A connection must send its hello within this many seconds.
HELLO_TIMEOUT = 2.0
# Lines longer than this are garbage.
MAX_LINE = 1 << 16


def encode(message: dict[str, Any]) -> bytes:
    """One message as a line of JSON."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def describe_call(entry: dict[str, Any] | None) -> str:
    """One rank's call as text, e.g. ``all_sum(float32, shape (4,))`` or ``send(..., to 1)``.

    Args:
        entry: A ``chk`` message, or None for a rank that had posted nothing.

    Returns:
        A short description.
    """
    if entry is None:
        return "nothing yet"
    shape = tuple(entry.get("shape") or ())
    text = f"{entry['op']}({entry.get('dtype')}, shape {shape}"
    peer = entry.get("peer")
    if peer is not None:
        text += f", {'to' if entry['op'] == 'send' else 'from'} {peer}"
    return text + ")"
