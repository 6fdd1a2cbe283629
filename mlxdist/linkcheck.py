"""What the import cannot promise about mlxdist's build: ``python -m mlxdist.linkcheck``.

Importing :mod:`mlxdist._c` already loads both extensions, resolves every C
function they declare, checks that the MLX they were compiled against is the
one running and that the bridge sees mlx.core's nanobind types (else the
import fails, saying so). This checks, and exits non-zero when a check fails:

- the libmlx the extension loaded is the one file the ``mlx`` package loaded
  (two would be two engines that share no group);
- the side-effect-free ``mlx_distributed_*`` functions run (``is_available``
  per backend, ``group_new``/``group_free``, a non-strict ``init`` with
  ``group_rank``, ``group_size`` and ``group_free``);
- an mx.array goes through the bridge and back, and through a lazy all_sum,
  keeping its graph node, unevaluated;

and it prints, for each backend and operation, whether MLX provides it
natively, mlxdist fills it in, or it is unavailable (from
:data:`mlxdist.backends.CAPABILITIES`), with the versions and the libmpi in
use. Output is a table, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "Check",
    "LinkReport",
    "declared_functions",
    "call_side_effect_free",
    "mapped_libmlx_files",
    "check_libmlx",
    "check_bridge",
    "operation_table",
    "run_checks",
    "main",
]

DISTRIBUTED_PREFIX = "mlx_distributed_"
BACKEND_NAMES = ("ring", "mpi", "jaccl", "nccl")

_LIBMLX_NAME = re.compile(r"^libmlx\.(so|dylib)(\.|$)")


@dataclass
class Check:
    """One check and its outcome.

    Attributes:
        name: What was checked.
        ok: Whether it passed.
        detail: The value seen, or why it failed.
        function: The C function the check called, if any.
    """

    name: str
    ok: bool
    detail: str = ""
    function: str = ""


@dataclass
class LinkReport:
    """Everything linkcheck found; ``ok`` is the conjunction of all checks."""

    extension: str = ""
    checks: list[Check] = field(default_factory=list)
    declared: list[str] = field(default_factory=list)
    libmlx: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    backends: dict[str, dict[str, Any]] = field(default_factory=dict)
    mpi_library: str = ""

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (with ``ok`` included)."""
        data = asdict(self)
        data["ok"] = self.ok
        return data


# -- functions ---------------------------------------------------------------


def declared_functions(lib: Any, prefix: str = DISTRIBUTED_PREFIX) -> list[str]:
    """The functions the extension's cdef declares whose names start with ``prefix``.

    ``dir(lib)`` of a cffi API-mode module lists what the cdef declared
    (functions, constants, enum values); constants and enum values are ints.

    Args:
        lib: The extension's ``lib``.
        prefix: Keep only names starting with this.

    Returns:
        The sorted function names.
    """
    names = []
    for name in dir(lib):
        if name.startswith(prefix) and not isinstance(getattr(lib, name, None), int):
            names.append(name)
    return sorted(names)


def _call(function: str, label: str, action: Callable[[], tuple[bool, str, Any]]) -> tuple[Check, Any]:
    """Run ``action`` (returning ok, detail, value) as the check of one call."""
    try:
        ok, detail, value = action()
    except Exception as exc:  # a failed call is a failed check, never a crash
        return Check(label, False, f"{type(exc).__name__}: {exc}", function), None
    return Check(label, ok, detail, function), value


def call_side_effect_free(ffi: Any, lib: Any, init_backend: str) -> list[Check]:
    """Call the ``mlx_distributed_*`` functions that change nothing.

    Args:
        ffi: The extension's ``ffi``.
        lib: The extension's ``lib``.
        init_backend: The backend for the non-strict init (``ring`` answers at
            once with a single-process group when nothing launched us).

    Returns:
        One :class:`Check` per call, in call order.
    """
    from mlxdist._c import last_error

    def returned(rc: int) -> tuple[bool, str, None]:
        return rc == 0, f"rc={rc}" + (f" ({last_error()})" if rc else ""), None

    checks = []
    for backend in ("any",) + BACKEND_NAMES:
        check, _ = _call(
            "mlx_distributed_is_available",
            f"is_available({backend!r})",
            lambda b=backend: (True, str(bool(lib.mlx_distributed_is_available(b.encode()))), None),
        )
        checks.append(check)

    check, empty = _call(
        "mlx_distributed_group_new", "group_new()", lambda: (True, "empty group", lib.mlx_distributed_group_new())
    )
    checks.append(check)
    if empty is not None:
        checks.append(
            _call("mlx_distributed_group_free", "group_free(empty group)",
                  lambda: returned(lib.mlx_distributed_group_free(empty)))[0]
        )

    handle = ffi.new("mlx_distributed_group*")
    check, _ = _call(
        "mlx_distributed_init",
        f"init(strict=false, {init_backend!r})",
        lambda: returned(lib.mlx_distributed_init(handle, False, init_backend.encode())),
    )
    checks.append(check)
    if not check.ok:
        return checks

    def rank() -> tuple[bool, str, int]:
        value = lib.mlx_distributed_group_rank(handle[0])
        return value >= 0, f"rank={value}", value

    def size() -> tuple[bool, str, int]:
        value = lib.mlx_distributed_group_size(handle[0])
        return value >= 1, f"size={value}", value

    rank_check, rank_value = _call("mlx_distributed_group_rank", "group_rank(init's group)", rank)
    size_check, size_value = _call("mlx_distributed_group_size", "group_size(init's group)", size)
    if rank_check.ok and size_check.ok and rank_value >= size_value:
        rank_check.ok, rank_check.detail = False, f"rank={rank_value} >= size={size_value}"
    checks += [
        rank_check,
        size_check,
        _call("mlx_distributed_group_free", "group_free(init's group)",
              lambda: returned(lib.mlx_distributed_group_free(handle[0])))[0],
    ]
    return checks


