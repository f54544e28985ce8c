"""vjp of the RNN cells against central finite differences (float64), for every argument,
plus the pullback's calling convention (which gradients it returns, None cotangents)."""
import numpy as np
import pytest

import statescan as ss
from _helpers import CELLS, CELL_SIZES, make_problem, random_cotangent, state_parts

FD_CASES = [
    ("full", dict(state=True)),
    ("zero_state", dict()),                              # sLSTM: the n == 0 initial branch
    ("heads2", dict(H=4, heads=2, state=True)),
    ("headsH", dict(H=4, heads=4, state=True, b=False)),
    ("W_none", dict(W=False, state=True)),
    ("W_none_heads2_no_b", dict(W=False, heads=2, b=False, state=True)),
    ("R3_heads1_b_r_only", dict(R3=True, b=False, state=True)),
    ("large", dict(scale=3.0, state=True, seed=5)),      # saturated gates, both sLSTM branches
]


def _loss(p, cot, args, state):
    """sum(y * dy) + sum(state * dstate): the scalar whose gradient the pullback returns."""
    y, st = p.fn(*args, heads=p.heads, state=state)
    dy, dst = cot
    total = np.sum(y * dy)
    for s, d in zip(state_parts(p.cell, st), state_parts(p.cell, dst)):
        total += np.sum(s * d)
    return total


def _finite_differences(p, cot, eps=1e-6):
    """Central differences of _loss w.r.t. every array argument and initial-state part."""
    args = [None if a is None else a.copy() for a in p.args()]
    parts = [s.copy() for s in p.state_parts()]
    S = CELL_SIZES[p.cell][1]

    def loss():
        st = None if not parts else (parts[0] if S == 1 else tuple(parts))
        return _loss(p, cot, args, st)

    grads = []
    for arr in args + parts:
        if arr is None:
            grads.append(None)
            continue
        g = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            v = arr[idx]
            arr[idx] = v + eps
            up = loss()
            arr[idx] = v - eps
            down = loss()
            arr[idx] = v
            g[idx] = (up - down) / (2 * eps)
        grads.append(g)
    return grads[:5], grads[5:]


def _check(got, fd, what):
    err = np.max(np.abs(got - fd))
    assert err <= 1e-6 * max(1.0, np.max(np.abs(fd))), f"{what}: max error {err:.3e}"


@pytest.mark.parametrize("case", FD_CASES, ids=[c[0] for c in FD_CASES])
@pytest.mark.parametrize("cell", CELLS)
def test_vjp_matches_finite_differences(cell, case, backend):
    kw = dict(B=2, T=4, I=3, H=4)
    kw.update(case[1])
    p = make_problem(cell, **kw)
    out, pb = ss.vjp(p.fn, *p.args(), **p.kwargs())
    cot = random_cotangent(cell, out, seed=3)
    grads = pb(cot)
    fd_args, fd_state = _finite_differences(p, cot)

    n_pos = 5 if p.b_r is not None else (4 if p.b is not None else 3)
    assert len(grads) == n_pos + (p.state is not None)
    names = ("x", "W", "R", "b", "b_r")
    for k in range(5):
        g = grads[k] if k < n_pos else None
        if fd_args[k] is None:
            assert g is None, f"d{names[k]} should be None"
        else:
            _check(g, fd_args[k], f"{cell} {case[0]} d{names[k]}")
    if p.state is not None:
        dstate = state_parts(cell, grads[-1])
        assert len(dstate) == len(fd_state)
        for name, g, fd in zip(("h", "c", "n", "m"), dstate, fd_state):
            _check(g, fd, f"{cell} {case[0]} dstate {name}")


@pytest.mark.parametrize("cell", CELLS)
def test_pullback_arity(cell, backend):
    p = make_problem(cell, B=2, T=3, I=3, H=4, state=True)
    x, W, R, b, b_r = p.args()
    S = CELL_SIZES[cell][1]
    cot = None

    def grads(*args, **kw):
        nonlocal cot
        out, pb = ss.vjp(p.fn, *args, **kw)
        cot = random_cotangent(cell, out)
        return pb(cot)

    assert len(grads(x, W, R)) == 3
    assert len(grads(x, W, R, b)) == 4
    assert len(grads(x, W, R, b, b_r)) == 5
    assert len(grads(x, W, R, b=b)) == 4
    g = grads(x, W, R, None, b_r)
    assert len(g) == 5 and g[3] is None and g[4] is not None
    xa = make_problem(cell, B=2, T=3, H=4, W=False).x
    g = grads(xa, None, R)
    assert len(g) == 3 and g[1] is None and g[0].shape == xa.shape
    g = grads(x, W, R, state=p.state)
    assert len(g) == 4
    if S == 1:
        assert isinstance(g[3], np.ndarray) and g[3].shape == (2, 4)
    else:
        assert isinstance(g[3], tuple) and len(g[3]) == S


@pytest.mark.parametrize("cell", CELLS)
def test_none_cotangents_mean_zero(cell, backend):
    p = make_problem(cell, B=2, T=3, I=3, H=4, state=True)
    out, pb = ss.vjp(p.fn, *p.args(), **p.kwargs())
    dy, dstate = random_cotangent(cell, out)
    zeros_state = tuple(np.zeros_like(s) for s in state_parts(cell, dstate))
    zeros_state = zeros_state[0] if len(zeros_state) == 1 else zeros_state

    def same(a, b):
        for u, v in zip(a[:5], b[:5]):
            assert np.array_equal(u, v)
        for u, v in zip(state_parts(cell, a[5]), state_parts(cell, b[5])):
            assert np.array_equal(u, v)

    same(pb((dy, None)), pb((dy, zeros_state)))
    same(pb((None, dstate)), pb((np.zeros_like(dy), dstate)))
    g = pb((None, None))
    assert all(np.array_equal(a, np.zeros_like(a)) for a in g[:5])
    if CELL_SIZES[cell][1] > 1:             # individual state parts may be None too
        parts = list(state_parts(cell, dstate))
        partial = [None] + parts[1:]
        expected = [np.zeros_like(parts[0])] + parts[1:]
        same(pb((dy, tuple(partial))), pb((dy, tuple(expected))))


@pytest.mark.parametrize("cell", CELLS)
def test_gradient_is_linear_in_cotangent(cell, backend):
    """pullback(a*u + v) == a*pullback(u) + pullback(v): catches state kept between calls."""
    p = make_problem(cell, B=3, T=5, I=3, H=6, heads=2, state=True)
    out, pb = ss.vjp(p.fn, *p.args(), **p.kwargs())
    u, v = random_cotangent(cell, out, 1), random_cotangent(cell, out, 2)

    def comb(a, b):
        if isinstance(a, tuple):
            return tuple(comb(s, t) for s, t in zip(a, b))
        return 2.5 * a + b

    gu, gv, guv = pb(u), pb(v), pb(comb(u, v))
    for a, b, c in zip(gu, gv, guv):
        for s, t, r in zip(*(state_parts(cell, z) if isinstance(z, tuple) else (z,)
                             for z in (a, b, c))):
            np.testing.assert_allclose(r, 2.5 * s + t, rtol=1e-12, atol=1e-12)
