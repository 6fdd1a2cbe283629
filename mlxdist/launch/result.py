"""How a launched job ended, and the launcher's account of it."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LaunchResult", "TIMEOUT_EXIT", "describe_exit", "report_lines"]

TIMEOUT_EXIT = 124


@dataclass
class LaunchResult:
    """How a launch ended.

    Attributes:
        returncodes: Each process's exit code (for MPI, mpirun's only), None if
            killed before it exited by itself.
        timed_out: Whether the job deadline passed.
        failed_rank: The first rank seen failing, if any (for MPI, as mpirun
            reports it).
        rank_exits: The failing ranks' exit statuses (negative: killed by that
            signal), as far as they are known.
        output: The prefixed output lines, when captured.
        report: The first failure a rank's watchdog reported (rank, op, kind,
            message, lost), if the world failed.
        lost_ranks: The ranks the world declared lost or stalled, and (ring) the
            ranks still running when the job was ended after the world failed.
        ended_after_failure: The job was ended because its world failed while
            some rank still ran.
        wakeups: How often the launcher's wait woke with no process exited (to
            look for the world's failure report): about once a second while
            every rank runs, ten times a second once one has ended.
        stopped: A request to stop was passed on to the job (a SIGTERM to the
            launcher, :meth:`~mlxdist.launch.RunningJob.pass_on_stop`).
        stop_overran: The job had not ended by that stop's grace and was ended.
    """

    returncodes: list[int | None]
    timed_out: bool = False
    failed_rank: int | None = None
    rank_exits: dict[int, int] = field(default_factory=dict)
    output: list[str] = field(default_factory=list)
    report: dict[str, Any] | None = None
    lost_ranks: list[int] = field(default_factory=list)
    ended_after_failure: bool = False
    wakeups: int = 0
    stopped: bool = False
    stop_overran: bool = False

    @property
    def ok(self) -> bool:
        """True when every rank exited 0 (before the deadline, if any) and the world did not fail."""
        return (not self.timed_out and not self.ended_after_failure and not self.stop_overran
                and all(rc == 0 for rc in self.returncodes))

    @property
    def exit_code(self) -> int:
        """A process exit code summarising the launch (0, the failure's code, or 124)."""
        if self.timed_out:
            return TIMEOUT_EXIT
        codes = list(self.rank_exits.values())
        if self.failed_rank is not None and self.failed_rank in self.rank_exits:
            codes.insert(0, self.rank_exits[self.failed_rank])
        for rc in codes + [rc for rc in self.returncodes if rc is not None]:
            if rc:
                if rc < 0:
                    return 128 + min(-rc, 127)
                return rc if rc < 256 else 1
        return 0 if self.ok else 1


def describe_exit(rank: int, code: int) -> str:
    """``"rank R exited with C"`` or ``"rank R was killed by SIGNAME"``."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"rank {rank} was killed by {name}"
    return f"rank {rank} exited with {code}"


def report_lines(result: LaunchResult, timeout: float | None, backend: str) -> list[str]:
    """The launcher's own lines saying how the job ended (empty when it went well).

    Args:
        result: The job's end.
        timeout: Its job deadline, if any.
        backend: ``"ring"`` or ``"mpi"``.

    Returns:
        Lines, without prefix or newline.
    """
    lines = []
    if result.timed_out:
        lines.append(f"mlxdist.launch: job deadline of {timeout:g} s passed; killed all ranks")
    elif result.stop_overran:
        lines.append("mlxdist.launch: the job did not end within the grace after the SIGTERM passed on to it; "
                     "ended the ranks")
    elif result.ended_after_failure and result.lost_ranks:
        who = ", ".join(str(r) for r in result.lost_ranks)
        lines.append(f"mlxdist.launch: the world failed and rank(s) {who} did not end (stalled or lost); "
                     "ended the job")
    elif result.rank_exits:
        first = result.failed_rank if result.failed_rank in result.rank_exits else min(result.rank_exits)
        order = [first] + sorted(r for r in result.rank_exits if r != first)
        failures = "; ".join(describe_exit(r, result.rank_exits[r]) for r in order)
        lines.append(f"mlxdist.launch: {failures}; killed the others")
    elif not result.ok:
        codes = ", ".join(str(rc) for rc in result.returncodes)
        who = "mpirun" if backend == "mpi" else "the ranks"
        lines.append(f"mlxdist.launch: {who} exited with {codes} (no failing rank was reported)")
    report = result.report
    if report is not None:
        lost = report.get("lost") or []
        named = f"; lost or stalled: rank(s) {', '.join(map(str, lost))}" if lost else ""
        where = f"{report.get('op')} #{report.get('seq')}: " if report.get("op") else ""
        lines.append(f"mlxdist.launch: first failure, reported by rank {report.get('rank')}: "
                     f"{where}{report.get('message')}{named}")
    return lines
