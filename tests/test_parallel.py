"""Parallel-in-time solvers equal the sequential definitions: the RNN cells' solvers and
solve_recurrence (matrix_scan: test_matrix_scan.py)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import statescan as ss
from statescan import parallel
from _helpers import CELLS, SOLVERS, assert_outputs_close, make_cell, user_problem


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


# ---- solve_recurrence -----------------------------------------------------------------------

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
