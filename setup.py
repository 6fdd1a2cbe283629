# Only here to carry cffi_modules: setuptools refuses that key in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["build_ffi.py:ffibuilder"])
