"""Declares the optional C speedup of the SPOP codec; everything else is in pyproject.toml.

``optional=True``: without a C compiler or Python headers the build skips the
extension and the package falls back to its pure-Python decoder.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("spoa.spop._speedups", ["spoa/spop/_speedups.c"], optional=True),
    ],
)
