"""Bad input to the RNN cells raises TypeError/ValueError naming the argument; NaN propagates
only where the recurrence carries it; property tests over shapes/dtypes/strides/heads; the
backend switch."""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import statescan as ss
from _helpers import (CELLS, CELL_SIZES, assert_all_close, flat_outputs, make_problem,
                      on_backends, random_cotangent, state_parts, using_backend)


def _call(p, **override):
    args = dict(zip(("x", "W", "R", "b", "b_r"), p.args()))
    kw = p.kwargs()
    for k, v in override.items():
        (kw if k in kw else args)[k] = v
    return p.fn(*args.values(), **kw)


def _with_state_part(p, k, value):
    parts = list(p.state_parts())
    parts[k] = value
    return parts[0] if len(parts) == 1 else tuple(parts)


# ---- shapes -------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
def test_wrong_ranks_name_the_argument(cell, backend):
    p = make_problem(cell, B=2, T=3, I=4, H=6)
    G = CELL_SIZES[cell][0]
    with pytest.raises(ValueError, match=r"\bx\b.*shape"):
        _call(p, x=p.x[0])
    with pytest.raises(ValueError, match=r"\bx\b.*shape"):
        _call(p, x=p.x[None])
    with pytest.raises(ValueError, match=r"\bW\b.*shape"):
        _call(p, W=p.W[None])
    with pytest.raises(ValueError, match=r"\bW\b.*shape"):
        _call(p, W=p.W.ravel())
    with pytest.raises(ValueError, match=r"\bR\b.*shape"):
        _call(p, R=p.R.ravel())
    with pytest.raises(ValueError, match=r"\bR\b.*shape"):
        _call(p, R=p.R[None, None])
    with pytest.raises(ValueError, match=r"\bb\b.*shape"):
        _call(p, b=p.b[None])
    with pytest.raises(ValueError, match=r"\bb_r\b.*shape"):
        _call(p, b_r=p.b_r[:, None])
    with pytest.raises(ValueError, match=r"\bx\b.*shape"):     # W=None: x must be [B,T,G*H]
        _call(p, W=None)
    with pytest.raises(ValueError, match=r"\bx\b.*shape"):
        _call(p, W=None, x=np.zeros((2, 3, G * 6 + 1)))


@pytest.mark.parametrize("cell", CELLS)
def test_size_mismatches_name_the_argument(cell, backend):
    p = make_problem(cell, B=2, T=3, I=4, H=6, state=True)
    G = CELL_SIZES[cell][0]
    with pytest.raises(ValueError, match=r"\bW\b.*shape"):          # H from R is 6
        _call(p, W=np.zeros((G * 5, 4)))
    with pytest.raises(ValueError, match=r"\bx\b.*shape"):          # I from W is 3: x is wrong
        _call(p, W=np.zeros((G * 6, 3)))
    with pytest.raises(ValueError, match=r"\bR\b.*shape"):
        _call(p, R=np.zeros((G * 6, 5)))
    with pytest.raises(ValueError, match=r"\bR\b.*shape"):
        _call(p, R=np.zeros((G * 6 + 1, 6)))
    with pytest.raises(ValueError, match=r"\bb\b.*shape"):
        _call(p, b=np.zeros(G * 6 - 1))
    with pytest.raises(ValueError, match=r"\bb_r\b.*shape"):
        _call(p, b_r=np.zeros(G * 5))
    for k, name in enumerate(("h", "c", "n", "m")[:CELL_SIZES[cell][1]]):
        with pytest.raises(ValueError, match=rf"state {name}\b.*shape"):
            _call(p, state=_with_state_part(p, k, np.ones((2, 5))))
        with pytest.raises(ValueError, match=rf"state {name}\b.*shape"):   # batch size
            _call(p, state=_with_state_part(p, k, np.ones((3, 6))))
        with pytest.raises(ValueError, match=rf"state {name}\b.*shape"):
            _call(p, state=_with_state_part(p, k, np.ones((2, 6, 1))))


