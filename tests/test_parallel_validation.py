"""Parallel solvers: non-convergence (warned, the sequential result returned), NaN, bad
arguments, deprecated keywords."""
import numpy as np
import pytest

import statescan as ss
from _helpers import assert_outputs_close, make_cell, user_problem


# ---- non-convergence and bad input ----------------------------------------------------------

def test_non_convergence_returns_sequential_result():
    args, kw = make_cell("lstm", T=40, scale=1.5, state=True)
    expected = ss.lstm(*args, **kw)
    with pytest.warns(RuntimeWarning, match="info.sequential"):
        y, state, info = ss.lstm(*args, **kw, solver="jacobi", max_iter=3)
    assert not info.converged and info.iterations == 3 and info.residual > info.tol
    assert_outputs_close(info.sequential, expected, 1e-12)
    assert np.max(np.abs(y - expected[0])) > 1e-7    # the stalled iterate is really off


def test_non_convergence_warning_points_at_the_callers_line():
    args, kw = make_cell("lstm", T=30)
    for run in (lambda: ss.lstm(*args, solver="jacobi", max_iter=2, **kw),
                lambda: ss.vjp(ss.lstm, *args, solver="jacobi", max_iter=2, **kw)):
        with pytest.warns(RuntimeWarning, match="info.sequential") as record:
            run()
        assert [w.filename for w in record] == [__file__]


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
    _, info = ss.solve_recurrence(f, s0, xs, solver="quasi-newton")
    assert info.solver == "quasi-newton"
    with pytest.warns(DeprecationWarning, match="SolverInfo.solver"):
        assert info.method == "quasi-newton"


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
