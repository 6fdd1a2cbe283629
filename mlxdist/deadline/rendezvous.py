"""Joining the side channel: the bounded rendezvous at init, or an address agreed over the backend.

Rank 0 serves a small TCP store (:mod:`mlxdist._sidechannel`); every rank
connects with the job token. With the launcher's ``MLXDIST_STORE`` every rank
joins before the backend starts (:func:`rendezvous`), so a missing or
duplicate rank fails within the timeout with a typed error naming it; without
it the address and a fresh token travel over the backend once the world
formed (:func:`agree_over_backend`).
"""

from __future__ import annotations

import os
import secrets
import socket
from typing import Callable, Mapping

from mlxdist._sidechannel import Link, Store
from mlxdist.config import RingConfig, reuse_as_ring
from mlxdist.deadline.settings import Settings
from mlxdist.deadline.watchdog import Watchdog
from mlxdist.errors import InitializationError

__all__ = ["rendezvous", "agree_over_backend", "launch_environment", "rank_and_size", "ring_addresses"]


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    reuse_as_ring(sock)  # the launcher holds the store's port until the job ends
    sock.bind((host, port))
    sock.listen(64)
    return sock


def _split_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise InitializationError(f"MLXDIST_STORE must be host:port, got {text!r}")
    return host, int(port)


def rendezvous(
    backend: str,
    rank: int,
    size: int,
    settings: Settings,
    address: tuple[str, int],
    token: str,
    hosts: list[str] | None,
    ring_peers: set[tuple[str, int]],
) -> Watchdog:
    """Join the side channel before the backend starts; bounded by the timeout.

    Rank 0 listens on ``address`` (the job's own address) and waits for every
    rank; every rank connects with the token and waits until all joined.

    Returns:
        The world's watchdog (attach it with :func:`mlxdist.deadline.world_hooks.attach` once the world exists).

    Raises:
        InitializationError: a rank missing, joined twice, with another world
            size, or rank 0 unreachable, naming the rank (and host).
    """
    dog = Watchdog(backend, rank, size, settings, ring_peers)
    timeout = settings.timeout
    if rank == 0:
        # Rank 0 must serve the store itself: connecting to whatever else
        # holds the port would only end in a confusing protocol failure.
        try:
            listener = _bind(*address)
        except OSError as exc:
            raise InitializationError(
                f"rank 0 cannot listen on the side channel's address {address[0]}:{address[1]} "
                f"(MLXDIST_STORE): {exc.strerror or exc}; another process holds the port, or the "
                "address is not this host's") from exc
        dog.store = Store(listener, size, token, timeout, _heartbeat_timeout(settings), hosts)
    try:
        dog.link = Link(address, rank, size, token, timeout, dog._on_message)
    except OSError as exc:
        raise InitializationError(
            f"rank {rank} cannot reach rank 0's side channel at {address[0]}:{address[1]} "
            f"within {timeout:g} s: {exc} (rank 0 missing or wrong address)") from exc
    reason = dog.link.wait_ready(None if timeout is None else timeout + 2.0)
    if reason is not None:
        dog.link.close()
        if dog.store is not None:
            dog.store.stop()
        raise InitializationError(f"rank {rank}: init failed: {reason}")
    return dog


def _heartbeat_timeout(settings: Settings) -> float | None:
    # Generous: a loaded machine can starve a heartbeat for seconds; a stalled
    # peer inside an operation is caught by the deadline first.
    return None if settings.timeout is None else max(5.0, 2 * settings.timeout)


def agree_over_backend(
    backend: str,
    rank: int,
    size: int,
    settings: Settings,
    exchange: Callable[[list[int]], list[list[int]]],
    host: str,
    ring_peers: set[tuple[str, int]],
) -> Watchdog:
    """Start the side channel of a world formed without ``MLXDIST_STORE``.

    Rank 0 listens on ``host`` (an address the job already uses), port chosen
    by the system, and the address and a fresh token travel over the backend
    itself (``exchange``: an all_gather of small integer lists).

    Returns:
        The world's watchdog.

    Raises:
        InitializationError: the side channel could not be formed.
    """
    listener = _bind(host, 0) if rank == 0 else None
    token_int = secrets.randbits(62) if rank == 0 else 0
    mine = [0, 0, 0, 0]
    if listener is not None:
        ip = int.from_bytes(socket.inet_aton(host), "big")
        mine = [ip, listener.getsockname()[1], token_int, 1]
    rows = exchange(mine)
    ip, port, token_int, _ = rows[0]
    address = (socket.inet_ntoa(int(ip).to_bytes(4, "big")), int(port))
    token = f"{token_int:x}"
    dog = Watchdog(backend, rank, size, settings, ring_peers)
    if listener is not None:
        dog.store = Store(listener, size, token, settings.timeout, _heartbeat_timeout(settings), None)
    try:
        dog.link = Link(address, rank, size, token, settings.timeout, dog._on_message)
    except OSError as exc:
        raise InitializationError(
            f"rank {rank} cannot reach rank 0's side channel at {address[0]}:{address[1]}: {exc} "
            "(for MPI across hosts set MLXDIST_STORE_HOST to rank 0's address)") from exc
    reason = dog.link.wait_ready(None if settings.timeout is None else settings.timeout + 2.0)
    if reason is not None:
        raise InitializationError(f"rank {rank}: side channel failed: {reason}")
    return dog


def launch_environment(environ: Mapping[str, str] | None = None) -> tuple[tuple[str, int], str] | None:
    """The side channel's address and token from the launcher, if it set them.

    Raises:
        InitializationError: ``MLXDIST_STORE`` without ``MLXDIST_JOB_TOKEN``, or malformed.
    """
    env = os.environ if environ is None else environ
    store = env.get("MLXDIST_STORE")
    if not store:
        return None
    token = env.get("MLXDIST_JOB_TOKEN")
    if not token:
        raise InitializationError("MLXDIST_STORE is set but MLXDIST_JOB_TOKEN is not: the side channel "
                                  "accepts only connections that present the job token")
    return _split_address(store), token


def rank_and_size(
    backend: str, ring: RingConfig | None, environ: Mapping[str, str] | None = None
) -> tuple[int, int, list[str] | None]:
    """This process's rank, the world size and (ring) each rank's first address.

    Args:
        backend: ``"ring"`` or ``"mpi"``.
        ring: The validated ring configuration (:func:`mlxdist.config.ring_config`), for ring.
        environ: The environment MPI's launcher set (``os.environ`` by default).

    Raises:
        InitializationError: the configuration or environment does not say.
    """
    if backend == "ring":
        if ring is None:
            raise InitializationError("a ring world needs MLX_RANK and MLX_HOSTFILE")
        return ring.rank, len(ring.hosts), [f"{h[0][0]}:{h[0][1]}" for h in ring.hosts]
    env = os.environ if environ is None else environ
    for r, s in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
                 ("PMIX_RANK", "OMPI_COMM_WORLD_SIZE")):
        if r in env and s in env:
            return int(env[r]), int(env[s]), None
    raise InitializationError("cannot read this rank and the world size from the MPI environment")


def ring_addresses(ring: RingConfig) -> set[tuple[str, int]]:
    """Every ``(ip, port)`` of a ring configuration (every rank's, every address)."""
    return {address for addresses in ring.hosts for address in addresses}
