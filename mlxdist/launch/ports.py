"""Ports for a local job, and how many local ranks this process can start."""

from __future__ import annotations

import secrets
import socket
import subprocess

__all__ = ["free_ports", "PortReservation", "max_local_ranks", "open_file_limit", "FILES_PER_RANK"]

# Open files the launcher keeps per local rank (two pipes, a port while reserving)
# and for itself.
FILES_PER_RANK = 3
_FILES_RESERVED = 64

# Ports the system never hands out by itself (bind to port 0, outgoing
# connections) lie below its ephemeral range; a job's ports are drawn from
# [_PORT_FLOOR, start of that range) so that mpirun's own listeners and the
# ranks' outgoing connections, made after the ports were chosen, cannot take them.
_PORT_FLOOR = 10000
_EPHEMERAL_FALLBACK = 32768  # Linux's default start; macOS and BSD start at 49152


def _ephemeral_start() -> int:
    """The first port of the system's ephemeral range."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    try:
        out = subprocess.run(["sysctl", "-n", "net.inet.ip.portrange.first"], capture_output=True,
                             text=True, timeout=5)
        return int(out.stdout.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        return _EPHEMERAL_FALLBACK


class PortReservation:
    """Ports held until :meth:`close`: drawn as :func:`free_ports` draws them, then kept bound.

    Each port stays bound by a socket of this process with ``SO_REUSEPORT``
    and no ``listen``: any other bind of the port fails (another launch's
    draw then picks another one), while a rank that binds with
    ``SO_REUSEPORT`` itself, as MLX's ring and mlxdist's side channel do,
    binds and listens as if the port were free (connections only ever reach
    listening sockets). Where ``SO_REUSEPORT`` does not exist the ports are
    released at once, as :func:`free_ports` does.

    Attributes:
        ports: The port numbers.
    """

    def __init__(self, count: int, host: str = "127.0.0.1") -> None:
        self.ports = _draw(count, host)
        self._held: list[socket.socket] = []
        if not hasattr(socket, "SO_REUSEPORT"):
            return
        for port in self.ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.bind((host, port))
            except OSError:
                s.close()  # taken in the moment since the draw: the rank's bind will say so
                continue
            self._held.append(s)

    def close(self) -> None:
        """Release the ports (idempotent)."""
        for s in self._held:
            s.close()
        self._held = []

    def __enter__(self) -> PortReservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _draw(count: int, host: str) -> list[int]:
    top = _ephemeral_start()
    if top - _PORT_FLOOR < 100 * count:
        # An ephemeral range reaching down near the floor leaves no room:
        # draw from every unprivileged port instead.
        low, top = 1024, 65536
    else:
        low = _PORT_FLOOR
    rng = secrets.SystemRandom()
    sockets: list[socket.socket] = []
    try:
        for _ in range(100 * count):
            if len(sockets) == count:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, rng.randrange(low, top)))
            except OSError:
                s.close()
                continue
            sockets.append(s)
        if len(sockets) < count:
            raise OSError(f"no {count} free ports on {host} in [{low}, {top})")
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct ports on ``host`` that were free a moment ago, outside the ephemeral range.

    Each candidate is bound (all of them together, so they are distinct) and
    released before returning. Ports are drawn at random below the system's
    ephemeral range, where no process is given a port unless it asks for that
    one, so a port stays free between this call and the rank that binds it
    (with the ephemeral ports of ``bind(0)`` another process, mpirun's among
    them, could be handed the same port in between). A launch holds its ports
    until its ranks are done (:class:`PortReservation`), so two launches never
    draw the same one.

    Args:
        count: How many distinct ports.
        host: The address to bind.

    Returns:
        The port numbers.

    Raises:
        OSError: ``count`` free ports could not be found.
    """
    return _draw(count, host)


def open_file_limit() -> int:
    """This process's soft limit on open files (``ulimit -n``)."""
    try:
        import resource
    except ImportError:
        return 1024
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY or soft <= 0 else int(soft)


def max_local_ranks() -> int:
    """How many local ranks this process can start: bounded by its open-file limit.

    Returns:
        The largest ``n`` a launch accepts here.
    """
    return max(1, (open_file_limit() - _FILES_RESERVED) // FILES_PER_RANK)
