"""ssd: Mamba-2's options (D, z, dt_bias, dt_softplus, grouped B/C) against the float64 step
loop, gradients vs finite differences, the decode step, variable lengths, reverse, resets."""
import numpy as np
import pytest

import statescan as ss
from statescan._reference import ssd as sref
from conftest import assert_close, using_backend

F64, F32 = np.float64, np.float32


def problem(Bt=2, T=9, NH=4, P=3, N=5, G=None, *, D=None, z=False, bias=False, sp=False,
            state=True, dtype=F64, seed=0):
    """Arguments (x, dt, A, B, C) and keywords of one ssd call; G=None gives B/C [Bt,T,N]."""
    rng = np.random.default_rng(seed)

    def r(*shape, s=1.0):
        return (s * rng.standard_normal(shape)).astype(dtype)

    x = r(Bt, T, NH, P)
    dt = (0.1 + rng.random((Bt, T, NH))).astype(dtype) if not sp else r(Bt, T, NH)
    A = -(0.2 + rng.random(NH)).astype(dtype)
    bc = (Bt, T, N) if G is None else (Bt, T, G, N)
    B, C = r(*bc, s=0.5), r(*bc, s=0.5)
    kw = {}
    if D == 1:
        kw["D"] = r(NH)
    elif D == 2:
        kw["D"] = r(NH, P)
    if z:
        kw["z"] = r(Bt, T, NH, P)
    if bias:
        kw["dt_bias"] = r(NH, s=0.3)
    if sp:
        kw["dt_softplus"] = True
    if state:
        kw["state"] = r(Bt, NH, P, N, s=0.5)
    return (x, dt, A, B, C), kw


def reference(args, kw, **extra):
    x = args[0]
    h0 = kw.get("state", np.zeros(x.shape[:1] + (x.shape[2], x.shape[3], args[3].shape[-1])))
    opts = {n: kw[n] for n in ("D", "z", "dt_bias", "dt_softplus") if n in kw}
    return sref.ssd_recurrence(*args, h0, **opts, **extra)


OPTIONS = [dict(), dict(D=1), dict(D=2), dict(z=True), dict(bias=True), dict(sp=True),
           dict(bias=True, sp=True), dict(G=1), dict(G=2), dict(G=4),
           dict(G=2, D=2, z=True, bias=True, sp=True)]


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_options_vs_step_loop(backend, opts, chunk):
    args, kw = problem(T=13, **opts)
    y, h = ss.ssd(*args, chunk=chunk, **kw)
    y_ref, h_ref = reference(args, kw)
    assert_close(y, y_ref, tol=1e-10)
    assert_close(h, h_ref, tol=1e-10)


def test_grouped_equals_per_head_b_c(backend):
    """Grouped B/C equal the ungrouped call run group by group on that group's heads."""
    args, kw = problem(T=10, NH=4, G=2, D=1, z=True)
    x, dt, A, B, C = args
    y, h = ss.ssd(*args, **kw)
    for g in range(2):
        hs = slice(2 * g, 2 * g + 2)
        yg, hg = ss.ssd(x[:, :, hs], dt[:, :, hs], A[hs], B[:, :, g], C[:, :, g],
                        D=kw["D"][hs], z=kw["z"][:, :, hs], state=kw["state"][:, hs])
        assert_close(y[:, :, hs], yg, tol=1e-12)
        assert_close(h[:, hs], hg, tol=1e-12)


def test_scalars_and_lists_broadcast(backend):
    args, kw = problem(T=6, NH=3)
    x, dt, A, B, C = args
    y1, _ = ss.ssd(x, dt, -0.5, B, C, D=0.3, dt_bias=[0.1, 0.1, 0.1])
    y2, _ = ss.ssd(x, dt, np.full(3, -0.5), B, C, D=np.full(3, 0.3), dt_bias=np.full(3, 0.1))
    assert np.array_equal(y1, y2)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("opts", [dict(), dict(G=2, D=2, z=True, bias=True, sp=True)])
def test_compiled_matches_reference(dtype, opts):
    tol = 1e-12 if dtype == F64 else 1e-5
    args, kw = problem(T=40, dtype=dtype, **opts)
    rng = np.random.default_rng(3)
    cot = (rng.standard_normal(args[0].shape).astype(dtype),
           rng.standard_normal(kw["state"].shape).astype(dtype))
    outs = {}
    for name in ("compiled", "python"):
        with using_backend(name):
            out, pb = ss.vjp(ss.ssd, *args, chunk=16, **kw)
            outs[name] = list(out) + list(pb(cot))
    for a, b in zip(outs["compiled"], outs["python"]):
        assert a.dtype == dtype
        assert_close(a, b, dtype=dtype, tol=tol)


