"""linear_scan and selective_scan: the numpy reference against independent element loops,
the compiled kernels against the reference (forward and vjp), streaming in chunks, thread-count
independence, gradients against finite differences, and argument checking."""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import statescan as ss
from conftest import assert_all_close, assert_all_equal, assert_close, using_backend, using_threads

DTYPES = (np.float64, np.float32)
TOL = {np.float64: 1e-12, np.float32: 1e-5}
KW_ORDER = ("z", "dt_bias", "state")


# ---- problems --------------------------------------------------------------------------------

def linear_problem(B=2, T=5, D=7, dtype=np.float64, h0=True, seed=0):
    """(a, b, state or None) of a random linear_scan call."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1.1, 1.1, (B, T, D)).astype(dtype)
    b = rng.standard_normal((B, T, D)).astype(dtype)
    h = rng.standard_normal((B, D)).astype(dtype) if h0 else None
    return a, b, h


def selective_problem(Bt=2, T=5, Dm=7, N=3, dtype=np.float64, *, D=True, z=False,
                      dt_bias=False, softplus=False, state=False, seed=0):
    """(args, kwargs) of a random selective_scan call; dt > 0 unless softplus is used."""
    rng = np.random.default_rng(seed)

    def rand(*shape, s=1.0):
        return (s * rng.standard_normal(shape)).astype(dtype)

    dt = rand(Bt, T, Dm, s=0.7) if softplus else rng.uniform(0.05, 0.6, (Bt, T, Dm)).astype(dtype)
    args = (rand(Bt, T, Dm), dt, -np.exp(rand(Dm, N, s=0.5)), rand(Bt, T, N), rand(Bt, T, N),
            rand(Dm) if D else None)
    kw = {"dt_softplus": softplus}
    if z:
        kw["z"] = rand(Bt, T, Dm)
    if dt_bias:
        kw["dt_bias"] = rand(Dm, s=0.3)
    if state:
        kw["state"] = rand(Bt, Dm, N)
    return args, kw


def naive_selective(x, dt, A, B, C, D=None, *, z=None, dt_bias=None, dt_softplus=False,
                    state=None):
    """Element-by-element loops straight from the definition (independent of the package)."""
    Bt, T, Dm = x.shape
    N = A.shape[1]
    h = np.zeros((Bt, Dm, N)) if state is None else np.array(state, dtype=np.float64)
    y = np.zeros((Bt, T, Dm))
    for b in range(Bt):
        for t in range(T):
            for d in range(Dm):
                delta = dt[b, t, d] + (0.0 if dt_bias is None else dt_bias[d])
                if dt_softplus:
                    delta = math.log1p(math.exp(delta))
                acc = 0.0 if D is None else D[d] * x[b, t, d]
                for n in range(N):
                    h[b, d, n] = (math.exp(delta * A[d, n]) * h[b, d, n]
                                  + delta * B[b, t, n] * x[b, t, d])
                    acc += C[b, t, n] * h[b, d, n]
                if z is not None:
                    acc *= z[b, t, d] / (1 + math.exp(-z[b, t, d]))
                y[b, t, d] = acc
    return y, h


def naive_linear(a, b, h0=None):
    B, T, D = b.shape
    h = np.zeros((B, T, D))
    for i in range(B):
        for d in range(D):
            prev = 0.0 if h0 is None else h0[i, d]
            for t in range(T):
                prev = a[i, t, d] * prev + b[i, t, d]
                h[i, t, d] = prev
    return h


def strided(a):
    """A non-contiguous view with the values of `a` (every other element of the last axis)."""
    if a is None:
        return None
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1] + 1,), a.dtype)
    big[..., 1::2] = a
    return big[..., 1::2]


OPTIONS = {
    "plain": {},
    "noD": dict(D=False),
    "state": dict(state=True),
    "z": dict(z=True),
    "bias_softplus": dict(dt_bias=True, softplus=True),
    "all": dict(z=True, dt_bias=True, softplus=True, state=True),
}
SHAPES = {
    "T1": dict(Bt=1, T=1, Dm=5, N=2),
    "odd": dict(Bt=3, T=7, Dm=19, N=5),
    "two_blocks": dict(Bt=2, T=4, Dm=32, N=16),
    "block_tail": dict(Bt=2, T=6, Dm=37, N=4),
    "Dm1_N1": dict(Bt=2, T=5, Dm=1, N=1),
    "wide": dict(Bt=1, T=3, Dm=70, N=17),
}


# ---- 1. definitions --------------------------------------------------------------------------

@pytest.mark.parametrize("opt", sorted(OPTIONS))
def test_selective_reference_matches_element_loops(opt):
    args, kw = selective_problem(Bt=2, T=4, Dm=3, N=3, **OPTIONS[opt])
    with using_backend("python"):
        y, state = ss.selective_scan(*args, **kw)
    y_n, state_n = naive_selective(*args, **kw)
    assert_close(y, y_n, tol=1e-10, what="y")
    assert_close(state, state_n, tol=1e-10, what="state")


@pytest.mark.parametrize("h0", [False, True])
def test_linear_reference_matches_element_loops(h0):
    a, b, h = linear_problem(B=2, T=6, D=3, h0=h0)
    with using_backend("python"):
        out = ss.linear_scan(a, b, h)
    assert_close(out, naive_linear(a, b, h), tol=1e-10)


def test_compiled_backend_available():
    assert ss.backend() == "compiled", "statescan._ext.scan must be built for these tests"


# ---- compiled vs reference -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("opt", sorted(OPTIONS))
def test_selective_compiled_matches_reference(opt, shape, dtype):
    args, kw = selective_problem(dtype=dtype, **SHAPES[shape], **OPTIONS[opt])
    with using_backend("python"):
        expected = ss.selective_scan(*args, **kw)
    out = ss.selective_scan(*args, **kw)
    assert all(o.dtype == dtype for o in out)
    assert_all_close(out, expected, tol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [(1, 1, 1), (3, 7, 5), (2, 9, 600), (4, 3, 1030)])
@pytest.mark.parametrize("h0", [False, True])
def test_linear_compiled_matches_reference(size, dtype, h0):
    a, b, h = linear_problem(*size, dtype=dtype, h0=h0)
    with using_backend("python"):
        expected = ss.linear_scan(a, b, h)
    out = ss.linear_scan(a, b, h)
    assert out.dtype == dtype
    assert_close(out, expected, tol=TOL[dtype])


@pytest.mark.parametrize("backend_name", ["compiled", "python"])
@pytest.mark.parametrize("size", [dict(Bt=0, T=4, Dm=5, N=3), dict(Bt=2, T=0, Dm=5, N=3),
                                  dict(Bt=0, T=0, Dm=2, N=2), dict(Bt=2, T=3, Dm=0, N=2),
                                  dict(Bt=2, T=3, Dm=4, N=0)])
def test_selective_empty(size, backend_name):
    args, kw = selective_problem(**size, z=True, dt_bias=True, state=True)
    with using_backend(backend_name):
        y, state = ss.selective_scan(*args, **kw)
        assert y.shape == args[0].shape and state.shape == kw["state"].shape
        if size["T"] == 0:
            assert_close(state, kw["state"])
        if size["N"] == 0 and size["Bt"] > 0:
            x, D, z = args[0], args[5], kw["z"]
            assert_close(y, D * x * z / (1 + np.exp(-z)))
        out, pb = ss.vjp(ss.selective_scan, *args, **kw)
        grads = pb((np.ones_like(y), np.ones_like(state)))
        assert [g.shape for g in grads] == [a.shape for a in args] + [
            kw[k].shape for k in KW_ORDER]


@pytest.mark.parametrize("backend_name", ["compiled", "python"])
@pytest.mark.parametrize("size", [(0, 4, 5), (2, 0, 5), (2, 3, 0)])
def test_linear_empty(size, backend_name):
    a, b, h = linear_problem(*size)
    with using_backend(backend_name):
        out = ss.linear_scan(a, b, h)
        assert out.shape == b.shape
        _, pb = ss.vjp(ss.linear_scan, a, b, h)
        da, db, dh0 = pb(np.ones_like(out))
        assert da.shape == a.shape and db.shape == b.shape
        if size[1] == 0:
            assert_close(dh0, np.zeros_like(h))


@pytest.mark.parametrize("dtype", DTYPES)
def test_noncontiguous_inputs(dtype):
    args, kw = selective_problem(Bt=2, T=5, Dm=21, N=4, dtype=dtype, z=True, dt_bias=True,
                                 softplus=True, state=True)
    expected = ss.selective_scan(*args, **kw)
    out = ss.selective_scan(*(strided(a) for a in args),
                            **{k: (strided(v) if isinstance(v, np.ndarray) else v)
                               for k, v in kw.items()})
    assert_all_equal(out, expected)
    a, b, h = linear_problem(B=2, T=4, D=9, dtype=dtype)
    assert_all_equal((ss.linear_scan(strided(a), strided(b), strided(h)),),
                     (ss.linear_scan(a, b, h),))


@pytest.mark.parametrize("backend_name", ["compiled", "python"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_selective_streaming_in_chunks(dtype, backend_name):
    args, kw = selective_problem(Bt=2, T=11, Dm=18, N=5, dtype=dtype, z=True, dt_bias=True,
                                 softplus=True, state=True)
    with using_backend(backend_name):
        y, state = ss.selective_scan(*args, **kw)
        cut = 4
        seq = lambda a, s: a[:, s] if a is not None and a.ndim == 3 else a   # noqa: E731
        kw1 = {k: seq(v, slice(0, cut)) if k == "z" else v for k, v in kw.items()}
        y1, s1 = ss.selective_scan(*(seq(a, slice(0, cut)) for a in args[:2]), args[2],
                                   *(seq(a, slice(0, cut)) for a in args[3:5]), args[5], **kw1)
        kw2 = dict(kw1, state=s1, z=kw["z"][:, cut:])
        y2, s2 = ss.selective_scan(*(seq(a, slice(cut, None)) for a in args[:2]), args[2],
                                   *(seq(a, slice(cut, None)) for a in args[3:5]), args[5], **kw2)
    assert_close(np.concatenate([y1, y2], axis=1), y, tol=TOL[dtype])
    assert_close(s2, state, tol=TOL[dtype])


@pytest.mark.parametrize("backend_name", ["compiled", "python"])
def test_linear_streaming_in_chunks(backend_name):
    a, b, h = linear_problem(B=3, T=9, D=13)
    with using_backend(backend_name):
        full = ss.linear_scan(a, b, h)
        first = ss.linear_scan(a[:, :5], b[:, :5], h)
        second = ss.linear_scan(a[:, 5:], b[:, 5:], first[:, -1])
    assert_close(np.concatenate([first, second], axis=1), full)


def test_results_do_not_depend_on_thread_count():
    args, kw = selective_problem(Bt=3, T=9, Dm=45, N=6, z=True, dt_bias=True, softplus=True,
                                 state=True)
    a, b, h = linear_problem(B=3, T=6, D=1100)
    runs = []
    for threads in (1, 2, 3):
        with using_threads(threads):
            out, pb = ss.vjp(ss.selective_scan, *args, **kw)
            grads = pb((np.cos(out[0]), np.sin(out[1])))
            hl, pbl = ss.vjp(ss.linear_scan, a, b, h)
            runs.append(out + grads + (hl,) + pbl(np.cos(hl)))
    for other in runs[1:]:
        assert_all_equal(other, runs[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_nan_out(dtype):
    args, kw = selective_problem(Bt=2, T=4, Dm=17, N=3, dtype=dtype, softplus=True)
    x = args[0].copy()
    x[1, 2, 5] = np.nan
    y, state = ss.selective_scan(x, *args[1:], **kw)
    assert np.isnan(y[1, 2:, 5]).all() and np.isnan(state[1, 5]).all()
    assert not np.isnan(y[0]).any() and not np.isnan(np.delete(y[1], 5, axis=1)).any()
    a, b, _ = linear_problem(B=1, T=4, D=3, dtype=dtype)
    b[0, 1, 2] = np.nan
    h = ss.linear_scan(a, b)
    assert np.isnan(h[0, 1:, 2]).all() and not np.isnan(h[0, :, :2]).any()


def test_large_arguments_saturate_like_the_reference():
    """exp over/underflow inside the kernel: decays of 0 and huge dt, like numpy."""
    args, kw = selective_problem(Bt=1, T=6, Dm=20, N=3, softplus=True)
    dt = args[1].copy()
    dt[0, 1, :5] = 200.0          # softplus(200) = 200: exp(200*A) underflows to 0
    dt[0, 2, 5:8] = -200.0        # softplus -> ~1e-87: no decay, no input
    A = args[2].copy()
    A[3] = -1e3
    new = (args[0], dt, A) + args[3:]
    with using_backend("python"):
        expected = ss.selective_scan(*new, **kw)
    assert_all_close(ss.selective_scan(*new, **kw), expected, tol=1e-12)


def _kernel_exp(v, dtype):
    """exp(v) as the compiled selective scan computes it: the state after one step from
    state 1 with dt = 1, A = v and no input."""
    v = np.asarray(v, dtype).ravel()
    n = v.size
    x, dt = np.zeros((1, 1, n), dtype), np.ones((1, 1, n), dtype)
    B, C = np.zeros((1, 1, 1), dtype), np.zeros((1, 1, 1), dtype)
    return ss.selective_scan(x, dt, v.reshape(n, 1), B, C, state=np.ones((1, n, 1), dtype))[1]


@pytest.mark.parametrize("dtype,lo,hi,ulps", [(np.float32, -86.9, 88.72, 2),
                                               (np.float64, -708.0, 709.78, 3)])
def test_kernel_exp_accuracy(dtype, lo, hi, ulps):
    v = np.concatenate([np.linspace(lo, hi, 20001), np.linspace(-1, 1, 2001)]).astype(dtype)
    got = _kernel_exp(v, dtype).ravel().astype(np.float64)
    rel = np.abs(got / np.exp(v.astype(np.float64)) - 1)
    assert rel.max() <= ulps * np.finfo(dtype).eps / 2
    edge = _kernel_exp([-1e30, -1e3, 1e3, 1e30, np.nan, -np.inf, np.inf], dtype).ravel()
    assert np.array_equal(edge, [0, 0, np.inf, np.inf, np.nan, 0, np.inf], equal_nan=True)


# ---- 2. gradients ----------------------------------------------------------------------------

def _directional_check(fn, args, kw, positional, grads, names, cot, rel=1e-6, eps=1e-6):
    """Per input: <grad, v> against the central difference of <cot, fn(...)> along a random
    direction v.  `positional` names fn's positional parameters in order."""
    rng = np.random.default_rng(3)

    def objective(name, value):
        if name in positional:
            i = positional.index(name)
            out = fn(*args[:i], value, *args[i + 1:], **kw)
        else:
            out = fn(*args, **dict(kw, **{name: value}))
        out = out if isinstance(out, tuple) else (out,)
        return sum(float(np.sum(c * o)) for c, o in zip(cot, out))

    for name, grad in zip(names, grads):
        base = args[positional.index(name)] if name in positional else kw[name]
        assert grad.shape == base.shape, name
        v = rng.standard_normal(base.shape)
        fd = (objective(name, base + eps * v) - objective(name, base - eps * v)) / (2 * eps)
        exact = float(np.sum(grad * v))
        assert abs(fd - exact) <= rel * max(1.0, abs(exact)), (
            f"d/d{name}: finite difference {fd:.10g} vs vjp {exact:.10g}")


