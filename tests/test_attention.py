"""linear_attention, ssd, attention: every form of the math agrees (step loop, quadratic masked
form, chunked kernel, compiled vs numpy), streaming, gradients vs finite differences, errors."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import statescan as ss
from statescan._reference import attention as ref
from statescan._reference import linear_attention as lref
from statescan._reference import ssd as sref
from conftest import assert_close, using_backend, using_threads

F64, F32 = np.float64, np.float32


def rand(rng, *shape, dtype=F64, s=1.0):
    return (s * rng.standard_normal(shape)).astype(dtype)


def la_problem(B=2, NH=3, T=13, dk=5, dv=4, *, decay=True, state=True, dtype=F64, seed=0):
    rng = np.random.default_rng(seed)
    q, k = rand(rng, B, NH, T, dk, dtype=dtype, s=0.5), rand(rng, B, NH, T, dk, dtype=dtype, s=0.5)
    v = rand(rng, B, NH, T, dv, dtype=dtype)
    kw = {}
    if decay:
        kw["decay"] = np.linspace(0.6, 1.0, NH).astype(dtype)
    if state:
        kw["state"] = rand(rng, B, NH, dk, dv, dtype=dtype, s=0.5)
    return (q, k, v), kw


def la_operands(q, k, v, decay=None, state=None):
    """The recurrence's (g, S0) for linear attention."""
    B, NH, T, dk = q.shape
    g = None if decay is None else np.broadcast_to(np.log(decay)[:, None], (NH, T))
    S0 = np.zeros((B, NH, dk, v.shape[-1]), q.dtype) if state is None else state
    return g, S0


def ssd_problem(Bt=2, T=11, NH=3, P=4, N=5, *, state=True, dtype=F64, seed=0):
    rng = np.random.default_rng(seed)
    x = rand(rng, Bt, T, NH, P, dtype=dtype)
    dt = (0.1 + rng.random((Bt, T, NH))).astype(dtype)
    A = -(0.2 + rng.random(NH)).astype(dtype)
    B, C = rand(rng, Bt, T, N, dtype=dtype, s=0.5), rand(rng, Bt, T, N, dtype=dtype, s=0.5)
    kw = {"state": rand(rng, Bt, NH, P, N, dtype=dtype, s=0.5)} if state else {}
    return (x, dt, A, B, C), kw


def att_problem(B=2, NH=2, Tq=13, Tk=13, d=6, dv=5, dtype=F64, seed=0):
    rng = np.random.default_rng(seed)
    return (rand(rng, B, NH, Tq, d, dtype=dtype), rand(rng, B, NH, Tk, d, dtype=dtype),
            rand(rng, B, NH, Tk, dv, dtype=dtype))


# ---- the forms of the math agree ---------------------------------------------------------------

def test_reference_forms_agree():
    """Step loop, quadratic masked form and chunked form of the recurrence; SSD as linear
    attention vs Mamba-2's own recurrence."""
    (q, k, v), kw = la_problem(T=17)
    g, S0 = la_operands(q, k, v, **kw)
    o1, s1 = lref.recurrence(q, k, v, g, S0)
    for o, s in (lref.quadratic(q, k, v, g, S0), lref.linear_forward(q, k, v, g, S0, 5)):
        assert_close(o, o1, tol=1e-12)
        assert_close(s, s1, tol=1e-12)


@pytest.mark.parametrize("chunk", [1, 16, 64, 1000])
@pytest.mark.parametrize("decay,state", [(False, False), (True, False), (True, True),
                                         (False, True)])
def test_linear_attention_vs_naive(backend, chunk, decay, state):
    (q, k, v), kw = la_problem(T=37, decay=decay, state=state)
    g, S0 = la_operands(q, k, v, **kw)
    o, s = ss.linear_attention(q, k, v, chunk=chunk, **kw)
    for o_ref, s_ref in (lref.recurrence(q, k, v, g, S0), lref.quadratic(q, k, v, g, S0)):
        assert_close(o, o_ref, tol=1e-10)
        assert_close(s, s_ref, tol=1e-10)