@pytest.mark.parametrize("cell", CELLS)
def test_heads_inconsistent_with_R(cell, backend):
    G = CELL_SIZES[cell][0]
    p = make_problem(cell, B=2, T=3, I=4, H=6, heads=2)       # R [2, G*3, 3]
    with pytest.raises(ValueError, match=r"\bR\b"):
        _call(p, heads=3)
    with pytest.raises(ValueError, match=r"\bR\b"):
        _call(p, heads=1)
    with pytest.raises(ValueError, match=r"\bR\b"):           # 2-D R is [G*H, H]: heads=1 only
        _call(p, R=np.zeros((G * 6, 6)))
    with pytest.raises(ValueError, match=r"\bR\b"):           # G*D rows with D = 3
        _call(p, R=np.zeros((2, G * 3 + 1, 3)))
    with pytest.raises(ValueError, match=r"\bW\b"):           # 4 heads of D=3 -> H=12 != 6
        _call(p, heads=4, R=np.zeros((4, G * 3, 3)))
    with pytest.raises(ValueError, match=r"\bheads\b"):
        _call(p, heads=0)
    with pytest.raises(ValueError, match=r"\bheads\b"):
        _call(p, heads=-2)
    for bad in (2.0, "2", None, True):
        with pytest.raises(TypeError, match=r"\bheads\b"):
            _call(p, heads=bad)


# ---- dtypes -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_dtype", [np.int64, np.int32, np.complex128, np.complex64,
                                       np.float16, np.bool_, object])
@pytest.mark.parametrize("cell", CELLS)
def test_unsupported_dtypes_name_the_argument(cell, bad_dtype, backend):
    p = make_problem(cell, B=2, T=3, I=4, H=6, state=True)
    for name in ("x", "W", "R", "b", "b_r"):
        arr = getattr(p, name)
        with pytest.raises(TypeError, match=rf"\b{name}\b"):
            _call(p, **{name: arr.astype(bad_dtype)})
    for k, name in enumerate(("h", "c", "n", "m")[:CELL_SIZES[cell][1]]):
        with pytest.raises(TypeError, match=rf"state {name}\b"):
            _call(p, state=_with_state_part(p, k, p.state_parts()[k].astype(bad_dtype)))


@pytest.mark.parametrize("cell", CELLS)
def test_mixed_float_dtypes(cell, backend):
    p = make_problem(cell, B=2, T=3, I=4, H=6, state=True)
    for name in ("x", "W", "R", "b", "b_r"):
        arr = getattr(p, name)
        with pytest.raises(TypeError, match=rf"\b{name}\b.*float32|float32.*\b{name}\b"):
            _call(p, **{name: arr.astype(np.float32)})
    for k, name in enumerate(("h", "c", "n", "m")[:CELL_SIZES[cell][1]]):
        with pytest.raises(TypeError, match=rf"state {name}\b"):
            _call(p, state=_with_state_part(p, k, p.state_parts()[k].astype(np.float32)))
    p32 = make_problem(cell, B=2, T=3, I=4, H=6, state=True, dtype=np.float32)
    with pytest.raises(TypeError, match=r"state h\b"):
        _call(p32, state=_with_state_part(p32, 0, p32.state_parts()[0].astype(np.float64)))


def test_python_lists_are_accepted(backend):
    p = make_problem("lstm", B=2, T=3, I=4, H=5, state=True)
    expected = flat_outputs("lstm", p.call())
    got = flat_outputs("lstm", ss.lstm(p.x.tolist(), p.W.tolist(), p.R.tolist(), p.b.tolist(),
                                       p.b_r.tolist(), state=[s.tolist() for s in p.state]))
    assert_all_close(got, expected)


