"""Ports for a local job, and how many local ranks this process can start."""

from __future__ import annotations

import secrets
import socket
import subprocess

__all__ = ["free_ports", "max_local_ranks", "open_file_limit", "FILES_PER_RANK"]

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


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct ports on ``host`` that were free a moment ago, outside the ephemeral range.

    Each candidate is bound (all of them together, so they are distinct) and
    released before returning. Ports are drawn at random below the system's
    ephemeral range, where no process is given a port unless it asks for that
    one, so a port stays free between this call and the rank that binds it
    (with the ephemeral ports of ``bind(0)`` another process, mpirun's among
    them, could be handed the same port in between).

    Args:
        count: How many distinct ports.
        host: The address to bind.

    Returns:
        The port numbers.

    Raises:
        OSError: ``count`` free ports could not be found.
    """
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
