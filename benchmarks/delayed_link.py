"""Two network namespaces joined by a link that delays every packet, for benchmarks (root only).

Where the kernel has ``tc netem``, that is the tool; this machine's kernel has
no netem (nor fq or iptables), so the link is two TUN devices, one moved into
each namespace, and a relay thread in this process that forwards each IP
packet from one to the other after ``delay_us`` microseconds. The relay's own
cost (a Python select loop) adds to the delay: :func:`measure_one_way_us`
measures what the ranks actually see (half a TCP round trip) and the report
states that figure, not the requested one.
"""

from __future__ import annotations

import fcntl
import heapq
import os
import select
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

__all__ = ["delayed_link", "measure_one_way_us"]

_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000


def _ip(*command: str) -> None:
    subprocess.run(["ip", *command], check=True, capture_output=True)


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    return fd


def _relay(fds: tuple[int, int], delay: float, stop: threading.Event) -> None:
    """Forward packets between the two TUN devices, each ``delay`` seconds after it arrived."""
    try:  # the kernel's default 50 us timer slack would add to every short wait
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK, 1 ns
    except (OSError, AttributeError):
        pass
    queue: list[tuple[float, int, int, bytes]] = []
    other = {fds[0]: fds[1], fds[1]: fds[0]}
    sequence = 0
    while not stop.is_set():
        now = time.perf_counter()
        while queue and queue[0][0] <= now:
            _, _, target, packet = heapq.heappop(queue)
            try:
                os.write(target, packet)
            except OSError:
                pass  # the device went away or its queue is full: the packet is lost, as on a link
        timeout = max(0.0, queue[0][0] - now) if queue else 0.05
        ready, _, _ = select.select(list(fds), [], [], timeout)
        for fd in ready:
            while True:
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                sequence += 1
                heapq.heappush(queue, (time.perf_counter() + delay, sequence, other[fd], packet))


@contextmanager
def delayed_link(delay_us: float, tag: str = "") -> Iterator[tuple[list[str], list[str]]]:
    """Two namespaces whose only link delays each packet by ``delay_us`` one way.

    Args:
        delay_us: Added one-way delay in microseconds.
        tag: Short prefix for the namespace and device names (default from the pid).

    Yields:
        ``(namespace names, their addresses)``; everything is removed on exit.
    """
    tag = tag or f"dl{os.getpid() % 100000}"
    names, addresses = [f"{tag}a", f"{tag}b"], ["10.214.91.1", "10.214.91.2"]
    created: list[str] = []
    fds: list[int] = []
    stop = threading.Event()
    relay = None
    try:
        for index, ns in enumerate(names):
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            device = f"{tag}t{index}"
            fds.append(_open_tun(device))
            _ip("link", "set", device, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addresses[index]}/24", "dev", device)
            _ip("-n", ns, "link", "set", device, "up")
        relay = threading.Thread(target=_relay, args=(tuple(fds), delay_us * 1e-6, stop), daemon=True)
        relay.start()
        yield names, addresses
    finally:
        stop.set()
        if relay is not None:
            relay.join(timeout=5)
        for fd in fds:
            os.close(fd)
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


_PING = r"""
import socket, sys, time
role, host, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
if role == "server":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 29599)); s.listen(1); c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(count):
        c.sendall(c.recv(64))
else:
    for _ in range(100):
        try:
            c = socket.create_connection((host, 29599)); break
        except OSError:
            time.sleep(0.05)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for _ in range(count):
        t = time.perf_counter(); c.sendall(b"x" * 64); c.recv(64); times.append(time.perf_counter() - t)
    times.sort(); print(times[len(times) // 2] * 1e6 / 2)
"""


def measure_one_way_us(names: list[str], addresses: list[str], count: int = 200) -> float:
    """Half the median TCP round trip of 64 bytes from the first namespace to the second, in microseconds."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", names[1], sys.executable, "-c", _PING, "server", addresses[1], str(count)]
    )
    try:
        client = subprocess.run(
            ["ip", "netns", "exec", names[0], sys.executable, "-c", _PING, "client", addresses[1],
             str(count)],
            capture_output=True, text=True, timeout=60, check=True,
        )
        return float(client.stdout.strip())
    finally:
        server.kill()
        server.wait()
