"""Progress over the sweep: a rich bar on rank 0, or events a parent process turns into one.

When ``mlxdist.bench`` starts its own ranks, their output reaches it through
pipes (no terminal), so rank 0 prints one short event line per timed block
and the parent draws the bar.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, TextIO

__all__ = ["NullProgress", "BarProgress", "LogProgress", "EventProgress", "EVENT_MARK", "parse_event", "make_progress"]

EVENT_MARK = "@@mlxdist.bench "
# What a launcher may leave around a rank's line: mlxdist.launch's "[r] " and
# Open MPI's "[job,rank]<stdout>:" tags, which can also appear mid-line.
_LAUNCHER_TAG = re.compile(r"\[\d+,\d+\]<std(?:out|err)>:")


class NullProgress:
    """Progress that shows nothing (ranks other than 0, ``--no-progress``)."""

    def start(self, total: int) -> None:
        """Ignore the total."""

    def advance(self, description: str) -> None:
        """Ignore the step."""

    def stop(self) -> None:
        """Nothing to close."""


class BarProgress:
    """A rich progress bar on stderr.

    Args:
        stream: Where to draw it (stderr by default).
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]mlxdist.bench"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=Console(file=stream or sys.stderr),
            transient=False,
        )
        self._task: Any = None

    def start(self, total: int) -> None:
        """Show the bar for ``total`` timed blocks."""
        self._progress.start()
        self._task = self._progress.add_task("", total=total)

    def advance(self, description: str) -> None:
        """Move one block forward, naming the block that finished."""
        if self._task is not None:
            self._progress.update(self._task, advance=1, description=description)

    def stop(self) -> None:
        """Close the bar."""
        self._progress.stop()


class LogProgress:
    """A line every tenth of the sweep, for logs where a bar cannot redraw.

    Args:
        stream: Where to write (stderr by default).
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._total = 0
        self._done = 0
        self._next_tenth = 1

    def start(self, total: int) -> None:
        """Remember the number of timed blocks."""
        self._total, self._done, self._next_tenth = total, 0, 1

    def advance(self, description: str) -> None:
        """Count a block; print when another tenth is done."""
        self._done += 1
        if self._total and self._done * 10 >= self._next_tenth * self._total:
            self._next_tenth = self._done * 10 // self._total + 1
            self._stream.write(
                f"mlxdist.bench: {100 * self._done // self._total}% ({self._done}/{self._total}) {description}\n"
            )
            self._stream.flush()

    def stop(self) -> None:
        """Nothing to close."""


def make_progress(enabled: bool, stream: TextIO | None = None) -> NullProgress | BarProgress | LogProgress:
    """A bar on a terminal, lines in a log, nothing when disabled.

    Args:
        enabled: False for ``--no-progress``.
        stream: Where progress goes (stderr by default).

    Returns:
        The progress reporter.
    """
    stream = stream or sys.stderr
    if not enabled:
        return NullProgress()
    return BarProgress(stream) if stream.isatty() else LogProgress(stream)


class EventProgress:
    """Writes progress as event lines for a parent process.

    Args:
        stream: Where to write them (stdout by default).
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stdout

    def _emit(self, event: dict[str, Any]) -> None:
        # One write of the whole line: launchers forward it unbroken.
        self._stream.write(EVENT_MARK + json.dumps(event) + "\n")
        self._stream.flush()

    def start(self, total: int) -> None:
        """Announce ``total`` timed blocks."""
        self._emit({"event": "start", "total": total})

    def advance(self, description: str) -> None:
        """Announce a finished block."""
        self._emit({"event": "advance", "description": description})

    def stop(self) -> None:
        """Announce the end of the sweep."""
        self._emit({"event": "stop"})


def parse_event(line: str) -> dict[str, Any] | None:
    """The event carried by a line of a rank's output, if it carries one.

    Args:
        line: One output line, possibly with launcher tags.

    Returns:
        The event, or None for ordinary output (or a line too mangled to read).
    """
    clean = _LAUNCHER_TAG.sub("", line)
    at = clean.find(EVENT_MARK)
    if at < 0:
        return None
    try:
        event = json.loads(clean[at + len(EVENT_MARK) :])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None
