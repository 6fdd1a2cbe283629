"""build_ffi.py's MLXDIST_MLXC_PREFIX path, against a stand-in mlx-c install.

No mlx-c release matches MLX 0.32, so the stand-in is cmlx itself compiled as
``libmlxc`` with its headers under ``include/mlx/c``: the layout of an mlx-c
install. The extension built against it must call mlx-c's functions from that
library (not its own copy) and report errors through mlx-c's handler.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx

ROOT = Path(__file__).resolve().parent.parent
CMLX = ROOT / "cmlx"
MLX_DIR = Path(next(iter(mlx.__path__)))

CHECK = r"""
import importlib.util, sys
import mlx.core
spec = importlib.util.spec_from_file_location("mlxdist._cmlx", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
ffi, lib = module.ffi, module.lib
lib.mlx_set_error_handler(lib.mlxdist_error_handler, ffi.NULL, ffi.NULL)
group = ffi.new("mlx_distributed_group*")
assert lib.mlx_distributed_init(group, False, b"ring") == 0
assert lib.mlx_distributed_group_size(group[0]) == 1
# An extension call that fails reports through mlx-c's handler.
empty = ffi.new("mlx_array*")[0]
assert lib.mlxdist_collective(empty, empty, lib.MLXDIST_ALL_SUM, group[0], ffi.new("mlx_stream*")[0]) == 1
print(ffi.string(lib.mlxdist_last_error()).decode())
"""


def test_extension_builds_against_an_mlxc_install(tmp_path):
    prefix = tmp_path / "mlxc"
    (prefix / "lib").mkdir(parents=True)
    shutil.copytree(CMLX / "include" / "mlx", prefix / "include" / "mlx")
    sources = sorted(str(p) for p in (CMLX / "src").glob("*.cpp"))
    subprocess.run(
        ["g++", "-std=c++20", "-O0", "-fPIC", "-shared", "-o", str(prefix / "lib" / "libmlxc.so"),
         f"-I{CMLX / 'include'}", f"-I{MLX_DIR / 'include'}", *sources,
         f"-L{MLX_DIR / 'lib'}", "-lmlx", f"-Wl,-rpath,{MLX_DIR / 'lib'}"],
        check=True, timeout=600,
    )
    out = tmp_path / "build"
    env = {**os.environ, "MLXDIST_MLXC_PREFIX": str(prefix)}
    build = subprocess.run(
        [sys.executable, str(ROOT / "build_ffi.py"), str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (extension,) = (out / "mlxdist").glob("_cmlx*.so")
    needed = subprocess.run(["readelf", "-d", str(extension)], capture_output=True, text=True).stdout
    assert "libmlxc.so" in needed and "libmlx.so" in needed
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(extension)], capture_output=True, text=True).stdout
    assert "mlx_distributed_all_sum" not in symbols  # mlx-c's functions come from libmlxc
    check = subprocess.run(
        [sys.executable, "-c", CHECK, str(extension)], capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, check.stderr
    assert "null array" in check.stdout
