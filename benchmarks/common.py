"""What the benchmark scripts share: the test checkpoints' formats and sizes, the result
line a launched worker prints, running a script's worker on N ranks, and sizes as text.

The scripts import it as ``from common import ...`` (a script's own folder is on
``sys.path`` when it runs); nothing under ``tests/`` is imported here.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["FORMATS", "SIZES", "RESULT_TAG", "emit", "Results", "run_job", "size_text"]

# Weight formats of the random-weight checkpoints (mlxdist.lm.testing.write_checkpoint):
# 4-bit affine keeps float32 scales (MLX's CPU quantized matmul is far slower with float16 ones).
FORMATS = {"float16": dict(dtype="float16"), "4-bit": dict(dtype="float32", bits=4, group_size=64)}
SIZES = {
    "default": dict(
        hidden_size=768, num_layers=6, num_heads=12, num_kv_heads=4, intermediate_size=2048, vocab_size=512
    ),
    "quick": dict(
        hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=1408, vocab_size=512
    ),
    # 3 key/value heads: 2 ranks get 8 and 4 query heads (whole groups), the MLP evenly.
    "uneven": dict(
        hidden_size=768, num_layers=6, num_heads=12, num_kv_heads=3, intermediate_size=2048, vocab_size=512
    ),
}
RESULT_TAG = "BENCH_RESULT "


def emit(result: Any) -> None:
    """Print a worker's result as the one line :class:`Results` reads."""
    print(RESULT_TAG + json.dumps(result), flush=True)


class Results:
    """A line sink (``write``/``flush``) keeping every result line's decoded result."""

    def __init__(self) -> None:
        self.results: list[Any] = []

    def write(self, line: str) -> int:
        """Keep the result on ``line``, if it holds one."""
        at = line.find(RESULT_TAG)
        if at >= 0:
            self.results.append(json.loads(line[at + len(RESULT_TAG) :]))
        return len(line)

    def flush(self) -> None:
        """Nothing to flush."""


def run_job(argv: list[str], n: int, backend: str, timeout: float, script: str) -> tuple[Any, float]:
    """Run ``script`` with ``argv`` on ``n`` ranks (one plain process for n = 1).

    Args:
        argv: The worker's arguments.
        n: Number of ranks.
        backend: ``"ring"`` or ``"mpi"``.
        timeout: The job's deadline, seconds.
        script: The script to run (its worker prints its result with :func:`emit`).

    Returns:
        The first result printed, and the launcher's CPU time as a share of one core.

    Raises:
        SystemExit: the job failed or printed no result.
    """
    from mlxdist.launch import launch

    sink = Results()
    command = [sys.executable, os.path.abspath(script), *argv]
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter()
    if n == 1:  # a plain process: a one-host ring hostfile does not initialise
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        for line in done.stdout.splitlines():
            sink.write(line)
        failed, code = done.returncode != 0, done.returncode
        if failed:
            sys.stderr.write(done.stderr[-4000:])
    else:
        result = launch(command, n=n, backend=backend, timeout=timeout, stdout=sink)
        failed, code = not result.ok, result.exit_code
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_SELF)
    if failed or not sink.results:
        raise SystemExit(f"{Path(script).name}: job {argv} on {n} {backend} ranks failed (exit {code})")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return sink.results[0], cpu / wall


def size_text(nbytes: int) -> str:
    """``nbytes`` in the largest whole unit: "64 MiB", "4 KiB", "512 B"."""
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"
