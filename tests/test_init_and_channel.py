"""Init bounded by the deadline, the side channel's token, garbage connections, threads.

Ranks are started by hand here (each with its own rank and hostfile) so that a
rank can be missing, duplicated or the hostfile longer than the job.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mlxdist.launch import free_ports

WORKER = str(Path(__file__).parent / "workers" / "init_probe.py")
TIMEOUT = 3.0
LIMIT = 30.0


def _start_ranks(ranks: list[int], hosts: int, tmp: str, args: list[str], token: str | None = None,
                 store_port: int | None = None):
    ports = free_ports(hosts + 1)
    hostfile = Path(tmp, "hosts.json")
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports[:hosts]]))
    store = ("127.0.0.1", ports[hosts] if store_port is None else store_port)
    env = dict(os.environ, PYTHONUNBUFFERED="1", MLX_HOSTFILE=str(hostfile),
               MLXDIST_STORE=f"{store[0]}:{store[1]}", MLXDIST_JOB_TOKEN=token or secrets.token_hex(16))
    procs = []
    for i, r in enumerate(ranks):
        log = Path(tmp, f"p{i}.log")
        procs.append((subprocess.Popen([sys.executable, WORKER, *args], env=dict(env, MLX_RANK=str(r)),
                                       stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True), log))
    return procs, store, [("127.0.0.1", p) for p in ports[:hosts]]


def _wait(procs, limit: float = LIMIT) -> tuple[float, list[str]]:
    t0 = time.monotonic()
    try:
        while any(p.poll() is None for p, _ in procs):
            assert time.monotonic() - t0 < limit, "hang: " + "".join(log.read_text() for _, log in procs)
            time.sleep(0.02)
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return time.monotonic() - t0, [log.read_text(errors="replace") for _, log in procs]


def _result(output: str) -> str:
    return next((line for line in output.splitlines() if line.startswith("RESULT")), "")


def test_missing_peer_is_named_within_the_deadline():
    with tempfile.TemporaryDirectory() as tmp:
        procs, _, _ = _start_ranks([0], 2, tmp, [str(TIMEOUT)])
        elapsed, outputs = _wait(procs)
    line = _result(outputs[0])
    assert "InitializationError" in line and "ranks [1] did not join" in line and "127.0.0.1:" in line, outputs
    assert elapsed < TIMEOUT + 8, elapsed


def test_wrong_host_count_is_named_on_every_rank():
    """A hostfile of 3 hosts, 2 ranks started: both raise, naming rank 2 and its host."""
    with tempfile.TemporaryDirectory() as tmp:
        procs, _, hosts = _start_ranks([0, 1], 3, tmp, [str(TIMEOUT)])
        elapsed, outputs = _wait(procs)
    for out in outputs:
        line = _result(out)
        assert "InitializationError" in line and f"rank 2 at 127.0.0.1:{hosts[2][1]}" in line, outputs
    assert elapsed < TIMEOUT + 8, elapsed


def test_duplicate_rank_is_named():
    """Two processes claim rank 1: the job of the first pair runs; the impostor gets
    a typed error naming rank 1 (the side channel's "joined twice", or the rank's
    address already in use)."""
    with tempfile.TemporaryDirectory() as tmp:
        procs, _, _ = _start_ranks([0, 1, 1], 2, tmp, [str(TIMEOUT), "200"])
        elapsed, outputs = _wait(procs)
    typed = [_result(out) for out in outputs]
    ok = [out for out in outputs if "OK " in out]
    refused = [line for line in typed if "InitializationError" in line or "ConfigurationError" in line]
    assert len(ok) == 2 and len(refused) == 1, outputs
    assert re.search(r"rank 1 joined twice .*duplicate rank|rank 1's address .* in use", refused[0]), refused


def _garbage(address: tuple[str, int], payloads: list[bytes]) -> None:
    for payload in payloads:
        try:
            with socket.create_connection(address, timeout=1.0) as s:
                s.sendall(payload)
                time.sleep(0.05)
        except OSError:
            pass  # refused: nothing listens there any more


GARBAGE = [b"\x00" * 64, b"GET / HTTP/1.0\r\n\r\n", os.urandom(4096),
           b'{"t": "hello", "rank": 1, "size": 2, "token": "forged"}\n', b"{" * 70000]


def test_garbage_connections_neither_crash_nor_corrupt_the_job():
    """Junk to the side channel (at init and while running) and to the ring ports."""
    with tempfile.TemporaryDirectory() as tmp:
        procs, store, hosts = _start_ranks([0, 1], 2, tmp, [str(TIMEOUT), "200"])
        deadline = time.monotonic() + 10
        _garbage(store, GARBAGE)  # during init
        while "JOINED" not in Path(tmp, "p0.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        _garbage(store, GARBAGE)  # while collectives run
        for host in hosts:
            _garbage(host, GARBAGE)
        elapsed, outputs = _wait(procs)
    for rank, out in enumerate(outputs):
        assert f"OK {rank} 3.0" in out, outputs


def test_a_forged_token_is_refused():
    """A connection with the wrong token never joins: the job still forms and runs."""
    with tempfile.TemporaryDirectory() as tmp:
        procs, store, _ = _start_ranks([0], 2, tmp, [str(TIMEOUT)])
        limit = time.monotonic() + 20
        while True:  # rank 0's store comes up once its interpreter started
            try:
                conn = socket.create_connection(store, timeout=2.0)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < limit
                time.sleep(0.05)
        with conn as s:
            s.sendall(b'{"t":"hello","rank":1,"size":2,"token":"not-the-job-token","pid":1}\n')
            s.settimeout(2.0)
            try:
                answer = s.recv(100)
            except (socket.timeout, ConnectionResetError):
                answer = b""
        elapsed, outputs = _wait(procs)
    assert answer == b"", answer  # closed without an answer
    assert "ranks [1] did not join" in _result(outputs[0]), outputs


def test_a_stranger_on_the_store_port_is_named():
    """Another program holds the side channel's port and answers with its own banner:
    rank 0 cannot listen there and says so; rank 1 reaches the stranger and gets a typed
    error instead of a protocol failure deep in init."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_ports(1)[0]
        stranger = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        stranger.bind(("127.0.0.1", port))
        stranger.listen(8)
        stop = threading.Event()

        def serve() -> None:
            stranger.settimeout(0.1)
            while not stop.is_set():
                try:
                    conn, _ = stranger.accept()
                except socket.timeout:
                    continue
                with conn:
                    conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
                    time.sleep(0.2)

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        procs, _, _ = _start_ranks([0, 1], 2, tmp, [str(TIMEOUT)], store_port=port)
        try:
            elapsed, outputs = _wait(procs)
        finally:
            stop.set()
            server.join()
            stranger.close()
    first, second = (_result(out) for out in outputs)
    assert "InitializationError" in first and "cannot listen" in first and f":{port}" in first, outputs
    assert "InitializationError" in second and "not mlxdist's protocol" in second and "SSH-2.0" in second, outputs
    assert elapsed < TIMEOUT + 8, elapsed
