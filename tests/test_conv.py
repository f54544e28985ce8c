"""causal_conv1d: the definition (torch Conv1d, an element loop), streaming, variable lengths,
resets, the decode path and out_state, gradients against finite differences, edge sizes and
argument checking, on both backends."""
import numpy as np
import pytest

import statescan as ss
from conftest import assert_all_equal, assert_close

DTYPES = (np.float64, np.float32)


def problem(B=2, T=7, C=5, K=4, dtype=np.float64, *, bias=True, state=False, seed=0):
    """(x, weight, bias, state) of a random call."""
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return rng.standard_normal(shape).astype(dtype)

    return (rand(B, T, C), rand(C, K) / np.sqrt(K).astype(dtype),
            rand(C) if bias else None, rand(B, C, K - 1) if state else None)


def naive(x, w, b=None, *, activation=None, state=None):
    """Element loop straight from the definition, in float64."""
    B, T, C = x.shape
    K = w.shape[1]
    hist = np.zeros((B, C, K - 1)) if state is None else np.asarray(state, np.float64)
    y = np.zeros((B, T, C))
    for i in range(B):
        for c in range(C):
            seq = np.concatenate([hist[i, c], x[i, :, c]])   # index s + K-1 is time s
            for t in range(T):
                acc = 0.0 if b is None else float(b[c])
                for j in range(K):
                    acc += float(w[c, j]) * float(seq[t + j])
                y[i, t, c] = acc / (1 + np.exp(-acc)) if activation == "silu" else acc
    return y


# ---- the definition ---------------------------------------------------------------------------

@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_element_loop(backend, activation, state, dtype):
    x, w, b, s0 = problem(dtype=dtype, state=state)
    y, st = ss.causal_conv1d(x, w, b, activation=activation, state=s0)
    assert y.dtype == dtype and st.dtype == dtype
    assert_close(y, naive(x, w, b, activation=activation, state=s0), dtype)
    full = np.concatenate([np.zeros((2, 5, 3), dtype) if s0 is None else s0,
                           x.transpose(0, 2, 1)], axis=2)
    assert_all_equal([st], [full[:, :, -3:]])


@pytest.mark.torch
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 2, 4])
def test_matches_torch_conv1d(backend, activation, dtype, K):
    torch = pytest.importorskip("torch")
    x, w, b, _ = problem(B=3, T=9, C=6, K=K, dtype=dtype)
    conv = torch.nn.Conv1d(6, 6, K, groups=6, padding=K - 1,
                           dtype=torch.float64 if dtype == np.float64 else torch.float32)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w[:, None, :]))
        conv.bias.copy_(torch.from_numpy(b))
        want = conv(torch.from_numpy(x).transpose(1, 2))[..., :9].transpose(1, 2)
        if activation == "silu":
            want = torch.nn.functional.silu(want)
    y, _ = ss.causal_conv1d(x, w, b, activation=activation)
    assert_close(y, want.numpy(), dtype)


# ---- streaming, lengths, resets -------------------------------------------------------------

@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunks_equal_one_call_bit_for_bit(backend, K, dtype):
    x, w, b, s0 = problem(B=3, T=11, C=37, K=K, dtype=dtype, state=True)
    whole = ss.causal_conv1d(x, w, b, activation="silu", state=s0)
    ys, st = [], s0
    for a, e in ((0, 1), (1, 3), (3, 4), (4, 9), (9, 9), (9, 10), (10, 11)):
        y, st = ss.causal_conv1d(x[:, a:e], w, b, activation="silu", state=st)
        ys.append(y)
    assert_all_equal([np.concatenate(ys, axis=1), st], list(whole))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_steps_with_out_state_in_place(backend, dtype):
    x, w, b, s0 = problem(B=2, T=6, C=33, dtype=dtype, state=True)
    want = ss.causal_conv1d(x, w, b, activation="silu", state=s0)
    cache = s0.copy()
    ys = []
    for t in range(6):
        y, st = ss.causal_conv1d(x[:, t:t + 1], w, b, activation="silu", state=cache,
                                 out_state=cache)
        assert st is cache
        ys.append(y)
    assert_all_equal([np.concatenate(ys, axis=1), cache], list(want))