@pytest.mark.parametrize("chunk", [1, 16, 64, 1000])
@pytest.mark.parametrize("state", [False, True])
def test_ssd_vs_recurrence(backend, chunk, state):
    (x, dt, A, B, C), kw = ssd_problem(T=37, state=state)
    h0 = kw.get("state", np.zeros((2, 3, 4, 5)))
    y_ref, h_ref = sref.ssd_recurrence(x, dt, A, B, C, h0)
    y, h = ss.ssd(x, dt, A, B, C, chunk=chunk, **kw)
    assert_close(y, y_ref, tol=1e-10)
    assert_close(h, h_ref, tol=1e-10)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_ssd_strong_decay_does_not_overflow(dtype):
    """dt*A summed over a long block reaches -1e4: only differences of cumulative log-decays
    (<= 0) are exponentiated, so nothing overflows."""
    (x, dt, A, B, C), kw = ssd_problem(T=300, NH=2, state=True, seed=3)
    dt, A = dt * 50, np.array([-20.0, -0.01])
    y_ref, h_ref = sref.ssd_recurrence(x, dt, A, B, C, kw["state"])
    y, h = ss.ssd(*(a.astype(dtype) for a in (x, dt, A, B, C)), chunk=128,
                  state=kw["state"].astype(dtype))
    assert_close(y, y_ref, dtype=dtype, tol=1e-10 if dtype == F64 else 1e-4)
    assert_close(h, h_ref, dtype=dtype, tol=1e-10 if dtype == F64 else 1e-4)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [1, 16, 64, None, 1000])
@pytest.mark.parametrize("Tq,Tk", [(37, 37), (13, 40), (40, 13), (1, 9)])
def test_attention_vs_naive(backend, causal, chunk, Tq, Tk):
    q, k, v = att_problem(Tq=Tq, Tk=Tk)
    o = ss.attention(q, k, v, causal=causal, chunk=chunk)
    assert_close(o, ref.softmax_attention(q, k, v, causal, 1 / np.sqrt(6)), tol=1e-10)


def test_attention_causal_offset_and_scale():
    """Tk > Tq: query i sees keys j <= i + Tk - Tq (the extra keys are a shared prefix);
    Tk < Tq: the first queries see nothing and output zeros."""
    q, k, v = att_problem(Tq=3, Tk=5)
    o = ss.attention(q, k, v, scale=0.3)
    for i in range(3):
        s = q[..., i:i + 1, :] @ np.swapaxes(k[..., : i + 3, :], -1, -2) * 0.3
        p = np.exp(s - s.max(-1, keepdims=True))
        expected = (p / p.sum(-1, keepdims=True)) @ v[..., : i + 3, :]
        assert_close(o[..., i:i + 1, :], expected, tol=1e-12)
    q, k, v = att_problem(Tq=5, Tk=3)
    assert np.all(ss.attention(q, k, v)[..., :2, :] == 0)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_compiled_matches_reference(dtype):
    tol = 1e-12 if dtype == F64 else 1e-5
    (q, k, v), kw = la_problem(T=70, dtype=dtype)
    ssd_args, ssd_kw = ssd_problem(T=70, dtype=dtype)
    att = att_problem(Tq=70, Tk=75, dtype=dtype)
    calls = [(ss.linear_attention, (q, k, v), dict(kw, chunk=16)),
             (ss.ssd, ssd_args, dict(ssd_kw, chunk=16)),
             (ss.attention, att, dict(chunk=16)),
             (ss.attention, att, dict(causal=False, chunk=32))]
    for fn, args, kwargs in calls:
        outs = {}
        for name in ("compiled", "python"):
            with using_backend(name):
                outs[name] = fn(*args, **kwargs)
        for a, b in zip(np.atleast_1d(outs["compiled"]) if fn is ss.attention else outs["compiled"],
                        np.atleast_1d(outs["python"]) if fn is ss.attention else outs["python"]):
            assert a.dtype == dtype
            assert_close(a, b, dtype=dtype, tol=tol, what=fn.__name__)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [None, 96, 33])
