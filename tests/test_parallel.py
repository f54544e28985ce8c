"""Parallel-in-time solvers: equal to the sequential definitions (matrix_scan: test_matrix_scan.py)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import statescan as ss
from statescan import parallel

CELLS = {"elman": (1, 1), "lstm": (4, 2), "gru": (3, 1), "slstm": (4, 4)}
SOLVERS = ("newton", "quasi-newton", "jacobi")
compiled = pytest.mark.skipif(ss.backend() != "compiled", reason="compiled kernels not built")


def make_cell(cell, B=2, T=24, H=8, heads=1, dtype=np.float64, seed=0, scale=0.4, state=False):
    G, S = CELLS[cell]
    D = H // heads
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, 5)).astype(dtype)
    W = (rng.standard_normal((G * H, 5)) * 0.5).astype(dtype)
    shape = (G * H, H) if heads == 1 else (heads, G * D, D)
    R = (rng.standard_normal(shape) * scale).astype(dtype)
    b = (rng.standard_normal(G * H) * 0.1).astype(dtype)
    b_r = (rng.standard_normal(G * H) * 0.1).astype(dtype)
    kw = {"heads": heads}
    if state:
        s = (rng.standard_normal((S, B, H)) * 0.3).astype(dtype)
        if cell == "slstm":
            s[2] = np.abs(s[2]) + 1     # normaliser n >= 1 as the cell produces it
        kw["state"] = s[0] if S == 1 else tuple(s)
    return (x, W, R, b, b_r), kw


def assert_outputs_close(out, ref_out, atol):
    np.testing.assert_allclose(out[0], ref_out[0], rtol=0, atol=atol)
    for a, r in zip(_flat(out[1]), _flat(ref_out[1])):
        np.testing.assert_allclose(a, r, rtol=0, atol=atol)


def _flat(state):
    return state if isinstance(state, tuple) else (state,)


# ---- cells x solvers equal the sequential kernel -------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("heads,state", [(1, False), (2, True)])
@pytest.mark.parametrize("dtype,atol", [(np.float64, 1e-7), (np.float32, 1e-4)])
def test_cell_solvers_match_sequential(cell, solver, heads, state, dtype, atol):
    args, kw = make_cell(cell, heads=heads, dtype=dtype, state=state)
    fn = getattr(ss, cell)
    expected = fn(*args, **kw)
    tol = 1e-10 if dtype == np.float64 else None
    y, final, info = fn(*args, **kw, solver=solver, tol=tol)
    assert info.converged and 1 <= info.iterations <= args[0].shape[1]
    assert y.dtype == dtype and y.shape == expected[0].shape
    assert_outputs_close((y, final), expected, atol)


def test_newton_needs_few_iterations():
    args, kw = make_cell("lstm", T=64)
    _, _, info = ss.lstm(*args, **kw, solver="newton")
    assert info.converged and info.iterations < 16 and info.residual <= 1e-10
    assert info.sequential is None


@settings(max_examples=30, deadline=None)
@given(cell=st.sampled_from(sorted(CELLS)), solver=st.sampled_from(SOLVERS),
       T=st.integers(1, 6), heads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_exact_after_T_iterations(cell, solver, T, heads, seed):
    # Strong recurrent weights (no contraction): exactness comes from the T-step argument.
    args, kw = make_cell(cell, B=2, T=T, H=4, heads=heads, seed=seed, scale=1.5, state=True)
    fn = getattr(ss, cell)
    expected = fn(*args, **kw)
    y, final, info = fn(*args, **kw, solver=solver, tol=0.0, max_iter=T)
    assert info.iterations <= T and info.converged
    assert_outputs_close((y, final), expected, 1e-12)


def test_guess():
    # The solution as the guess: one iteration, residual 0.
    args, kw = make_cell("gru", T=20)
    y0, _ = ss.gru(*args, **kw)
    y, _, info = ss.gru(*args, **kw, solver="quasi-newton", guess=y0)
    assert info.iterations == 1 and info.residual < 1e-14
    np.testing.assert_allclose(y, y0, atol=1e-12)
    # h only ([B,T,H], c starts at zero) or all components ([B,T,S*H])
    args, kw = make_cell("lstm", T=20, state=True)
    y0, _ = ss.lstm(*args, **kw)
    for guess in (y0, np.concatenate([y0, np.zeros_like(y0)], axis=-1)):
        y, _, info = ss.lstm(*args, **kw, solver="newton", guess=guess)
        assert info.converged
        np.testing.assert_allclose(y, y0, atol=1e-7)


@pytest.mark.parametrize("B,T", [(0, 5), (2, 0)])
def test_empty(B, T):
    args, kw = make_cell("lstm", B=B, T=T)
    y, (h, c), info = ss.lstm(*args, **kw, solver="newton")
    assert y.shape == (B, T, 8) and h.shape == (B, 8) and info.converged
    out, pullback = ss.vjp(ss.lstm, *args, **kw, solver="newton")
    grads = pullback((np.zeros((B, T, 8)), None))
    assert grads[0].shape == args[0].shape and not np.any(grads[2])


# ---- gradients -----------------------------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("solver", SOLVERS)
def test_gradients_match_sequential_vjp(cell, heads, solver):
    args, kw = make_cell(cell, T=16, heads=heads, state=True, seed=3)
    fn = getattr(ss, cell)
    (y0, s0), pullback0 = ss.vjp(fn, *args, **kw)
    out, pullback = ss.vjp(fn, *args, **kw, solver=solver, tol=1e-12)
    assert len(out) == 3 and out[2].converged
    rng = np.random.default_rng(1)
    dy = rng.standard_normal(y0.shape)
    ds = tuple(rng.standard_normal(s.shape) for s in _flat(s0))
    ds = ds[0] if len(ds) == 1 else ds
    expected = pullback0((dy, ds))
    got = pullback((dy, ds, None))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        for gi, ei in zip(_flat(g), _flat(e)):
            np.testing.assert_allclose(gi, ei, rtol=0, atol=1e-7)


def test_gradients_without_W():
    G, _ = CELLS["gru"]
    rng = np.random.default_rng(2)
    ax = rng.standard_normal((2, 12, G * 8))
    R = rng.standard_normal((G * 8, 8)) * 0.4
    (y, _), pb0 = ss.vjp(ss.gru, ax, None, R)
    _, pb = ss.vjp(ss.gru, ax, None, R, solver="newton")
    dy = rng.standard_normal(y.shape)
    for g, e in zip(pb((dy, None)), pb0((dy, None))):
        if e is None:
            assert g is None
        else:
            np.testing.assert_allclose(g, e, atol=1e-7)


# ---- non-convergence and bad input ----------------------------------------------------------

def test_non_convergence_returns_sequential_result():
    args, kw = make_cell("lstm", T=40, scale=1.5, state=True)
    expected = ss.lstm(*args, **kw)
    with pytest.warns(RuntimeWarning, match="info.sequential"):
        y, state, info = ss.lstm(*args, **kw, solver="jacobi", max_iter=3)
    assert not info.converged and info.iterations == 3 and info.residual > info.tol
    assert_outputs_close(info.sequential, expected, 1e-12)
    assert np.max(np.abs(y - expected[0])) > 1e-7    # the stalled iterate is really off


def test_non_convergence_gradients_use_the_exact_trajectory():
    args, kw = make_cell("elman", T=30, scale=1.5)
    (y0, _), pb0 = ss.vjp(ss.elman, *args, **kw)
    with pytest.warns(RuntimeWarning):
        out, pb = ss.vjp(ss.elman, *args, **kw, solver="jacobi", max_iter=2)
    assert not out[2].converged
    dy = np.ones_like(y0)
    for g, e in zip(pb((dy, None)), pb0((dy, None))):
        np.testing.assert_allclose(g, e, atol=1e-7)


def test_nan_in_nan_out_without_iterating_T_times():
    args, kw = make_cell("gru", T=50)
    args[0][0, 3, 0] = np.nan
    with pytest.warns(RuntimeWarning):
        y, h, info = ss.gru(*args, **kw, solver="newton")
    assert not info.converged and info.iterations == 1
    assert np.isnan(info.sequential[0][0, 3:]).all() and np.isfinite(info.sequential[0][1]).all()


def test_bad_solver_arguments():
    args, kw = make_cell("lstm", T=5)
    with pytest.raises(ValueError, match="solver must be one of 'sequential', 'newton', "
                                         "'quasi-newton', 'jacobi'"):
        ss.lstm(*args, solver="gauss")
    with pytest.raises(ValueError, match="tol"):
        ss.lstm(*args, solver="newton", tol=-1.0)
    with pytest.raises(TypeError, match="tol"):
        ss.lstm(*args, solver="newton", tol="small")
    with pytest.raises(ValueError, match="max_iter"):
        ss.lstm(*args, solver="newton", max_iter=0)
    with pytest.raises(TypeError, match="max_iter"):
        ss.lstm(*args, solver="newton", max_iter=2.5)
    with pytest.raises(ValueError, match=r"guess.*\[B, T, H\]"):
        ss.lstm(*args, solver="newton", guess=np.zeros((2, 5, 7)))
    with pytest.raises(TypeError, match="guess"):
        ss.lstm(*args, solver="newton", guess=np.zeros((2, 5, 8), np.int64))
    with pytest.raises(TypeError, match="guess"):
        ss.lstm(*args, solver="newton", guess=np.zeros((2, 5, 8), np.float32))


# ---- solve_recurrence -----------------------------------------------------------------------

def user_problem(n=4, B=2, T=25, seed=8):
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((n, n)) * 0.6
    f = lambda s, x: np.tanh(s @ M.T + x)
    jac = lambda s, x: (1 - f(s, x) ** 2)[:, :, None] * M
    s0 = rng.standard_normal((B, n))
    xs = rng.standard_normal((B, T, n))
    expected = np.empty((B, T, n))
    s = s0
    for t in range(T):
        s = f(s, xs[:, t])
        expected[:, t] = s
    return f, jac, s0, xs, expected


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("with_jac", [True, False])
def test_solve_recurrence(solver, with_jac):
    f, jac, s0, xs, expected = user_problem()
    s, info = ss.solve_recurrence(f, s0, xs, jac=jac if with_jac else None, solver=solver)
    assert info.converged and s.shape == expected.shape
    np.testing.assert_allclose(s, expected, atol=1e-7, rtol=0)
    if solver == "newton" and with_jac:
        assert info.iterations < 12


def test_solve_recurrence_diagonal_jacobian_and_float32():
    rng = np.random.default_rng(9)
    a = rng.uniform(0.2, 0.9, 6)
    f = lambda s, x: np.sin(a * s) + x
    jac = lambda s, x: a * np.cos(a * s)              # [N, n]: diagonal
    s0 = np.zeros((3, 6), np.float32)
    xs = rng.standard_normal((3, 40, 6)).astype(np.float32)
    expected = parallel._UserProblem(f, xs, 3, 40, 6, np.float32, None).sequential(s0)
    for solver in SOLVERS:
        s, info = ss.solve_recurrence(f, s0, xs, jac=jac, solver=solver)
        assert s.dtype == np.float32 and info.converged
        np.testing.assert_allclose(s, expected, atol=1e-4)


def test_solve_recurrence_deprecated_keywords():
    """method= and s0= (the old spellings of solver= and state=) still work, with a warning;
    a bad name given through method= is reported under that name."""
    f, jac, s0, xs, expected = user_problem()
    s, _ = ss.solve_recurrence(f, s0, xs, solver="jacobi")
    with pytest.warns(DeprecationWarning, match="method="):
        old, _ = ss.solve_recurrence(f, s0, xs, method="jacobi")
    np.testing.assert_array_equal(old, s)
    with pytest.warns(DeprecationWarning, match="s0="):
        old, _ = ss.solve_recurrence(f, s0=s0, xs=xs, solver="jacobi")
    np.testing.assert_array_equal(old, s)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="method"):
        ss.solve_recurrence(f, s0, xs, method="gauss")
    with pytest.raises(TypeError, match="s0"):
        ss.solve_recurrence(f, s0, xs, s0=s0)
    with pytest.raises(TypeError, match="state"):
        ss.solve_recurrence(f, xs=xs)


def test_solve_recurrence_non_convergence_and_bad_input():
    f, jac, s0, xs, expected = user_problem(T=30)
    with pytest.warns(RuntimeWarning):
        s, info = ss.solve_recurrence(f, s0, xs, solver="jacobi", max_iter=2)
    assert not info.converged
    np.testing.assert_allclose(info.sequential, expected, atol=1e-12)
    with pytest.raises(TypeError, match="f must be callable"):
        ss.solve_recurrence(None, s0, xs)
    with pytest.raises(TypeError, match="jac"):
        ss.solve_recurrence(f, s0, xs, jac=3)
    with pytest.raises(ValueError, match="solver must be one of 'newton', 'quasi-newton', "
                                         "'jacobi'"):
        ss.solve_recurrence(f, s0, xs, solver="gauss")
    with pytest.raises(ValueError, match=r"xs must have shape \[B, T, ...\] with B = 2"):
        ss.solve_recurrence(f, s0, xs[:1])
    with pytest.raises(ValueError, match=r"state must have shape \[B, n\]"):
        ss.solve_recurrence(f, s0[0], xs)
    with pytest.raises(TypeError, match="state"):
        ss.solve_recurrence(f, s0.astype(int), xs)
    with pytest.raises(ValueError, match="f must return shape"):
        ss.solve_recurrence(lambda s, x: s[:, :2], s0, xs)
    with pytest.raises(ValueError, match="jac must return shape"):
        ss.solve_recurrence(f, s0, xs, jac=lambda s, x: s[:, :2])
    with pytest.raises(ValueError, match="guess"):
        ss.solve_recurrence(f, s0, xs, guess=np.zeros((2, 30, 3)))
    empty, info = ss.solve_recurrence(f, s0, xs[:, :0])
    assert empty.shape == (2, 0, 4) and info.iterations == 0
