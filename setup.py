"""Declares the compiled kernels only; everything else is in pyproject.toml.

CANPIPE_CYTHON_DEBUG=1 builds with line tracing and no optimisation; CANPIPE_CYTHON_ANNOTATE=1 writes
the HTML annotation beside each .pyx. A failed compile is not fatal: the pure-Python twins serve.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("CANPIPE_CYTHON_DEBUG") == "1"
KERNELS = ["histogram", "groupby", "jsonl"]


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler: install without the compiled kernels
            print(f"WARNING: compiled kernels not built ({exc}); the pure-Python twins will be used")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"WARNING: {ext.name} not built ({exc}); its pure-Python twin will be used")


def extensions():
    import numpy
    from Cython.Build import cythonize

    macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
    if DEBUG:
        macros.append(("CYTHON_TRACE_NOGIL", "1"))
    modules = [
        Extension(
            f"engine.kernels._{name}_c",
            [f"ext/{name}.pyx"],
            include_dirs=[numpy.get_include()],
            define_macros=macros,
            extra_compile_args=["-O0", "-g"] if DEBUG else ["-O3"],
        )
        for name in KERNELS
    ]
    return cythonize(
        modules,
        language_level=3,
        annotate=os.environ.get("CANPIPE_CYTHON_ANNOTATE") == "1",
        compiler_directives={"boundscheck": DEBUG, "wraparound": False, "cdivision": True, "linetrace": DEBUG},
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
