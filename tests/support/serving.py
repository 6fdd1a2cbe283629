"""A running ``mlxdist-serve -n N`` for the serving tests: the supervising process
started in its own session, its ranks found through ``/health``, and everything
ended at close (ranks run in their own sessions, stopped ones included)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

__all__ = ["ServeProcess"]


class ServeProcess:
    """``python -m mlxdist.serve --model CHECKPOINT -n N --backend B --port 0 EXTRA...``."""

    def __init__(self, checkpoint: Path, backend: str, log: Path, n: int, *extra: str) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlxdist.serve", "--model", str(checkpoint), "-n", str(n), "--backend", backend,
             "--port", "0", *extra],
            stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True,
        )
        self.url = ""
        self.pids: set[int] = set()

    def text(self) -> str:
        """What the server wrote so far (its log)."""
        return self.log.read_text()

    def wait_for(self, ranks: int, deadline: float) -> dict[str, Any]:
        """Wait until a world of ``ranks`` ranks is ready; its ``/health``.

        Raises:
            AssertionError: not ready within ``deadline`` seconds, or the server ended.
        """
        end = time.monotonic() + deadline
        while time.monotonic() < end and self.proc.poll() is None:
            match = re.search(r"serving on (http://\S+)/v1", self.text())
            if match:
                self.url = match.group(1)
                try:
                    health = httpx.get(self.url + "/health", timeout=5).json()
                except httpx.HTTPError:
                    health = {}
                if health.get("state") == "ready" and health["plan"].get("ranks") == ranks:
                    self.pids |= set(health["plan"]["pids"])
                    return health
            time.sleep(0.2)
        raise AssertionError(f"no ready world of {ranks} ranks:\n{self.text()[-4000:]}")

    def health(self) -> dict[str, Any]:
        """The server's ``/health``."""
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_state(self, state: str, deadline: float = 30.0) -> dict[str, Any]:
        """Wait until ``/health`` says ``state``; that ``/health``.

        Raises:
            AssertionError: not within ``deadline`` seconds.
        """
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            health = self.health()
            if health["state"] == state:
                return health
            time.sleep(0.05)
        raise AssertionError(f"never {state}: {self.health()}\n{self.text()[-3000:]}")

    def close(self) -> None:
        """End the supervisor (SIGTERM, then SIGKILL of its session) and every rank it ran."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        for pid in self.pids:  # ranks run in their own sessions
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
