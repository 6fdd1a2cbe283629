"""Several hosts on one machine: network namespaces on a bridge (veth pairs), for root.

``bridged_hosts(count, subnet)`` makes ``count`` namespaces, each with one
address ``SUBNET.<i+1>/24``, and a switch namespace holding the bridge they
hang on; with ``root_address`` this process's own namespace gets a port on
the same bridge too (``SUBNET.254``), so a process here reaches the hosts and
they reach it. Everything made is deleted at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import pytest

__all__ = ["Hosts", "bridged_hosts", "needs_root", "ip"]

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="network namespaces need root and iproute2 (CI runs as root)",
)


def ip(*args: str) -> None:
    """Run ``ip ARGS...``; raise if it fails."""
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class Hosts:
    """The namespaces made by :func:`bridged_hosts`.

    Attributes:
        names: Each host's namespace.
        addresses: Each host's address.
        switch: The namespace holding the bridge.
        switch_ports: Each host's port on the bridge (in ``switch``): set it down to cut the host off.
        root_address: This namespace's address on the bridge, if it has one.
    """

    names: list[str]
    addresses: list[str]
    switch: str
    switch_ports: list[str]
    root_address: Optional[str] = None


@contextmanager
def bridged_hosts(count: int, subnet: str, root_address: bool = False) -> Iterator[Hosts]:
    """``count`` namespaces on one bridge (see the module docstring); deleted on exit.

    Args:
        count: Number of hosts.
        subnet: The first three octets of their /24 (``"10.213.77"``).
        root_address: Also put this namespace on the bridge, as ``SUBNET.254``.

    Yields:
        The :class:`Hosts`.
    """
    tag = f"md{os.getpid() % 100000}"
    switch = f"{tag}sw"
    names = [f"{tag}h{i}" for i in range(count)]
    created: list[str] = []
    root_link = f"{tag}r"
    try:
        for ns in [switch, *names]:
            ip("netns", "add", ns)
            created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        hosts = Hosts(names, [], switch, [f"{tag}s{i}" for i in range(count)])
        for i, ns in enumerate(names):
            inside = f"{tag}e{i}"
            ip("link", "add", inside, "netns", ns, "type", "veth", "peer", "name", hosts.switch_ports[i],
               "netns", switch)
            ip("-n", switch, "link", "set", hosts.switch_ports[i], "master", "br0")
            ip("-n", switch, "link", "set", hosts.switch_ports[i], "up")
            address = f"{subnet}.{i + 1}"
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", inside)
            ip("-n", ns, "link", "set", inside, "up")
            hosts.addresses.append(address)
        if root_address:
            ip("link", "add", root_link, "type", "veth", "peer", "name", f"{tag}rs", "netns", switch)
            ip("-n", switch, "link", "set", f"{tag}rs", "master", "br0")
            ip("-n", switch, "link", "set", f"{tag}rs", "up")
            hosts.root_address = f"{subnet}.254"
            ip("addr", "add", f"{hosts.root_address}/24", "dev", root_link)
            ip("link", "set", root_link, "up")
        yield hosts
    finally:
        subprocess.run(["ip", "link", "del", root_link], capture_output=True)
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