# ---- gradients ---------------------------------------------------------------------------------

def numeric_grad(loss, value, eps=1e-6):
    grad = np.zeros_like(value)
    for i in np.ndindex(value.shape):
        vals = []
        for sgn in (1, -1):
            a = value.copy()
            a[i] += sgn * eps
            vals.append(loss(a))
        grad[i] = (vals[0] - vals[1]) / (2 * eps)
    return grad


def check_vjp(args, kw, extra=None, seed=6):
    """Gradients of every positional array and every given keyword array, in the pullback's
    order, against central finite differences."""
    extra = extra or {}
    rng = np.random.default_rng(seed)
    out, pullback = ss.vjp(ss.ssd, *args, **kw, **extra)
    cot = (rng.standard_normal(out[0].shape), rng.standard_normal(out[1].shape))
    grads = pullback(cot)
    names = [n for n in ("D", "z", "dt_bias", "state") if n in kw]
    arrays = list(args) + [kw[n] for n in names]
    assert len(grads) == len(arrays)

    def loss_at(i):
        def loss(a):
            new_args = list(args)
            new_kw = dict(kw)
            if i < len(args):
                new_args[i] = a
            else:
                new_kw[names[i - len(args)]] = a
            y, h = ss.ssd(*new_args, **new_kw, **extra)
            return np.sum(y * cot[0]) + np.sum(h * cot[1])
        return loss

    for i, (g, a) in enumerate(zip(grads, arrays)):
        assert g.shape == np.shape(a)
        assert_close(g, numeric_grad(loss_at(i), a), tol=1e-6, what=f"gradient {i}")
    return grads


@pytest.mark.parametrize("opts", [dict(D=1, z=True, bias=True, sp=True),
                                  dict(G=2, D=2, z=True, bias=True, sp=True), dict(G=1)])
def test_vjp_options(backend, opts):
    args, kw = problem(Bt=2, T=6, NH=2, P=2, N=3, **opts)
    check_vjp(args, dict(kw, chunk=4))


# ---- decoding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("opts", [dict(), dict(G=2, D=2, z=True, bias=True, sp=True),
                                  dict(D=1),
                                  # blocks of 8 (float) / 4 (double) state rows, then single rows
                                  dict(P=19, N=24, D=2, z=True), dict(P=8, N=16, G=2)])
def test_decode_steps_equal_prefill(backend, dtype, opts):
    args, kw = problem(T=7, dtype=dtype, **opts)
    y, h = ss.ssd(*args, **kw)
    x, dt, A, B, C = args
    state = kw["state"].copy()
    step_kw = {n: v for n, v in kw.items() if n != "state"}
    for t in range(7):
        if "z" in kw:
            step_kw["z"] = np.ascontiguousarray(kw["z"][:, t:t + 1])
        token = [np.ascontiguousarray(a[:, t:t + 1]) for a in (x, dt, B, C)]   # fast path
        yt, new = ss.ssd(token[0], token[1], A, token[2], token[3], state=state,
                         out_state=state, **step_kw)
        assert new is state                       # updated in place
        assert_close(yt[:, 0], y[:, t], dtype=dtype, tol=1e-12 if dtype == F64 else 1e-5)
    assert_close(state, h, dtype=dtype, tol=1e-12 if dtype == F64 else 1e-5)


def test_decode_out_state_and_inputs_untouched():
    args, kw = problem(T=1, G=2, D=2, z=True)
    state = kw["state"]
    before = state.copy()
    y, h = ss.ssd(*args, **kw)
    assert np.array_equal(state, before) and h is not state
    out = np.empty_like(state)
    y2, h2 = ss.ssd(*args, **kw, out_state=out)
    assert h2 is out and np.array_equal(h2, h) and np.array_equal(y2, y)
    with using_backend("python"):
        y3, h3 = ss.ssd(*args, **kw)
    assert_close(y3, y, tol=1e-12)
    assert_close(h3, h, tol=1e-12)


def test_out_state_checked():
    args, kw = problem(T=3)
    with pytest.raises(ValueError, match="out_state must have shape"):
        ss.ssd(*args, **kw, out_state=np.empty((1, 2)))
    with pytest.raises(TypeError, match="out_state"):
        ss.ssd(*args, **kw, out_state=kw["state"].astype(F32))
    out = np.empty_like(kw["state"])
    y, h = ss.ssd(*args, **kw, out_state=out)          # prefill: the final state copied in
    assert h is out and np.array_equal(h, ss.ssd(*args, **kw)[1])


