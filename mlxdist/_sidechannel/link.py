"""One rank's connection to the store: join, send, and a reader thread for what the store says."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any, Callable

from mlxdist._sidechannel.protocol import MAX_LINE, encode

__all__ = ["Link"]


class Link:
    """One rank's connection to the store.

    Args:
        address: ``(host, port)`` of rank 0's store.
        rank: This rank.
        size: The world size this rank believes in.
        token: The job token.
        timeout: Seconds to keep retrying the connection (rank 0 may start late).
        on_message: Called on the reader thread with every message after ``ready``.

    Raises:
        OSError: the store could not be reached in time.
    """

    def __init__(
        self,
        address: tuple[str, int],
        rank: int,
        size: int,
        token: str,
        timeout: float | None,
        on_message: Callable[[dict[str, Any]], None],
    ) -> None:
        self.address = address
        self.rank = rank
        self.on_message = on_message
        self.send_lock = threading.Lock()
        self.closed = False
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.create_connection(address, timeout=1.0)
                break
            except OSError:
                if deadline is not None and time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(None)
        self.file = self.sock.makefile("rb")
        self.send({"t": "hello", "rank": rank, "size": size, "token": token, "pid": os.getpid()})

    def send(self, message: dict[str, Any]) -> bool:
        """Send one message; False when the connection is gone."""
        data = encode(message)
        with self.send_lock:
            if self.closed:
                return False
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                return False

    def wait_ready(self, timeout: float | None) -> str | None:
        """Block until the store says every rank joined.

        Returns:
            None when ready, else the reason init failed.
        """
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            line = self.file.readline(MAX_LINE)
        except (socket.timeout, OSError):
            return f"no answer from rank 0's side channel at {self.address[0]}:{self.address[1]} within {timeout:g} s"
        finally:
            self.sock.settimeout(None)
        if not line:
            return f"rank 0's side channel at {self.address[0]}:{self.address[1]} closed the connection during init"
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            return (f"the side channel at {self.address[0]}:{self.address[1]} answered {line[:60]!r}, "
                    "which is not mlxdist's protocol (another program on that port?)")
        if message.get("t") == "ready":
            return None
        return str(message.get("message", "init failed"))

    def start_reader(self) -> None:
        """Deliver every later message to ``on_message`` on a daemon thread."""
        threading.Thread(target=self._read, name="mlxdist-link", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                line = self.file.readline(MAX_LINE)
            except OSError:
                line = b""
            if not line:
                if not self.closed:
                    self.on_message({"t": "eof"})
                return
            try:
                message = json.loads(line)
            except ValueError:
                continue
            self.on_message(message)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self.send_lock:
            self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
