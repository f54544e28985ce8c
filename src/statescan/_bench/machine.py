"""The machine a benchmark runs on: its name, thread control, and its measured GEMM peak."""
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
    """Measured GFLOP/s of a square GEMM through numpy (best of repeated calls): the practical
    peak of this machine for the run's thread count.  n=512 already reaches OpenBLAS's peak,
    and its few-millisecond calls fit between other processes' time slices on a busy machine
    (larger ones measured 30% low there)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    out = np.empty((n, n), dtype)
    np.matmul(a, b, out=out)
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return 2.0 * n ** 3 / best / 1e9
