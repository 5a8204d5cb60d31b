"""Build of opsd-kernels.

The package is pure Python + Triton; the native extension (csrc/ + python/, built through
CMakeLists.txt) is optional and, when absent, the package still installs and imports.
"""

from setuptools import setup

setup()
