"""Build the Cython kernels in ext/ twice: statescan._ext.<name> (portable: the architecture's
baseline ISA, runs on any CPU of it) and statescan._ext.native.<name> (-march=native, or
-mcpu=native on arm64: the installing machine's SIMD).  statescan._dispatch picks the native
set at import when the CPU has every ISA extension written to _ext/native/_features.py.

Environment switches:
  STATESCAN_PORTABLE=1   build the portable set only
  STATESCAN_NO_OPENMP=1  build without OpenMP even when the compiler has it
  STATESCAN_EXTENSIONS=rnn,scan   build only these ext/*.pyx (development: faster rebuilds;
                                  _cpu, which the dispatcher needs, is always built)
"""
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
PORTABLE, NATIVE = "statescan._ext", "statescan._ext.native"


def _compiler_accepts(compiler, flags):
    """True when `compiler` compiles and links a trivial program with `flags`.

    The probe links with the user's LDFLAGS as the extensions will (distutils adds them to the
    shared-library linker only): with CFLAGS=-fsanitize=... and no matching link flags every
    probe would fail and the build would silently drop OpenMP."""
    link_flags = flags + shlex.split(os.environ.get("LDFLAGS", ""))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "probe.c")
        src.write_text("#include <stdio.h>\nint main(void){return 0;}\n")
        try:
            objs = compiler.compile([str(src)], output_dir=tmp, extra_postargs=flags)
            compiler.link_executable(objs, str(Path(tmp, "probe")), extra_postargs=link_flags)
        except Exception:
            return False
    return True


def _isa_features(compiler, flags):
    """The ISA extensions ext/_cpu.h reports as compiled-for under `flags` (preprocessed only)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "cpu.i")
        compiler.preprocess(str(HERE / "ext" / "_cpu.h"), str(out), extra_postargs=flags)
        text = "\n".join(line for line in out.read_text().splitlines()
                         if not line.startswith("#"))   # line markers quote file names
    table = text.split("statescan_compiled_isa[] = {", 1)[1].split("}", 1)[0]
    return tuple(re.findall(r'"([^"]+)"', table))


def _write_if_changed(path, text):
    path = Path(path)
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)   # atomic: a concurrent import never reads half a file


class BuildExt(build_ext):
    """Adds optimisation, SIMD and OpenMP flags the compiler actually supports."""

    def build_extensions(self):
        cc = self.compiler
        native_flags = []
        if cc.compiler_type == "msvc":
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
                        native_flags = [flag]
                        break
            if not os.environ.get("STATESCAN_NO_OPENMP") and _compiler_accepts(cc, ["-fopenmp"]):
                compile_flags.append("-fopenmp")
                link_flags.append("-fopenmp")
            else:
                print("statescan: building without OpenMP (kernels run on one thread)", file=sys.stderr)
        if native_flags:
            self._write_native_features(native_flags, _isa_features(cc, native_flags))
        else:
            print("statescan: building the portable kernels only", file=sys.stderr)
            self.extensions = [e for e in self.extensions if not e.name.startswith(NATIVE + ".")]
        for ext in self.extensions:
            native = native_flags if ext.name.startswith(NATIVE + ".") else []
            ext.extra_compile_args = compile_flags + native + ext.extra_compile_args
            ext.extra_link_args = link_flags + ext.extra_link_args
        super().build_extensions()

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:   # two sets to compile: use the cores unless told otherwise
            self.parallel = os.cpu_count() or 1

    def _write_native_features(self, flags, features):
        """_features.py beside the native modules in the build tree, read by statescan._dispatch
        before it imports any of them (copy_extensions_to_source puts it in place too)."""
        self._features_text = (
            '"""Written by setup.py: the ISA extensions the native kernels were compiled for."""\n'
            f"FLAGS = {tuple(flags)!r}\n"
            f"FEATURES = {features!r}\n")
        where = Path(self.get_ext_fullpath(f"{NATIVE}._cpu")).parent
        where.mkdir(parents=True, exist_ok=True)
        _write_if_changed(where / "_features.py", self._features_text)

    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        if getattr(self, "_features_text", None):
            build_py = self.get_finalized_command("build_py")
            _write_if_changed(Path(build_py.get_package_dir(NATIVE), "_features.py"),
                              self._features_text)

    def copy_file(self, infile, outfile, *args, **kwargs):
        """Replace in-place modules atomically: a process that has the old module loaded keeps
        its (now unlinked) file instead of seeing it rewritten under it."""
        tmp = f"{outfile}.tmp{os.getpid()}"
        copied = super().copy_file(infile, tmp, *args, **kwargs)[1]
        os.replace(tmp, outfile)
        return outfile, copied


_only = {n for n in os.environ.get("STATESCAN_EXTENSIONS", "").split(",") if n}
_SOURCES = [pyx for pyx in sorted((HERE / "ext").glob("*.pyx"))
            if not _only or pyx.stem in _only | {"_cpu"}]
_CYTHON_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
    "nonecheck": False,
}


def _extensions(package, subdir):
    """Every selected ext/*.pyx as `package`.<stem>.  Each set is cythonized into its own
    directory: the generated C names its module, so the two sets cannot share one file."""
    exts = [
        Extension(
            f"{package}.{pyx.stem}",
            [str(pyx.relative_to(HERE))],
            include_dirs=[numpy.get_include(), "ext"],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            # the C headers the kernels include: an edited header rebuilds them (cythonize
            # follows .pxd files, setuptools only these)
            depends=[str(h.relative_to(HERE)) for h in sorted((HERE / "ext").glob("*.h"))],
        )
        for pyx in _SOURCES
    ]
    return cythonize(exts, include_path=["ext"], compiler_directives=_CYTHON_DIRECTIVES,
                     build_dir=str(Path("build", "cython", subdir)))


_native = [] if os.environ.get("STATESCAN_PORTABLE") else _extensions(NATIVE, "native")
setup(
    ext_modules=_extensions(PORTABLE, "portable") + _native,
    cmdclass={"build_ext": BuildExt},
)
