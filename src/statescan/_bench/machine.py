"""The machine a benchmark runs on: its name, thread control, and its measured GEMM peaks."""
import os
import platform
import time

import numpy as np

from .. import _blas


def describe():
    """CPU model, core counts and software versions, for the report."""
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_flags": _simd_flags(),
        "blas_kernels": _blas.kernel_names(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def _cpuinfo():
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def _cpu_model():
    for line in _cpuinfo().splitlines():
        if line.split(":")[0].strip() in ("model name", "Hardware", "Processor"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _physical_cores():
    pairs, phys = set(), None
    for line in _cpuinfo().splitlines():
        key = line.split(":")[0].strip()
        if key == "physical id":
            phys = line.split(":", 1)[1].strip()
        elif key == "core id":
            pairs.add((phys, line.split(":", 1)[1].strip()))
    return len(pairs) or None


def _simd_flags():
    for line in _cpuinfo().splitlines():
        if line.startswith(("flags", "Features")):
            have = set(line.split(":", 1)[1].split())
            return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "neon", "asimd", "sve")
                    if f in have]
    return []


def set_blas_threads(n):
    """Limit the BLAS numpy uses to `n` threads (the input projections and the sgemm peak run
    through it).  Returns False when no known BLAS library was found in the process."""
    return _blas.set_threads(n)


def gemm_peak(dtype="float32", n=512, seconds=0.6):
    """Measured GFLOP/s of a square GEMM through numpy (best of repeated calls) for the run's
    thread count: the yardstick of the regression guard's peak fractions.  n=512 already
    reaches OpenBLAS's peak, and its few-millisecond calls fit between other processes' time
    slices on a busy machine (larger ones measured 30% low there)."""
    a, b, out = _square_operands(dtype, n)
    return _best_gflops(lambda: np.matmul(a, b, out=out), 2.0 * n ** 3, seconds)


def compiled_gemm_peak(dtype="float32", n=512, seconds=0.6, threads=1):
    """Measured GFLOP/s of the same GEMM through statescan's compiled micro-kernel (the cells'
    input projection, on `threads` threads), None without the compiled kernels.

    Where numpy's BLAS does not use the machine's widest vectors (OpenBLAS runs its AVX2
    kernels on an AVX-512 AMD EPYC: half the FMA throughput), this is the machine's peak, and
    a percentage of numpy's would read above 100%."""
    from .. import _dispatch
    if not _dispatch.use_compiled():
        return None
    project = _dispatch.ext_module("rnn").project
    a, b, out = _square_operands(dtype, n)
    x, w, y = a[None], np.ascontiguousarray(b.T), out[None]      # y = x @ w.T = a @ b
    return _best_gflops(lambda: project(x, w, None, y, threads), 2.0 * n ** 3, seconds)


def _square_operands(dtype, n):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype),
            np.empty((n, n), dtype))


def _best_gflops(call, flops, seconds):
    call()
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        t0 = time.perf_counter()
        call()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return flops / best / 1e9