# ---- variable lengths, reverse, resets ---------------------------------------------------------

FULL = dict(G=2, D=2, z=True, bias=True, sp=True)


@pytest.mark.parametrize("chunk", [3, 64])
def test_lengths_equal_rows_alone(backend, chunk):
    args, kw = problem(Bt=3, T=10, **FULL)
    lengths = [10, 4, 0]
    y, h = ss.ssd(*args, chunk=chunk, lengths=lengths, **kw)
    for b, n in enumerate(lengths):
        row = [a[b:b + 1, :n] for a in (args[0], args[1])] + [args[2]] + \
              [a[b:b + 1, :n] for a in (args[3], args[4])]
        row_kw = dict(kw, z=kw["z"][b:b + 1, :n], state=kw["state"][b:b + 1])
        yb, hb = ss.ssd(*row, chunk=chunk, **row_kw)
        assert_close(y[b:b + 1, :n], yb, tol=1e-12)
        assert_close(h[b:b + 1], hb, tol=1e-12)
        assert np.all(y[b, n:] == 0)
    y_ref, h_ref = reference(args, kw, lengths=np.array(lengths))
    assert_close(y, y_ref, tol=1e-10)
    assert_close(h, h_ref, tol=1e-10)


def test_lengths_T_is_bit_identical(backend):
    args, kw = problem(T=9, **FULL)
    plain = ss.ssd(*args, **kw)
    for a, b in zip(plain, ss.ssd(*args, lengths=[9, 9], **kw)):
        assert np.array_equal(a, b)


def test_reverse_equals_flipped_prefix(backend):
    args, kw = problem(Bt=2, T=8, **FULL)
    lengths = [8, 5]
    y, h = ss.ssd(*args, lengths=lengths, reverse=True, chunk=3, **kw)
    for b, n in enumerate(lengths):
        def flip(a):
            return a[b:b + 1, :n][:, ::-1]
        yb, hb = ss.ssd(flip(args[0]), flip(args[1]), args[2], flip(args[3]), flip(args[4]),
                        **dict(kw, z=flip(kw["z"]), state=kw["state"][b:b + 1]))
        assert_close(y[b:b + 1, :n], yb[:, ::-1], tol=1e-12)
        assert_close(h[b:b + 1], hb, tol=1e-12)
        assert np.all(y[b, n:] == 0)
    y_ref, h_ref = reference(args, kw, lengths=np.array(lengths), reverse=True)
    assert_close(y, y_ref, tol=1e-10)


@pytest.mark.parametrize("chunk", [2, 4, 64])
def test_reset_equals_separate_sequences(backend, chunk):
    """A row packing sequences [0, 3), [3, 7), [7, 11): resets inside and across blocks."""
    args, kw = problem(Bt=1, T=11, **FULL)
    reset = np.zeros((1, 11), bool)
    reset[0, [3, 7]] = True
    y, h = ss.ssd(*args, reset=reset, chunk=chunk, **kw)
    x, dt, A, B, C = args
    zero = np.zeros_like(kw["state"])
    for i, (t0, t1) in enumerate([(0, 3), (3, 7), (7, 11)]):
        part = dict(kw, z=kw["z"][:, t0:t1], state=kw["state"] if i == 0 else zero)
        yp, hp = ss.ssd(x[:, t0:t1], dt[:, t0:t1], A, B[:, t0:t1], C[:, t0:t1], **part)
        assert_close(y[:, t0:t1], yp, tol=1e-12)
    assert_close(h, hp, tol=1e-12)
    y_ref, _ = reference(args, kw, reset=reset)
    assert_close(y, y_ref, tol=1e-10)


def test_reset_ignores_non_finite_history(backend):
    """A reset zeroes the state exactly: a NaN before it does not reach later steps."""
    args, kw = problem(Bt=1, T=8)
    args[0][0, 1] = np.nan
    reset = np.zeros((1, 8), bool)
    reset[0, 4] = True
    y, h = ss.ssd(*args, reset=reset, chunk=8, **kw)
    assert np.isnan(y[0, 1:4]).all() and not np.isnan(y[0, 4:]).any() and not np.isnan(h).any()


@pytest.mark.parametrize("extra", [dict(lengths=[5, 3]), dict(lengths=[5, 2], reverse=True),
                                   dict(reset=[[0, 0, 1, 0, 0], [1, 0, 0, 1, 0]]),
                                   dict(lengths=[5, 4], reset=[[0, 0, 0, 1, 0],
                                                               [0, 1, 0, 0, 0]],
                                        reverse=True)])
