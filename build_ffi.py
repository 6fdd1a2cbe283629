"""cffi out-of-line builder for ``mlxdist._cmlx``.

The cdef is read from the cmlx headers, joined in dependency order. By default
the cmlx C++ sources are compiled into the extension and linked against the
libmlx shipped in the installed ``mlx`` wheel. With ``MLXDIST_MLXC_PREFIX`` set
to a real mlx-c install, only the mlxdist extensions are compiled and the
extension links that mlx-c instead, with the same cdef.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from cffi import FFI

if TYPE_CHECKING:
    from setuptools import Extension

ROOT = Path(__file__).resolve().parent
CMLX = ROOT / "cmlx"
INCLUDE = CMLX / "include"

# Dependency order: each header only uses types declared before it.
HEADERS = [
    "mlx/c/string.h",
    "mlx/c/error.h",
    "mlx/c/version.h",
    "mlx/c/stream.h",
    "mlx/c/array.h",
    "mlx/c/distributed_group.h",
    "mlx/c/distributed.h",
    "mlxdist/cmlx_ext.h",
]

CMLX_SOURCES = [
    "src/array.cpp",
    "src/distributed.cpp",
    "src/distributed_group.cpp",
    "src/error.cpp",
    "src/stream.cpp",
    "src/string.cpp",
    "src/version.cpp",
]
EXT_SOURCES = ["src/ext/mlxdist_ext.cpp"]

_CPLUSPLUS_GUARD = re.compile(r"#ifdef __cplusplus.*?#endif", re.S)


def header_cdef(text: str) -> str:
    """Strip what cffi's parser does not take: C++ guards and preprocessor lines."""
    text = _CPLUSPLUS_GUARD.sub("", text)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def read_cdef() -> str:
    return "\n".join(header_cdef((INCLUDE / h).read_text()) for h in HEADERS)


def mlx_package_dir() -> Path:
    import mlx

    return Path(next(iter(mlx.__path__))).resolve()


def rpath_args(rpaths: list[str]) -> list[str]:
    """Linker arguments for ``$ORIGIN``-relative (``@loader_path`` on macOS) rpaths."""
    if sys.platform == "darwin":
        return [f"-Wl,-rpath,{r.replace('$ORIGIN', '@loader_path')}" for r in rpaths]
    return [f"-Wl,-rpath,{r}" for r in rpaths] + ["-Wl,-z,origin"]


# Both extensions land in site-packages/mlxdist/ and libmlx in
# site-packages/mlx/lib/: an $ORIGIN-relative rpath survives pip's isolated
# build directory being deleted.
MLX_RPATH = "$ORIGIN/../mlx/lib"


def build_settings() -> dict:
    mlx_dir = mlx_package_dir()
    mlx_lib = mlx_dir / "lib"
    include_dirs = [str(INCLUDE), str(mlx_dir / "include")]
    library_dirs = [str(mlx_lib)]
    libraries = ["mlx"]
    sources = CMLX_SOURCES + EXT_SOURCES
    rpaths = [MLX_RPATH]
    prefix = os.environ.get("MLXDIST_MLXC_PREFIX")
    if prefix:
        include_dirs.insert(0, str(Path(prefix) / "include"))
        library_dirs.insert(0, str(Path(prefix) / "lib"))
        libraries.insert(0, "mlxc")
        sources = EXT_SOURCES
        rpaths.append(str(Path(prefix) / "lib"))
    link_args = rpath_args(rpaths)
    return dict(
        # setuptools insists on sources relative to the project directory;
        # ffibuilder.compile() (run as a script) works from its own directory.
        sources=[str(CMLX / s) if __name__ == "__main__" else os.path.relpath(CMLX / s) for s in sources],
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        libraries=libraries,
        extra_compile_args=["-std=c++20", "-O2", "-fvisibility=hidden"],
        extra_link_args=link_args,
        source_extension=".cpp",
    )


def bridge_extension() -> "Extension":
    """The nanobind module ``mlxdist._bridge`` (cmlx/src/bridge/bridge.cpp).

    It is compiled in MLX's nanobind domain (``NB_DOMAIN=mlx``) with the
    nanobind the build requirements pin, whose internals key must equal
    mlx.core's for the two to share MLX's bound types.
    """
    import nanobind
    from setuptools import Extension

    nb_dir = Path(nanobind.__file__).resolve().parent
    mlx_dir = mlx_package_dir()
    return Extension(
        "mlxdist._bridge",
        sources=[
            os.path.relpath(CMLX / "src" / "bridge" / "bridge.cpp"),
            # (setuptools refuses absolute source paths)
            os.path.relpath(nb_dir / "src" / "nb_combined.cpp"),
        ],
        include_dirs=[
            str(INCLUDE),
            str(mlx_dir / "include"),
            str(nb_dir / "include"),
            str(nb_dir / "src"),
            str(nb_dir / "ext" / "robin_map" / "include"),
        ],
        define_macros=[("NB_DOMAIN", "mlx"), ("NB_COMPACT_ASSERTIONS", None), ("NDEBUG", None)],
        library_dirs=[str(mlx_dir / "lib")],
        libraries=["mlx"],
        extra_compile_args=["-std=c++20", "-O2", "-fvisibility=hidden", "-fno-strict-aliasing"],
        extra_link_args=rpath_args([MLX_RPATH]),
        language="c++",
    )


ffibuilder = FFI()
ffibuilder.cdef(read_cdef())
ffibuilder.set_source(
    "mlxdist._cmlx",
    "\n".join(f'#include "{h}"' for h in HEADERS),
    **build_settings(),
)

if __name__ == "__main__":
    # Out-of-tree build (pip install does the real one): python build_ffi.py [OUTDIR]
    outdir = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build"
    ffibuilder.compile(tmpdir=str(outdir), verbose=True)