def test_out_state_on_the_general_path(backend):
    x, w, b, s0 = problem(state=True)
    want = ss.causal_conv1d(x, w, b, state=s0)
    out = np.full_like(s0, np.nan)
    y, st = ss.causal_conv1d(x, w, b, state=s0, out_state=out, lengths=[7, 7])
    assert st is out
    assert_all_equal([y, out], list(want))
    y, st = ss.causal_conv1d(x, w, b, state=s0, out_state=s0)
    assert st is s0
    assert_all_equal([y, s0], list(want))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lengths_rows_equal_each_row_alone(backend, dtype):
    x, w, b, s0 = problem(B=4, T=8, C=9, dtype=dtype, state=True)
    lengths = [8, 3, 0, 1]
    y, st = ss.causal_conv1d(x, w, b, activation="silu", state=s0, lengths=lengths)
    for i, n in enumerate(lengths):
        yi, si = ss.causal_conv1d(x[i:i + 1, :n], w, b, activation="silu", state=s0[i:i + 1])
        assert_all_equal([y[i:i + 1, :n], st[i:i + 1]], [yi, si])
        assert not y[i, n:].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_resets_equal_separate_sequences(backend, dtype):
    x, w, b, s0 = problem(B=2, T=10, C=6, dtype=dtype, state=True)
    reset = np.zeros((2, 10), bool)
    reset[0, [0, 4, 5]] = True
    reset[1, 9] = True
    y, st = ss.causal_conv1d(x, w, b, activation="silu", state=s0, reset=reset)
    pieces = {0: [(0, 4, None), (4, 5, None), (5, 10, None)], 1: [(0, 9, s0[1:]), (9, 10, None)]}
    for i, parts in pieces.items():
        for a, e, init in parts:
            yi, si = ss.causal_conv1d(x[i:i + 1, a:e], w, b, activation="silu", state=init)
            assert_all_equal([y[i:i + 1, a:e]], [yi])
        assert_all_equal([st[i:i + 1]], [si])


def test_reset_at_a_padded_step_is_ignored(backend):
    x, w, b, s0 = problem(B=1, T=5, state=True)
    reset = np.zeros((1, 5), bool)
    reset[0, 3] = True
    want = ss.causal_conv1d(x, w, b, state=s0, lengths=[3])
    assert_all_equal(list(ss.causal_conv1d(x, w, b, state=s0, lengths=[3], reset=reset)),
                     list(want))


# ---- gradients -------------------------------------------------------------------------------

def numeric_grads(f, args, eps=1e-6):
    grads = []
    for i, a in enumerate(args):
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            plus = [v.copy() for v in args]
            minus = [v.copy() for v in args]
            plus[i][idx] += eps
            minus[i][idx] -= eps
            g[idx] = (f(*plus) - f(*minus)) / (2 * eps)
        grads.append(g)
    return grads


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("variant", ["plain", "state", "lengths-resets"])
def test_gradients_match_finite_differences(backend, activation, variant):
    x, w, b, s0 = problem(B=3, T=6, C=4, K=3, state=True, seed=3)
    kw = {"activation": activation}
    if variant == "lengths-resets":
        reset = np.zeros((3, 6), bool)
        reset[0, 2] = reset[1, 1] = reset[2, 4] = True
        kw.update(lengths=[6, 3, 0], reset=reset)
    rng = np.random.default_rng(7)
    dy, ds = rng.standard_normal(x.shape), rng.standard_normal(s0.shape)
    with_state = variant != "plain"
    args = [x, w, b] + ([s0] if with_state else [])

    def f(x, w, b, s=None):
        y, st = ss.causal_conv1d(x, w, b, state=s, **kw)
        return float((y * dy).sum() + (st * ds).sum())

    (y, st), pullback = ss.vjp(ss.causal_conv1d, x, w, b,
                               **dict(kw, state=s0 if with_state else None))
    assert_all_equal([y, st], list(ss.causal_conv1d(x, w, b, state=s0 if with_state else None,
                                                    **kw)))
    grads = pullback((dy, ds))
    assert len(grads) == len(args)
    for g, want, name in zip(grads, numeric_grads(f, args), ("dx", "dw", "db", "dstate")):
        assert_close(g, want, tol=1e-6, what=name)
    if variant == "lengths-resets":
        assert not grads[0][1, 3:].any() and not grads[0][2].any()


def test_gradient_structure_without_bias_and_none_cotangents(backend):
    x, w, _, _ = problem(bias=False)
    (y, st), pullback = ss.vjp(ss.causal_conv1d, x, w)
    dx, dw = pullback(None)
    assert not dx.any() and not dw.any()
    dx, dw = pullback((np.ones_like(y), None))
    # with dy = 1, tap j sees the inputs at times 0 .. T-1-(K-1-j)
    assert_close(dw, np.stack([x[:, :4 + j].sum(axis=(0, 1)) for j in range(4)], axis=1))
    # input s reaches the outputs s + K-1-j that exist: taps j >= s + K - T
    want_dx = np.stack([w[:, max(0, s + 4 - 7):].sum(axis=1) for s in range(7)])
    assert_close(dx, np.broadcast_to(want_dx, x.shape))
    with pytest.raises(TypeError, match="cotangent"):
        pullback(np.ones_like(y))


# ---- edge sizes, NaN, errors ------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 0, 3), (0, 4, 3), (2, 4, 0)])
def test_empty_axes(backend, shape):
    B, T, C = shape
    x = np.zeros(shape)
    w = np.ones((C, 3))
    s0 = np.arange(B * C * 2, dtype=float).reshape(B, C, 2)
    y, st = ss.causal_conv1d(x, w, state=s0)
    assert y.shape == shape and st.shape == (B, C, 2)
    assert_all_equal([st], [s0])
    (y, st), pullback = ss.vjp(ss.causal_conv1d, x, w, state=s0)
    dx, dw, ds = pullback((None, np.ones_like(st)))
    assert dx.shape == shape and dw.shape == (C, 3) and not dw.any()
    assert_all_equal([ds], [np.ones_like(st)])