# -- libmlx ------------------------------------------------------------------


def _linux_mapped_files() -> list[str]:
    with open("/proc/self/maps") as maps:
        return [parts[5] for parts in (line.split(maxsplit=5) for line in maps) if len(parts) == 6]


def _macos_loaded_images() -> list[str]:
    dyld = ctypes.CDLL(None)  # the process's global namespace holds dyld's functions
    dyld._dyld_image_count.restype = ctypes.c_uint32
    dyld._dyld_get_image_name.restype = ctypes.c_char_p
    dyld._dyld_get_image_name.argtypes = [ctypes.c_uint32]
    return [dyld._dyld_get_image_name(i).decode() for i in range(dyld._dyld_image_count())]


def mapped_libmlx_files() -> list[str] | None:
    """The distinct libmlx files loaded in this process (real paths).

    Returns:
        The files, or None where the platform gives no way to list them
        (neither ``/proc/self/maps`` nor macOS's dyld).
    """
    if os.path.exists("/proc/self/maps"):
        paths = _linux_mapped_files()
    elif sys.platform == "darwin":
        paths = _macos_loaded_images()
    else:
        return None
    found = {os.path.realpath(p.strip()) for p in paths if _LIBMLX_NAME.match(os.path.basename(p.strip()))}
    return sorted(found)


def check_libmlx(ffi: Any, lib: Any, mapped: list[str] | None) -> tuple[Check, dict[str, Any]]:
    """Whether the extension's libmlx is the one file loaded in the process.

    The ``mlx`` package always loads a libmlx, so a single loaded file that
    equals the extension's means both use the same engine; two files would
    mean two engines that do not share groups.

    Args:
        ffi: The extension's ``ffi``.
        lib: The extension's ``lib``.
        mapped: The loaded libmlx files (:func:`mapped_libmlx_files`).

    Returns:
        The check and the paths seen.
    """
    raw = ffi.string(lib.mlxdist_libmlx_path()).decode()
    extension_path = os.path.realpath(raw) if raw else ""
    info: dict[str, Any] = {"extension": extension_path, "process": mapped}
    if not extension_path:
        return Check("libmlx is shared with mlx", False, "the extension cannot tell its libmlx"), info
    if mapped is None:
        return Check("libmlx is shared with mlx", False, "cannot list loaded libraries here"), info
    same = mapped == [extension_path]
    detail = extension_path if same else f"extension: {extension_path}; loaded: {', '.join(mapped)}"
    return Check("libmlx is shared with mlx", same, detail), info


# -- the bridge --------------------------------------------------------------


def check_bridge(bridge: Any) -> list[Check]:
    """Round-trip an mx.array through the bridge, and through a lazy all_sum.

    - an unevaluated mx.array through ``to_handle``/``from_handle`` (an
      ``mlx_array`` ctx and back) keeps its graph node and stays unevaluated;
    - a lazy all_sum through the bridge on the single-process world returns
      that node unevaluated (MLX's all_sum of one rank is its input), and
      evaluates to the input's values.

    Args:
        bridge: The ``mlxdist._bridge`` module.

    Returns:
        The checks.
    """
    import mlx.core as mx

    def round_trip() -> tuple[bool, str, None]:
        x = mx.arange(4, dtype=mx.float32) + 1  # a graph node, not evaluated
        before = bridge.node(x)
        back = bridge.from_handle(bridge.to_handle(x))
        after, source = bridge.node(back), bridge.node(x)
        ok = after == before == source and before[1] == 0
        return ok, f"node {before} -> {after}, source still {source}", None

    def lazy_all_sum() -> tuple[bool, str, None]:
        import mlxdist
        from mlxdist._paths.lazy import FUNCTIONS
        from mlxdist.group_record import record_of

        group = mlxdist.init()
        if group.size() != 1:
            return True, f"not run: a launched world of {group.size()} ranks", None
        x = mx.arange(4, dtype=mx.float32) + 1
        y = bridge.collective(FUNCTIONS["all_sum"], x, record_of(group).address, None)
        node, source = bridge.node(y), bridge.node(x)
        lazy = node == source and node[1] == 0
        values = [float(v) for v in y.tolist()]
        ok = lazy and values == [1.0, 2.0, 3.0, 4.0] and y.dtype == mx.float32
        return ok, f"node {node} (input {source}), values {values}", None

    return [
        _call("", "bridge round trip keeps the node, unevaluated", round_trip)[0],
        _call("mlx_distributed_all_sum", "lazy all_sum through the bridge (size-1 world)", lazy_all_sum)[0],
    ]


