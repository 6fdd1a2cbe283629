"""Starting the ranks when ``mlxdist.bench`` runs with no launcher.

The parent starts ``--nranks`` copies of itself through :mod:`mlxdist.launch`,
draws rank 0's progress events as a bar, passes other output through, and
reads the result document rank 0 writes to a file.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
from typing import Any

from mlxdist.bench.options import BenchConfig
from mlxdist.bench.progress import make_progress, parse_event
from mlxdist.launch import launch

__all__ = ["RankOutput", "spawn_ranks"]


class RankOutput:
    """A text sink for the ranks' stdout: events drive ``progress``, the rest goes to stderr
    (stdout is the report's, which may be JSON).

    Args:
        progress: Receives start/advance events.
    """

    def __init__(self, progress: Any) -> None:
        self._progress = progress
        self._lock = threading.Lock()
        self._pending = ""

    def write(self, text: str) -> int:
        """Take output (complete lines from the launcher, or parts of them).

        Args:
            text: The output.

        Returns:
            The number of characters taken.
        """
        with self._lock:
            self._pending += text
            *lines, self._pending = self._pending.split("\n")
            for line in lines:
                self._route(line)
        return len(text)

    def flush(self) -> None:
        """Flush the pass-through output."""
        sys.stderr.flush()

    def _route(self, line: str) -> None:
        event = parse_event(line)
        if event is None:
            sys.stderr.write(line + "\n")
        elif event.get("event") == "start":
            self._progress.start(int(event["total"]))
        elif event.get("event") == "advance":
            self._progress.advance(str(event.get("description", "")))


def spawn_ranks(config: BenchConfig) -> tuple[int, dict[str, Any] | None]:
    """Run the benchmark on ``config.nranks`` local ranks and collect rank 0's document.

    Args:
        config: The parsed command line (its ``argv`` is passed on to the ranks).

    Returns:
        The launch's exit code and the result document (None if a rank failed
        or the deadline passed).

    Raises:
        FileNotFoundError: backend ``mpi`` without an ``mpirun``.
    """
    backend = config.backend or "ring"
    progress = make_progress(config.progress)
    with tempfile.TemporaryDirectory(prefix="mlxdist-bench-") as tmp:
        result_file = os.path.join(tmp, "result.json")
        command = [
            sys.executable, "-m", "mlxdist.bench", *config.argv,
            "--backend", backend, "--emit-events", "--result-file", result_file,
        ]
        try:
            result = launch(command, n=config.nranks, backend=backend, timeout=config.timeout,
                            stdout=RankOutput(progress), stderr=sys.stderr)
        finally:
            progress.stop()
        if not result.ok or not os.path.exists(result_file):
            return result.exit_code or 1, None
        with open(result_file) as f:
            return 0, json.load(f)
