"""Deadlines, peer loss and the agreement check: no rank waits forever.

MLX's backends have no operation timeout and no abort. mlxdist adds both from
outside the engine, with one :class:`Watchdog` per world:

- a side channel (:mod:`mlxdist._sidechannel`) that init starts: rank 0 runs
  a small TCP store on the job's own address; every rank connects with the
  job token and sends heartbeats;
- every blocking call of the world is registered with the watchdog
  (:meth:`Watchdog.enter` and :meth:`Watchdog.leave`, from the eager gate and
  :func:`evaluate`): a call still running at its deadline, a peer whose connection closes or whose
  heartbeats stop, or a mismatch found by the agreement check fails the
  world on *every* rank;
- a failed world interrupts the calls still blocked in the backend. On ring,
  the backend's TCP connections (found through ``/proc/self/fd``, matched
  against the hostfile) are shut down, so MLX's own wait ends with "connection
  to a peer was lost" and :meth:`Watchdog.translate` gives the typed error
  raised in its place. On
  MPI a blocked call cannot be interrupted: the watchdog writes the report
  (rank, op, cause) to stderr and ends the process with
  :data:`JOB_ABORT_EXIT`; the launcher (or mpirun) then ends the job. The same
  happens on ring if a call does not return within a grace period after its
  connections were closed.

Errors: :class:`~mlxdist.errors.DeadlineExceeded` (a ``TimeoutError``),
:class:`~mlxdist.errors.PeerLostError` (a ``CommunicationError``) and
:class:`~mlxdist.errors.MismatchError` (a ``ValueError``), raised on every
live rank, naming the op, the group, the elapsed time and the ranks that did
not arrive when known. Once failed, a world's later operations raise the same
error at once; the process stays usable (save, then exit).

The lazy rule: an mx.array collective communicates inside ``mx.eval``. Evaluate
results of collectives with ``mlxdist.eval``, which runs
``mx.eval`` registered in the same way and raises the typed errors; a bare
``mx.eval`` is still interrupted on ring (the connections are closed when the
world fails) but raises MLX's ``RuntimeError``.

Modules, bottom to top: :mod:`~mlxdist.deadline.settings` (timeout and
check), :mod:`~mlxdist.deadline.teardown` (closing the backend's sockets, the
launcher's report), :mod:`~mlxdist.deadline.watchdog` (the watchdog and the
agreement check), :mod:`~mlxdist.deadline.rendezvous` (joining the side
channel) and :mod:`~mlxdist.deadline.world_hooks` (init's hooks, per-group
timeouts, ``mx.eval`` under the deadline).

Settings: ``init(timeout=...)`` or ``MLXDIST_TIMEOUT`` (seconds; ``none`` for
no deadline; default :data:`DEFAULT_TIMEOUT`), per group with
:func:`set_timeout`; ``init(check=True)`` or ``MLXDIST_CHECK=1`` for the
agreement check. The side channel's address comes from ``MLXDIST_STORE``
(``host:port``, with ``MLXDIST_JOB_TOKEN``; ``mlxdist.launch`` sets both), or
is agreed over the backend at init (rank 0 listens on its hostfile address
for ring, on ``MLXDIST_STORE_HOST`` or loopback for MPI).
"""

from mlxdist._c.signature import signature_of
from mlxdist.deadline.teardown import shutdown_sockets, write_report
from mlxdist.deadline.rendezvous import (
    agree_over_backend,
    launch_environment,
    rank_and_size,
    rendezvous,
    ring_addresses,
)
from mlxdist.deadline.settings import DEFAULT_TIMEOUT, UNSET, Settings, parse_timeout, settings_from
from mlxdist.deadline.watchdog import JOB_ABORT_EXIT, Watchdog
from mlxdist.deadline.world_hooks import (
    after_init,
    agree,
    attach,
    before_init,
    evaluate,
    on_failure,
    set_timeout,
    watched,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "JOB_ABORT_EXIT",
    "UNSET",
    "Settings",
    "Watchdog",
    "settings_from",
    "parse_timeout",
    "before_init",
    "after_init",
    "attach",
    "agree",
    "set_timeout",
    "on_failure",
    "evaluate",
    "watched",
    "rendezvous",
    "agree_over_backend",
    "launch_environment",
    "rank_and_size",
    "ring_addresses",
    "signature_of",
    "shutdown_sockets",
    "write_report",
]
