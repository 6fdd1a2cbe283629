"""A started launch plan: its processes, their output readers, and how the job ends.

:meth:`mlxdist.launch.plan.LaunchPlan.start` builds a :class:`RunningJob`;
:meth:`RunningJob.wait` watches it (asleep while every rank runs: it looks for
the world's failure report once a second) and ends whatever still runs.

Before the launcher signals ranks to end them, it writes why in the job's
ending notice (the file ``MLXDIST_ENDING`` names), so a rank that gets
SIGTERM can tell the launcher ending the job (a rank failed, the world failed,
the deadline passed, Ctrl-C) from a request to stop that the launcher passed on to
every rank (:meth:`RunningJob.pass_on_stop`) or that was sent to the rank itself:
:func:`launcher_ending` reads it.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from typing import Any, Sequence

from mlxdist.errors import InvalidArgumentError
from mlxdist.launch.mpi import mpi_failures
from mlxdist.launch.output import LineSink, pump
from mlxdist.launch.result import LaunchResult, describe_exit

__all__ = ["RunningJob", "KILL_GRACE", "FAILURE_GRACE", "STOP_GRACE", "ENDING_VARIABLE", "MPI_STOP_SIGNAL",
           "launcher_ending"]

# SIGTERM to every rank, then this long for all of them together, then SIGKILL.
KILL_GRACE = 3.0
# Once a rank's watchdog reported that the world failed, the ranks get this long
# to exit by themselves (they raise the typed error and may save state);
# the ones still running then are ended and named.
FAILURE_GRACE = 4.0
# Once a SIGTERM to the launcher was passed on to the ranks, the job gets this long to end by itself.
STOP_GRACE = 60.0
# The ranks' variable naming the launcher's ending notice.
ENDING_VARIABLE = "MLXDIST_ENDING"
# A stop passed on to an MPI job: mpirun forwards it to every rank (it ends them at once on SIGTERM).
MPI_STOP_SIGNAL = signal.SIGUSR2
_POLL = 0.1
_IDLE_POLL = 1.0


def _signal_running(procs: Sequence[subprocess.Popen], sig: int) -> None:
    """Send ``sig`` to the process group of each process still running."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


def launcher_ending() -> str | None:
    """Why the launcher that started this process is ending its job, if it said so.

    A rank reads it when it gets SIGTERM: a notice means the launcher is ending
    the job (a rank failed, the world failed, the deadline passed, Ctrl-C);
    none means the signal is a request to stop (passed on by the launcher, or
    sent to the rank itself).

    Returns:
        The launcher's reason, or None (no notice, or no launcher of this package).
    """
    path = os.environ.get(ENDING_VARIABLE)
    if not path:
        return None
    try:
        with open(path) as f:
            return f.read().strip() or "the launcher is ending the job"
    except OSError:
        return None