# ---- state and cotangent structure ---------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
def test_wrong_state_structure(cell, backend):
    p = make_problem(cell, B=2, T=3, I=4, H=6, state=True)
    S = CELL_SIZES[cell][1]
    parts = p.state_parts()
    if S == 1:
        with pytest.raises(ValueError, match=r"state h\b"):
            _call(p, state=(parts[0], parts[0]))
        with pytest.raises(ValueError, match=r"state h\b"):
            _call(p, state=np.stack([parts[0], parts[0]]))
    else:
        with pytest.raises(TypeError, match=r"\bstate\b"):
            _call(p, state=parts[0])                      # a bare array, not a tuple
        with pytest.raises(TypeError, match=r"\bstate\b"):
            _call(p, state=np.stack(parts))
        with pytest.raises(TypeError, match=r"\bstate\b"):
            _call(p, state=parts[:-1])
        with pytest.raises(TypeError, match=r"\bstate\b"):
            _call(p, state=parts + parts[:1])
        with pytest.raises(TypeError, match=r"state c\b"):
            _call(p, state=(parts[0], None) + parts[2:])


@pytest.mark.parametrize("cell", CELLS)
def test_bad_cotangents(cell, backend):
    p = make_problem(cell, B=2, T=3, I=4, H=6, state=True)
    S = CELL_SIZES[cell][1]
    out, pb = ss.vjp(p.fn, *p.args(), **p.kwargs())
    dy, dstate = random_cotangent(cell, out)
    parts = state_parts(cell, dstate)
    with pytest.raises(ValueError, match=r"\bdy\b.*shape"):
        pb((dy[:, :-1], dstate))
    with pytest.raises(ValueError, match=r"\bdy\b.*shape"):
        pb((dy[0], dstate))
    with pytest.raises(TypeError, match=r"\bdy\b"):
        pb((dy.astype(np.complex128), dstate))
    with pytest.raises(TypeError, match="cotangent"):
        pb(dy)
    with pytest.raises(TypeError, match="cotangent"):
        pb((dy, dstate, dstate))
    bad = np.zeros((2, 5))
    with pytest.raises(ValueError, match=r"\bdstate\b.*shape"):
        pb((dy, bad if S == 1 else (bad,) + parts[1:]))
    with pytest.raises(TypeError, match=r"\bdstate\b"):
        pb((dy, parts[0].astype(np.int64) if S == 1 else (parts[0].astype(np.int64),) + parts[1:]))
    if S > 1:
        with pytest.raises(TypeError, match=r"\bdstate\b"):
            pb((dy, parts[:-1]))


def test_vjp_of_unsupported_function():
    with pytest.raises(TypeError, match="not differentiable"):
        ss.vjp(np.tanh, np.zeros(3))
    with pytest.raises(TypeError, match="not differentiable"):
        ss.vjp(lambda x: x, np.zeros(3))


# ---- NaN ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell", CELLS)
def test_nan_in_x_reaches_only_later_steps_of_its_row(cell, dtype, backend):
    B, T, b0, t0 = 3, 6, 1, 2
    p = make_problem(cell, B=B, T=T, I=4, H=37, state=True, dtype=dtype)
    p.x[b0, t0, 1] = np.nan
    out, pb = ss.vjp(p.fn, *p.args(), **p.kwargs())
    y = out[0]
    assert np.isnan(y[b0, t0:]).all()
    assert np.isfinite(y[b0, :t0]).all()
    assert np.isfinite(np.delete(y, b0, axis=0)).all()
    for s in state_parts(cell, out[1]):
        assert np.isnan(s[b0]).all() and np.isfinite(np.delete(s, b0, axis=0)).all()
    dx = pb(random_cotangent(cell, out))[0]
    assert np.isnan(dx[b0, t0]).all()
    assert np.isfinite(np.delete(dx, b0, axis=0)).all()