def test_vjp_lengths_reverse_reset(backend, extra):
    args, kw = problem(Bt=2, T=5, NH=2, P=2, N=2, G=2, D=2, z=True, bias=True, sp=True)
    if "reset" in extra:
        extra = dict(extra, reset=np.array(extra["reset"], bool))
    grads = check_vjp(args, dict(kw, chunk=2), extra)
    if "lengths" in extra:
        for b, n in enumerate(extra["lengths"]):
            for g in grads[:2] + grads[3:5] + (grads[6],):   # dx, ddt, dB, dC, dz
                assert np.all(g[b, n:] == 0)


def test_padded_inputs_may_hold_nan(backend):
    args, kw = problem(Bt=2, T=6, **FULL)
    lengths = [6, 3]
    clean = ss.ssd(*args, lengths=lengths, **kw)
    dirty = [a.copy() for a in args]
    for i in (0, 1, 3, 4):
        dirty[i][1, 3:] = np.nan
    z = kw["z"].copy()
    z[1, 3:] = np.nan
    out, pb = ss.vjp(ss.ssd, *dirty, lengths=lengths, **dict(kw, z=z))
    for a, b in zip(out, clean):
        assert np.array_equal(a, b)
    grads = pb((np.ones_like(out[0]), None))
    assert all(not np.isnan(g).any() for g in grads)


@pytest.mark.parametrize("chunk", [1, 2, 64])
def test_overflowing_decay_matches_step_loop_nan_pattern(chunk):
    """exp(dt A) = inf times a state of mixed signs: the step loop gives NaN where h C sums
    +inf and -inf and +-inf elsewhere; the compiled kernel and the chunked reference apply the
    decay before the sum too (finite inputs keep their bits), forward and vjp alike."""
    x = np.array([0.5, -0.25, 1.0, 2.0]).reshape(1, 2, 1, 2)
    dt = np.array([1000.0, 0.5]).reshape(1, 2, 1)
    A = np.array([1.0])
    B = np.array([0.3, 0.2, -0.1, 0.4]).reshape(1, 2, 2)
    C = np.array([1.0, 0.5, 0.7, -0.2]).reshape(1, 2, 2)
    state = np.array([1.0, -1.0, 1.0, 1.0]).reshape(1, 1, 2, 2)     # [P, N] rows
    with np.errstate(all="ignore"):
        expected, _ = sref.ssd_recurrence(x, dt, A, B, C, state)
    assert np.isnan(expected[0, 0, 0, 0]) and np.isinf(expected[0, 0, 0, 1])
    results = []
    for name in ("compiled", "python"):
        with using_backend(name), np.errstate(all="ignore"):
            (y, h), pb = ss.vjp(ss.ssd, x, dt, A, B, C, state=state, chunk=chunk)
            grads = pb((np.ones_like(y), None))
        assert np.array_equal(np.isnan(y), np.isnan(expected)), name
        assert np.array_equal(y[np.isinf(y)], expected[np.isinf(expected)]), name
        results.append([y, h, *grads])
    for a, b in zip(*results):
        assert np.array_equal(np.isnan(a), np.isnan(b))
        assert np.array_equal(np.where(np.isinf(a), a, 0), np.where(np.isinf(b), b, 0))


def test_bad_input_names_the_argument():
    args, kw = problem(T=5, NH=4, G=2)
    x, dt, A, B, C = args
    with pytest.raises(ValueError, match="G"):
        ss.ssd(x, dt, A, B[:, :, :1].repeat(3, axis=2), C[:, :, :1].repeat(3, axis=2))
    with pytest.raises(ValueError, match="C must have shape"):
        ss.ssd(x, dt, A, B, C[:, :, :1])
    with pytest.raises(ValueError, match="D must have shape"):
        ss.ssd(x, dt, A, B, C, D=np.ones((4, 7)))
    with pytest.raises(ValueError, match="z must have shape"):
        ss.ssd(x, dt, A, B, C, z=x[:, :2])
    with pytest.raises(ValueError, match="dt_bias must"):
        ss.ssd(x, dt, A, B, C, dt_bias=np.ones(3))
    with pytest.raises(TypeError, match="dt_softplus"):
        ss.ssd(x, dt, A, B, C, dt_softplus=1)
    with pytest.raises(ValueError, match="lengths"):
        ss.ssd(x, dt, A, B, C, lengths=[1, 2, 3])
    with pytest.raises(ValueError, match="lengths"):
        ss.ssd(x, dt, A, B, C, lengths=[1, 6])
    with pytest.raises(TypeError, match="lengths"):
        ss.ssd(x, dt, A, B, C, lengths=[1.5, 2])
    with pytest.raises(ValueError, match="reset"):
        ss.ssd(x, dt, A, B, C, reset=np.zeros((2, 4), bool))
    with pytest.raises(TypeError, match="reverse"):
        ss.ssd(x, dt, A, B, C, reverse="yes")
    with pytest.raises(TypeError, match="chunk"):
        ss.ssd(x, dt, A, B, C, chunk=2.0)


