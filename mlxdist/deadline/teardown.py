"""How a failed world ends its calls and tells the launcher: the backend's
sockets shut down (ring), the first failure's report written."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

__all__ = ["write_report", "shutdown_sockets"]


def write_report(report: dict[str, Any]) -> None:
    """Write the first failure's report where the launcher reads it (``MLXDIST_REPORT``)."""
    path = os.environ.get("MLXDIST_REPORT")
    if not path:
        return
    # Written whole under a name of its own, then linked into place: the launcher
    # never reads half a report, and the first rank to link wins.
    staging = f"{path}.{os.getpid()}"
    try:
        with open(staging, "w") as f:
            json.dump(report, f)
        os.link(staging, path)
    except OSError:
        pass  # another rank was first (or the launcher's folder is gone)
    finally:
        try:
            os.unlink(staging)
        except OSError:
            pass


def shutdown_sockets(peers: set[tuple[str, int]]) -> int:
    """Shut down this process's TCP sockets connected to, or accepted on, ``peers``.

    The backend's worker threads then see their connections closed and fail
    the pending operations with MLX's own "connection to a peer was lost".

    Returns:
        How many sockets were shut down.
    """
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = int(name)
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            s = socket.socket(fileno=os.dup(fd))
        except (OSError, ValueError):
            continue
        try:
            if s.family != socket.AF_INET or s.type != socket.SOCK_STREAM:
                continue
            local = s.getsockname()
            try:
                remote = s.getpeername()
            except OSError:
                remote = None
            if remote in peers or (remote is not None and local in peers):
                s.shutdown(socket.SHUT_RDWR)
                count += 1
        except OSError:
            pass
        finally:
            s.close()
    return count