def test_compiled_vjp_matches_reference_on_wide_heads(dtype, causal, chunk):
    """Heads wider than the kernels' column panels with a partial last panel (d = 40,
    dv = 72), several query blocks (Tq = 300) and key chunks, Tk > Tq: the compiled forward
    and all three gradients agree with the float64 reference."""
    q, k, v = att_problem(B=1, NH=2, Tq=300, Tk=331, d=40, dv=72, dtype=dtype, seed=5)
    do = rand(np.random.default_rng(6), 1, 2, 300, 72, dtype=dtype)
    out, pb = ss.vjp(ss.attention, q, k, v, causal=causal, chunk=chunk)
    grads = pb(do)
    with using_backend("python"):
        out_ref, pb_ref = ss.vjp(ss.attention, *(a.astype(F64) for a in (q, k, v)),
                                 causal=causal, chunk=chunk)
        grads_ref = pb_ref(do.astype(F64))
    tol = 1e-12 if dtype == F64 else 2e-5
    for name, a, b in zip(("o", "dq", "dk", "dv"), (out, *grads), (out_ref, *grads_ref)):
        assert a.dtype == dtype
        assert_close(a, b, dtype=dtype, tol=tol, what=name)


def test_thread_count_does_not_change_results():
    (q, k, v), kw = la_problem(B=3, NH=3, T=50, dtype=F32)
    ssd_args, ssd_kw = ssd_problem(Bt=3, T=50, dtype=F32)
    att = att_problem(B=3, NH=3, Tq=50, Tk=50, dtype=F32)
    results = []
    for n in (1, 2, 3):
        with using_threads(n):
            results.append((ss.linear_attention(q, k, v, chunk=16, **kw),
                            ss.ssd(*ssd_args, chunk=16, **ssd_kw), ss.attention(*att, chunk=16)))
    for r in results[1:]:
        for a, b in zip(results[0], r):
            for x, y in zip(np.atleast_1d(a) if isinstance(a, np.ndarray) else a,
                            np.atleast_1d(b) if isinstance(b, np.ndarray) else b):
                assert np.array_equal(x, y)


# ---- streaming, decoding, shapes ---------------------------------------------------------------

@pytest.mark.parametrize("split", [1, 7, 20])
def test_streaming_equals_one_call(backend, split):
    (q, k, v), kw = la_problem(T=29)
    o, s = ss.linear_attention(q, k, v, chunk=8, **kw)
    o1, s1 = ss.linear_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split], chunk=8, **kw)
    o2, s2 = ss.linear_attention(q[:, :, split:], k[:, :, split:], v[:, :, split:], chunk=8,
                                 decay=kw["decay"], state=s1)
    assert_close(np.concatenate([o1, o2], axis=2), o, tol=1e-12)
    assert_close(s2, s, tol=1e-12)

    (x, dt, A, B, C), kw = ssd_problem(T=29)
    y, h = ss.ssd(x, dt, A, B, C, chunk=8, **kw)
    parts = [(x[:, :split], dt[:, :split], A, B[:, :split], C[:, :split]),
             (x[:, split:], dt[:, split:], A, B[:, split:], C[:, split:])]
    y1, h1 = ss.ssd(*parts[0], chunk=8, **kw)
    y2, h2 = ss.ssd(*parts[1], chunk=8, state=h1)
    assert_close(np.concatenate([y1, y2], axis=1), y, tol=1e-12)
    assert_close(h2, h, tol=1e-12)


def test_ssd_decoding_step_by_step(backend):
    """T = 1 with a state is the O(1) decoding step."""
    (x, dt, A, B, C), kw = ssd_problem(T=6)
    y, h = ss.ssd(x, dt, A, B, C, **kw)
    state = kw["state"]
    for t in range(6):
        yt, state = ss.ssd(x[:, t:t + 1], dt[:, t:t + 1], A, B[:, t:t + 1], C[:, t:t + 1],
                           state=state)
        assert_close(yt[:, 0], y[:, t], tol=1e-12)
    assert_close(state, h, tol=1e-12)


