"""Launch configurations, validated before MLX sees them.

MLX reads ``MLX_RANK`` with ``atoi`` (so "abc" is rank 0), does not check a
negative rank (a crash), divides by the host count (an empty hostfile is a
SIGFPE), and meets a malformed hostfile, a one-host ring or a port in use
with a generic error, some only after half a minute of retries. Here each is
a :class:`~mlxdist.errors.ConfigurationError` naming the entry at fault.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
from dataclasses import dataclass
from typing import Any, Mapping

from mlxdist.errors import ConfigurationError

__all__ = ["RingConfig", "parse_rank", "parse_address", "parse_hostfile", "ring_config", "reuse_as_ring"]


@dataclass(frozen=True)
class RingConfig:
    """A ring job as this rank sees it.

    Attributes:
        rank: This process's rank.
        hosts: Every rank's addresses, as (ip, port) pairs.
    """

    rank: int
    hosts: tuple[tuple[tuple[str, int], ...], ...]


def parse_rank(text: str, variable: str = "MLX_RANK") -> int:
    """A rank given in the environment: a non-negative decimal integer.

    Raises:
        ConfigurationError: anything else, naming the variable and its value.
    """
    stripped = text.strip()
    if not stripped.isdigit() or not stripped.isascii():
        raise ConfigurationError(f"{variable}={text!r} is not a rank: expected a non-negative integer")
    return int(stripped)


def parse_address(entry: Any, where: str) -> tuple[str, int]:
    """An ``"ip:port"`` hostfile entry (an IPv4 address or a host name that
    resolves to one; port 1-65535).

    Raises:
        ConfigurationError: not a string of that form, naming ``where``.
    """
    if not isinstance(entry, str):
        raise ConfigurationError(f"{where} is {entry!r}: expected an \"ip:port\" string")
    host, sep, port_text = entry.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigurationError(f"{where} is {entry!r}: expected \"ip:port\"")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ConfigurationError(f"{where} is {entry!r}: port {port} is outside 1-65535")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        try:
            socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            raise ConfigurationError(f"{where} is {entry!r}: {host!r} is neither an IPv4 address nor a host name "
                                     "that resolves to one") from None
    return host, port


def parse_hostfile(path: str) -> tuple[tuple[tuple[str, int], ...], ...]:
    """Read a ring hostfile: a JSON list with one list of ``"ip:port"`` per rank.

    Raises:
        ConfigurationError: unreadable, not JSON, or not of that shape; fewer
            than two ranks; ranks with different numbers of addresses (each
            rank connects as many sockets to each side).
    """
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except OSError as exc:
        raise ConfigurationError(f"cannot read the hostfile MLX_HOSTFILE={path!r}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigurationError(f"the hostfile {path!r} is not valid JSON: {exc}") from None
    if not isinstance(document, list):
        raise ConfigurationError(
            f"the hostfile {path!r} holds a {type(document).__name__}: expected a list with one list of "
            "\"ip:port\" strings per rank"
        )
    if len(document) < 2:
        raise ConfigurationError(
            f"the hostfile {path!r} lists {len(document)} rank(s): a ring needs at least 2 "
            "(a single process needs no hostfile)"
        )
    hosts = []
    for r, entry in enumerate(document):
        if not isinstance(entry, list) or not entry:
            raise ConfigurationError(
                f"the hostfile {path!r}: rank {r}'s entry is {entry!r}: expected a non-empty list of \"ip:port\""
            )
        hosts.append(tuple(parse_address(a, f"the hostfile {path!r}: rank {r}'s address {i}") for i, a in enumerate(entry)))
    counts = {len(h) for h in hosts}
    if len(counts) > 1:
        raise ConfigurationError(
            f"the hostfile {path!r} gives ranks different numbers of addresses ({[len(h) for h in hosts]}): "
            "every rank needs as many"
        )
    return tuple(hosts)


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
    hosts = parse_hostfile(env["MLX_HOSTFILE"])
    if rank >= len(hosts):
        raise ConfigurationError(f"MLX_RANK={rank} is not a rank of the hostfile's {len(hosts)}")
    if check_ports:
        for host, port in hosts[rank]:
            _check_bindable(host, port, rank)
    return RingConfig(rank, hosts)
