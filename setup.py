"""Build the Cython kernels in ext/ into statescan._ext.<name>.

Environment switches:
  STATESCAN_PORTABLE=1   do not add -march=native (a build that runs on any CPU of the arch)
  STATESCAN_NO_OPENMP=1  build without OpenMP even when the compiler has it
  STATESCAN_EXTENSIONS=rnn,scan   build only these ext/*.pyx (development: faster rebuilds)
"""
import os
import sys
import tempfile
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent


def _compiler_accepts(compiler, flags):
    """True when `compiler` compiles and links a trivial OpenMP-free program with `flags`."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "probe.c")
        src.write_text("#include <stdio.h>\nint main(void){return 0;}\n")
        try:
            objs = compiler.compile([str(src)], output_dir=tmp, extra_postargs=flags)
            compiler.link_executable(objs, str(Path(tmp, "probe")), extra_postargs=flags)
        except Exception:
            return False
    return True


class BuildExt(build_ext):
    """Adds optimisation, SIMD and OpenMP flags the compiler actually supports."""

    def build_extensions(self):
        cc = self.compiler
        is_msvc = cc.compiler_type == "msvc"
        if is_msvc:
            compile_flags, link_flags = ["/O2"], []
            if not os.environ.get("STATESCAN_NO_OPENMP"):
                compile_flags.append("/openmp")
        else:
            # -fno-wrapv: Python's CFLAGS carry -fwrapv, which blocks vectorising index arithmetic.
            compile_flags = ["-O3", "-fno-wrapv", "-fno-math-errno", "-fno-trapping-math"]
            link_flags = []
            # The cell loops touch many arrays; let GCC version them for aliasing instead of
            # giving up on vectorising (its default allows 10 run-time alias checks).
            if _compiler_accepts(cc, ["--param=vect-max-version-for-alias-checks=64"]):
                compile_flags.append("--param=vect-max-version-for-alias-checks=64")
            if not os.environ.get("STATESCAN_PORTABLE"):
                for flag in ("-march=native", "-mcpu=native"):
                    if _compiler_accepts(cc, [flag]):
                        compile_flags.append(flag)
                        break
            if not os.environ.get("STATESCAN_NO_OPENMP") and _compiler_accepts(cc, ["-fopenmp"]):
                compile_flags.append("-fopenmp")
                link_flags.append("-fopenmp")
            else:
                print("statescan: building without OpenMP (kernels run on one thread)", file=sys.stderr)
        for ext in self.extensions:
            ext.extra_compile_args = compile_flags + ext.extra_compile_args
            ext.extra_link_args = link_flags + ext.extra_link_args
        super().build_extensions()


_only = {n for n in os.environ.get("STATESCAN_EXTENSIONS", "").split(",") if n}
extensions = [
    Extension(
        f"statescan._ext.{pyx.stem}",
        [str(pyx.relative_to(HERE))],
        include_dirs=[numpy.get_include(), "ext"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for pyx in sorted((HERE / "ext").glob("*.pyx"))
    if not _only or pyx.stem in _only
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["ext"],
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "nonecheck": False,
        },
    ),
    cmdclass={"build_ext": BuildExt},
)
