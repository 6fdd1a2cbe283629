"""MPI's thread level: asked for before MLX initialises MPI, read back after.

MLX initialises MPI with ``MPI_Init``, which gives no thread support unless
the implementation is told otherwise; Open MPI reads ``OMPI_MPI_THREAD_LEVEL``
and MPICH ``MPIR_CVAR_DEFAULT_THREAD_LEVEL``. With MPI_THREAD_MULTIPLE the
groups of an MPI world may communicate from different threads at once (each
group then has its own lock); otherwise their eager operations share one lock.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["request_thread_multiple", "provides_thread_multiple"]

_MPI_THREAD_MULTIPLE = 3  # the same value in Open MPI and MPICH


def request_thread_multiple() -> None:
    """Ask the MPI that MLX will initialise for MPI_THREAD_MULTIPLE, unless the user chose."""
    os.environ.setdefault("OMPI_MPI_THREAD_LEVEL", str(_MPI_THREAD_MULTIPLE))
    os.environ.setdefault("MPIR_CVAR_DEFAULT_THREAD_LEVEL", "MPI_THREAD_MULTIPLE")


def _loaded_libmpi() -> str | None:
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/maps", encoding="utf-8") as maps:
                for line in maps:
                    path = line.split()[-1]
                    if os.path.basename(path).startswith("libmpi.so"):
                        return path
        except OSError:
            return None
        return None
    return os.environ.get("MLX_MPI_LIBNAME") or "libmpi.dylib"


def provides_thread_multiple() -> bool:
    """Whether the MPI loaded in this process was initialised with MPI_THREAD_MULTIPLE."""
    path = _loaded_libmpi()
    if path is None:
        return False
    try:
        libmpi = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | os.RTLD_GLOBAL)
        provided = ctypes.c_int(0)
        if libmpi.MPI_Query_thread(ctypes.byref(provided)) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return provided.value == _MPI_THREAD_MULTIPLE
