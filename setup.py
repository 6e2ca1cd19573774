"""Build the Cython extensions.

The Cython sources live in cython_ext/, outside the package, so every
extension is named explicitly and the include path is given.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
EXT = os.path.join(HERE, "cython_ext")

DEBUG = os.environ.get("DRB_DEBUG") == "1"
macros = [("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []
cflags = ["-O2", "-g", "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]

MODULES = {
    "drb_uring._ring": "drb_uring/_ring.pyx",
    "drb_uring._ringbench": "drb_uring/_ringbench.pyx",
    "drb_uring._grant": "drb_uring/_grant.pyx",
    "drb_uring._backend": "drb_uring/_backend.pyx",
}

# The backend worker's hot loop drives its grant ring with liburing.
LIBRARIES = {"drb_uring._backend": ["uring"]}

extensions = [
    Extension(name, [os.path.join("cython_ext", src)], include_dirs=[EXT],
              define_macros=macros, extra_compile_args=cflags,
              libraries=LIBRARIES.get(name, []))
    for name, src in MODULES.items()
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=[EXT],
        language_level=3,
        annotate=os.environ.get("DRB_ANNOTATE") == "1",
        force=os.environ.get("DRB_ANNOTATE") == "1" or DEBUG,
        compiler_directives={"linetrace": DEBUG, "embedsignature": True},
    ),
)