@pytest.mark.parametrize("B,T", [(0, 5), (2, 0), (0, 0), (1, 1), (3, 1)])
def test_empty_and_single_step(backend, B, T):
    (q, k, v), kw = la_problem(B=B, T=T, NH=2)
    o, s = ss.linear_attention(q, k, v, **kw)
    assert o.shape == (B, 2, T, 4) and s.shape == (B, 2, 5, 4)
    if T == 0:
        assert_close(s, kw["state"])
    (x, dt, A, Bm, C), kw = ssd_problem(Bt=B, T=T)
    y, h = ss.ssd(x, dt, A, Bm, C, **kw)
    assert y.shape == x.shape and h.shape == (B, 3, 4, 5)
    if T == 0:
        assert_close(h, kw["state"])
    for Tk in (T, 0):
        q, k, v = att_problem(B=B, Tq=T, Tk=Tk)
        o = ss.attention(q, k, v)
        assert o.shape == (B, 2, T, 5)
        out, pb = ss.vjp(ss.attention, q, k, v, causal=False)
        assert [g.shape for g in pb(np.ones_like(out))] == [q.shape, k.shape, v.shape]


def test_non_contiguous_inputs(backend):
    (q, k, v), kw = la_problem(T=20)
    qt = np.asfortranarray(q)
    vt = np.repeat(v, 2, axis=-1)[..., ::2]
    assert not qt.flags.c_contiguous and not vt.flags.c_contiguous
    for a, b in zip(ss.linear_attention(qt, k, vt, **kw), ss.linear_attention(q, k, v, **kw)):
        assert np.array_equal(a, b)
    (x, dt, A, B, C), kw = ssd_problem()
    xs = np.swapaxes(np.swapaxes(x, 1, 2).copy(), 1, 2)
    for a, b in zip(ss.ssd(xs, dt[..., ::-1][..., ::-1], A, B, C, **kw),
                    ss.ssd(x, dt, A, B, C, **kw)):
        assert np.array_equal(a, b)
    q, k, v = att_problem()
    assert np.array_equal(ss.attention(q[..., ::-1][..., ::-1], np.asfortranarray(k), v),
                          ss.attention(q, k, v))


def test_nan_propagates(backend):
    (q, k, v), kw = la_problem(T=10)
    q = q.copy()
    q[0, 0, 3, 0] = np.nan
    o, _ = ss.linear_attention(q, k, v, **kw)
    assert np.isnan(o[0, 0, 3]).all() and not np.isnan(o[1]).any()
    q, k, v = att_problem()
    k = k.copy()
    k[0, 0, 4, 0] = np.nan
    o = ss.attention(q, k, v)
    assert np.isnan(o[0, 0, 4:]).all() and not np.isnan(o[0, 0, :4]).any()


# ---- gradients vs central finite differences ---------------------------------------------------

def numeric_grad(loss, arrays, index, eps=1e-6):
    base = arrays[index]
    grad = np.zeros_like(base)
    for i in np.ndindex(base.shape):
        vals = []
        for sgn in (1, -1):
            a = base.copy()
            a[i] += sgn * eps
            vals.append(loss(*arrays[:index], a, *arrays[index + 1:]))
        grad[i] = (vals[0] - vals[1]) / (2 * eps)
    return grad


def check_vjp(fn, args, kw, kw_names, cot):
    """statescan.vjp's gradients for args then kw[kw_names] against finite differences."""
    out, pullback = ss.vjp(fn, *args, **kw)
    grads = pullback(cot)
    n = len(args)
    arrays = list(args) + [kw[name] for name in kw_names]
    assert len(grads) == len(arrays)

    def loss(*arrs):
        o = fn(*arrs[:n], **dict(kw, **dict(zip(kw_names, arrs[n:]))))
        if isinstance(o, tuple):
            return sum(np.sum(a * c) for a, c in zip(o, cot) if c is not None)
        return np.sum(o * cot)

    for i, g in enumerate(grads):
        assert g.shape == arrays[i].shape
        assert_close(g, numeric_grad(loss, arrays, i), tol=1e-6, what=f"gradient {i}")


