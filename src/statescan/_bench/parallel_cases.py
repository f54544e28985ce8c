"""Benchmark grid of the parallel-in-time family: the compiled matrix scan (diagonal, dense
blocks) and the RNN cells solved with newton / quasi-newton / jacobi.

Each solver case (B=1, PyTorch's default initialisation, max_iter=200) also runs the
sequential compiled kernel on the same input ("sequential"): on a few cores it is much
faster, and the table should say so (benchmarks/PARALLEL.md: cost model and measurements;
compare ``--threads 1`` with ``--threads 2``).  The numpy reference, an interpreted step loop
as DEER and ParaRNN compare against, runs on a shorter sequence.
"""
import numpy as np

import statescan as ss

from .._cells import CELLS
from .core import NUMPY_REF, STATESCAN, Case, Runner, numpy_reference

SEQUENTIAL = "sequential"
SOLVERS = ("newton", "quasi-newton", "jacobi")
NEWTON_MAX_BYTES = 0.8e9        # newton stores T per-step Jacobians of (S*H)^2 floats


def cases(quick):
    grid = _QUICK if quick else _FULL
    return [_case(*point, dtype, guard=quick and point in _GUARD)
            for point in grid for dtype in ("float32", "float64") if _fits(point, dtype)]


def _fits(point, dtype):
    """False for a newton solve whose T Jacobians of (S*H)^2 floats exceed NEWTON_MAX_BYTES."""
    if point[0] != "solve" or point[2] != "newton":
        return True
    _, cell, _, H, T = point
    return T * (CELLS[cell].states * H) ** 2 * np.dtype(dtype).itemsize <= NEWTON_MAX_BYTES


# ("scan", kind, B, T, K, m) | ("solve", cell, solver, H, T)
_QUICK = [("scan", "diagonal", 1, 16384, 1, 16), ("scan", "dense", 4, 2048, 4, 8),
          ("solve", "lstm", "quasi-newton", 64, 256)]
_GUARD = {("scan", "diagonal", 1, 16384, 1, 16)}
_FULL = ([("scan", "diagonal", B, 65536, 1, n) for B, n in ((1, 16), (1, 256), (16, 256))]
         + [("scan", "dense", B, 4096, K, m) for B, K, m in ((1, 1, 64), (1, 8, 16), (16, 4, 8))]
         + [("solve", cell, solver, H, T) for cell in ("lstm", "gru") for solver in SOLVERS
            for H in (8, 64, 256) for T in (1000, 10000, 100000) if T < 100000 or H == 8])


def _case(kind, *rest, guard=False):
    if kind == "scan":
        return _scan_case(*rest, guard=guard)
    return _solve_case(*rest, guard=guard)


def _scan_case(form, B, T, K, m, dtype, guard):
    flops = 2.0 * B * T * K * m * (m if form == "dense" else 1)
    params = {"B": B, "T": T, "K": K, "m": m}
    return Case("parallel", f"matrix_scan-{form}", params, dtype, T, flops,
                lambda: _scan_runners(form, B, T, K, m, dtype), guard=guard)


def _scan_runners(form, B, T, K, m, dtype):
    rng = np.random.default_rng(B * 131 + T + K * 7 + m)
    shape = (B, T, K, m) if K > 1 else (B, T, m)
    b = rng.standard_normal(shape).astype(dtype)
    if form == "dense":       # entries of size 1/m keep the products bounded
        A = (rng.uniform(-1, 1, shape + (m,)) / m).astype(dtype)
    else:
        A = rng.uniform(-1, 1, shape).astype(dtype)
    Tr = min(T, 512)
    short = lambda: ss.matrix_scan(A[:, :Tr], b[:, :Tr])
    return {STATESCAN: lambda: ss.matrix_scan(A, b),
            NUMPY_REF: Runner(numpy_reference(short), steps=Tr, expected=short)}


def _solve_case(cell, solver, H, T, dtype, guard):
    params = {"B": 1, "H": H, "T": T}
    return Case("parallel", f"{cell}-{solver}", params, dtype, T, 0.0,
                lambda: _solve_runners(cell, solver, H, T, dtype), guard=guard,
                atol=1e-3 if dtype == "float32" else 1e-7)


def _solve_runners(cell, solver, H, T, dtype):
    G = CELLS[cell].gates
    rng = np.random.default_rng(H * 17 + T)
    k = 1 / np.sqrt(H)                   # PyTorch's default initialisation: a contraction
    x = rng.standard_normal((1, T, H)).astype(dtype)
    W, R = (rng.uniform(-k, k, (G * H, H)).astype(dtype) for _ in range(2))
    b = rng.uniform(-k, k, G * H).astype(dtype)
    fn = getattr(ss, cell)
    Tr = min(T, 256)

    def run(n):
        return lambda: fn(x[:, :n], W, R, b, b, solver=solver, max_iter=200)[0]

    return {STATESCAN: run(T),
            SEQUENTIAL: lambda: fn(x, W, R, b, b)[0],
            NUMPY_REF: Runner(numpy_reference(run(Tr)), steps=Tr, expected=run(Tr))}
