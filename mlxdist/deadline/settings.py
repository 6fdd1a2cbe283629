"""A world's deadline settings: the per-operation timeout and the agreement check."""

from __future__ import annotations

import os
from typing import Any, Mapping

from mlxdist.errors import ArgumentTypeError, InvalidArgumentError

__all__ = ["DEFAULT_TIMEOUT", "UNSET", "Settings", "parse_timeout", "settings_from"]

DEFAULT_TIMEOUT = 300.0
"""Seconds an operation may take when neither ``init`` nor the environment says."""

UNSET: Any = object()
"""The default of ``init(timeout=...)``: the environment decides."""


class Settings:
    """A world's deadline settings.

    Attributes:
        timeout: Seconds per operation (None: no deadline).
        check: Whether ranks agree on every operation before it runs.
    """

    __slots__ = ("timeout", "check")

    def __init__(self, timeout: float | None, check: bool) -> None:
        self.timeout = timeout
        self.check = check


def parse_timeout(value: Any, source: str) -> float | None:
    """Seconds, or None for no deadline, from a number or a string (``none`` for none).

    Raises:
        InvalidArgumentError: not positive and finite, or an unreadable string.
        ArgumentTypeError: neither a number, a string nor None.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() in ("none", "off", "inf", ""):
            return None
        try:
            value = float(value)
        except ValueError:
            raise InvalidArgumentError(f"{source} must be a number of seconds or 'none', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{source} must be a number of seconds or None, got {type(value).__name__}")
    value = float(value)
    if not 0 < value < float("inf"):
        raise InvalidArgumentError(f"{source} must be > 0 seconds and finite (or None for no deadline), got {value!r}")
    return value


def settings_from(
    timeout: Any = UNSET, check: bool | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Resolve ``init``'s arguments against the environment.

    Args:
        timeout: Seconds, None for no deadline, or unset (then ``MLXDIST_TIMEOUT``,
            then :data:`DEFAULT_TIMEOUT`).
        check: The agreement check, or None (then ``MLXDIST_CHECK``).
        environ: The environment (``os.environ`` by default).

    Returns:
        The settings.

    Raises:
        InvalidArgumentError, ArgumentTypeError: a timeout that is not a positive number.
    """
    env = os.environ if environ is None else environ
    if timeout is UNSET:
        timeout = parse_timeout(env["MLXDIST_TIMEOUT"], "MLXDIST_TIMEOUT") if "MLXDIST_TIMEOUT" in env else DEFAULT_TIMEOUT
    else:
        timeout = parse_timeout(timeout, "timeout")
    if check is None:
        check = env.get("MLXDIST_CHECK", "").strip().lower() in ("1", "true", "yes", "on")
    return Settings(timeout, bool(check))
