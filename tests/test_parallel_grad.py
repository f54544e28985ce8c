"""Gradients through the parallel solvers equal those of the sequential kernels."""
import numpy as np
import pytest

import statescan as ss
from _helpers import CELL_SIZES, CELLS, SOLVERS, flat_state, make_cell


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
    ds = tuple(rng.standard_normal(s.shape) for s in flat_state(s0))
    ds = ds[0] if len(ds) == 1 else ds
    expected = pullback0((dy, ds))
    got = pullback((dy, ds, None))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        for gi, ei in zip(flat_state(g), flat_state(e)):
            np.testing.assert_allclose(gi, ei, rtol=0, atol=1e-7)


def test_gradients_without_W():
    G, _ = CELL_SIZES["gru"]
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


def test_non_convergence_gradients_use_the_exact_trajectory():
    args, kw = make_cell("elman", T=30, scale=1.5)
    (y0, _), pb0 = ss.vjp(ss.elman, *args, **kw)
    with pytest.warns(RuntimeWarning):
        out, pb = ss.vjp(ss.elman, *args, **kw, solver="jacobi", max_iter=2)
    assert not out[2].converged
    dy = np.ones_like(y0)
    for g, e in zip(pb((dy, None)), pb0((dy, None))):
        np.testing.assert_allclose(g, e, atol=1e-7)
