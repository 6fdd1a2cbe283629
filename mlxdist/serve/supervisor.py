"""The supervising process of ``mlxdist-serve -n N`` or ``--hostfile``: the front door, and a new world
each time one is lost.

The front door (HTTP and the engine link) runs on the main thread for the
process's whole life. A thread of its own runs the worlds one after the
other: it starts the ranks through the launch plan API (N local ones, or
one on each host of ``--hostfile`` through the ``--ssh`` remote shell),
waits until the world fails (the broker hears it from rank 0's engine or
its link, or the launcher sees a rank end), ends what is left of it, and
starts a new world without the lost ranks: locally as many fewer as the
failure names (at least one); with a hostfile, on the hosts of the last
world but those of the ranks the failure names (else the rank the launcher
saw end; else the last host). The ranks load the model and plan again
(``--mode``, ``--pp-weights`` and ``--experts`` as given, the plan dispatcher of
:mod:`mlxdist.lm` picking for the new size), and the broker resumes every
request in flight on it (:mod:`mlxdist.serve.resume`). Below
``--min-ranks`` the failure is final: every request gets the error,
``/health`` says ``failed`` naming the lost ranks, and the process exits
non-zero. With MPI, a rank's loss ends the whole mpirun; the new world is a
fresh mpirun.

With a hostfile, world k's ring ports are ``--starting-port + (k - 1) *
hosts`` plus the rank (a new world never binds a port the last one may still
hold), the side channel is agreed over the ring, and the engine link
listens on ``--link-host`` (default: this machine's address on the route to
the first host).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import threading
import time
from typing import Optional

from mlxdist.errors import InvalidArgumentError
from mlxdist.hostfiles import Host, read_launch_hostfile
from mlxdist.launch import PrefixedWriter, plan_job
from mlxdist.launch.hosts import local_address_towards
from mlxdist.launch.result import LaunchResult, report_lines
from mlxdist.serve.frontdoor import FrontDoor, load_config
from mlxdist.serve.options import ServeOptions, check_experts
from mlxdist.serve.protocol import LINK_VARIABLE, TOKEN_VARIABLE
from mlxdist.serve.resume import ResumingBroker

__all__ = ["supervise", "Supervisor", "next_world"]

logger = logging.getLogger("mlxdist.serve")

# Seconds the front door keeps answering after the final failure, so clients get their errors.
FAIL_GRACE = 2.0
# Seconds a lost world's leftover ranks get after SIGTERM before SIGKILL (nothing of theirs is kept).
_TEARDOWN_GRACE = 0.5


def next_world(size: int, hosts: Optional[list[Host]], lost: list[int]) -> tuple[int, list[Host], list[Host]]:
    """The world that follows one of ``size`` ranks that lost the ranks ``lost``.

    Args:
        size: The lost world's number of ranks.
        hosts: Its hosts (rank r on ``hosts[r]``), None for local ranks.
        lost: The ranks to leave out (out of range ones are ignored); empty: unknown.

    Returns:
        ``(size, hosts, lost_hosts)`` of the next world: locally ``size`` minus
        the ranks lost (at least one); with hosts, those of the ranks not lost
        (unknown: all but the last), and the hosts left out.
    """
    ranks = {r for r in lost if 0 <= r < size}
    if hosts is None:
        return size - max(1, len(ranks)), [], []
    if not ranks:
        return size - 1, hosts[:-1], hosts[-1:]
    return (size - len(ranks), [h for r, h in enumerate(hosts) if r not in ranks],
            [h for r, h in enumerate(hosts) if r in ranks])


class _World:
    """One started job of ranks and the thread waiting for it to end.

    Args:
        n: Number of ranks.
        options: The server's options (``backend``, ``ssh``, ``starting_port``, the ranks' command line).
        env: The ranks' variables (the link's address and token).
        down: Set once the job ended.
        hosts: The hosts to run on (one rank each), None for local ranks.
        port_offset: Added to ``--starting-port`` (a new world's ports are fresh).
    """

    def __init__(self, n: int, options: ServeOptions, env: dict[str, str],
                 down: threading.Event, hosts: Optional[list[Host]] = None, port_offset: int = 0) -> None:
        self.size = n
        self.hosts = hosts
        backend = options.backend
        command = [sys.executable, "-m", "mlxdist.serve", *options.rank_argv()]
        if hosts is not None:
            self.plan = plan_job(command, backend=backend, env=env, hosts=hosts, remote_shell=options.ssh,
                                 starting_port=options.starting_port + port_offset)
        else:
            self.plan = plan_job(command, n=n, backend=backend, env=env)
        if n == 1 and backend == "ring" and hosts is None:
            # One process is a world of its own: no ring to join.
            for rank_env in self.plan.envs:
                rank_env.pop("MLX_HOSTFILE", None)
                rank_env.pop("MLX_RANK", None)
        try:
            self.job = self.plan.start(PrefixedWriter(sys.stdout, sys.stderr, None))
        except BaseException:
            self.plan.close()
            raise
        self.result: Optional[LaunchResult] = None
        self._waiter = threading.Thread(target=self._wait, args=(down,), name="mlxdist-serve-job", daemon=True)
        self._waiter.start()

    def _wait(self, down: threading.Event) -> None:
        # No job deadline: a failed world ends the job through the per-operation deadline.
        self.result = self.job.wait(None)
        down.set()

    def ended(self, timeout: Optional[float]) -> bool:
        """Wait up to ``timeout`` s for the job to end by itself."""
        self._waiter.join(timeout)
        return not self._waiter.is_alive()

    def end(self, grace: float) -> Optional[LaunchResult]:
        """End every rank still running; the job's result."""
        self.job.end(grace)
        self._waiter.join(10)
        self.plan.close()
        return self.result


class Supervisor:
    """Runs the worlds of one server (see the module docstring).

    Args:
        options: The server's options.
        hosts: The hostfile's hosts (one rank each), None for local ranks.

    Raises:
        ConfigurationError: no route to the first host (``--link-host`` not given).
        OSError: the HTTP or link address cannot be bound.
    """

    def __init__(self, options: ServeOptions, hosts: Optional[list[Host]] = None) -> None:
        self.options = options
        self.hosts = hosts
        link_host = "127.0.0.1"
        if hosts is not None:
            link_host = options.link_host or local_address_towards(hosts[0].ips[0])
        self.door = FrontDoor(options, link_host=link_host)
        self.broker = ResumingBroker(self.door.token, options, on_world_lost=self._world_lost)
        self.door.broker = self.broker
        self.env = {LINK_VARIABLE: self.door.link_address, TOKEN_VARIABLE: self.door.token}
        self.down = threading.Event()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.world: Optional[_World] = None
        self.final: Optional[tuple[str, list[str]]] = None
        self.last_result: Optional[LaunchResult] = None
        self.lost: list[str] = []  # "rank R of N" for every world lost
        self._loss: tuple[str, list[int], str] = ("", [], "")

    def _world_lost(self, reason: str, ranks: list[int], how: str) -> None:
        # On the front door's loop: the broker saw the world fail first.
        self._loss = (reason, ranks, how)
        self.down.set()

    def _start(self, number: int, size: int, hosts: Optional[list[Host]]) -> _World:
        offset = (number - 1) * len(self.hosts) if self.hosts is not None else 0
        world = _World(size, self.options, self.env, self.down, hosts, offset)
        placement = {} if hosts is None else {"hosts": list(world.plan.hosts or []),
                                              "addresses": list(world.plan.addresses)}
        self.door.call(functools.partial(self.broker.note, started=time.time(), world=number, placement=placement))
        if hosts is not None:
            logger.warning("mlxdist-serve: world %d on host(s) %s (ring %s)", number, ", ".join(placement["hosts"]),
                           ", ".join(placement["addresses"]))
        return world

    def _lost(self, world: _World) -> list[int]:
        """The ranks of ``world`` the failure names, else the one the launcher saw end by itself."""
        ranks = sorted({int(r) for r in self.broker.loss.get("ranks") or self._loss[1] if 0 <= int(r) < world.size})
        result = world.result
        if not ranks and result is not None and result.failed_rank is not None and 0 <= result.failed_rank < world.size:
            ranks = [result.failed_rank]
        return ranks

    def _run_worlds(self) -> None:
        hosts = self.hosts
        size, number = (len(hosts) if hosts is not None else self.options.nranks), 1
        while not self.stopping.is_set():
            with self.lock:
                if self.stopping.is_set():
                    return
                self.down.clear()  # a late word of the last world's loss
                try:
                    self.world = world = self._start(number, size, hosts)
                except (OSError, ValueError) as exc:  # the launcher's typed errors subclass these
                    self._give_up(None, f"could not start world {number} on {size} rank(s): {exc}", [])
                    return
            self.down.wait()
            if self.stopping.is_set() or self.broker.stopping:
                return  # the end we asked for
            seen = time.time()
            if world.result is not None and not world.result.ok:
                # The launcher's account (the broker keeps the first one of this world's loss).
                lines = report_lines(world.result, None, self.options.backend)
                ranks = world.result.lost_ranks or sorted(world.result.rank_exits)
                self.door.call(functools.partial(self.broker.fail, "; ".join(lines) or "the ranks exited",
                                                 ranks, source="job"))
            elif world.result is not None and world.result.ok:
                return  # the ranks ended cleanly: the front door is shutting down
            time.sleep(0.05)  # let the broker's note of the loss land first
            reason = self.broker.reason or ""
            ranks = self._lost(world)
            left, next_hosts, lost_hosts = next_world(size, hosts, ranks)
            on = {r: f" ({hosts[r].ssh})" for r in ranks} if hosts is not None else {}
            self.lost.extend([f"rank {r} of {size}{on.get(r, '')}" for r in ranks] or [f"a rank of {size}"])
            if hosts is not None:
                hosts = next_hosts
                self.door.call(functools.partial(self.broker.note, lost_hosts=[h.ssh for h in lost_hosts]))
            if not self.broker.ever_ready:
                self._give_up(world, f"{reason}; the first world never became ready", ranks)
                return
            if left < self.options.min_ranks:
                self._give_up(world, f"{reason}; lost {', '.join(self.lost)}: {left} rank(s) left, below "
                              f"--min-ranks {self.options.min_ranks}", ranks)
                return
            result = world.end(_TEARDOWN_GRACE)
            for line in report_lines(result, None, self.options.backend) if result is not None else []:
                logger.warning("%s", line)
            self.door.call(functools.partial(self.broker.note, ended=time.time()))
            without = f" without {', '.join(h.ssh for h in lost_hosts)}" if lost_hosts else ""
            logger.warning("mlxdist-serve: world %d ended %.2f s after the loss was seen; starting world %d on "
                           "%d rank(s)%s", number, time.time() - seen, number + 1, left, without)
            size, number = left, number + 1

    def _give_up(self, world: Optional[_World], message: str, ranks: list[int]) -> None:
        self.final = (message, ranks)
        self.door.call(functools.partial(self.broker.give_up, message, ranks))
        if world is not None:
            self.last_result = world.end(_TEARDOWN_GRACE)
        time.sleep(FAIL_GRACE)
        self.door.stop()

    def run(self) -> int:
        """Serve until SIGINT/SIGTERM or a final failure; the exit status."""
        runner = threading.Thread(target=self._run_worlds, name="mlxdist-serve-worlds", daemon=True)
        runner.start()
        try:
            config = load_config(self.options)
            print(f"mlxdist-serve: serving on http://{self.options.host}:{self.door.port}/v1", file=sys.stderr,
                  flush=True)
            self.door.run(config)
        finally:
            with self.lock:
                self.stopping.set()
                world = self.world
            self.down.set()
            if world is not None and self.final is None:
                # The front door asked the engine to stop; the ranks end by themselves, else they are ended.
                world.ended(self.options.timeout + 10)
                self.last_result = world.end(_TEARDOWN_GRACE)
            runner.join(timeout=10)
        if self.final is not None:
            message, ranks = self.final
            named = f" (rank {', '.join(map(str, ranks))})" if ranks else ""
            print(f"mlxdist-serve: failed{named}: {message}", file=sys.stderr, flush=True)
            return 1
        result = self.last_result
        if result is not None and result.ok:
            return 0
        print("mlxdist-serve: failed: the ranks did not end cleanly", file=sys.stderr, flush=True)
        return (result.exit_code if result is not None else 1) or 1


def supervise(options: ServeOptions) -> int:
    """Serve HTTP here and run the ranks' worlds until stopped or below ``--min-ranks``.

    Args:
        options: The server's options (``nranks``, ``backend``, ``min_ranks``, ``reform_wait``,
            ``hostfile``, ``ssh``, ``starting_port``, ``link_host``, ...).

    Returns:
        The exit status: 0 after a clean stop, non-zero after a final failure.

    Raises:
        InvalidArgumentError: ``--model`` is not a checkpoint directory, ``--min-ranks``
            exceeds the number of ranks, ``-n`` differs from the hostfile's hosts, or
            ``--experts ep`` cannot place the model's experts (a dense model: a
            :class:`~mlxdist.errors.ShapeError` for more ranks than experts).
        ConfigurationError: the hostfile cannot be read or has a bad entry (named),
            or no route leads to its first host.
    """
    if not os.path.isfile(os.path.join(options.model, "config.json")):
        raise InvalidArgumentError(f"{options.model!r} is not an mlx-lm checkpoint directory (no config.json in it)")
    hosts = None
    if options.hostfile is not None:
        hosts = read_launch_hostfile(options.hostfile)
        if options.nranks is not None and options.nranks != len(hosts):
            raise InvalidArgumentError(f"-n {options.nranks} but the hostfile {options.hostfile} lists {len(hosts)} "
                                       "hosts (one rank each)")
        options = dataclasses.replace(options, nranks=len(hosts))
        if options.starting_port + len(hosts) ** 2 > 65536:
            raise InvalidArgumentError(f"--starting-port {options.starting_port} leaves no room for the ring ports of "
                                       f"{len(hosts)} worlds of up to {len(hosts)} hosts below 65536")
    if options.min_ranks > options.nranks:
        raise InvalidArgumentError(f"--min-ranks {options.min_ranks} exceeds the {options.nranks} rank(s) to start")
    check_experts(options, options.nranks)
    return Supervisor(options, hosts).run()