@pytest.mark.parametrize("backend_name", ["compiled", "python"])
@pytest.mark.parametrize("opt", sorted(OPTIONS))
def test_selective_vjp_matches_finite_differences(opt, backend_name):
    args, kw = selective_problem(Bt=2, T=5, Dm=18, N=3, **OPTIONS[opt])
    with using_backend(backend_name):
        (y, state), pb = ss.vjp(ss.selective_scan, *args, **kw)
        rng = np.random.default_rng(5)
        cot = (rng.standard_normal(y.shape), rng.standard_normal(state.shape))
        grads = pb(cot)
        names = ["x", "dt", "A", "B", "C"] + (["D"] if args[5] is not None else [])
        names += [k for k in KW_ORDER if k in kw]
        assert len(grads) == len(names)
        _directional_check(ss.selective_scan, args, kw, ("x", "dt", "A", "B", "C", "D"),
                           grads, names, cot)


@pytest.mark.parametrize("backend_name", ["compiled", "python"])
@pytest.mark.parametrize("h0", [False, True])
def test_linear_vjp_matches_finite_differences(h0, backend_name):
    a, b, h = linear_problem(B=2, T=6, D=5, h0=h0)
    args = (a, b, h) if h0 else (a, b)
    with using_backend(backend_name):
        out, pb = ss.vjp(ss.linear_scan, *args)
        cot = (np.random.default_rng(2).standard_normal(out.shape),)
        grads = pb(cot[0])
        assert len(grads) == len(args)
        _directional_check(ss.linear_scan, args, {}, ("a", "b", "state"), grads,
                           ("a", "b", "state")[:len(args)], cot)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt", ["plain", "all", "z"])
