"""Hostfiles: MLX's ring format and ``mlx.launch``'s, read by one reader with one address rule.

Two JSON formats name where ranks run:

- **MLX's ring hostfile** (``MLX_HOSTFILE``, what a ring rank reads): one list
  of ``"host:port"`` strings per rank, ``[["10.0.0.1:5000"], ["10.0.0.2:5001"]]``;
  every rank has as many addresses (it connects as many sockets to each side).
- **mlx.launch's hostfile** (what a launcher reads to start one rank on each
  machine): one object per rank, ``{"ssh": "<name>", "ips": ["<host>", ...]}``;
  the ring uses each entry's first ip.

Both are read by :func:`read_json` (a :class:`~mlxdist.errors.ConfigurationError`
naming the file when it cannot be read or is not JSON), and every address in
either follows one rule, :func:`parse_host`: an IPv4 address or a name that
resolves to one (ring addresses add a port, 1-65535: :func:`parse_address`).
Each error names the file and the entry at fault.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass
from typing import Any, Sequence

from mlxdist.errors import ConfigurationError

__all__ = ["Host", "RingHosts", "read_json", "parse_host", "parse_address", "read_ring_hostfile",
           "parse_ring_hostfile", "ring_hostfile_text", "read_launch_hostfile", "parse_launch_hostfile"]

# Every rank's addresses, as (host, port) pairs, in rank order.
RingHosts = tuple[tuple[tuple[str, int], ...], ...]


@dataclass(frozen=True)
class Host:
    """One entry of an mlx.launch hostfile.

    Attributes:
        ssh: The name the remote shell reaches it by.
        ips: Its addresses; the ring uses the first.
    """

    ssh: str
    ips: tuple[str, ...]


def read_json(path: str) -> Any:
    """The decoded content of a hostfile.

    Args:
        path: The file.

    Returns:
        The decoded JSON.

    Raises:
        ConfigurationError: the file cannot be read or is not JSON (naming the path).
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigurationError(f"cannot read the hostfile {path!r}: {reason}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"the hostfile {path!r} is not valid JSON ({exc.msg} at line {exc.lineno} "
                                 f"column {exc.colno})") from None


def parse_host(host: Any, where: str) -> str:
    """Check one host of a hostfile: an IPv4 address, or a name that resolves to one.

    Args:
        host: The entry.
        where: What to call it in the error (file and entry).

    Returns:
        ``host``.

    Raises:
        ConfigurationError: not a string, or neither an IPv4 address nor a name that resolves to one.
    """
    if not isinstance(host, str) or not host:
        raise ConfigurationError(f"{where} is {host!r}: expected an IPv4 address or a host name")
    try:
        ipaddress.IPv4Address(host)
        return host
    except ValueError:
        pass
    try:
        socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise ConfigurationError(f"{where} is {host!r}: neither an IPv4 address nor a host name "
                                 "that resolves to one") from None
    return host


def parse_address(entry: Any, where: str) -> tuple[str, int]:
    """Check one ``"host:port"`` of a ring hostfile (the host as :func:`parse_host`; port 1-65535).

    Args:
        entry: The entry.
        where: What to call it in the error (file, rank and index).

    Returns:
        ``(host, port)``.

    Raises:
        ConfigurationError: not a string of that form, naming ``where``.
    """
    if not isinstance(entry, str):
        raise ConfigurationError(f"{where} is {entry!r}: expected a \"host:port\" string")
    host, sep, port_text = entry.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigurationError(f"{where} is {entry!r}: expected \"host:port\"")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ConfigurationError(f"{where} is {entry!r}: port {port} is outside 1-65535")
    return parse_host(host, f"{where} {entry!r}: the host"), port


def parse_ring_hostfile(document: Any, path: str) -> RingHosts:
    """Check a decoded ring hostfile.

    Args:
        document: The decoded JSON.
        path: The file, for errors.

    Returns:
        Every rank's ``(host, port)`` addresses.

    Raises:
        ConfigurationError: not a list of non-empty lists of ``"host:port"``;
            fewer than two ranks; ranks with different numbers of addresses.
    """
    if not isinstance(document, list):
        raise ConfigurationError(
            f"the hostfile {path!r} holds a {type(document).__name__}: expected a list with one list of "
            "\"host:port\" strings per rank"
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
                f"the hostfile {path!r}: rank {r}'s entry is {entry!r}: expected a non-empty list of \"host:port\""
            )
        hosts.append(tuple(parse_address(a, f"the hostfile {path!r}: rank {r}'s address {i}")
                           for i, a in enumerate(entry)))
    counts = [len(h) for h in hosts]
    if len(set(counts)) > 1:
        raise ConfigurationError(
            f"the hostfile {path!r} gives ranks different numbers of addresses ({counts}): every rank needs as many"
        )
    return tuple(hosts)


def read_ring_hostfile(path: str) -> RingHosts:
    """Read and check MLX's ring hostfile (see the module docstring).

    Args:
        path: The file (``MLX_HOSTFILE``).

    Returns:
        Every rank's ``(host, port)`` addresses.

    Raises:
        ConfigurationError: the file cannot be read, is not JSON or not of that shape (naming the entry).
    """
    return parse_ring_hostfile(read_json(path), path)


def ring_hostfile_text(addresses: Sequence[str]) -> str:
    """The ring hostfile of one ``"host:port"`` per rank, as MLX reads it.

    Args:
        addresses: Each rank's address, in rank order.

    Returns:
        The JSON text.
    """
    return json.dumps([[a] for a in addresses])


def _launch_entry(index: int, entry: Any, path: str) -> Host:
    where = f"{path}: entry {index}"
    if not isinstance(entry, dict):
        raise ConfigurationError(f"{where} must be an object with 'ssh' and 'ips', got {entry!r}")
    name = entry.get("ssh")
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ConfigurationError(f"{where}: 'ssh' must be a non-empty host name, got {name!r}")
    if name.startswith("-"):
        raise ConfigurationError(f"{where}: 'ssh' {name!r} would be read as an option of the remote shell")
    ips = entry.get("ips")
    if not isinstance(ips, list) or not ips:
        raise ConfigurationError(f"{where} ({name}): 'ips' must be a non-empty list of addresses (the ring "
                                 f"uses the first), got {ips!r}")
    return Host(name, tuple(parse_host(ip, f"{where} ({name}): ip") for ip in ips))


def parse_launch_hostfile(document: Any, path: str = "hostfile") -> list[Host]:
    """Check a decoded mlx.launch hostfile.

    Args:
        document: The decoded JSON.
        path: What to call it in errors (its path).

    Returns:
        One :class:`Host` per entry, in order.

    Raises:
        ConfigurationError: not a non-empty list, or an entry without a host
            name or with a bad address (named by its index).
    """
    if not isinstance(document, list) or not document:
        raise ConfigurationError(f"{path}: an mlx.launch hostfile is a non-empty JSON list of "
                                 f'{{"ssh": HOST, "ips": [ADDRESS, ...]}}, got {type(document).__name__}')
    return [_launch_entry(i, entry, path) for i, entry in enumerate(document)]


def read_launch_hostfile(path: str) -> list[Host]:
    """Read and check an mlx.launch hostfile (see the module docstring).

    Args:
        path: The file.

    Returns:
        One :class:`Host` per entry, in order.

    Raises:
        ConfigurationError: the file cannot be read, is not JSON, or an entry is bad (named).
    """
    return parse_launch_hostfile(read_json(path), path)
