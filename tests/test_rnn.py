"""RNN cells: compiled kernels against the numpy reference (forward and vjp), streaming,
thread-count independence, and the shapes/dtypes/aliasing of what the functions return."""
import numpy as np
import pytest

import statescan as ss
from statescan import _dispatch
from _helpers import (CELLS, CELL_SIZES, assert_all_close, assert_all_equal, flat_outputs,
                      make_problem, on_backends, random_cotangent, state_parts, using_backend,
                      using_threads, vjp_grads)

DTYPES = (np.float64, np.float32)


def strided(a, order="reverse"):
    """A non-contiguous view holding the same values as `a`."""
    if a is None:
        return None
    if order == "fortran":
        return np.asfortranarray(a)
    if order == "reverse":          # negative strides on every axis
        idx = (slice(None, None, -1),) * a.ndim
        return a[idx].copy()[idx]
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1] + 1,), a.dtype)   # every other column
    big[..., 1::2] = a
    return big[..., 1::2]


def noncontiguous(p):
    """Replace every array of problem `p` by a non-contiguous view with the same values."""
    p.x = strided(p.x, "every_other")
    p.W = strided(p.W, "fortran")
    p.R = strided(p.R, "reverse")
    p.b = strided(p.b, "every_other")
    p.b_r = strided(p.b_r, "reverse")
    if p.state is not None:
        parts = tuple(strided(s, "fortran") for s in state_parts(p.cell, p.state))
        p.state = parts[0] if len(parts) == 1 else parts
    return p


# (id, make_problem keyword arguments, post-processing)
CASES = [
    ("B1_T1", dict(B=1, T=1, I=3, H=5), None),
    ("B3_H37", dict(B=3, T=6, I=4, H=37), None),
    ("B5_H70", dict(B=5, T=5, I=7, H=70), None),
    ("B9_H33_I40", dict(B=9, T=4, I=40, H=33), None),
    ("B4_H32", dict(B=4, T=3, I=5, H=32), None),
    ("B8_H64", dict(B=8, T=3, I=6, H=64), None),
    ("T0", dict(B=3, T=0, I=4, H=5, state=True), None),
    ("B0", dict(B=0, T=4, I=4, H=5), None),
    ("B0_T0", dict(B=0, T=0, I=2, H=3), None),
    ("heads3_D11", dict(B=5, T=5, I=6, H=33, heads=3), None),
    ("heads4_D16", dict(B=9, T=4, I=5, H=64, heads=4, state=True), None),
    ("heads2_D37", dict(B=3, T=4, I=5, H=74, heads=2), None),
    ("headsH_D1", dict(B=5, T=6, I=4, H=7, heads=7), None),
    ("heads1_R3d", dict(B=3, T=4, I=4, H=9, R3=True), None),
    ("W_none", dict(B=3, T=5, H=37, W=False), None),
    ("W_none_heads2", dict(B=5, T=4, H=10, heads=2, W=False, state=True), None),
    ("no_biases", dict(B=3, T=5, I=4, H=9, b=False, b_r=False), None),
    ("b_only", dict(B=3, T=5, I=4, H=9, b_r=False), None),
    ("b_r_only", dict(B=3, T=5, I=4, H=9, b=False), None),
    ("state", dict(B=5, T=6, I=3, H=37, state=True), None),
    ("noncontiguous", dict(B=5, T=5, I=6, H=37, state=True), noncontiguous),
    ("noncontiguous_heads", dict(B=3, T=4, I=3, H=12, heads=3, state=True), noncontiguous),
    ("large_inputs", dict(B=3, T=8, I=4, H=9, state=True, scale=4.0), None),
    ("B33_T12", dict(B=33, T=12, I=5, H=20, heads=2, state=True), None),
    ("B1_H130", dict(B=1, T=3, I=5, H=130, state=True), None),      # many 32-column panels
    ("B10_H130_heads2", dict(B=10, T=3, I=5, H=130, heads=2), None),
]