@pytest.mark.parametrize("T", [1, 50, 70])
def test_selective_vjp_compiled_matches_reference(T, opt, dtype):
    """T=50, 70: several recomputed checkpoint chunks in the compiled backward."""
    args, kw = selective_problem(Bt=2, T=T, Dm=37, N=5, dtype=dtype, **OPTIONS[opt])
    rng = np.random.default_rng(7)
    results = {}
    for name in ("compiled", "python"):
        with using_backend(name):
            out, pb = ss.vjp(ss.selective_scan, *args, **kw)
            assert_all_equal(out, ss.selective_scan(*args, **kw))
            cot = (rng.standard_normal(out[0].shape).astype(dtype), None)
            results[name] = pb(cot)
            rng = np.random.default_rng(7)
    tol = 1e-11 if dtype == np.float64 else 2e-4
    assert_all_close(results["compiled"], results["python"], tol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_vjp_compiled_matches_reference(dtype):
    a, b, h = linear_problem(B=3, T=8, D=600, dtype=dtype)
    cot = np.random.default_rng(1).standard_normal(b.shape).astype(dtype)
    results = {}
    for name in ("compiled", "python"):
        with using_backend(name):
            out, pb = ss.vjp(ss.linear_scan, a, b, h)
            assert_all_equal((out,), (ss.linear_scan(a, b, h),))
            results[name] = pb(cot)
    assert_all_close(results["compiled"], results["python"], tol=TOL[dtype])


def test_cotangent_none_means_zero():
    args, kw = selective_problem(state=True)
    out, pb = ss.vjp(ss.selective_scan, *args, **kw)
    zero = pb((None, None))
    assert all(not np.any(g) for g in zero)
    dy_only = pb((np.ones_like(out[0]), None))
    both = pb((np.ones_like(out[0]), np.zeros_like(out[1])))
    assert_all_equal(dy_only, both)


# ---- 3. argument checking --------------------------------------------------------------------

def _call_selective(**changes):
    args, kw = selective_problem(Bt=2, T=3, Dm=4, N=5, z=True, dt_bias=True, state=True)
    names = ("x", "dt", "A", "B", "C", "D")
    a = dict(zip(names, args))
    a.update({k: v for k, v in changes.items() if k in names})
    kw.update({k: v for k, v in changes.items() if k not in names})
    return ss.selective_scan(*(a[n] for n in names), **kw)


@pytest.mark.parametrize("name,shape", [
    ("x", (2, 3)), ("dt", (2, 3, 5)), ("A", (4,)), ("A", (5, 5)), ("B", (2, 3, 4)),
    ("C", (2, 4, 5)), ("D", (5,)), ("z", (2, 3, 3)), ("dt_bias", (4, 1)),
    ("state", (2, 5, 4))])
def test_selective_bad_shapes_name_the_argument(name, shape):
    with pytest.raises(ValueError, match=name):
        _call_selective(**{name: np.zeros(shape)})


@pytest.mark.parametrize("name", ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "state"])
@pytest.mark.parametrize("bad", ["int", "complex", "float32", "none"])
def test_selective_bad_dtypes_name_the_argument(name, bad):
    args, kw = selective_problem(Bt=2, T=3, Dm=4, N=5, z=True, dt_bias=True, state=True)
    value = dict(zip(("x", "dt", "A", "B", "C", "D"), args), **kw)[name]
    if bad == "none":
        if name in ("D", "z", "dt_bias", "state"):
            return                                   # optional: None is allowed
        new = None
    else:
        new = value.astype({"int": np.int64, "complex": np.complex128,
                            "float32": np.float32}[bad])
    with pytest.raises(TypeError, match=name):
        _call_selective(**{name: new})


