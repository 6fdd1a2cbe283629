"""Several hosts on one machine: network namespaces on a bridge (veth pairs), for root.

``bridged_hosts(count, subnet)`` makes ``count`` namespaces, each with one
address ``SUBNET.<i+1>/24``, and a switch namespace holding the bridge they
hang on; with ``root_address`` this process's own namespace gets a port on
the same bridge too (``SUBNET.254``), so a process here reaches the hosts and
they reach it. Everything made is deleted at the end.

These are the only multi-host and link-down tests, so a machine that cannot make
namespaces fails them (never skips them): they need root and ``ip`` from iproute2,
a system package (``apt-get install iproute2``; ``.ci/run`` installs it where it
is missing).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import pytest

__all__ = ["Hosts", "bridged_hosts", "require_namespaces", "ip"]


def require_namespaces() -> None:
    """Fail the calling test, saying what is missing, unless this process can make network namespaces."""
    if shutil.which("ip") is None:
        pytest.fail("network namespaces need `ip` from iproute2, a system package: apt-get install iproute2")
    if os.geteuid() != 0:
        pytest.fail("network namespaces need root: run the namespace tests as root (CI does)")


def ip(*args: str) -> None:
    """Run ``ip ARGS...``; fail the calling test with ip's own message if it fails."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"ip {' '.join(args)} exited with {done.returncode}: {done.stderr.strip()}")


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
    require_namespaces()
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