def _random_cases(n, seed):
    """Random shapes mixing every option; sizes deliberately off the 4-row / 32-column grid."""
    rng = np.random.default_rng(seed)
    cases = []
    for k in range(n):
        heads = int(rng.choice([1, 1, 2, 3, 5]))
        D = int(rng.integers(1, 40 // heads + 2))
        kw = dict(B=int(rng.integers(1, 11)), T=int(rng.integers(1, 7)),
                  I=int(rng.integers(1, 12)), H=heads * D, heads=heads,
                  W=bool(rng.random() < 0.8), b=bool(rng.random() < 0.5),
                  b_r=bool(rng.random() < 0.5), state=bool(rng.random() < 0.5), seed=100 + k)
        cases.append((f"random{k}", kw, noncontiguous if rng.random() < 0.3 else None))
    return cases


CASES += _random_cases(8, seed=2024)
CASE_IDS = [c[0] for c in CASES]


@pytest.mark.skipif(not _dispatch.compiled_available(), reason="compiled kernels not built")
def test_registry_and_compiled_kernels_name_the_same_cells():
    """The kernel ids live in ext/_cells.pxd only; the Python side names cells."""
    ids = _dispatch.ext_module("rnn").CELL_IDS
    assert set(ids) == set(CELLS)
    assert sorted(ids.values()) == list(range(len(CELLS)))


def _problem(cell, case, dtype):
    _, kw, post = case
    p = make_problem(cell, dtype=dtype, **kw)
    return post(p) if post else p


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("cell", CELLS)
def test_forward_compiled_matches_reference(cell, case, dtype):
    p = _problem(cell, case, dtype)
    out = on_backends(p.call)
    got, ref = flat_outputs(cell, out["compiled"]), flat_outputs(cell, out["python"])
    for a in got:
        assert a.dtype == np.dtype(dtype)
    assert_all_close(got, ref, dtype, what=f"{cell} {case[0]} (y, state...)")
    assert all(np.isfinite(a).all() for a in ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("cell", CELLS)
def test_vjp_compiled_matches_reference(cell, case, dtype):
    p = _problem(cell, case, dtype)
    res = on_backends(vjp_grads, p)
    (out_c, g_c), (out_p, g_p) = res["compiled"], res["python"]
    assert_all_close(flat_outputs(cell, out_c), flat_outputs(cell, out_p), dtype, what="out")
    assert_all_close(g_c, g_p, dtype, what=f"{cell} {case[0]} grads")


@pytest.mark.parametrize("cell", CELLS)
def test_gradients_have_argument_shapes_and_dtype(cell, backend):
    for kw in (dict(B=3, T=4, I=5, H=6), dict(B=3, T=4, I=5, H=6, heads=2, state=True),
               dict(B=2, T=3, H=6, R3=True, W=False, state=True)):
        for dtype in DTYPES:
            p = make_problem(cell, dtype=dtype, **kw)
            _, grads = vjp_grads(p)
            expected = p.args() + ((p.state,) if p.state is not None else ())
            n_pos = 5 if p.b_r is not None else (4 if p.b is not None else 3)
            expected = expected[:n_pos] + expected[5:]
            assert len(grads) == len(expected)
            for g, a in zip(grads, expected):
                if a is None:
                    assert g is None
                    continue
                for gp, ap in zip(state_parts(cell, g) if isinstance(a, tuple) else (g,),
                                  a if isinstance(a, tuple) else (a,)):
                    assert gp.shape == ap.shape and gp.dtype == ap.dtype


@pytest.mark.parametrize("cell", CELLS)
def test_output_structure(cell, backend):
    G, S = CELL_SIZES[cell]
    p = make_problem(cell, B=3, T=5, I=4, H=6)
    y, state = p.call()
    assert y.shape == (3, 5, 6)
    parts = state_parts(cell, state)
    if S == 1:
        assert isinstance(state, np.ndarray)
    else:
        assert isinstance(state, tuple) and len(state) == S
    assert all(s.shape == (3, 6) for s in parts)
    assert np.array_equal(y[:, -1], parts[0])     # the last output is the final h


@pytest.mark.parametrize("cell", CELLS)
def test_empty_sequences(cell, backend):
    """T=0 returns the initial state (a copy, not the caller's array); B=0 works."""
    p = make_problem(cell, B=3, T=0, I=4, H=5, state=True)
    y, state = p.call()
    assert y.shape == (3, 0, 5)
    for got, init in zip(state_parts(cell, state), p.state_parts()):
        assert np.array_equal(got, init) and not np.shares_memory(got, init)
    p = make_problem(cell, B=3, T=0, I=4, H=5)
    _, state = p.call()
    assert all(np.array_equal(s, np.zeros((3, 5))) for s in state_parts(cell, state))
    p = make_problem(cell, B=0, T=4, I=4, H=5)
    y, state = p.call()
    assert y.shape == (0, 4, 5)
    assert all(s.shape == (0, 5) for s in state_parts(cell, state))
    for kw in (dict(B=3, T=0, state=True), dict(B=0, T=4)):
        p = make_problem(cell, I=4, H=5, **kw)
        _, grads = vjp_grads(p)
        for g in grads[:5]:
            assert np.array_equal(g, np.zeros_like(g))
        if kw.get("state"):
            for g, d in zip(state_parts(cell, grads[-1]),
                            state_parts(cell, random_cotangent(cell, p.call())[1])):
                assert np.array_equal(g, d)       # T=0: the state passes straight through


@pytest.mark.parametrize("cell", CELLS)
def test_inputs_are_not_modified(cell, backend):
    p = make_problem(cell, B=5, T=4, I=3, H=37, heads=1, state=True)
    before = [a.copy() for a in p.args()] + [s.copy() for s in p.state_parts()]
    out, pb = ss.vjp(p.fn, *p.args(), **p.kwargs())
    cot = random_cotangent(cell, out)
    cot_before = [cot[0].copy()] + [s.copy() for s in state_parts(cell, cot[1])]
    g1 = pb(cot)
    g2 = pb(cot)           # the pullback can be called again with the same result
    p.call()
    after = list(p.args()) + list(p.state_parts())
    for a, b_ in zip(after, before):
        assert np.array_equal(a, b_)
    for a, b_ in zip([cot[0]] + list(state_parts(cell, cot[1])), cot_before):
        assert np.array_equal(a, b_)
    assert_all_equal(g1, g2, "pullback called twice")


@pytest.mark.parametrize("cell", CELLS)
def test_results_are_not_overwritten_by_later_calls(cell, backend):
    """Outputs and saved pullbacks own their memory: another call must not change them."""
    p1 = make_problem(cell, B=3, T=5, I=4, H=37, state=True, seed=1)
    p2 = make_problem(cell, B=3, T=5, I=4, H=37, state=True, seed=2)
    out1, pb1 = ss.vjp(p1.fn, *p1.args(), **p1.kwargs())
    kept = flat_outputs(cell, out1)
    kept = tuple(a.copy() for a in kept)
    cot = random_cotangent(cell, out1)
    g1 = pb1(cot)
    kept_g = [g if g is None or isinstance(g, tuple) else g.copy() for g in g1]
    out2, pb2 = ss.vjp(p2.fn, *p2.args(), **p2.kwargs())
    p2.call()
    pb2(random_cotangent(cell, out2, seed=5))
    assert_all_equal(flat_outputs(cell, out1), kept, "first output after a second call")
    assert_all_equal(g1[:5], tuple(kept_g[:5]), "first gradients after a second call")
    assert_all_equal(pb1(cot)[:5], tuple(kept_g[:5]), "first pullback after a second call")


# ---- streaming, vjp forward identity, threads ----------------------------------------------

def _split_call(p, split):
    """Run p's sequence as x[:, :split] then x[:, split:], carrying the state over."""
    y1, s1 = p.fn(p.x[:, :split], p.W, p.R, p.b, p.b_r, heads=p.heads, state=p.state)
    y2, s2 = p.fn(p.x[:, split:], p.W, p.R, p.b, p.b_r, heads=p.heads, state=s1)
    return np.concatenate([y1, y2], axis=1), s2


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("cell", CELLS)
def test_streaming_in_chunks_is_bit_identical(cell, dtype, backend):
    for kw in (dict(B=3, T=9, I=5, H=37), dict(B=5, T=9, I=4, H=12, heads=3, state=True),
               dict(B=2, T=9, H=6, W=False), dict(B=1, T=9, I=33, H=70, state=True)):
        p = make_problem(cell, dtype=dtype, **kw)
        whole = flat_outputs(cell, p.call())
        for split in (0, 1, 4, 8, 9):
            assert_all_equal(flat_outputs(cell, _split_call(p, split)), whole,
                             f"{cell} {kw} split at {split}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("cell", CELLS)
def test_token_by_token_equals_one_call(cell, dtype, backend):
    """Decoding one step at a time (B*T = 1 or B rows per call) gives the one-call result."""
    for kw in (dict(B=1, T=6, I=33, H=70), dict(B=2, T=5, I=33, H=37, heads=1, state=True),
               dict(B=3, T=4, I=40, H=12, heads=3, state=True)):
        p = make_problem(cell, dtype=dtype, **kw)
        whole = flat_outputs(cell, p.call())
        ys, state = [], p.state
        for t in range(p.x.shape[1]):
            y, state = p.fn(p.x[:, t:t + 1], p.W, p.R, p.b, p.b_r, heads=p.heads, state=state)
            ys.append(y)
        got = flat_outputs(cell, (np.concatenate(ys, axis=1), state))
        assert_all_equal(got, whole, f"{cell} {kw} step by step")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("cell", CELLS)
def test_saturated_gates_stay_finite(cell, dtype):
    """Input pre-activations of +-hundreds/thousands (exp overflows in float32 / float64):
    outputs and gradients stay finite and the kernels agree with the reference.  R stays
    O(1), so the problem stays well conditioned."""
    for scale in (100.0, 3000.0):
        p = make_problem(cell, B=5, T=6, H=37, W=False, state=True, dtype=dtype, seed=9)
        p.x = (p.x * scale).astype(dtype)
        res = on_backends(vjp_grads, p)
        (out_c, g_c), (out_p, g_p) = res["compiled"], res["python"]
        for a in flat_outputs(cell, out_c):
            assert np.isfinite(a).all(), f"{cell} scale {scale}: non-finite output"
        assert_all_close(flat_outputs(cell, out_c), flat_outputs(cell, out_p), dtype,
                         what=f"{cell} scale {scale} forward")
        assert_all_close(g_c, g_p, dtype, what=f"{cell} scale {scale} grads")


@pytest.mark.parametrize("cell", CELLS)
def test_vjp_forward_equals_plain_forward(cell, backend):
    for kw in (dict(B=3, T=6, I=5, H=37), dict(B=9, T=5, I=4, H=12, heads=4, state=True),
               dict(B=2, T=4, H=6, W=False, b=False)):
        for dtype in DTYPES:
            p = make_problem(cell, dtype=dtype, **kw)
            out, _ = ss.vjp(p.fn, *p.args(), **p.kwargs())
            assert_all_equal(flat_outputs(cell, out), flat_outputs(cell, p.call()))


THREAD_CASES = [dict(B=16, T=5, I=8, H=64), dict(B=16, T=5, I=8, H=64, heads=4, state=True),
                dict(B=9, T=4, I=5, H=37, state=True), dict(B=5, T=3, I=3, H=6, heads=2),
                dict(B=1, T=4, I=3, H=70)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("cell", CELLS)
def test_thread_count_does_not_change_results(cell, dtype):
    with using_backend("compiled"):
        for kw in THREAD_CASES:
            p = make_problem(cell, dtype=dtype, **kw)
            res = {}
            for n in (1, 2, 3):
                with using_threads(n):
                    out, grads = vjp_grads(p)
                    res[n] = flat_outputs(cell, out) + flat_outputs(cell, p.call()) + grads
            assert_all_equal(res[2], res[1], f"{cell} {kw} 2 threads vs 1")
            assert_all_equal(res[3], res[1], f"{cell} {kw} 3 threads vs 1")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("cell", CELLS)
def test_rows_do_not_depend_on_batch_grouping(cell, dtype, backend):
    """A batch row's result is bit-identical whether computed alone or among other rows (the
    basis of thread-count independence: jobs may group rows differently).  W=None keeps the
    input GEMM out of it."""
    def rows_of(tree, rows):
        if isinstance(tree, tuple):
            return tuple(rows_of(t, rows) for t in tree)
        return tree[rows]

    for kw in (dict(B=13, T=3, H=37), dict(B=11, T=3, H=130, heads=2, state=True)):
        p = make_problem(cell, W=False, dtype=dtype, **kw)
        out, pb = ss.vjp(p.fn, *p.args(), **p.kwargs())
        cot = random_cotangent(cell, out)
        dx = pb(cot)[0]
        for rows in (slice(0, 1), slice(kw["B"] - 1, None), slice(3, 10), slice(8, 11)):
            out_q, pb_q = ss.vjp(p.fn, p.x[rows], *p.args()[1:], heads=p.heads,
                                 state=None if p.state is None else rows_of(p.state, rows))
            what = f"{cell} {kw} rows {rows}"
            assert_all_equal(flat_outputs(cell, out_q), rows_of(flat_outputs(cell, out), rows),
                             what)
            assert np.array_equal(pb_q(rows_of(cot, rows))[0], dx[rows]), f"{what}: dx"


def test_set_num_threads_is_restored():
    old = ss.get_num_threads()
    with using_threads(1):
        assert ss.get_num_threads() == 1
    assert ss.get_num_threads() == old
    with pytest.raises(ValueError, match="n must be >= 1"):
        ss.set_num_threads(0)


# ---- float32 computes the same function as float64 -----------------------------------------

@pytest.mark.parametrize("cell", CELLS)
def test_float32_close_to_float64(cell, backend):
    p64 = make_problem(cell, B=4, T=6, I=5, H=37, heads=1, state=True)
    p32 = make_problem(cell, B=4, T=6, I=5, H=37, heads=1, state=True, dtype=np.float32)
    # float32 rounding of the inputs and the arithmetic: a few 1e-6 after 6 steps
    assert_all_close(flat_outputs(cell, p32.call()), flat_outputs(cell, p64.call()),
                     np.float64, tol=1e-4, what="f32 vs f64")


# ---- accuracy of the elementwise math, isolated through special cases of the cells ---------

def _math_grid(dtype):
    g = np.concatenate([np.linspace(-30, 30, 6001), np.geomspace(1e-30, 40, 1500),
                        -np.geomspace(1e-30, 40, 1500), [0.0, -0.0, 100, -100, 800, -800]])
    return g.astype(dtype)


def _assert_ulps(got, exact, dtype, what, ulps=8):
    """|got - exact| <= ulps * eps * |exact| elementwise (differences below the smallest
    normal number are ignored: those results are subnormal)."""
    info = np.finfo(dtype)
    exact = exact.astype(dtype).astype(np.float64)
    err = np.abs(got.astype(np.float64) - exact)
    bad = err > ulps * info.eps * np.abs(exact) + info.tiny
    assert not bad.any(), (f"{what}: {bad.sum()} values off by more than {ulps} ulp, e.g. "
                           f"got {got[bad][:3]} for {exact[bad][:3]}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_elementwise_math_is_accurate_to_a_few_ulp(dtype, backend):
    """With W=None, R=0 and a chosen state, single outputs of the cells are exactly tanh,
    sigmoid, log-sigmoid or exp of an input: check them over a dense grid, near 0 (relative
    accuracy) and far out (saturation, overflow), plus inf and NaN."""
    from scipy.special import expit, log_expit
    u = _math_grid(dtype)
    N = u.size
    u64 = u.astype(np.float64)
    z = np.zeros((N, 1), dtype)
    R1, R4 = np.zeros((1, 1), dtype), np.zeros((4, 1), dtype)

    y, _ = ss.elman(u.reshape(N, 1, 1), None, R1)             # h = tanh(u)
    _assert_ulps(y.ravel(), np.tanh(u64), dtype, "tanh")

    x = np.zeros((N, 1, 4), dtype)                            # sLSTM from the zero state with
    x[:, 0, 2], x[:, 0, 3] = 20, u                            # z~ = 20, o~ = u: h = sigmoid(u)
    y, _ = ss.slstm(x, None, R4)
    _assert_ulps(y.ravel(), expit(u64), dtype, "sigmoid")

    x = np.zeros((N, 1, 4), dtype)                            # i~ = -1e4, f~ = u, n = 1, m = 0:
    x[:, 0, 0], x[:, 0, 1] = -1e4, u                          # m_t = log_sigmoid(u)
    _, (_, _, _, m) = ss.slstm(x, None, R4, state=(z, z, z + 1, z))
    _assert_ulps(m.ravel(), log_expit(u64), dtype, "log_sigmoid")

    v = -np.abs(u)                                            # f~ = 1e4, m_prev = v <= 0,
    x = np.zeros((N, 1, 4), dtype)                            # c_prev = 1: c_t = exp(v)
    x[:, 0, 1] = 1e4
    _, (_, c, _, _) = ss.slstm(x, None, R4, state=(z, z + 1, z + 1, v.reshape(N, 1)))
    _assert_ulps(c.ravel(), np.exp(-np.abs(u64)), dtype, "exp")

    special = np.array([np.inf, -np.inf, np.nan], dtype)
    y, _ = ss.elman(special.reshape(3, 1, 1), None, R1)
    assert np.array_equal(y.ravel(), [1, -1, np.nan], equal_nan=True)
    x = np.zeros((3, 1, 4), dtype)
    x[:, 0, 2], x[:, 0, 3] = 20, special
    y, _ = ss.slstm(x, None, R4)
    assert np.array_equal(y.ravel(), [1, 0, np.nan], equal_nan=True)
