"""Build the Cython extensions.

The Cython sources live in cython_ext/, outside the package, so every
extension is named explicitly and the include path is given.
"""
import os
import subprocess

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
EXT = os.path.join(HERE, "cython_ext")

DEBUG = os.environ.get("DRB_DEBUG") == "1"
macros = [("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []
cflags = ["-O2", "-g", "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]

# Each extension is named after the Python part it serves; its source sits
# at the same path under cython_ext/ (cimports resolve by that path).
MODULES = [
    "drb_uring.ring._spsc",       # the two ends of a double ring
    "drb_uring.ring._bench",      # ring soak and benchmark loops
    "drb_uring.channel._worker",  # the worker's loop on its grant ring
    "drb_uring.channel._grant",   # building a grant ring
    "drb_uring.enforce._task",    # the task table contract as Python values
    "drb_uring.tools._load",      # the load generator, one loop for every transport
    "drb_uring.tools._baselines", # the mechanisms drb is measured against
    "drb_uring.disk._backend",    # the disk's backend contract and its local-file backend
    "drb_uring.disk._fuseloop",   # the disk's FUSE server loop
    "drb_uring.disk._ringbackend",  # the disk's backend over a channel
]

# The worker's hot loop drives its grant ring with liburing.
LIBRARIES = {"drb_uring.channel._worker": ["uring"], "drb_uring.tools._baselines": ["uring"],
             "drb_uring.disk._backend": ["uring"], "drb_uring.disk._fuseloop": ["uring"]}

# drb_atomic.h, and the contract headers shared with the eBPF programs.
INCLUDE_DIRS = [os.path.join(EXT, "drb_uring", "includes"), os.path.join(HERE, "bpf")]

extensions = [
    Extension(name, [os.path.join("cython_ext", *name.split(".")) + ".pyx"],
              include_dirs=INCLUDE_DIRS, define_macros=macros, extra_compile_args=cflags,
              libraries=LIBRARIES.get(name, []))
    for name in MODULES
]

# drb-fusermount, the program a domain runs in place of fusermount: plain C,
# built beside the extensions and installed with the package.
HELPERS = {os.path.join("drb_uring", "disk", "fusermount.c"): "drb-fusermount"}


class BuildExtAndHelpers(build_ext):
    def run(self):
        super().run()
        cc = os.environ.get("CC", "cc")
        for src, name in HELPERS.items():
            out_dir = os.path.dirname(src) if self.inplace else \
                os.path.join(self.build_lib, os.path.dirname(src))
            os.makedirs(out_dir, exist_ok=True)
            out = os.path.join(out_dir, name)
            subprocess.check_call([cc, "-O2", "-Wall", "-Werror", "-o", out,
                                   os.path.join(HERE, src)])


setup(
    cmdclass={"build_ext": BuildExtAndHelpers},
    ext_modules=cythonize(
        extensions,
        include_path=[EXT],
        language_level=3,
        annotate=os.environ.get("DRB_ANNOTATE") == "1",
        force=os.environ.get("DRB_ANNOTATE") == "1" or DEBUG,
        compiler_directives={"linetrace": DEBUG, "embedsignature": True},
    ),
)
