"""The header block: where and how the benchmark ran, as nccl-tests prints it."""

from __future__ import annotations

import os
import platform
import socket
from typing import Any

import mlx.core as mx
import numpy as np

import mlxdist
from mlxdist.bench.chain import VARIANTS
from mlxdist.bench.options import BenchConfig, format_size

__all__ = ["collect_header", "header_lines"]

_HOST_BYTES = 64


def _gather_hosts(group: mlxdist.Group) -> list[str]:
    """Every rank's host name (all ranks call it)."""
    name = socket.gethostname().encode()[:_HOST_BYTES]
    padded = np.zeros(_HOST_BYTES, np.uint8)
    padded[: len(name)] = np.frombuffer(name, np.uint8)
    gathered = np.asarray(group.all_gather(padded)).reshape(group.size(), _HOST_BYTES)
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in gathered]


def _mode(config: BenchConfig) -> str:
    if config.workload == "chain":
        return "chain"
    return "tensor-parallel" if config.tp else "sweep"


def collect_header(config: BenchConfig, group: mlxdist.Group, impls: list[str]) -> dict[str, Any]:
    """Describe the run; every rank calls it (it gathers each rank's pid and host).

    Args:
        config: The configuration.
        group: The mlxdist world group.
        impls: The implementations that run.

    Returns:
        JSON-ready facts: host, cores, versions, backend, ranks, sizes, iterations.
    """
    pids = np.asarray(group.all_gather(np.array([os.getpid()], np.int64))).tolist()
    hosts = _gather_hosts(group)
    header: dict[str, Any] = {
        "host": socket.gethostname(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlxdist": mlxdist.__version__,
        "numpy": np.__version__,
        "backend": group.backend.value if group.backend else "none",
        "ranks": group.size(),
        "rank_hosts": [{"rank": r, "pid": int(p), "host": h} for r, (p, h) in enumerate(zip(pids, hosts))],
        "mode": _mode(config),
        "min_bytes": config.min_bytes,
        "max_bytes": config.max_bytes,
        "step_factor": config.step_factor,
        "hidden": config.hidden if config.tp or config.workload == "chain" else None,
        "chain_length": config.chain_length if config.workload == "chain" else None,
        "tokens": list(config.tokens) if config.tp else None,
        "warmup": config.warmup,
        "iters": config.iters,
        "rounds": config.rounds,
        "ops": list(VARIANTS) if config.workload == "chain" else list(config.ops),
        "dtypes": list(config.dtypes),
        "implementations": impls,
    }
    if "mpi4py" in impls:
        from mpi4py import MPI

        header["mpi_library"] = MPI.Get_library_version().splitlines()[0].strip()
    return header


def header_lines(header: dict[str, Any]) -> list[str]:
    """The header as ``#`` lines, in the manner of nccl-tests.

    Args:
        header: What :func:`collect_header` returned.

    Returns:
        The lines, without newlines.
    """
    if header["mode"] == "tensor-parallel":
        sizes = f"tensor-parallel: hidden {header['hidden']} x tokens {header['tokens']}"
    elif header["mode"] == "chain":
        sizes = f"decode chain: {header['chain_length']} chained all_sums of hidden {header['hidden']}, one eval"
    else:
        sizes = (
            f"minBytes {format_size(header['min_bytes'])} maxBytes {format_size(header['max_bytes'])} "
            f"step: {header['step_factor']}(factor)"
        )
    lines = [
        "# mlxdist.bench: collective microbenchmarks, nccl-tests style",
        f"# host: {header['host']}  cores: {header['cores']}  {header['platform']}",
        f"# MLX {header['mlx']}  mlxdist {header['mlxdist']}  numpy {header['numpy']}  "
        f"Python {header['python']}",
        f"# backend: {header['backend']}  ranks: {header['ranks']}",
        f"# {sizes}  warmup iters: {header['warmup']}  iters: {header['iters']} "
        f"in {header.get('rounds', 1)} rounds",
        f"# ops: {', '.join(header['ops'])}  dtypes: {', '.join(header['dtypes'])}",
        f"# implementations: {', '.join(header['implementations'])}",
    ]
    if "mpi_library" in header:
        lines.append(f"# MPI: {header['mpi_library']}")
    lines.append("#")
    lines += [f"#  Rank {e['rank']:2d} Pid {e['pid']:7d} on {e['host']}" for e in header["rank_hosts"]]
    lines.append("#")
    return lines