@pytest.mark.parametrize("decay,state", [(True, True), (False, False)])
def test_linear_attention_vjp(backend, decay, state):
    (q, k, v), kw = la_problem(B=1, NH=2, T=9, dk=3, dv=2, decay=decay, state=state)
    if decay:
        kw["decay"] = np.array([0.7, 0.95])      # inside (0, 1) so both FD steps are valid
    rng = np.random.default_rng(5)
    names = [n for n in ("decay", "state") if n in kw]
    check_vjp(ss.linear_attention, (q, k, v), dict(kw, chunk=4), names,
              (rand(rng, 1, 2, 9, 2), rand(rng, 1, 2, 3, 2)))


@pytest.mark.parametrize("state", [True, False])
def test_ssd_vjp(backend, state):
    args, kw = ssd_problem(Bt=2, T=7, NH=2, P=2, N=3, state=state)
    rng = np.random.default_rng(6)
    check_vjp(ss.ssd, args, dict(kw, chunk=3), list(kw),
              (rand(rng, 2, 7, 2, 2), rand(rng, 2, 2, 2, 3) if state else None))


@pytest.mark.parametrize("causal,Tq,Tk", [(True, 7, 7), (True, 5, 8), (False, 6, 4)])
def test_attention_vjp(backend, causal, Tq, Tk):
    args = att_problem(B=1, Tq=Tq, Tk=Tk, d=3, dv=2)
    rng = np.random.default_rng(7)
    check_vjp(ss.attention, args, dict(causal=causal, chunk=3), [], rand(rng, 1, 2, Tq, 2))


@pytest.mark.parametrize("dtype", [F64, F32])
def test_compiled_gradients_match_reference(dtype):
    tol = 1e-11 if dtype == F64 else 1e-4
    rng = np.random.default_rng(8)
    (q, k, v), kw = la_problem(T=40, dtype=dtype)
    ssd_args, ssd_kw = ssd_problem(T=40, dtype=dtype)
    att = att_problem(Tq=40, Tk=45, dtype=dtype)
    calls = [(ss.linear_attention, (q, k, v), dict(kw, chunk=16),
              (rand(rng, 2, 3, 40, 4, dtype=dtype), rand(rng, 2, 3, 5, 4, dtype=dtype))),
             (ss.ssd, ssd_args, dict(ssd_kw, chunk=16),
              (rand(rng, 2, 40, 3, 4, dtype=dtype), rand(rng, 2, 3, 4, 5, dtype=dtype))),
             (ss.attention, att, dict(chunk=16), rand(rng, 2, 2, 40, 5, dtype=dtype))]
    for fn, args, kwargs, cot in calls:
        grads = {}
        for name in ("compiled", "python"):
            with using_backend(name):
                grads[name] = ss.vjp(fn, *args, **kwargs)[1](cot)
        for a, b in zip(grads["compiled"], grads["python"]):
            assert a.dtype == dtype
            assert_close(a, b, dtype=dtype, tol=tol, what=fn.__name__)


def test_vjp_forward_identical_and_zero_cotangents():
    (q, k, v), kw = la_problem()
    out, pb = ss.vjp(ss.linear_attention, q, k, v, **kw)
    for a, b in zip(out, ss.linear_attention(q, k, v, **kw)):
        assert np.array_equal(a, b)
    grads = pb((None, None))
    assert all(np.all(g == 0) for g in grads)
    q, k, v = att_problem()
    out, pb = ss.vjp(ss.attention, q, k, v)
    assert np.array_equal(out, ss.attention(q, k, v))


# ---- bad input ---------------------------------------------------------------------------------

