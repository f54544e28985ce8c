"""The BLAS libraries in the process (numpy's, and scipy's, which the compiled attention, linear
attention and ssd kernels call): their thread count, and a first product that keeps OpenBLAS
out of a slow state.

OpenBLAS (0.3.30 and 0.3.31, the libraries of numpy 2.4's and scipy's wheels) on an AMD EPYC
of the first Zen generation ran float32 products of 256 output columns and a long inner
dimension -- the parameter gradients' dx = dgx W at H = 256, the attention kernel's blocks --
at a third of its speed (12 against 35 GFLOP/s on one thread), in every thread of the process,
until one BLAS thread had run a product of 512 output columns or more; from then on at full
speed, with the same bits.  Split over OpenBLAS's threads that product does not help, so
:func:`prepare` runs it (0.3 ms per library) with each library on one thread, once per process.
"""
import ctypes
import contextlib
import os

import numpy as np

_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_", "openblas_set_num_threads",
            "MKL_Set_Num_Threads", "bli_thread_set_num_threads")
_GETTERS = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
            "openblas_get_num_threads64_", "openblas_get_num_threads")

_CORENAMES = ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
              "openblas_get_corename64_", "openblas_get_corename")
# OpenBLAS's names of the cores it has AVX-512 kernels for
_AVX512_CORES = {"skylakex", "cooperlake", "sapphirerapids"}

_prepared = False


def _loaded_libraries():
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if ".so" in line})
    except OSError:
        return []


def _libraries():
    """ctypes handles of the BLAS libraries loaded in the process."""
    out = []
    for path in _loaded_libraries():
        if any(k in os.path.basename(path).lower() for k in ("blas", "mkl", "blis")):
            try:
                out.append(ctypes.CDLL(path))
            except OSError:
                pass
    return out


def _call_first(lib, symbols, *args):
    """The result of the first of `symbols` that `lib` has, or None when it has none."""
    for symbol in symbols:
        fn = getattr(lib, symbol, None)
        if fn is not None:
            return fn(*args)
    return None


def kernel_names():
    """OpenBLAS's names of the kernels each OpenBLAS library in the process runs (its
    ``get_corename``, e.g. ``"Haswell"``, ``"SkylakeX"``), sorted, without repeats; other BLAS
    libraries name none.  OpenBLAS picks its kernels by CPU model, not by ISA features: an AMD
    EPYC Zen 4 runs its SkylakeX (AVX-512) kernels, a Zen 5 its Haswell (AVX2) ones."""
    names = set()
    for lib in _libraries():
        for symbol in _CORENAMES:
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                names.add((fn() or b"").decode(errors="replace"))
                break
    return sorted(names)


def avx512_kernels():
    """True when every OpenBLAS library in the process that names its kernels runs AVX-512
    ones (SkylakeX, Cooperlake, SapphireRapids), and at least one does."""
    names = kernel_names()
    return bool(names) and all(name.lower() in _AVX512_CORES for name in names)


def set_threads(n):
    """Limit every BLAS library in the process to `n` threads.  Returns False when no known
    library was found."""
    results = [_call_first(lib, _SETTERS, ctypes.c_int(n)) for lib in _libraries()]
    return any(r is not None for r in results)


@contextlib.contextmanager
def _one_thread():
    """Each OpenBLAS library on one thread in the block, its count restored after."""
    counts = []
    for lib in _libraries():
        n = _call_first(lib, _GETTERS)
        if n is not None:
            counts.append((lib, n))
            _call_first(lib, _SETTERS, ctypes.c_int(1))
    try:
        yield
    finally:
        # in reverse: a library reached through several handles (scipy's extension modules
        # resolve to scipy's OpenBLAS) read 1 after the first handle set it
        for lib, n in reversed(counts):
            _call_first(lib, _SETTERS, ctypes.c_int(n))


def prepare():
    """Run one product of 512 output columns on one thread of numpy's and of scipy's BLAS,
    once per process (see the module's docstring); later calls return at once."""
    global _prepared
    if _prepared:
        return
    _prepared = True
    from scipy.linalg import blas
    a, b = np.ones((128, 128), np.float32), np.ones((128, 512), np.float32)
    with _one_thread():
        a @ b
        blas.sgemm(1.0, a, b)