def test_kernel_size_one_is_a_pointwise_scale(backend):
    x, w, b, _ = problem(K=1)
    y, st = ss.causal_conv1d(x, w, b)
    assert st.shape == (2, 5, 0)
    assert_close(y, x * w[:, 0] + b)


def test_nan_stays_in_its_row_and_channel(backend):
    x, w, b, _ = problem(B=3, T=6, C=4)
    x[1, 4, 3] = np.nan
    y, st = ss.causal_conv1d(x, w, b, activation="silu")
    bad = np.isnan(y)
    assert bad[1, 4:, 3].all()
    bad[1, 4:, 3] = False
    assert not bad.any()
    assert np.isnan(st[1, 3]).any() and np.isnan(st).sum() == np.isnan(st[1, 3]).sum()


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(x=np.zeros((2, 3))), ValueError, "x must have shape"),
    (dict(x=np.zeros((2, 3, 4))), ValueError, "x must have shape"),
    (dict(x=np.zeros((2, 3, 5), np.int64)), TypeError, "x must"),
    (dict(x=np.zeros((2, 3, 5), np.float32)), TypeError, "x is float32"),
    (dict(weight=np.zeros((5, 0))), ValueError, "weight"),
    (dict(bias=np.zeros(4)), ValueError, "bias must have shape"),
    (dict(state=np.zeros((2, 5, 2))), ValueError, r"state must have shape \[B, C, K-1\]"),
    (dict(activation="relu"), ValueError, "None, 'silu'"),
    (dict(lengths=[1, 9]), ValueError, "lengths"),
    (dict(reset=np.zeros((2, 2), bool)), ValueError, "reset"),
    (dict(out_state=np.zeros((2, 5, 3), np.float32)), TypeError, "out_state"),
    (dict(out_state=np.zeros((2, 5, 2))), ValueError, "out_state"),
    (dict(reverse=True), TypeError, "reverse"),
])
def test_bad_arguments_name_the_argument(backend, kwargs, exc, match):
    call = dict(x=np.zeros((2, 3, 5)), weight=np.zeros((5, 4)), bias=None)
    call.update(kwargs)
    with pytest.raises(exc, match=match):
        ss.causal_conv1d(call.pop("x"), call.pop("weight"), call.pop("bias"), **call)


def test_decode_path_bad_arguments_still_checked(backend):
    x, w, b, s0 = problem(T=1, state=True)
    with pytest.raises(ValueError, match="state must have shape"):
        ss.causal_conv1d(x, w, b, state=s0[:, :, :2])
    with pytest.raises(ValueError, match="activation"):
        ss.causal_conv1d(x, w, b, state=s0, activation="gelu")
    with pytest.raises(ValueError, match="out_state"):
        ss.causal_conv1d(x, w, b, state=s0, out_state=s0[:, :, :2])
    with pytest.raises(ValueError, match="out_state must be the state array itself"):
        flat = np.zeros(2 * 5 * 3 + 1)     # two contiguous [2, C, K-1] views, one element apart
        ss.causal_conv1d(x, w, b, state=flat[:-1].reshape(2, 5, 3),
                         out_state=flat[1:].reshape(2, 5, 3))


def test_non_contiguous_and_list_inputs(backend):
    x, w, b, s0 = problem(T=1, state=True)
    want = ss.causal_conv1d(x, w, b, state=s0)
    xs = np.asfortranarray(x)
    ws = np.ascontiguousarray(w.T).T
    got = ss.causal_conv1d(xs, ws, b.tolist(), state=np.asfortranarray(s0))
    assert_all_equal(list(got), list(want))
    x, w, b, _ = problem()
    want = ss.causal_conv1d(x, w, b)
    wide = np.zeros((2, 7, 10))
    wide[:, :, ::2] = x
    assert not wide[:, :, ::2].flags.c_contiguous
    assert_all_equal(list(ss.causal_conv1d(wide[:, :, ::2], np.ascontiguousarray(w.T).T, b)),
                     list(want))


def test_padded_steps_take_no_part_in_gradients_even_with_inf(backend):
    x, w, b, _ = problem(B=2, T=5, C=3, K=2)
    x[1, 3:] = np.inf                       # padding may hold anything
    (y, st), pullback = ss.vjp(ss.causal_conv1d, x, w, b, lengths=[5, 3])
    dx, dw, db = pullback((np.ones_like(y), np.ones_like(st)))
    assert not dx[1, 3:].any()
    assert np.isfinite(dx).all() and np.isfinite(dw).all() and np.isfinite(db).all()