def test_bad_input_names_the_argument():
    (q, k, v), kw = la_problem(NH=3)
    with pytest.raises(TypeError, match="q"):
        ss.linear_attention(q.astype(int), k, v)
    with pytest.raises(TypeError, match="v"):
        ss.linear_attention(q, k, v.astype(np.complex128))
    with pytest.raises(TypeError, match="k"):
        ss.linear_attention(q, k.astype(F32), v)
    with pytest.raises(ValueError, match=r"k must have shape"):
        ss.linear_attention(q, k[:, :, :-1], v)
    with pytest.raises(ValueError, match=r"v must have shape"):
        ss.linear_attention(q, k, v[:1])
    with pytest.raises(ValueError, match=r"q must have shape"):
        ss.linear_attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"decay must have shape \[NH\]"):
        ss.linear_attention(q, k, v, decay=np.ones(2))
    with pytest.raises(ValueError, match=r"decay must lie in \(0, 1\]"):
        ss.linear_attention(q, k, v, decay=np.array([0.5, 0.0, 1.0]))
    with pytest.raises(ValueError, match="state must have shape"):
        ss.linear_attention(q, k, v, state=np.zeros((2, 3, 4, 5)))
    with pytest.raises(TypeError, match="chunk"):
        ss.linear_attention(q, k, v, chunk=2.0)
    with pytest.raises(ValueError, match="chunk"):
        ss.linear_attention(q, k, v, chunk=0)

    (x, dt, A, B, C), kw = ssd_problem()
    with pytest.raises(ValueError, match="dt must have shape"):
        ss.ssd(x, dt[:, :, :1], A, B, C)
    with pytest.raises(ValueError, match="A must have shape"):
        ss.ssd(x, dt, A[:1], B, C)
    with pytest.raises(ValueError, match="C must have shape"):
        ss.ssd(x, dt, A, B, C[..., :-1])
    with pytest.raises(ValueError, match="state must have shape"):
        ss.ssd(x, dt, A, B, C, state=np.zeros((2, 3, 5, 4)))
    with pytest.raises(TypeError, match="B"):
        ss.ssd(x, dt, A, B.astype(np.int32), C)

    q, k, v = att_problem()
    with pytest.raises(ValueError, match="k must have shape"):
        ss.attention(q, k[..., :-1], v)
    with pytest.raises(ValueError, match="v must have shape"):
        ss.attention(q, k, v[:, :, :-1])
    with pytest.raises(TypeError, match="causal"):
        ss.attention(q, k, v, causal="yes")
    with pytest.raises(TypeError, match="scale"):
        ss.attention(q, k, v, scale="big")
    with pytest.raises(TypeError, match="k"):
        ss.attention(q, None, v)
    out, pb = ss.vjp(ss.linear_attention, *la_problem()[0])
    with pytest.raises(ValueError, match="do"):
        pb((np.zeros((1, 1)), None))


sizes = st.integers(0, 5)


@settings(max_examples=40, deadline=None)
@given(B=sizes, NH=st.integers(1, 3), T=st.integers(0, 20), dk=st.integers(1, 4),
       dv=st.integers(1, 4), chunk=st.integers(1, 9), f32=st.booleans(), decay=st.booleans(),
       state=st.booleans(), causal=st.booleans(), Tk=st.integers(0, 20),
       seed=st.integers(0, 2**16))
def test_property_never_crashes_and_matches_reference(B, NH, T, dk, dv, chunk, f32, decay,
                                                      state, causal, Tk, seed):
    dtype = F32 if f32 else F64
    tol = 1e-4 if f32 else 1e-10
    (q, k, v), kw = la_problem(B, NH, T, dk, dv, decay=decay, state=state, dtype=dtype,
                               seed=seed)
    o, s = ss.linear_attention(q, k, v, chunk=chunk, **kw)
    g, S0 = la_operands(*(a.astype(F64) for a in (q, k, v)),
                        **{n: a.astype(F64) for n, a in kw.items()})
    o_ref, s_ref = lref.recurrence(q.astype(F64), k.astype(F64), v.astype(F64), g, S0)
    assert o.dtype == dtype
    assert_close(o, o_ref, dtype=dtype, tol=tol)
    assert_close(s, s_ref, dtype=dtype, tol=tol)

    args, kw = ssd_problem(B, T, NH, dv, dk, state=state, dtype=dtype, seed=seed)
    y, h = ss.ssd(*args, chunk=chunk, **kw)
    h0 = kw["state"] if state else np.zeros((B, NH, dv, dk), dtype)
    y_ref, h_ref = sref.ssd_recurrence(*(a.astype(F64) for a in args + (h0,)))
    assert_close(y, y_ref, dtype=dtype, tol=tol)
    assert_close(h, h_ref, dtype=dtype, tol=tol)

    q, k, v = att_problem(B, NH, T, Tk, dk, dv, dtype=dtype, seed=seed)
    o = ss.attention(q, k, v, causal=causal, chunk=chunk)
    assert_close(o, ref.softmax_attention(q.astype(F64), k.astype(F64), v.astype(F64), causal,
                                          1 / np.sqrt(dk)), dtype=dtype, tol=tol)


