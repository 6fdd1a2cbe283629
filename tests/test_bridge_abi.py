"""The bridge refuses to load, with an ImportError naming both keys, when it
cannot see mlx.core's types.

A variant of cmlx/src/bridge/bridge.cpp is compiled with the flags of
build_ffi.bridge_extension() but in another nanobind domain: its internals key
differs from mlx.core's, so nanobind there has no mx.array type. Importing it
must raise ImportError naming its key and the interpreter's keys (mlx.core's,
ending in ``_mlx__``), never crash or load half-working.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mlxdist._c import bridge

ROOT = Path(__file__).resolve().parent.parent
OTHER_DOMAIN = "mlxdist_test_other"

IMPORT = r"""
import importlib.util, sys
import mlx.core
spec = importlib.util.spec_from_file_location("_bridge", sys.argv[1])
module = importlib.util.module_from_spec(spec)
try:
    spec.loader.exec_module(module)
except ImportError as exc:
    print("ImportError:", exc)
else:
    print("loaded")
"""


def compile_variant(out_dir: Path, domain: str) -> Path:
    """Build the bridge with the project's flags in nanobind domain ``domain``.

    Optimisation is off (-O0): only loading is tested, and it keeps the build
    to seconds. The two translation units compile in parallel.
    """
    sys.path.insert(0, str(ROOT))
    try:
        import build_ffi
    finally:
        sys.path.remove(str(ROOT))
    ext = build_ffi.bridge_extension()
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        pytest.fail("no C++ compiler: the bridge cannot be built here either")
    macros = [f"-D{name}" if value is None else f"-D{name}={value}" for name, value in ext.define_macros if name != "NB_DOMAIN"]
    includes = [f"-I{d}" for d in ext.include_dirs] + [f"-I{sysconfig.get_paths()['include']}"]
    flags = [f for f in ext.extra_compile_args if not f.startswith("-O")] + ["-O0", "-fPIC", f"-DNB_DOMAIN={domain}"]
    sources = [Path(s).resolve() for s in ext.sources]

    def compile_one(source: Path) -> Path:
        obj = out_dir / (source.stem + ".o")
        subprocess.run([compiler, *flags, *macros, *includes, "-c", str(source), "-o", str(obj)],
                       check=True, capture_output=True, timeout=300)
        return obj

    with ThreadPoolExecutor(2) as pool:
        objects = list(pool.map(compile_one, sources))
    module = out_dir / ("_bridge" + sysconfig.get_config_var("EXT_SUFFIX"))
    libdirs = [f"-L{d}" for d in ext.library_dirs] + [f"-Wl,-rpath,{d}" for d in ext.library_dirs]
    subprocess.run([compiler, "-shared", *map(str, objects), "-o", str(module), *libdirs,
                    *(f"-l{lib}" for lib in ext.libraries)], check=True, capture_output=True, timeout=120)
    return module


@pytest.fixture(scope="module")
def other_domain_bridge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_variant(tmp_path_factory.mktemp("bridge"), OTHER_DOMAIN)


def test_a_bridge_in_another_domain_raises_import_error_naming_both_keys(other_domain_bridge: Path) -> None:
    done = subprocess.run([sys.executable, "-c", IMPORT, str(other_domain_bridge)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr  # no crash
    message = done.stdout.strip()
    assert message.startswith("ImportError:"), message
    # The variant's key is mlx.core's with only the domain changed: the same
    # nanobind ABI, so the domain alone makes the types invisible.
    own_key = bridge.internals_key.removesuffix("_mlx__") + f"_{OTHER_DOMAIN}__"
    assert f"internals key is {own_key}" in message
    assert bridge.internals_key in message  # mlx.core's, as this interpreter holds it
    assert bridge.internals_key.endswith("_mlx__")
    assert "rebuild mlxdist" in message

