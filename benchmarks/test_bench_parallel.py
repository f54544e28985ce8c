"""Parallel-in-time evaluation: the matrix scan and the Newton / quasi-Newton / Jacobi solvers
of the RNN cells (same result as the sequential loop, to tolerance)."""
import numpy as np
import pytest

import statescan

DTYPES = ["float32", "float64"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,shape", [("dense", (4, 1024, 16, 16)), ("diagonal", (4, 1024, 256)),
                                        ("blocks", (4, 1024, 8, 4, 4))], ids=lambda v: str(v))
def test_matrix_scan(benchmark, kernel, rand, kind, shape, dtype):
    fn = kernel("matrix_scan")
    A = rand(*shape, dtype=dtype, scale=0.2)
    b = rand(*(shape[:-1] if kind != "diagonal" else shape), dtype=dtype)
    benchmark.group = "matrix_scan"
    h = benchmark(fn, A, b)
    assert h.shape == b.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solver", ["newton", "quasi-newton", "jacobi"])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_cell_solver(benchmark, kernel, rand, cell, solver, dtype):
    fn = kernel(cell)
    if not hasattr(statescan, "solve_recurrence"):
        pytest.skip("parallel solvers are not available")
    G = {"gru": 3, "lstm": 4}[cell]
    B, T, H = 4, 256, 32
    x = rand(B, T, H, dtype=dtype)
    W = rand(G * H, H, dtype=dtype, scale=H ** -0.5)
    R = rand(G * H, H, dtype=dtype, scale=0.5 * H ** -0.5)
    benchmark.group = f"{cell} parallel solvers"
    y, _, info = benchmark(fn, x, W, R, solver=solver, max_iter=T)
    assert y.shape == (B, T, H)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["newton", "quasi-newton", "jacobi"])
def test_solve_recurrence(benchmark, kernel, rand, method, dtype):
    fn = kernel("solve_recurrence")
    B, T, n = 4, 512, 16
    w = rand(n, n, dtype=dtype, scale=0.5 * n ** -0.5)

    def f(s, x):
        return np.tanh(s @ w + x)

    def jac(s, x):
        d = 1 - np.tanh(s @ w + x) ** 2
        return d[:, :, None] * w.T[None]

    xs = rand(B, T, n, dtype=dtype)
    s0 = np.zeros((B, n), dtype)
    benchmark.group = "solve_recurrence"
    out = benchmark(fn, f, s0, xs, jac=jac, method=method, max_iter=T)
    assert out[0].shape == (B, T, n)
