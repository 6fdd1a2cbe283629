"""The one place that loads the compiled extension ``mlxdist._cmlx``.

Importing this module loads libmlx through ``mlx.core`` (so an editable build
resolves it too), checks that the running MLX is the one the extension was
compiled against, and installs mlxdist's error handler before any other C
call: mlx-c's default handler would exit the process.
"""

from __future__ import annotations

import os

import mlx.core as _mx  # noqa: F401  (loads libmlx before the extension)


def _unbuilt_message() -> str:
    package = os.path.dirname(os.path.abspath(__file__))
    return (
        f"mlxdist's compiled extension (mlxdist._cmlx) is not built in {package}. "
        "In a source checkout, build it in place with `pip install -e .`; after "
        "`pip install .`, run Python from outside the source tree, so that the "
        "installed mlxdist is imported instead of these sources."
    )


try:
    from mlxdist._cmlx import ffi, lib
except ModuleNotFoundError as exc:
    if exc.name != "mlxdist._cmlx":
        raise
    raise ImportError(_unbuilt_message(), name="mlxdist._cmlx") from exc

__all__ = ["ffi", "lib", "last_error", "compiled_mlx_version", "running_mlx_version"]

lib.mlx_set_error_handler(lib.mlxdist_error_handler, ffi.NULL, ffi.NULL)


def last_error() -> str:
    """The last error message the C layer reported on the calling thread."""
    return ffi.string(lib.mlxdist_last_error()).decode("utf-8", "replace")


def compiled_mlx_version() -> str:
    """The MLX version the extension was compiled against."""
    return ffi.string(lib.mlxdist_compiled_mlx_version()).decode()


def running_mlx_version() -> str:
    """The version of the libmlx loaded in this process."""
    handle = ffi.new("mlx_string*")
    if lib.mlx_version(handle) != 0:
        raise ImportError(f"mlxdist: cannot read the MLX version: {last_error()}")
    try:
        return ffi.string(lib.mlx_string_data(handle[0])).decode()
    finally:
        lib.mlx_string_free(handle[0])


def _check_abi() -> None:
    compiled = compiled_mlx_version()
    running = running_mlx_version()
    if running.split(".dev")[0] != compiled:
        raise ImportError(
            f"mlxdist was compiled against MLX {compiled} but MLX {running} is "
            "installed; MLX's C++ ABI changes between releases. Rebuild with "
            "`pip install --force-reinstall --no-deps .` from the mlxdist source, "
            f"or install mlx=={compiled}."
        )


_check_abi()
