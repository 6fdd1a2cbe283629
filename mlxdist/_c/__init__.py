"""The compiled layer: the one place that loads mlxdist's two extensions.

- ``ffi``/``lib``: the cffi binding of cmlx (mlx-c's ``mlx_distributed_*``
  signatures and the ``mlxdist_`` extensions), ``mlxdist._cmlx``;
- ``bridge``: ``mlxdist._bridge``, a nanobind module in MLX's nanobind domain
  that hands mx.arrays to those C functions and their lazy results back, with
  nothing evaluated or copied.

Importing this module loads libmlx through ``mlx.core`` (so an editable build
resolves it too), installs mlxdist's error handler before any other C call
(mlx-c's default handler exits the process), and checks that the running MLX
is the one both extensions were compiled against and that the bridge sees
mlx.core's nanobind types: when any of this fails, the import fails, saying
why (``python -m mlxdist.linkcheck`` checks what an import cannot).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import mlx.core as _mx  # noqa: F401  (loads libmlx before the extensions)

__all__ = ["ffi", "lib", "bridge", "last_error", "compiled_mlx_version", "running_mlx_version"]


def _unbuilt(module: str, exc: ImportError) -> ImportError:
    package = Path(__file__).resolve().parent.parent
    return ImportError(
        f"mlxdist's compiled extension ({module}) is not built in {package}: build it in place "
        "with `pip install -e .` from the source tree, or, after `pip install .`, run Python "
        f"from outside the source tree so that the installed package is imported ({exc})",
        name=module,
    )


try:
    from mlxdist._cmlx import ffi, lib
except ModuleNotFoundError as exc:
    raise _unbuilt("mlxdist._cmlx", exc) from None

lib.mlx_set_error_handler(lib.mlxdist_error_handler, ffi.NULL, ffi.NULL)


def last_error() -> str:
    """The last error message the C layer reported on the calling thread."""
    return ffi.string(lib.mlxdist_last_error()).decode("utf-8", "replace")


def compiled_mlx_version() -> str:
    """The MLX version the extensions were compiled against."""
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


def _load_bridge() -> Any:
    # The bridge raises ImportError itself, naming both nanobind keys, when it
    # cannot see mlx.core's types.
    try:
        return importlib.import_module("mlxdist._bridge")
    except ModuleNotFoundError as exc:
        raise _unbuilt("mlxdist._bridge", exc) from None


_check_abi()
bridge = _load_bridge()
if str(bridge.compiled_mlx_version).split(".dev")[0] != compiled_mlx_version():
    raise ImportError(
        f"mlxdist._bridge was compiled against MLX {bridge.compiled_mlx_version}, mlxdist._cmlx against "
        f"{compiled_mlx_version()}: the two extensions come from different builds. Rebuild with "
        "`pip install --force-reinstall --no-deps .` from the mlxdist source."
    )
