"""The ranks' output: read line by line, each line delivered with its rank.

A line sink is ``sink(rank, stream, text)``: ``rank`` is the rank that wrote
the line (None for the MPI runner's own lines), ``stream`` is ``"stdout"`` or
``"stderr"``, ``text`` the line without its newline. Sinks are called from
reader threads, one line at a time per stream.
"""

from __future__ import annotations

import threading
from typing import IO, Callable

from mlxdist.launch.mpi import MPI_TAG

__all__ = ["LineSink", "PrefixedWriter", "prefix_of", "pump"]

LineSink = Callable[[int | None, str, str], None]


def prefix_of(rank: int | None) -> str:
    """The prefix a rank's lines get on the launcher's output (``"[r] "``, or none)."""
    return "" if rank is None else f"[{rank}] "


class PrefixedWriter:
    """A line sink writing each line, prefixed with its rank, to a text stream per stream name.

    Args:
        stdout: Where rank stdout lines go.
        stderr: Where rank stderr lines (and the launcher's own) go.
        capture: A list that also keeps every prefixed line, or None.
    """

    def __init__(self, stdout: IO[str], stderr: IO[str], capture: list[str] | None) -> None:
        self.streams = {"stdout": stdout, "stderr": stderr}
        self.capture = capture
        self.lock = threading.Lock()

    def __call__(self, rank: int | None, stream: str, text: str) -> None:
        """Write one line."""
        line = f"{prefix_of(rank)}{text.rstrip(chr(10))}\n"
        sink = self.streams[stream]
        with self.lock:
            sink.write(line)
            sink.flush()
            if self.capture is not None:
                self.capture.append(line)


def pump(stream: IO[bytes], sink: LineSink, name: str, rank: int | None, tagged: bool,
         untagged: list[str]) -> None:
    """Copy a child's output to ``sink`` line by line until it closes.

    Args:
        stream: The child's pipe.
        sink: Gets every line.
        name: ``"stdout"`` or ``"stderr"``.
        rank: The rank of an untagged child (None for mpirun).
        tagged: The output is mpirun's ``--tag-output``, split by rank.
        untagged: Keeps mpirun's own lines (no rank tag), at most 1000.
    """
    partial: dict[int | None, str] = {}
    current: int | None = rank
    for raw in iter(stream.readline, b""):
        text = raw.decode("utf-8", "replace")
        if not tagged:
            sink(rank, name, text.rstrip("\n"))
            continue
        pieces = MPI_TAG.split(text)
        # pieces: [untagged, rank, text, rank, text, ...]. An untagged start
        # continues a rank's unfinished line, else it is mpirun's own.
        if current not in partial:
            current = None
        segments = [(current, pieces[0])] + [
            (int(pieces[i]), pieces[i + 1]) for i in range(1, len(pieces), 2)
        ]
        for who, piece in segments:
            if not piece:
                continue
            current = who
            pending = partial.pop(who, "") + piece
            *lines, rest = pending.split("\n")
            for line in lines:
                sink(who, name, line)
                if who is None and len(untagged) < 1000:
                    untagged.append(line)
            if rest:
                partial[who] = rest
    for who, rest in partial.items():
        sink(who, name, rest)
        if who is None:
            untagged.append(rest)
    stream.close()
