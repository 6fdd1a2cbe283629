# Here because setuptools refuses cffi_modules in pyproject.toml; the nanobind
# bridge is built beside the cffi extension from the same builder module.
import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_ffi import bridge_extension  # noqa: E402

setup(cffi_modules=["build_ffi.py:ffibuilder"], ext_modules=[bridge_extension()])
