"""Ctrl-C and a rank blocked in a collective.

A SIGINT reaches a Python thread only between bytecodes; an eager collective
waits inside MLX (``mx::synchronize`` on its stream) with no timeout or abort in
any backend, so a KeyboardInterrupt is raised only when the call returns (see
README, "Threads"). What must hold is that Ctrl-C on the launcher ends the
whole job, blocked ranks included, within seconds.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import BACKENDS, WORKERS


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purpose
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /proc (macOS): kill(pid, 0) is the answer


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigint_to_the_launcher_ends_a_blocked_job(backend):
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlxdist.launch",
            "-n",
            "2",
            "--backend",
            backend,
            "--timeout",
            "60",
            "--",
            sys.executable,
            str(WORKERS / "blocked_rank.py"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A shell without job control starts background commands with SIGINT ignored, and
        # an ignored SIGINT stays ignored across exec: give the launcher a terminal's default.
        preexec_fn=_default_sigint,
    )
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        entered = False
        while time.monotonic() < deadline and not (entered and len(pids) == 2):
            line = launcher.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            match = re.search(r"pid (\d+) rank", line)
            if match:
                pids.append(int(match.group(1)))
            entered = entered or "entering all_sum" in line
        assert len(pids) == 2 and entered, f"the ranks did not start: {pids}"
        time.sleep(0.5)  # rank 0 is now inside the all_sum
        assert launcher.poll() is None and all(_alive(p) for p in pids)
        start = time.monotonic()
        launcher.send_signal(signal.SIGINT)
        code = launcher.wait(timeout=20)
        took = time.monotonic() - start
        gone_by = time.monotonic() + 5
        while any(_alive(p) for p in pids) and time.monotonic() < gone_by:
            time.sleep(0.05)
        assert code != 0, "an interrupted job must not report success"
        assert took < 10, f"the launcher took {took:.1f} s to end"
        assert not any(_alive(p) for p in pids), "a rank outlived the interrupted launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