# -- backends ----------------------------------------------------------------


def operation_table(capabilities: Mapping[Any, Any], available: Mapping[str, bool]) -> dict[str, dict[str, Any]]:
    """For each backend and operation: ``native``, ``mlxdist`` or ``unavailable``.

    Args:
        capabilities: :class:`mlxdist.backends.Capabilities` per backend (keyed
            by :class:`mlxdist.Backend` or name).
        available: Whether each backend can be used here.

    Returns:
        ``{backend: {"available": bool, "operations": {op: status}}}``.
    """
    from mlxdist.backends import OPERATIONS

    table = {}
    for backend, caps in capabilities.items():
        name = getattr(backend, "value", backend)
        statuses = {op: caps.status(op) for op in OPERATIONS}
        table[name] = {"available": bool(available.get(name, False)), "operations": statuses}
    return table


# -- driver ------------------------------------------------------------------


def run_checks() -> LinkReport:
    """Run every check.

    Returns:
        The :class:`LinkReport` (its ``ok`` says whether all passed).
    """
    report = LinkReport()
    try:
        import mlx.core as mx

        from mlxdist import _cmlx
        from mlxdist._c import bridge, compiled_mlx_version, ffi, lib, running_mlx_version
    except ImportError as exc:  # the import's own guarantees failed: it says which
        report.checks.append(Check("import mlxdist._c", False, str(exc)))
        return report
    from mlxdist._mpi import LIBNAME_VARIABLE, default_library_name, select_library
    from mlxdist.backends import CAPABILITIES, detect_backend

    report.extension = getattr(_cmlx, "__file__", "") or ""
    report.versions = {"compiled": compiled_mlx_version(), "libmlx": running_mlx_version(),
                       "mlx_python": str(mx.__version__)}
    select_library()  # the libmpi mlxdist.init would use, before MLX first loads one
    report.mpi_library = os.environ.get(LIBNAME_VARIABLE) or default_library_name()
    report.declared = declared_functions(lib)
    launched = detect_backend()
    report.checks.extend(call_side_effect_free(ffi, lib, launched.value if launched else "ring"))
    libmlx_check, report.libmlx = check_libmlx(ffi, lib, mapped_libmlx_files())
    report.checks.append(libmlx_check)
    report.checks.extend(check_bridge(bridge))
    available = {b: bool(lib.mlx_distributed_is_available(b.encode())) for b in BACKEND_NAMES}
    report.backends = operation_table(CAPABILITIES, available)
    return report


def _status(ok: bool) -> str:
    return "[green]ok[/]" if ok else "[bold red]FAIL[/]"


def render(report: LinkReport, console: Any) -> None:
    """Print the report as tables on a rich console.

    Args:
        report: What :func:`run_checks` found.
        console: A ``rich.console.Console``.
    """
    from rich.table import Table

    checks = Table(title="checks", title_justify="left")
    for column in ("check", "result", "detail"):
        checks.add_column(column, overflow="fold")
    for c in report.checks:
        checks.add_row(c.name, _status(c.ok), c.detail)
    console.print(checks)
    called = {c.function for c in report.checks}
    console.print("mlx_distributed_* functions (all resolved at import; * called here): " + ", ".join(
        f"{name}{'*' if name in called else ''}" for name in report.declared))
    console.print("MLX: " + ", ".join(f"{k} {v}" for k, v in report.versions.items())
                  + f"; libmpi: {report.mpi_library}")
    if report.backends:
        from mlxdist.backends import OPERATIONS

        styles = {"native": "green", "mlxdist": "cyan", "unavailable": "dim"}
        ops = Table(
            title="operations per backend (native: MLX; mlxdist: filled in by mlxdist)",
            title_justify="left",
        )
        ops.add_column("operation")
        for name in report.backends:
            ops.add_column(name)
        ops.add_row("available here", *("yes" if e["available"] else "no" for e in report.backends.values()))
        ops.add_section()
        for op in OPERATIONS:
            cells = (e["operations"][op] for e in report.backends.values())
            ops.add_row(op, *(f"[{styles[s]}]{s}[/]" for s in cells))
        console.print(ops)
    verdict = "[green]all checks passed[/]" if report.ok else "[bold red]some checks failed[/]"
    console.print(f"{sum(c.ok for c in report.checks)}/{len(report.checks)} checks passed: {verdict}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments (``sys.argv[1:]`` by default).

    Returns:
        0 when every check passed, 1 otherwise.
    """
    parser = argparse.ArgumentParser(
        prog="python -m mlxdist.linkcheck",
        description="Check what importing mlxdist cannot: one libmlx, the C calls, the bridge; print the operations per backend.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = run_checks()
    if args.json:
        sys.stdout.write(json.dumps(report.as_dict(), indent=2) + "\n")
    else:
        from rich.console import Console

        render(report, Console())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
