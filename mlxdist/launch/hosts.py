"""Ranks on other machines: each rank's command through a remote shell.

The hosts come from ``mlx.launch``'s hostfile (:func:`mlxdist.hostfiles.read_launch_hostfile`),
one rank per entry in the file's order; the ring uses each entry's first ip.
A rank on a host is started as ``SHELL... <host>
'<command>'`` (``ssh`` by default). Nothing of this machine is there but the
command line, so the command carries everything: it changes into this
process's working directory, sets the rank's variables with ``env`` (and
unsets the ones only a local launcher sets), and runs the rank under
:mod:`mlxdist.launch.remote`, which writes the ring's hostfile there and
ends the rank when its standard input closes (ending the local shell ends
the remote rank). Ports on a host cannot be probed from here: the ring's
come from a starting port, and the side channel is agreed over the ring.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
from typing import Mapping, Sequence

from mlxdist.errors import ConfigurationError, InvalidArgumentError
from mlxdist.hostfiles import Host, ring_hostfile_text
from mlxdist.launch.job import ENDING_VARIABLE

__all__ = ["DEFAULT_STARTING_PORT", "split_shell", "ring_addresses", "remote_command", "remote_commands",
           "remote_env", "local_address_towards"]

# mlx.launch's default.
DEFAULT_STARTING_PORT = 32323
# What only a local launcher sets: a remote rank must not inherit them from its shell.
LOCAL_ONLY = ("MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE", "MLXDIST_STORE", "MLXDIST_JOB_TOKEN",
              "MLXDIST_REPORT", ENDING_VARIABLE)
# This process's variables a remote rank gets too (its shell has its own environment).
FORWARDED = ("MLXDIST_TIMEOUT", "MLXDIST_CHECK", "HF_HUB_OFFLINE")


def split_shell(text: str | Sequence[str]) -> list[str]:
    """The remote shell's command, split as a shell would (``"ssh -o BatchMode=yes"``).

    Args:
        text: The command as one string, or its words.

    Returns:
        Its words.

    Raises:
        InvalidArgumentError: empty, or unbalanced quotes.
    """
    try:
        words = shlex.split(text) if isinstance(text, str) else [str(w) for w in text]
    except ValueError as exc:
        raise InvalidArgumentError(f"remote shell {text!r}: {exc}") from None
    if not words:
        raise InvalidArgumentError("the remote shell command is empty")
    return words


def ring_addresses(hosts: Sequence[Host], starting_port: int) -> list[str]:
    """Each rank's ring address: its host's first ip, port ``starting_port + rank``.

    Args:
        hosts: One rank on each, in order.
        starting_port: Rank 0's port.

    Returns:
        ``"ip:port"`` per rank.

    Raises:
        InvalidArgumentError: the ports do not fit in [1, 65535].
    """
    if isinstance(starting_port, bool) or not isinstance(starting_port, int) or not (
            0 < starting_port and starting_port + len(hosts) - 1 <= 65535):
        raise InvalidArgumentError(f"starting port {starting_port!r} leaves no room for {len(hosts)} ring "
                                   "ports below 65536")
    return [f"{host.ips[0]}:{starting_port + rank}" for rank, host in enumerate(hosts)]


def remote_command(command: Sequence[str], env: Mapping[str, str], hostfile: str | None,
                   cwd: str | None = None, python: str | None = None) -> str:
    """The one shell command that starts a rank on a host.

    Args:
        command: The rank's program and arguments (paths as they are on the host).
        env: The rank's own variables (set with ``env``; :data:`LOCAL_ONLY` ones
            not in it are unset, so the remote shell's own do not leak in).
        hostfile: The ring hostfile's content (JSON), written on the host; None
            for a rank that is a world of its own.
        cwd: The directory to change into (default: this process's).
        python: The interpreter that runs :mod:`mlxdist.launch.remote` (default: this one).

    Returns:
        The command, every word quoted for a POSIX shell.
    """
    words = ["env"]
    for name in LOCAL_ONLY:
        if name not in env:
            words += ["-u", name]
    words += [f"{k}={v}" for k, v in env.items()]
    words += [python or sys.executable, "-m", "mlxdist.launch.remote"]
    if hostfile is not None:
        words += ["--hostfile", hostfile]
    words += ["--", *command]
    return f"cd {shlex.quote(cwd or os.getcwd())} && exec {shlex.join(words)}"


def remote_env(env: Mapping[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    """A remote rank's variables.

    Args:
        env: The rank's own variables.
        environ: This process's environment.

    Returns:
        The :data:`FORWARDED` variables of ``environ``, then ``env``, and
        ``PYTHONUNBUFFERED=1`` unless ``env`` sets it.
    """
    out = {k: environ[k] for k in FORWARDED if k in environ}
    out.update(env)
    out.setdefault("PYTHONUNBUFFERED", "1")
    return out


def remote_commands(command: Sequence[str], hosts: Sequence[Host], shell: Sequence[str], starting_port: int,
                    env: Mapping[str, str]) -> tuple[list[list[str]], list[str], str | None]:
    """The local command line of each rank of a ring over ``hosts`` (one rank each, in order).

    Args:
        command: The ranks' program and arguments.
        hosts: Where the ranks run.
        shell: The remote shell's words (``["ssh"]``).
        starting_port: Rank r's ring port is ``starting_port + r``.
        env: The ranks' own variables (see :func:`remote_env`).

    Returns:
        ``(commands, addresses, ring)``: ``SHELL... HOST REMOTE_COMMAND`` per rank,
        the ring's ``ip:port`` per rank, and the ring hostfile's JSON (None for one
        rank, a world of its own: no ring, no ``MLX_RANK``).

    Raises:
        InvalidArgumentError: the ports do not fit.
    """
    addresses = ring_addresses(hosts, starting_port)
    ring = ring_hostfile_text(addresses) if len(hosts) > 1 else None
    variables = remote_env(env, os.environ)
    commands = []
    for rank, host in enumerate(hosts):
        rank_env = dict(variables, MLX_RANK=str(rank)) if ring is not None else variables
        commands.append([*shell, host.ssh, remote_command(command, rank_env, ring)])
    return commands, addresses, ring


def local_address_towards(ip: str) -> str:
    """This machine's address on the route to ``ip`` (a UDP ``connect``: no packet is sent).

    Args:
        ip: An IPv4 address.

    Returns:
        The local IPv4 address a connection to ``ip`` would leave from.

    Raises:
        ConfigurationError: no route to ``ip``.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((ip, 9))
            return s.getsockname()[0]
        except OSError as exc:
            raise ConfigurationError(f"no route from this machine to {ip}: {exc}") from None