def test_selective_bad_flag_and_cotangent():
    with pytest.raises(TypeError, match="dt_softplus"):
        _call_selective(dt_softplus="yes")
    args, kw = selective_problem()
    out, pb = ss.vjp(ss.selective_scan, *args, **kw)
    with pytest.raises(ValueError, match="dy"):
        pb((np.zeros((1, 1, 1)), None))
    with pytest.raises(ValueError, match="dstate"):
        pb((None, np.zeros((2, 2))))
    with pytest.raises(TypeError, match="cotangent"):
        pb(out[0])


def test_linear_bad_arguments_name_the_argument():
    a, b, h = linear_problem(B=2, T=3, D=4)
    with pytest.raises(ValueError, match="a"):
        ss.linear_scan(a[:, :2], b)
    with pytest.raises(ValueError, match="b"):
        ss.linear_scan(a[0], b[0])
    with pytest.raises(ValueError, match="state"):
        ss.linear_scan(a, b, h[:, :3])
    with pytest.raises(TypeError, match="a"):
        ss.linear_scan(a.astype(np.int32), b)
    with pytest.raises(TypeError, match="state"):
        ss.linear_scan(a, b, h.astype(np.float32))
    with pytest.warns(DeprecationWarning, match="h0"), pytest.raises(ValueError, match="h0"):
        ss.linear_scan(a, b, h0=h[:, :3])
    with pytest.raises(TypeError, match="b"):
        ss.linear_scan(a, None)
    _, pb = ss.vjp(ss.linear_scan, a, b)
    with pytest.raises(ValueError, match="dh"):
        pb(np.zeros((2, 3)))
    with pytest.raises(TypeError, match="h1"):
        ss.linear_scan(a, b, h1=h)
    with pytest.raises(TypeError, match="reverse"):
        ss.linear_scan(a, b, reverse=1)