@pytest.mark.parametrize("cell", CELLS)
def test_nan_in_dy_reaches_only_earlier_steps_of_its_row(cell, backend):
    B, T, b0, t0 = 3, 6, 1, 3
    p = make_problem(cell, B=B, T=T, I=4, H=37, state=True)
    out, pb = ss.vjp(p.fn, *p.args(), **p.kwargs())
    dy, dstate = random_cotangent(cell, out)
    dy[b0, t0, 5] = np.nan
    grads = pb((dy, dstate))
    dx = grads[0]
    assert np.isnan(dx[b0, :t0 + 1]).all()
    assert np.isfinite(dx[b0, t0 + 1:]).all()
    assert np.isfinite(np.delete(dx, b0, axis=0)).all()
    for s in state_parts(cell, grads[-1]):
        assert np.isfinite(np.delete(s, b0, axis=0)).all()


@pytest.mark.parametrize("cell", CELLS)
def test_nan_stays_in_its_unit_and_head(cell, backend):
    """W=None, heads=2: NaN in one pre-activation of unit j, head 0, at step t0 makes h_j NaN at
    t0, then all of head 0 (through R), never head 1."""
    B, T, H, D, b0, t0, j = 2, 5, 6, 3, 0, 1, 1
    G = CELL_SIZES[cell][0]
    p = make_problem(cell, B=B, T=T, H=H, heads=2, W=False, state=True)
    p.x[b0, t0, (G - 1) * H + j] = np.nan      # the last gate of unit j (o for LSTM, n for GRU)
    y, state = p.call()
    assert np.isnan(y[b0, t0, j]).all()
    assert np.isfinite(np.delete(y[b0, t0], j)).all()
    assert np.isnan(y[b0, t0 + 1:, :D]).all()
    assert np.isfinite(y[b0, :, D:]).all() and np.isfinite(y[b0, :t0]).all()
    assert np.isfinite(np.delete(y, b0, axis=0)).all()
    assert np.isfinite(state_parts(cell, state)[0][b0, D:]).all()


@pytest.mark.parametrize("cell", CELLS)
def test_nan_in_state_and_weights(cell, backend):
    p = make_problem(cell, B=3, T=4, I=3, H=5, state=True)
    st = _with_state_part(p, 0, p.state_parts()[0].copy())
    state_parts(cell, st)[0][2, 3] = np.nan
    y, _ = _call(p, state=st)
    assert np.isnan(y[2]).all() and np.isfinite(y[:2]).all()
    W = p.W.copy()
    W[0, 0] = np.nan
    y, _ = _call(p, W=W)          # gate 0 of unit 0 at t=0, then every unit through R
    assert np.isnan(y[:, 0, 0]).all() and np.isfinite(y[:, 0, 1:]).all()
    assert np.isnan(y[:, 1:]).all()


# ---- property tests -----------------------------------------------------------------------

LAYOUTS = ("c", "fortran", "reversed", "strided")


def _layout(a, how):
    if a is None or how == "c":
        return a
    if how == "fortran":
        return np.asfortranarray(a)
    idx = (slice(None, None, -1),) * a.ndim
    if how == "reversed":
        return a[idx].copy()[idx]
    big = np.zeros(a.shape + (2,), a.dtype)
    big[..., 0] = a
    return big[..., 0]


@st.composite
def problems(draw):
    cell = draw(st.sampled_from(CELLS))
    heads = draw(st.integers(1, 3))
    D = draw(st.integers(1, 6))
    kw = dict(B=draw(st.integers(0, 5)), T=draw(st.integers(0, 5)), I=draw(st.integers(1, 5)),
              H=heads * D, heads=heads, W=draw(st.booleans()), b=draw(st.booleans()),
              b_r=draw(st.booleans()), state=draw(st.booleans()), R3=draw(st.booleans()),
              dtype=draw(st.sampled_from([np.float64, np.float32])),
              seed=draw(st.integers(0, 2**16)))
    p = make_problem(cell, **kw)
    for name in ("x", "W", "R", "b", "b_r"):
        setattr(p, name, _layout(getattr(p, name), draw(st.sampled_from(LAYOUTS))))
    return p