def test_thread_count_does_not_change_results_with_lengths_and_resets():
    from conftest import using_threads
    args, kw = problem(Bt=3, T=20, dtype=F32, **FULL)
    reset = np.zeros((3, 20), bool)
    reset[:, [5, 13]] = True
    extra = dict(lengths=[20, 11, 3], reset=reset, chunk=4)
    results = []
    for n in (1, 2):
        with using_threads(n):
            out, pb = ss.vjp(ss.ssd, *args, **kw, **extra)
            results.append(list(out) + list(pb((np.ones_like(out[0]), None))))
    for a, b in zip(*results):
        assert np.array_equal(a, b)


# ---- heads wider than the micro-kernel's 32-column panels ----------------------------------------

@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("chunk", [64, 33])
def test_wide_heads_vs_float64(dtype, chunk):
    """The compiled forward and vjp on heads wider than a 32-column panel of the micro-kernel
    (AVX-512 builds; BLAS elsewhere) with a partial last one (P=40, N=72), blocks of many rows
    and a partial last block (T=150), against the python backend in float64 (the other tests
    use P, N <= 24 and T <= 13)."""
    args, kw = problem(Bt=2, T=150, NH=2, P=40, N=72, G=1, D=2, z=True, bias=True, sp=True,
                       dtype=dtype)
    rng = np.random.default_rng(3)
    cot = (rng.standard_normal(args[0].shape).astype(dtype),
           rng.standard_normal(kw["state"].shape).astype(dtype))
    tol = 1e-11 if dtype == F64 else 2e-5

    def run(a, k, c):
        out, pb = ss.vjp(ss.ssd, *a, chunk=chunk, **k)
        return out, pb(c)

    out, grads = run(args, kw, cot)
    wide = lambda a: a.astype(F64) if isinstance(a, np.ndarray) and a.dtype == dtype else a
    with using_backend("python"):
        out_ref, grads_ref = run([wide(a) for a in args], {n: wide(a) for n, a in kw.items()},
                                 tuple(wide(c) for c in cot))
    for name, a, e in zip(("y", "state"), out, out_ref):
        assert_close(a, e, dtype=dtype, tol=tol, what=name)
    for i, (g, e) in enumerate(zip(grads, grads_ref)):
        assert_close(g, e, dtype=dtype, tol=tol, what=f"gradient {i}")


@pytest.mark.parametrize("dtype", [F32, F64])
def test_block_products_either_way(dtype):
    """ssd's block products on the micro-kernel or through scipy's BLAS (the choice statescan
    makes from the BLAS's kernels when it loads): both against the step loop, forward and
    gradients, on shapes with a partial panel (P = 40) and several blocks; the setting is
    restored after."""
    from statescan import _blas, _dispatch
    if not _dispatch.compiled_available():
        pytest.skip("the compiled backend is not built")
    ext = _dispatch.ext_module("ssd")
    chosen = ext._use_microkernel_gemm(not _blas.avx512_kernels())
    args, kw = problem(Bt=2, T=70, NH=3, P=40, N=36, D=1, dtype=dtype, seed=5)
    y_ref, h_ref = reference(args, kw)
    tol = 1e-4 if dtype == F32 else 1e-10
    outputs = []
    try:
        for on in (True, False):
            ext._use_microkernel_gemm(on)
            y, h = ss.ssd(*args, chunk=16, **kw)
            assert_close(y, y_ref, tol=tol)
            assert_close(h, h_ref, tol=tol)
            (y2, h2), pullback = ss.vjp(ss.ssd, *args, chunk=16, **kw)
            outputs.append(pullback((np.ones_like(y2), np.ones_like(h2))))
    finally:
        ext._use_microkernel_gemm(chosen)
    for a, b in zip(outputs[0], outputs[1]):
        assert_close(a, b, tol=tol)