def test_linear_state_keyword_and_deprecated_h0():
    a, b, h = linear_problem(B=2, T=4, D=3)
    expected = ss.linear_scan(a, b, state=h)
    with pytest.warns(DeprecationWarning, match="state="):
        assert_all_equal((ss.linear_scan(a, b, h0=h),), (expected,))
    with pytest.warns(DeprecationWarning):
        out, pb = ss.vjp(ss.linear_scan, a, b, h0=h)
    assert len(pb(None)) == 3 and not any(np.any(g) for g in pb(None))
    with pytest.raises(TypeError, match="not both"):
        ss.linear_scan(a, b, h, h0=h)


@pytest.mark.parametrize("backend_name", ["compiled", "python"])
def test_linear_scalar_decay_broadcasts(backend_name):
    """a = 0.9 (or a per-channel list) broadcasts; its gradient is summed to its shape."""
    _, b, h = linear_problem(B=2, T=5, D=3)
    with using_backend(backend_name):
        full = ss.linear_scan(np.full(b.shape, 0.9), b, h)
        assert_all_equal((ss.linear_scan(0.9, b, h),), (full,))
        assert_all_equal((ss.linear_scan([0.9, 0.9, 0.9], b, h),), (full,))
        _, pb = ss.vjp(ss.linear_scan, 0.9, b, h)
        _, pb_full = ss.vjp(ss.linear_scan, np.full(b.shape, 0.9), b, h)
        dh = np.ones_like(full)
        assert np.shape(pb(dh)[0]) == ()
        assert_close(pb(dh)[0], pb_full(dh)[0].sum(), tol=1e-12)


