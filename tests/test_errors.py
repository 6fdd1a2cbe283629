"""Typed errors that need no peers: init, the ABI guard, the error channel, threads."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import mlxdist
from conftest import BACKENDS
from mlxdist import _c
from mlxdist._c import ffi, lib
from mlxdist._c.gate import check
from mlxdist._c.handles import GroupHandle
from mlxdist.backends import detect_backend
from suites import errors
from support import run_here
from support.shared import suite_results


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (MLX caches backends per process)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "OMPI_", "PMI"))}
    return subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )


def test_exception_hierarchy_subclasses_builtins():
    assert issubclass(mlxdist.InvalidRankError, ValueError)
    assert issubclass(mlxdist.ShapeError, ValueError)
    assert issubclass(mlxdist.DtypeError, TypeError)
    assert issubclass(mlxdist.AllocationError, MemoryError)
    assert issubclass(mlxdist.UnsupportedOperationError, NotImplementedError)
    assert not hasattr(mlxdist, "TransformError")
    for cls in (mlxdist.CommunicationError, mlxdist.InitializationError, mlxdist.BackendUnavailableError,
                mlxdist.AllocationError, mlxdist.DtypeError):
        assert issubclass(cls, mlxdist.DistributedError) and issubclass(cls, RuntimeError)


def test_c_errors_carry_their_kind_on_the_size_one_world():
    checks = run_here(errors.run, mlxdist.init())
    assert checks.count >= 20
    assert not checks.failures, "\n".join(checks.failures)


@pytest.mark.parametrize("backend", BACKENDS)
def test_c_errors_carry_their_kind_on_two_ranks(backend):
    results, _ = suite_results("suites.errors:run", 2, backend)  # the launch shared per (n, backend)
    assert len(results) == 2 and all(r.checks >= 20 and r.failures == 0 for r in results)


def test_the_kind_not_the_message_decides_the_class():
    # Classifying by message text once turned any message containing "type"
    # into a DtypeError; the C side's kind (INIT here) decides now.
    handle = GroupHandle()
    rc = lib.mlx_distributed_init(handle.out, False, b"no-such-type-of-backend")
    with pytest.raises(mlxdist.InitializationError) as info:
        check(rc, "init")
    assert type(info.value) is mlxdist.InitializationError
    assert lib.mlxdist_last_error_kind() == lib.MLXDIST_ERROR_INIT


def test_check_reports_the_c_layer_message():
    handle = GroupHandle()
    rc = lib.mlx_distributed_init(handle.out, False, b"no-such-backend")
    with pytest.raises(mlxdist.InitializationError, match="no-such-backend"):
        check(rc, "init")
    check(0, "nothing")  # success raises nothing


def test_an_error_of_unknown_kind_gets_the_default_class():
    # mlx-c's own array functions report no kind: the caller's default applies.
    assert lib.mlx_array_eval(ffi.new("mlx_array*")[0]) == 1
    assert lib.mlxdist_last_error_kind() in (lib.MLXDIST_ERROR_UNKNOWN, lib.MLXDIST_ERROR_ARGUMENT)
    with pytest.raises(mlxdist.DistributedError):
        check(1, "eval")


def test_c_errors_never_exit_the_process():
    # mlx-c's default handler would exit(-1); ours records the message instead.
    null_array = ffi.new("mlx_array*")[0]
    assert lib.mlx_array_eval(null_array) == 1
    assert "null mlx_array" in _c.last_error()
    assert lib.mlx_distributed_recv(ffi.new("mlx_array*"), [-1], 1, lib.MLX_FLOAT32, 0,
                                    ffi.new("mlx_distributed_group*")[0], ffi.new("mlx_stream*")[0]) == 1


def test_error_messages_are_kept_per_thread():
    first_failed, second_failed = threading.Event(), threading.Event()
    seen: dict[str, str] = {}

    def fail_with(name: str, backend: bytes, mine: threading.Event, other: threading.Event) -> None:
        handle = GroupHandle()
        assert lib.mlx_distributed_init(handle.out, False, backend) == 1
        mine.set()
        other.wait(10)
        seen[name] = _c.last_error()

    a = threading.Thread(target=fail_with, args=("a", b"bogus-a", first_failed, second_failed))
    b = threading.Thread(target=fail_with, args=("b", b"bogus-b", second_failed, first_failed))
    a.start(), b.start(), a.join(20), b.join(20)
    assert "bogus-a" in seen["a"] and "bogus-b" in seen["b"]


def test_abi_guard_names_both_versions(monkeypatch):
    monkeypatch.setattr(_c, "running_mlx_version", lambda: "9.9.9")
    with pytest.raises(ImportError) as info:
        _c._check_abi()
    message = str(info.value)
    assert "9.9.9" in message and _c.compiled_mlx_version() in message and "pip install" in message


def test_compiled_version_matches_the_running_mlx():
    import mlx.core as mx

    assert _c.compiled_mlx_version() == mx.__version__.split(".dev")[0]


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, mlxdist.Backend.MPI),
        ({"PMI_RANK": "0"}, mlxdist.Backend.MPI),
        ({"MLX_RANK": "0", "MLX_HOSTFILE": "h.json"}, mlxdist.Backend.RING),
        ({"MLX_RANK": "0", "MLX_HOSTFILE": "h.json", "OMPI_COMM_WORLD_SIZE": "2"}, mlxdist.Backend.RING),
        ({"MLX_RANK": "0", "MLX_IBV_DEVICES": "d.json", "MLX_JACCL_COORDINATOR": "x:1"}, mlxdist.Backend.JACCL),
        ({"MLX_RANK": "0", "MLX_WORLD_SIZE": "2", "NCCL_HOST_IP": "x"}, mlxdist.Backend.NCCL),
    ],
)
def test_any_follows_the_launch_environment(env, expected):
    assert detect_backend(env) is expected


def test_backend_names():
    assert mlxdist.is_available("ring") and mlxdist.is_available(mlxdist.Backend.RING)
    with pytest.raises(ValueError, match="unknown backend"):
        mlxdist.is_available("carrier-pigeon")
    with pytest.raises(ValueError, match="unknown backend"):
        mlxdist.init("carrier-pigeon")


@pytest.mark.parametrize("backend", ["jaccl", "nccl"])
def test_unavailable_backend_raises(backend):
    import mlx.core as mx

    # MLX's own answer is the independent reference for what this build has.
    assert mlxdist.is_available(backend) == mx.distributed.is_available(backend)
    if not mlxdist.is_available(backend):
        with pytest.raises(mlxdist.BackendUnavailableError, match=backend):
            mlxdist.init(backend)


def test_strict_init_without_a_launcher_raises():
    with pytest.raises(mlxdist.InitializationError, match="launch"):
        mlxdist.init(strict=True)


def test_size_one_world_without_a_launcher():
    group = mlxdist.init()
    assert (group.rank(), group.size(), group.backend) == (0, 1, None)
    x = np.arange(3.0)
    assert mlxdist.all_sum(x) is x
    assert mlxdist.world().size() == 1


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("content", ["not json", None])
def test_ring_init_with_a_broken_hostfile(tmp_path, strict, content):
    # A launch environment that names a hostfile MLX cannot read is a
    # configuration error even when not strict: a typed error naming the
    # hostfile, not a crash, raised before MLX reads it.
    hostfile = tmp_path / "hosts.json"
    if content is not None:
        hostfile.write_text(content)
    result = run_python(
        "import mlxdist\n"
        "try:\n"
        f"    mlxdist.init('ring', strict={strict})\n"
        "except mlxdist.ConfigurationError as e:\n"
        "    print('typed:', e)\n",
        MLX_RANK="0",
        MLX_HOSTFILE=str(hostfile),
    )
    assert result.returncode == 0 and result.stdout.startswith("typed: "), result.stderr
    assert "hosts.json" in result.stdout


def test_import_needs_no_environment():
    result = run_python("import mlxdist; print(mlxdist.init().size())")
    assert result.returncode == 0 and result.stdout.strip() == "1", result.stderr
