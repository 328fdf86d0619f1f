"""Build the Cython kernels of moe.bindings; all metadata lives in pyproject.toml."""

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

# -ffp-contract=off: no silent FMA contraction, so results do not depend on the compiler's choice.
# -fno-math-errno: sqrt may become one SIMD instruction (nothing here reads errno); the values
# are the same IEEE-rounded ones.
COMPILE_ARGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
LINK_ARGS = ["-fopenmp"]
MACROS = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]


def kernel(name: str) -> Extension:
    return Extension(
        f"moe.bindings.{name}",
        [f"moe/bindings/{name}.pyx"],
        include_dirs=[np.get_include()],
        extra_compile_args=COMPILE_ARGS,
        extra_link_args=LINK_ARGS,
        define_macros=MACROS,
    )


setup(
    ext_modules=cythonize(
        [kernel(m) for m in ("_blas", "_dispatch", "_grouped", "_optim", "_gates")],
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )
)
