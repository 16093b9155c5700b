"""Declares the compiled kernels only; everything else is in pyproject.toml.

CANPIPE_CYTHON_DEBUG=1 builds with line tracing and no optimisation; CANPIPE_CYTHON_ANNOTATE=1 writes
the HTML annotation beside each .pyx. A failed compile is not fatal: the pure-Python twins serve, a WARNING
block names each kernel not built (pip shows it with -v; `canpipe check` reports the kernels in use), and
CANPIPE_REQUIRE_COMPILED=1 makes it fail the build instead (images and wheels that must be fast).
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("CANPIPE_CYTHON_DEBUG") == "1"
REQUIRE_COMPILED = os.environ.get("CANPIPE_REQUIRE_COMPILED") == "1"
NOT_BUILT = """
{rule}
WARNING: these compiled kernels were NOT built; their pure-Python twins will serve, several times slower:
{names}
`canpipe check` names the kernel implementation an installation uses; CANPIPE_REQUIRE_COMPILED=1 at build
time makes a failed compile fail the build.
{rule}"""
KERNELS = ["histogram", "groupby", "jsonl", "candecode"]


class OptionalBuildExt(build_ext):
    """Builds every kernel it can; the ones it cannot are named at the end, or fail the build when required."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:  # the kernels compile one per core (-O3 takes ~15 s a kernel here)
            self.parallel = os.cpu_count() or 1

    def run(self):
        self.not_built = {}  # extension name -> why
        try:
            super().run()
        except Exception as exc:  # no compiler at all
            if REQUIRE_COMPILED:
                raise
            self.not_built.update({ext.name: str(exc) for ext in self.extensions if ext.name not in self.not_built})
        if self.not_built:
            names = "\n".join(f"  {name}: {why}" for name, why in sorted(self.not_built.items()))
            print(NOT_BUILT.format(rule="=" * 78, names=names), file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            if REQUIRE_COMPILED:
                raise RuntimeError(f"CANPIPE_REQUIRE_COMPILED=1: kernel {ext.name} did not compile: {exc}") from exc
            self.not_built[ext.name] = str(exc)


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
        nthreads=os.cpu_count() or 1,
        language_level=3,
        annotate=os.environ.get("CANPIPE_CYTHON_ANNOTATE") == "1",
        compiler_directives={"boundscheck": DEBUG, "wraparound": False, "cdivision": True, "linetrace": DEBUG},
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