class RunningJob:
    """The processes of a started plan, their output readers and how they end.

    Built by :meth:`mlxdist.launch.plan.LaunchPlan.start` (``plan`` is that plan).
    """

    def __init__(self, plan: Any, sink: LineSink) -> None:
        self.plan = plan
        self.procs: list[subprocess.Popen] = []
        self._threads: list[threading.Thread] = []
        self._untagged: list[str] = []
        self._exited: queue.Queue[int] = queue.Queue()
        # When a stop passed on to the job must have ended it (monotonic time), once one was.
        self._stop_by: float | None = None
        tagged = plan.backend == "mpi"
        try:
            for cmd, proc_env, rank in zip(plan.commands, plan.envs, plan.ranks):
                # A remote rank lives while its standard input is open (mlxdist.launch.remote).
                stdin = subprocess.DEVNULL if plan.hosts is None else subprocess.PIPE
                proc = subprocess.Popen(cmd, env=proc_env, stdin=stdin, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=True)
                self.procs.append(proc)
                for stream, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
                    t = threading.Thread(target=pump, args=(stream, sink, name, rank, tagged, self._untagged),
                                         daemon=True)
                    t.start()
                    self._threads.append(t)
                threading.Thread(target=self._wait_for, args=(len(self.procs) - 1, proc), daemon=True).start()
        except (OSError, RuntimeError) as exc:
            self.end()
            raise InvalidArgumentError(
                f"could not start {len(plan.commands)} processes: the launch failed at the "
                f"{len(self.procs) + 1}th ({exc}); start fewer ranks"
            ) from exc

    def _wait_for(self, index: int, proc: subprocess.Popen) -> None:
        proc.wait()
        self._exited.put(index)

    @property
    def pids(self) -> list[int]:
        """The started processes' ids (the ranks for ring; mpirun for MPI)."""
        return [p.pid for p in self.procs]

    def poll(self) -> list[int | None]:
        """Each process's exit status so far (None: still running; negative: signal)."""
        return [p.poll() for p in self.procs]

    def world_failure(self) -> dict[str, Any] | None:
        """The first failure a rank's watchdog reported (rank, op, kind, message,
        ``lost``: the ranks it names as lost or stalled), or None."""
        try:
            with open(self.plan.report_path) as f:
                report = json.load(f)
        except (OSError, ValueError):
            return None
        return report if isinstance(report, dict) else None

    def _world_lost_a_rank(self) -> bool:
        # A mismatch fails the world on every rank alike: each raises and ends by itself.
        if not os.path.exists(self.plan.report_path):
            return False
        report = self.world_failure()
        return report is not None and report.get("kind") != "mismatch"

    def _only_lost_run(self) -> bool:
        # Every rank still running is one the world named lost or stalled: no need to wait.
        lost = set((self.world_failure() or {}).get("lost") or [])
        running = [r for r, p in zip(self.plan.ranks, self.procs) if p.poll() is None]
        return bool(lost) and all(r is not None and r in lost for r in running)

    def pass_on_stop(self, grace: float = STOP_GRACE) -> None:
        """Pass a request to stop on to the job: SIGTERM to every rank still running (for MPI,
        :data:`MPI_STOP_SIGNAL` to mpirun, which forwards it, and :func:`mlxdist.init` turns it
        into a SIGTERM in each rank: mpirun would end the ranks at once on a SIGTERM), with no
        ending notice, so each rank's program decides how it ends (a server drains); :meth:`wait`
        ends the ranks still running ``grace`` seconds later. A second call ends them at once.

        Safe in a signal handler (it only signals and notes the time).

        Args:
            grace: Seconds the job gets to end by itself.
        """
        now = time.monotonic()
        if self._stop_by is not None:
            self._stop_by = now
            return
        self._stop_by = now + grace
        _signal_running(self.procs, MPI_STOP_SIGNAL if self.plan.backend == "mpi" else signal.SIGTERM)

    def wait(self, timeout: float | None = None, end_on_failure: bool = True) -> LaunchResult:
        """Wait for the job to end, then end whatever still runs.

        The job ends when every process exited, when one exits non-zero, at the
        deadline, or (``end_on_failure``) :data:`FAILURE_GRACE` seconds after a
        rank's watchdog reported that the world lost a rank or passed a
        deadline: a rank stopped or stalled is then ended and named. After
        :meth:`pass_on_stop`, it also ends at that stop's grace.

        Args:
            timeout: Seconds before every rank is ended (None: no job deadline).
            end_on_failure: End the job once its world failed.

        Returns:
            How the job ended.
        """
        result = LaunchResult(returncodes=[None] * len(self.procs))
        deadline = None if timeout is None else time.monotonic() + timeout
        failed_at: float | None = None
        remaining = len(self.procs)
        try:
            while remaining:
                # The report is looked for once a second (often once a rank has
                # exited), so a healthy job's launcher stays asleep.
                step = _POLL if remaining < len(self.procs) or failed_at is not None else _IDLE_POLL
                for end in (deadline, self._stop_by):
                    if end is not None:
                        step = min(step, max(0.0, end - time.monotonic()))
                try:
                    index = self._exited.get(timeout=step)
                except queue.Empty:
                    result.wakeups += 1
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        result.timed_out = True
                        break
                    if self._stop_by is not None and now >= self._stop_by:
                        result.stop_overran = True
                        break
                    if end_on_failure and failed_at is None and self._world_lost_a_rank():
                        failed_at = now
                    if failed_at is not None and (now - failed_at >= FAILURE_GRACE or self._only_lost_run()):
                        result.ended_after_failure = True
                        break
                    continue
                remaining -= 1
                if self.procs[index].returncode != 0:
                    result.failed_rank = self.plan.ranks[index] if self.plan.ranks[index] is not None else index
                    break
        finally:
            still = [r for r, p in zip(self.plan.ranks, self.procs) if p.poll() is None and r is not None]
            self.end(reason=_ending_reason(self, result))
        result.stopped = self._stop_by is not None
        result.returncodes = [p.returncode for p in self.procs]
        result.report = self.world_failure()
        lost = [int(r) for r in (result.report or {}).get("lost") or []]
        if result.ended_after_failure and self.plan.backend == "ring":
            lost = sorted(set(lost) | set(still))
        result.lost_ranks = lost
        if self.plan.backend == "mpi":
            result.rank_exits = mpi_failures(self._untagged)
            if result.failed_rank is not None:
                result.failed_rank = next(iter(result.rank_exits), None)
        elif result.failed_rank is not None:
            result.rank_exits = {result.failed_rank: result.returncodes[result.failed_rank] or 0}
        return result

    def end(self, grace: float = KILL_GRACE, reason: str = "the launcher is ending the job") -> None:
        """End every process still running: the ending notice first, then SIGTERM (and SIGCONT,
        so a stopped rank takes it), one shared grace period, then SIGKILL; join the readers.
        A remote rank's standard input is closed first (which ends it on its host).

        Args:
            grace: Seconds between SIGTERM and SIGKILL.
            reason: Why, for the ending notice (see :func:`launcher_ending`).
        """
        if any(p.poll() is None for p in self.procs):
            self._write_notice(reason)
        for p in self.procs:
            if p.stdin is not None:
                try:
                    p.stdin.close()
                except OSError:
                    pass
        live = [p for p in self.procs if p.poll() is None]
        _signal_running(live, signal.SIGTERM)
        _signal_running(live, signal.SIGCONT)
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        _signal_running(live, signal.SIGKILL)
        for p in live:
            p.wait()
        for t in self._threads:
            t.join(timeout=5)

    def _write_notice(self, reason: str) -> None:
        path = self.plan.ending_path
        if not path:
            return
        try:
            with open(path + ".tmp", "w") as f:
                f.write(reason)
            os.replace(path + ".tmp", path)  # a rank never reads half of it
        except OSError:
            pass  # its directory is gone: the plan was closed, no rank of it reads it


def _ending_reason(job: RunningJob, result: LaunchResult) -> str:
    """What the ending notice says when :meth:`RunningJob.wait` ends the ranks still running."""
    if result.timed_out:
        return "the job deadline passed"
    if result.stop_overran:
        return "the job did not end within the grace after the stop passed on to it"
    if result.ended_after_failure:
        return "the world failed"
    if result.failed_rank is not None:
        if job.plan.backend == "mpi":
            return f"mpirun exited with {job.procs[0].returncode}"
        return describe_exit(result.failed_rank, job.procs[result.failed_rank].returncode or 0)
    return "the launcher was interrupted"
