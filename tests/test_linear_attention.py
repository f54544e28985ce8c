"""linear_attention: decay given as scalars / lists, the decode step and out_state, variable
lengths, reverse, resets (forward and gradients), huge chunks."""
import numpy as np
import pytest

import statescan as ss
from statescan._reference import linear_attention as lref
from conftest import assert_close, using_backend
from test_ssd import numeric_grad

F64, F32 = np.float64, np.float32


def problem(B=2, NH=3, T=9, dk=4, dv=3, *, decay=True, state=True, dtype=F64, seed=0):
    rng = np.random.default_rng(seed)

    def r(*shape, s=1.0):
        return (s * rng.standard_normal(shape)).astype(dtype)

    q, k, v = r(B, NH, T, dk, s=0.5), r(B, NH, T, dk, s=0.5), r(B, NH, T, dv)
    kw = {}
    if decay:
        kw["decay"] = np.linspace(0.6, 0.95, NH).astype(dtype)
    if state:
        kw["state"] = r(B, NH, dk, dv, s=0.5)
    return (q, k, v), kw


def step_loop(q, k, v, decay=None, state=None, lengths=None, reset=None, reverse=False):
    """The definition, row by row: S = decay S + k v^T (zeroed at a reset), o = S^T q."""
    B, NH, T, dk = q.shape
    dv = v.shape[-1]
    o = np.zeros((B, NH, T, dv))
    S_T = np.zeros((B, NH, dk, dv)) if state is None else state.astype(F64).copy()
    lam = np.ones(NH) if decay is None else np.asarray(decay, F64)
    for b in range(B):
        n = T if lengths is None else lengths[b]
        S = S_T[b]
        for t in (range(n - 1, -1, -1) if reverse else range(n)):
            if reset is not None and reset[b, t]:
                S = np.zeros_like(S)
            S = lam[:, None, None] * S + k[b, :, t, :, None] * v[b, :, t, None, :]
            o[b, :, t] = np.einsum("hkv,hk->hv", S, q[b, :, t])
        S_T[b] = S
    return o, S_T


def test_decay_scalar_and_list(backend):
    (q, k, v), _ = problem(NH=2)
    o1, s1 = ss.linear_attention(q, k, v, decay=0.9)
    o2, s2 = ss.linear_attention(q, k, v, decay=np.array([0.9, 0.9]))
    assert np.array_equal(o1, o2) and np.array_equal(s1, s2)
    o3, _ = ss.linear_attention(q, k, v, decay=[0.9, 0.8])
    assert_close(o3, step_loop(q, k, v, decay=[0.9, 0.8])[0], tol=1e-10)


@pytest.mark.parametrize("decay", [[np.nan, 0.5], [0.0, 0.5], [1.5, 0.5]])
def test_bad_decay_rejected(decay):
    (q, k, v), _ = problem(NH=2)
    with pytest.raises(ValueError, match="decay"):
        ss.linear_attention(q, k, v, decay=decay)
    with pytest.raises(ValueError, match="decay"):
        ss.linear_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], decay=np.array(decay),
                            state=np.zeros((2, 2, 4, 3)))


def test_huge_chunk_is_one_block(backend):
    (q, k, v), kw = problem()
    o, s = ss.linear_attention(q, k, v, chunk=2 ** 63, **kw)
    o1, s1 = ss.linear_attention(q, k, v, chunk=9, **kw)
    assert np.array_equal(o, o1) and np.array_equal(s, s1)


# ---- decoding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("decay", [True, False])
def test_decode_steps_in_place(backend, dtype, decay):
    (q, k, v), kw = problem(T=6, decay=decay, dtype=dtype)
    o, s = ss.linear_attention(q, k, v, **kw)
    state = kw["state"].copy()
    rest = {n: a for n, a in kw.items() if n != "state"}
    tol = 1e-12 if dtype == F64 else 1e-5
    for t in range(6):
        token = [np.ascontiguousarray(a[:, :, t:t + 1]) for a in (q, k, v)]   # fast path
        ot, new = ss.linear_attention(*token, state=state, out_state=state, **rest)
        assert new is state
        assert_close(ot[:, :, 0], o[:, :, t], dtype=dtype, tol=tol)
    assert_close(state, s, dtype=dtype, tol=tol)


def test_decode_compiled_matches_reference():
    (q, k, v), kw = problem(T=1)
    before = kw["state"].copy()
    o, s = ss.linear_attention(q, k, v, **kw)
    assert np.array_equal(kw["state"], before)
    with using_backend("python"):
        o2, s2 = ss.linear_attention(q, k, v, **kw)
    assert_close(o, o2, tol=1e-12)
    assert_close(s, s2, tol=1e-12)