# ---- hardening (issue 13) ----------------------------------------------------------------------

def test_huge_scale_and_chunk(backend):
    q, k, v = att_problem()
    with pytest.raises(ValueError, match="scale"):
        ss.attention(q, k, v, scale=10 ** 400)
    with pytest.raises(ValueError, match="scale"):
        ss.attention(q, k, v, scale=float("nan"))
    assert np.array_equal(ss.attention(q, k, v, chunk=2 ** 63), ss.attention(q, k, v, chunk=13))


def test_long_chunk_does_not_overflow_offsets():
    """chunk >= 46342 made chunk*chunk overflow 32-bit offsets; blocks are capped and offsets
    are 64-bit."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, 50000, 2)) * 0.1 for _ in range(3))
    o, s = ss.linear_attention(q, k, v, decay=0.99, chunk=50000)
    o2, s2 = ss.linear_attention(q, k, v, decay=0.99, chunk=2048)
    assert np.array_equal(o, o2) and np.array_equal(s, s2)


def test_zero_width_keys_build_no_score_matrix(backend):
    """d = 0: every visible key scores 0 (a causal running mean of v), without a Tq x Tk
    mask (it would take 144 MB here)."""
    import tracemalloc
    T = 12000 if backend == "compiled" else 4000
    rng = np.random.default_rng(0)
    v = rng.standard_normal((1, 1, T, 1))
    q = k = np.zeros((1, 1, T, 0))
    tracemalloc.start()
    o = ss.attention(q, k, v, chunk=64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < (20e6 if backend == "compiled" else T * T)     # a bool mask: T * T bytes
    expected = np.cumsum(v[0, 0, :, 0]) / np.arange(1, T + 1)
    assert_close(o[0, 0, :, 0], expected, tol=1e-10)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_key_or_value_stays_causal(backend, bad):
    """A non-finite key or value at t = 5 reaches no output (and no gradient) before t = 5."""
    q, k, v = att_problem(B=1, NH=1, Tq=9, Tk=9)
    for which in (1, 2):
        args = [q, k.copy(), v.copy()]
        args[which][0, 0, 5, 0] = bad
        out, pb = ss.vjp(ss.attention, *args, chunk=4)
        assert np.isfinite(out[0, 0, :5]).all()
        dq, dk, dv = pb(np.ones_like(out))
        assert np.isfinite(dq[0, 0, :5]).all()
        assert np.isfinite(ref.softmax_attention(*args, True, 0.5)[0, 0, :5]).all()


def _nan_inf_pattern(arrays):
    return [(np.isnan(a), np.where(np.isinf(a), np.sign(a), 0)) for a in arrays]


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("chunk", [1, 4, None])
@pytest.mark.parametrize("causal", [True, False])
def test_non_finite_input_gradients_match_reference(bad, chunk, causal):
    """A non-finite q, k or v at t = 5: the compiled vjp has the reference's NaN/inf pattern,
    and (causal) a masked pair adds nothing: dq before t = 5 stays finite, and a non-finite
    query reaches no key's gradient after it (a key at s only affects queries t >= s)."""
    q, k, v = att_problem(B=1, NH=2, Tq=9, Tk=9, d=3, dv=2)
    for which in (0, 1, 2):
        args = [q.copy(), k.copy(), v.copy()]
        args[which][0, 1, 5, 0] = bad
        results = []
        for name in ("compiled", "python"):
            with using_backend(name), np.errstate(all="ignore"):
                out, pb = ss.vjp(ss.attention, *args, causal=causal, chunk=chunk)
                results.append([out, *pb(np.ones_like(out))])
        for a, b in zip(_nan_inf_pattern(results[0]), _nan_inf_pattern(results[1])):
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        o, dq, dk, dv = results[0]
        assert np.isfinite(o[0, 0]).all() and np.isfinite(dq[0, 0]).all()
        if causal:
            assert np.isfinite(dq[0, 1, :5]).all()
            if which == 0:
                assert np.isfinite(dk[0, 1, 6:]).all() and np.isfinite(dv[0, 1, 6:]).all()


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("which", [0, 1, 2, 3])
def test_single_non_finite_entry_anywhere_in_a_long_block(dtype, which):
    """The compiled kernels' finiteness checks (vectorised reductions over whole blocks of V,
    K, q or dO) see one inf or NaN wherever it stands -- a block's first, middle or last entry
    (its vector tail): the NaN/inf pattern of every output and gradient is the reference's."""
    rng = np.random.default_rng(3)
    T, d, dv, chunk = 70, 33, 19, 32
    base = [rand(rng, 1, 1, T, d, dtype=dtype, s=0.5), rand(rng, 1, 1, T, d, dtype=dtype, s=0.5),
            rand(rng, 1, 1, T, dv, dtype=dtype), rand(rng, 1, 1, T, dv, dtype=dtype)]
    width = base[which].shape[-1]
    for t, c, bad in [(0, 0, np.inf), (40, 7, np.nan), (chunk - 1, width - 1, -np.inf),
                      (2 * chunk - 1, width - 1, np.nan), (T - 1, width - 1, np.inf)]:
        args = [a.copy() for a in base]
        args[which][0, 0, t, c] = bad
        results = []
        for name in ("compiled", "python"):
            with using_backend(name), np.errstate(all="ignore"):
                out, pb = ss.vjp(ss.attention, *args[:3], causal=True, chunk=chunk)
                results.append([out, *pb(args[3])])
        for a, b in zip(_nan_inf_pattern(results[0]), _nan_inf_pattern(results[1])):
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), (t, c)
        assert not all(np.isfinite(r).all() for r in results[0]), (t, c)