# (what to break, expected exception); applied to an otherwise valid problem
CORRUPTIONS = [
    ("none", None),
    ("x_int", TypeError), ("W_complex", TypeError), ("R_int", TypeError),
    ("b_f16", TypeError), ("mixed_R", TypeError), ("state_mixed", TypeError),
    ("x_rank", ValueError), ("R_rows", ValueError), ("b_len", ValueError),
    ("b_r_len", ValueError), ("heads_plus_one", ValueError), ("state_batch", ValueError),
    ("W_cols", ValueError),
]


def _corrupt(p, how):
    other = np.float32 if p.x.dtype == np.float64 else np.float64
    if how == "x_int":
        p.x = p.x.astype(np.int64)
    elif how == "W_complex":
        if p.W is None:
            return False
        p.W = p.W.astype(np.complex128)
    elif how == "R_int":
        p.R = p.R.astype(np.int32)
    elif how == "b_f16":
        if p.b is None:
            return False
        p.b = p.b.astype(np.float16)
    elif how == "mixed_R":
        p.R = p.R.astype(other)
    elif how == "state_mixed":
        if p.state is None:
            return False
        p.state = _with_state_part(p, 0, p.state_parts()[0].astype(other))
    elif how == "x_rank":
        p.x = p.x[None]
    elif how == "R_rows":
        p.R = np.concatenate([p.R, p.R[..., :1, :]], axis=-2)
    elif how == "b_len":
        if p.b is None:
            return False
        p.b = p.b[:-1]
    elif how == "b_r_len":
        if p.b_r is None:
            return False
        p.b_r = np.concatenate([p.b_r, p.b_r])
    elif how == "heads_plus_one":
        p.heads += 1
    elif how == "state_batch":
        if p.state is None:
            return False
        B, H = p.state_parts()[0].shape
        p.state = _with_state_part(p, 0, np.ones((B + 1, H), p.x.dtype))
    elif how == "W_cols":
        if p.W is None:
            return False
        p.W = p.W[:, :-1] if p.W.shape[1] > 1 else np.concatenate([p.W, p.W], axis=1)
    return True


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=problems(), corruption=st.sampled_from(CORRUPTIONS))
def test_property_valid_result_or_clean_error(p, corruption):
    how, expected_error = corruption
    if not _corrupt(p, how):
        how, expected_error = "none", None
    if expected_error is not None:
        for name in ("compiled", "python"):
            with using_backend(name):
                with pytest.raises(expected_error):
                    p.call()
                with pytest.raises(expected_error):
                    ss.vjp(p.fn, *p.args(), **p.kwargs())
        return
    res = on_backends(lambda: ss.vjp(p.fn, *p.args(), **p.kwargs()))
    outs = {k: flat_outputs(p.cell, v[0]) for k, v in res.items()}
    assert all(np.isfinite(a).all() for a in outs["compiled"])
    assert_all_close(outs["compiled"], outs["python"], p.x.dtype, what="forward")
    grads = {k: v[1](random_cotangent(p.cell, v[0])) for k, v in res.items()}
    assert_all_close(grads["compiled"], grads["python"], p.x.dtype, what="grads")
    assert all(np.isfinite(g).all() for g in grads["compiled"] if isinstance(g, np.ndarray))


# ---- backend switch -----------------------------------------------------------------------

def test_set_backend_switches_and_reports():
    ss.set_backend("python")
    assert ss.backend() == "python"
    ss.set_backend("compiled")
    assert ss.backend() == "compiled"
    for bad in ("numba", "", "Python", None):
        with pytest.raises(ValueError, match="backend"):
            ss.set_backend(bad)
    assert ss.backend() == "compiled"


def test_compiled_extension_is_built():
    from statescan import _dispatch
    assert _dispatch.compiled_available(), _dispatch._state["ext_error"]


@pytest.mark.parametrize("value, expected", [("python", "python"), ("compiled", "compiled"),
                                             ("", "compiled")])
def test_backend_environment_variable(value, expected):
    env = dict(os.environ, STATESCAN_BACKEND=value)
    out = subprocess.run([sys.executable, "-c", "import statescan; print(statescan.backend())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