# ---- variable lengths, reverse, resets ---------------------------------------------------------

@pytest.mark.parametrize("chunk", [2, 4, 64])
def test_lengths_reverse_reset_vs_step_loop(backend, chunk):
    (q, k, v), kw = problem(B=3, T=10)
    lengths = np.array([10, 6, 0])
    reset = np.zeros((3, 10), bool)
    reset[0, [0, 3, 4, 9]] = True
    reset[1, [2, 5]] = True
    for extra in (dict(lengths=lengths), dict(reset=reset), dict(lengths=lengths, reset=reset),
                  dict(lengths=lengths, reverse=True), dict(reverse=True, reset=reset)):
        o, s = ss.linear_attention(q, k, v, chunk=chunk, **kw, **extra)
        o_ref, s_ref = step_loop(q, k, v, **kw, **extra)
        assert_close(o, o_ref, tol=1e-10, what=str(list(extra)))
        assert_close(s, s_ref, tol=1e-10, what=str(list(extra)))


def test_rows_alone_and_bit_identical_full_lengths(backend):
    (q, k, v), kw = problem(B=2, T=8)
    o, s = ss.linear_attention(q, k, v, lengths=[8, 3], chunk=4, **kw)
    ob, sb = ss.linear_attention(q[1:, :, :3], k[1:, :, :3], v[1:, :, :3], chunk=4,
                                 decay=kw["decay"], state=kw["state"][1:])
    assert_close(o[1:, :, :3], ob, tol=1e-12)
    assert_close(s[1:], sb, tol=1e-12)
    assert np.all(o[1, :, 3:] == 0)
    plain = ss.linear_attention(q, k, v, chunk=4, **kw)
    for a, b in zip(plain, ss.linear_attention(q, k, v, chunk=4, lengths=[8, 8], **kw)):
        assert np.array_equal(a, b)


def test_reverse_equals_flipped_prefix(backend):
    (q, k, v), kw = problem(B=2, T=7)
    o, s = ss.linear_attention(q, k, v, lengths=[7, 4], reverse=True, chunk=3, **kw)
    flip = [a[1:, :, :4][:, :, ::-1] for a in (q, k, v)]
    ob, sb = ss.linear_attention(*flip, decay=kw["decay"], state=kw["state"][1:])
    assert_close(o[1:, :, :4], ob[:, :, ::-1], tol=1e-12)
    assert_close(s[1:], sb, tol=1e-12)


def test_reset_stops_non_finite_history(backend):
    (q, k, v), kw = problem(B=1, T=8)
    v[0, :, 1] = np.inf
    reset = np.zeros((1, 8), bool)
    reset[0, 5] = True
    o, s = ss.linear_attention(q, k, v, reset=reset, chunk=8, **kw)
    assert not np.isfinite(o[0, :, 1:5]).all()
    assert np.isfinite(o[0, :, 5:]).all() and np.isfinite(s).all()


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_infinite_query_after_reset_is_inf_not_nan(chunk):
    """A sequence started by a reset has no state term: an infinite query there gives the
    step loop's +-inf (not inf * 0 = NaN from a zero state), on both backends, and the vjp's
    NaN/inf patterns agree."""
    (q, k, v), kw = problem(B=1, NH=1, T=8, dk=1, dv=2)
    q[0, 0, 5, 0] = np.inf
    reset = np.zeros((1, 8), bool)
    reset[0, 5] = True
    expected, _ = step_loop(q, k, v, reset=reset, **kw)
    assert np.isinf(expected[0, 0, 5]).all()
    grads = []
    for name in ("compiled", "python"):
        with using_backend(name), np.errstate(all="ignore"):
            (o, s), pb = ss.vjp(ss.linear_attention, q, k, v, reset=reset, chunk=chunk, **kw)
            grads.append(pb((np.ones_like(o), np.ones_like(s))))
        assert np.array_equal(o[0, 0, 5], expected[0, 0, 5]), name
        assert np.isfinite(o[0, 0, :5]).all() and np.isfinite(o[0, 0, 6:]).all(), name
    for a, b in zip(*grads):
        if a is not None:
            assert np.array_equal(np.isnan(a), np.isnan(b))
            assert np.array_equal(np.where(np.isinf(a), a, 0), np.where(np.isinf(b), b, 0))


