"""Launch configurations, validated before MLX sees them.

MLX reads ``MLX_RANK`` with ``atoi`` (so "abc" is rank 0), does not check a
negative rank (a crash), divides by the host count (an empty hostfile is a
SIGFPE), and meets a malformed hostfile, a one-host ring or a port in use
with a generic error, some only after half a minute of retries. Here each is
a :class:`~mlxdist.errors.ConfigurationError` naming the entry at fault (the
hostfile is read by :mod:`mlxdist.hostfiles`).
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from typing import Mapping

from mlxdist.errors import ConfigurationError
from mlxdist.hostfiles import RingHosts, read_ring_hostfile

__all__ = ["RingConfig", "parse_rank", "ring_config", "reuse_as_ring"]


@dataclass(frozen=True)
class RingConfig:
    """A ring job as this rank sees it.

    Attributes:
        rank: This process's rank.
        hosts: Every rank's addresses, as (ip, port) pairs.
    """

    rank: int
    hosts: RingHosts


def parse_rank(text: str, variable: str = "MLX_RANK") -> int:
    """A rank given in the environment: a non-negative decimal integer.

    Raises:
        ConfigurationError: anything else, naming the variable and its value.
    """
    stripped = text.strip()
    if not stripped.isdigit() or not stripped.isascii():
        raise ConfigurationError(f"{variable}={text!r} is not a rank: expected a non-negative integer")
    return int(stripped)


def reuse_as_ring(sock: socket.socket) -> None:
    """Give ``sock`` the options MLX's ring binds its listeners with.

    ``SO_REUSEADDR``, and ``SO_REUSEPORT`` where it exists: a port the
    launcher holds for the job (``launch.ports.PortReservation``) then binds.

    Args:
        sock: A TCP socket, not yet bound.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


def _check_bindable(host: str, port: int, rank: int) -> None:
    """Refuse a listening address this process cannot bind (in use, not local).

    The probe binds as MLX's ring does, so a port the launcher holds for this
    rank counts as free.
    """
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        reuse_as_ring(probe)
        probe.bind((host, port))
    except OSError as exc:
        reason = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
        raise ConfigurationError(f"rank {rank}'s address {host}:{port} {reason}") from None
    finally:
        probe.close()


def ring_config(environ: Mapping[str, str] | None = None, check_ports: bool = True) -> RingConfig:
    """Validate a ring job's ``MLX_RANK`` and ``MLX_HOSTFILE``.

    Args:
        environ: The environment (``os.environ`` by default).
        check_ports: Also check that this rank can listen on its addresses.

    Returns:
        The configuration.

    Raises:
        ConfigurationError: a variable is missing or invalid, the rank is not
            one of the hostfile's, or this rank's address cannot be listened on.
    """
    env = os.environ if environ is None else environ
    missing = [v for v in ("MLX_RANK", "MLX_HOSTFILE") if not env.get(v)]
    if missing:
        raise ConfigurationError(f"ring needs MLX_RANK and MLX_HOSTFILE; missing or empty: {', '.join(missing)}")
    rank = parse_rank(env["MLX_RANK"])
    hosts = read_ring_hostfile(env["MLX_HOSTFILE"])
    if rank >= len(hosts):
        raise ConfigurationError(f"MLX_RANK={rank} is not a rank of the hostfile's {len(hosts)}")
    if check_ports:
        for host, port in hosts[rank]:
            _check_bindable(host, port, rank)
    return RingConfig(rank, hosts)