def test_query_seeing_only_minus_inf_scores_has_zero_gradients():
    """A query whose every visible score is -inf outputs 0 with lse = -inf; its probabilities
    in the backward are 0 (not exp(-inf + inf) = NaN), on both backends."""
    q = np.array([np.inf, 0.5, -0.3]).reshape(1, 1, 3, 1)
    k = np.array([-1.0, 0.2, 0.7]).reshape(1, 1, 3, 1)
    v = np.array([1.0, 2.0, 3.0]).reshape(1, 1, 3, 1)
    for name in ("compiled", "python"):
        with using_backend(name), np.errstate(all="ignore"):
            out, pb = ss.vjp(ss.attention, q, k, v, chunk=1)
            dq, dk, dv = pb(np.ones_like(out))
        assert out[0, 0, 0, 0] == 0 and np.isfinite(out).all(), name
        # dv[key 0] = sum of its probabilities: 0 for query 0, softmax weights for 1 and 2
        p1 = 1 / (1 + np.exp(0.5 * (0.2 + 1.0)))
        p2 = 1 / (1 + np.exp(-0.3 * (0.2 + 1.0)) + np.exp(-0.3 * (0.7 + 1.0)))
        assert dv[0, 0, 0, 0] == pytest.approx(p1 + p2, rel=1e-12), name
        assert np.isfinite(dv).all() and np.isfinite(dk[0, 0, 1:]).all(), name
        assert np.isfinite(dq).all() and dq[0, 0, 0, 0] == 0, name


def test_compiled_kernels_carry_their_references_names():
    """Every kernel of the family's compiled modules has a numpy reference of the same name."""
    import importlib
    from statescan import _dispatch
    for family in ("attention", "linear_attention", "ssd"):
        ext = _dispatch.ext_module(family)
        reference = importlib.import_module(f"statescan._reference.{family}")
        kernels = [n for n in dir(ext) if not n.startswith("_") and callable(getattr(ext, n))]
        assert kernels
        for name in kernels:
            assert callable(getattr(reference, name, None)), f"{family}.{name}"