@pytest.mark.parametrize("extra", [dict(lengths=[5, 2]), dict(lengths=[5, 3], reverse=True),
                                   dict(reset=[[0, 1, 0, 0, 1], [1, 0, 0, 1, 0]]),
                                   dict(lengths=[4, 5], reset=[[0, 0, 1, 0, 0],
                                                               [0, 1, 0, 0, 1]],
                                        reverse=True)])
def test_vjp_lengths_reverse_reset(backend, extra):
    (q, k, v), kw = problem(B=2, NH=2, T=5, dk=2, dv=2)
    kw["decay"] = np.array([0.7, 0.9])
    if "reset" in extra:
        extra = dict(extra, reset=np.array(extra["reset"], bool))
    rng = np.random.default_rng(4)
    out, pb = ss.vjp(ss.linear_attention, q, k, v, chunk=2, **kw, **extra)
    cot = (rng.standard_normal(out[0].shape), rng.standard_normal(out[1].shape))
    grads = pb(cot)
    arrays = [q, k, v, kw["decay"], kw["state"]]
    for i, (g, a) in enumerate(zip(grads, arrays)):
        def loss(x, i=i):
            args = list(arrays)
            args[i] = x
            o, s = ss.linear_attention(*args[:3], chunk=2, decay=args[3], state=args[4],
                                       **extra)
            return np.sum(o * cot[0]) + np.sum(s * cot[1])
        assert_close(g, numeric_grad(loss, a), tol=1e-6, what=f"gradient {i}")
    if "lengths" in extra:
        for b, n in enumerate(extra["lengths"]):
            assert all(np.all(g[b, :, n:] == 0) for g in grads[:3])


def test_bad_options_name_the_argument():
    (q, k, v), kw = problem()
    with pytest.raises(ValueError, match="lengths"):
        ss.linear_attention(q, k, v, lengths=[3])
    with pytest.raises(ValueError, match="lengths"):
        ss.linear_attention(q, k, v, lengths=[3, -1])
    with pytest.raises(ValueError, match="reset"):
        ss.linear_attention(q, k, v, reset=np.zeros((2, 3), bool))
    with pytest.raises(TypeError, match="reverse"):
        ss.linear_attention(q, k, v, reverse=None)
    with pytest.raises(ValueError, match="out_state"):
        ss.linear_attention(q, k, v, out_state=np.zeros((2, 3, 4, 4)))


def test_reference_chunked_equals_recurrence_with_resets():
    (q, k, v), kw = problem(B=2, T=9)
    g = np.broadcast_to(np.log(kw["decay"])[None, :, None], (2, 3, 9))
    reset = np.zeros((2, 9), bool)
    reset[0, 4] = reset[1, 0] = True
    o, s = lref.linear_forward(q, k, v, g, kw["state"], 4, 1, np.array([9, 7]), reset)
    o_ref, s_ref = step_loop(q, k, v, **kw, lengths=[9, 7], reset=reset)
    assert_close(o, o_ref, tol=1e-12)
    assert_close(s, s_ref, tol=1e-12)


# ---- heads wider than the micro-kernel's 32-column panels ----------------------------------------

@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("chunk", [64, 33])
def test_wide_heads_vs_float64(dtype, chunk):
    """The compiled forward and vjp on heads wider than a 32-column panel of the micro-kernel
    (AVX-512 builds; BLAS elsewhere) with partial last ones (dk=40, dv=72), blocks of many rows
    and a partial last block (T=150), against the python backend in float64 (the other tests
    use dk, dv <= 4 and T <= 10)."""
    (q, k, v), kw = problem(B=2, NH=2, T=150, dk=40, dv=72, dtype=dtype)
    rng = np.random.default_rng(3)
    cot = (rng.standard_normal(v.shape).astype(dtype),
           rng.standard_normal(kw["state"].shape).astype(dtype))
    tol = 1e-11 if dtype == F64 else 2e-5

    def run(a, kwa, c):
        out, pb = ss.vjp(ss.linear_attention, *a, chunk=chunk, **kwa)
        return out, pb(c)

    out, grads = run((q, k, v), kw, cot)
    with using_backend("python"):
        out_ref, grads_ref = run([a.astype(F64) for a in (q, k, v)],
                                 {n: a.astype(F64) for n, a in kw.items()},
                                 tuple(c.astype(F64) for c in cot))
    for name, a, e in zip(("o", "state"), out, out_ref):
        assert_close(a, e, dtype=dtype, tol=tol, what=name)
    for i, (g, e) in enumerate(zip(grads, grads_ref)):
        assert_close(g, e, dtype=dtype, tol=tol, what=f"gradient {i}")