_dims = st.integers(0, 4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_selective_property_never_crashes(data):
    """Random shapes (often mismatched) and dtypes: a result of the right shape, or a
    TypeError/ValueError -- never another exception or a crash."""
    Bt, T, Dm, N = (data.draw(_dims) for _ in range(4))
    dtype = data.draw(st.sampled_from([np.float32, np.float64, np.int32]))

    def arr(shape):
        if data.draw(st.booleans(), label="perturb") and len(shape) > 0:
            shape = tuple(s + data.draw(st.integers(-1, 1)) if s > 0 else s for s in shape)
        return np.full(shape, data.draw(st.floats(-3, 3)), dtype)

    args = (arr((Bt, T, Dm)), arr((Bt, T, Dm)), arr((Dm, N)), arr((Bt, T, N)), arr((Bt, T, N)),
            arr((Dm,)) if data.draw(st.booleans()) else None)
    kw = dict(dt_softplus=data.draw(st.booleans()))
    for name, shape in (("z", (Bt, T, Dm)), ("dt_bias", (Dm,)), ("state", (Bt, Dm, N))):
        if data.draw(st.booleans(), label=name):
            kw[name] = arr(shape)
    try:
        y, state = ss.selective_scan(*args, **kw)
    except (TypeError, ValueError):
        return
    assert y.shape == args[0].shape and state.shape == (Bt, args[0].shape[2], args[2].shape[1])


@settings(max_examples=25, deadline=None)
@given(B=_dims, T=_dims, D=_dims, da=st.integers(-1, 1), dtype=st.sampled_from(
    [np.float32, np.float64, np.int64]), with_h0=st.booleans())
def test_linear_property_never_crashes(B, T, D, da, dtype, with_h0):
    a = np.full((B, T, max(0, D + da)), 0.5, dtype)
    b = np.ones((B, T, D), np.float64)
    h0 = np.zeros((B, D), np.float64) if with_h0 else None
    try:
        h = ss.linear_scan(a, b, h0)
    except (TypeError, ValueError):
        return
    assert h.shape == (B, T, D)
    assert_close(h, naive_linear(a, b, h0))


def test_pullback_after_a_backend_switch():
    """The pullback uses what its forward saved, whichever backend is active when called."""
    args, kw = selective_problem(Bt=2, T=20, Dm=17, N=3, z=True, state=True)
    cot = (np.ones((2, 20, 17)), np.ones((2, 17, 3)))
    grads = {}
    for first, second in (("compiled", "python"), ("python", "compiled")):
        with using_backend(first):
            _, pb = ss.vjp(ss.selective_scan, *args, **kw)
        with using_backend(second):
            grads[first] = pb(cot)
    assert_all_close(grads["compiled"], grads["python"], tol=1e-11)


@pytest.mark.parametrize("backend_name", ["compiled", "python"])
def test_scalar_D_and_dt_bias_broadcast(backend_name):
    """D = 0.5 and dt_bias = 0.1 broadcast to [Dm]; their gradients are summed back."""
    args, kw = selective_problem(Bt=2, T=4, Dm=7, N=3, z=True, softplus=True)
    full = args[:5] + (np.full(7, 0.5),)
    with using_backend(backend_name):
        expected, pb_full = ss.vjp(ss.selective_scan, *full, **kw, dt_bias=np.full(7, 0.1))
        out, pb = ss.vjp(ss.selective_scan, *args[:5], 0.5, **kw, dt_bias=0.1)
        assert_all_equal(out, expected)
        cot = (np.cos(out[0]), None)
        grads, grads_full = pb(cot), pb_full(cot)
    assert np.shape(grads[5]) == () and np.shape(grads[7]) == ()
    assert_close(grads[5], grads_full[5].sum(), tol=1e-12)
    assert_close(grads[7], grads_full[7].sum(), tol=1e-12)

