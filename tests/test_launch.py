"""mlxdist.launch: ranks, prefixes, failure propagation, deadlines; a lost peer."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import pytest

from conftest import WORKERS, run_ranks
from mlxdist.launch import free_ports, launch


def probe(mode: str, n: int, backend: str, timeout: float = 60.0):
    return launch(
        [sys.executable, str(WORKERS / "launch_probe.py"), mode],
        n=n, backend=backend, timeout=timeout, capture=True, stdout=io.StringIO(), stderr=io.StringIO(),
    )


@pytest.mark.parametrize("backend", ["ring", "mpi"])
def test_every_rank_runs_with_its_prefix(backend):
    result = probe("ok", 3, backend)
    assert result.ok and result.exit_code == 0
    assert sorted(line for line in result.output if "hello" in line) == [
        f"[{r}] hello from {r}\n" for r in range(3)
    ]


@pytest.mark.parametrize("backend", ["ring", "mpi"])
def test_a_failing_rank_fails_the_launch_and_kills_the_rest(backend):
    start = time.monotonic()
    result = probe("fail", 3, backend)
    assert time.monotonic() - start < 30  # the others would sleep 120 s
    assert not result.ok and not result.timed_out and result.exit_code != 0
    if backend == "ring":
        assert result.failed_rank == 1 and result.returncodes[1] == 3


def test_deadline_kills_every_rank():
    start = time.monotonic()
    result = probe("sleep", 2, "ring", timeout=2)
    assert result.timed_out and result.exit_code == 124
    assert time.monotonic() - start < 20
    assert all(rc is not None and rc != 0 for rc in result.returncodes)


def test_command_line_exit_status_and_hostfile(tmp_path):
    script = tmp_path / "show.py"
    script.write_text(
        "import json, os\n"
        "hosts = json.load(open(os.environ['MLX_HOSTFILE']))\n"
        "print(os.environ['MLX_RANK'], json.dumps(hosts))\n"
    )
    ok = subprocess.run(
        [sys.executable, "-m", "mlxdist.launch", "-n", "2", "--timeout", "60", "--", sys.executable, str(script)],
        capture_output=True, text=True, timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    lines = sorted(ok.stdout.splitlines())
    assert [line.split()[:2] for line in lines] == [["[0]", "0"], ["[1]", "1"]]
    hosts = json.loads(lines[0].split(" ", 2)[2])
    assert len(hosts) == 2 and all(h[0].startswith("127.0.0.1:") for h in hosts)
    failing = subprocess.run(
        [sys.executable, "-m", "mlxdist.launch", "-n", "2", "--", sys.executable, "-c", "raise SystemExit(5)"],
        capture_output=True, text=True, timeout=120,
    )
    assert failing.returncode == 5


def test_bad_arguments():
    with pytest.raises(ValueError):
        launch([sys.executable, "-c", "pass"], n=0)
    with pytest.raises(ValueError):
        launch([], n=2)
    with pytest.raises(ValueError):
        launch([sys.executable], n=2, backend="carrier-pigeon")
    assert len(set(free_ports(8))) == 8


def test_lost_peer_raises_communication_error():
    result = run_ranks("peer_loss.py", 2, "ring", timeout=90)
    errors = [line for line in result.output if "CommunicationError" in line]
    assert any(line.startswith("[0] first") for line in errors)
    assert any(line.startswith("[0] again") and "already failed" in line for line in errors)
