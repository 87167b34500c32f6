"""Build configuration for codec's Cython extensions only; everything else lives in pyproject.toml."""

import platform
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup


def _compile_args():
    if sys.platform == "win32":
        return ["/O2", "/openmp"], []
    args = ["-O3", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        # Without -mpopcnt the bit-counting kernels fall back to a software popcount (~10x slower).
        args.append("-mpopcnt")
    return args, ["-fopenmp"]


_CARGS, _LARGS = _compile_args()
_KERNELS = ["_kernels"]  # module names under codec/kernels/, e.g. "_cofire" -> codec/kernels/_cofire.pyx

extensions = [
    Extension(
        f"codec.kernels.{name}",
        [f"codec/kernels/{name}.pyx"],
        include_dirs=[numpy.get_include()],
        extra_compile_args=_CARGS,
        extra_link_args=_LARGS,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for name in _KERNELS
]

setup(ext_modules=cythonize(extensions, language_level=3) if extensions else [])
