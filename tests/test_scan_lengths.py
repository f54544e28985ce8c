"""Variable lengths, reverse direction and resets in linear_scan and selective_scan: each
against the same rows run alone (valid prefix, flipped prefix, separate sequences), exact 0
on padding, gradients against finite differences, and bad arguments."""
import numpy as np
import pytest

import statescan as ss
from conftest import assert_all_close, assert_all_equal, using_backend, using_threads
from test_scan import _directional_check, linear_problem, selective_problem

BACKENDS = ("compiled", "python")
LENGTHS = np.array([5, 0, 2, 7])          # T = 7: a full row, an empty row, short rows
SEQ = ("x", "dt", "B", "C")               # selective_scan's per-step positional inputs


def sel_problem(dtype=np.float64, T=7, Dm=19, N=3, **opts):
    """A selective_scan call with every option (Dm = 19: a partial 16-channel block)."""
    return selective_problem(Bt=len(LENGTHS), T=T, Dm=Dm, N=N, dtype=dtype, z=True,
                             dt_bias=True, softplus=True, state=True, **opts)


def sel_row(args, kw, b, t):
    """Row b of a selective_scan call restricted to the time indices t (an index array)."""
    x, dt, A, B, C, D = args
    pick = lambda v: np.ascontiguousarray(v[b:b + 1, t])           # noqa: E731
    row_kw = dict(kw, z=pick(kw["z"]), state=kw["state"][b:b + 1])
    return (pick(x), pick(dt), A, pick(B), pick(C), D), row_kw


def reset_mask(T=7):
    reset = np.zeros((len(LENGTHS), T), bool)
    reset[0, [0, 3]] = True                # row 0: sequences [0,3) and [3,5), padded after
    reset[3, [2, 4, 5]] = True
    return reset


def segments(length, flags):
    """Processing-order segments [start, stop) of a row split at its resets."""
    if length == 0:
        return []
    starts = [0] + [t for t in range(1, length) if flags[t]]
    return list(zip(starts, starts[1:] + [length]))


# ---- forward: equal to the rows run alone ----------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reverse", [False, True])
def test_selective_lengths_equal_rows_alone(backend, dtype, reverse):
    args, kw = sel_problem(dtype)
    with using_backend(backend):
        y, state = ss.selective_scan(*args, **kw, lengths=LENGTHS, reverse=reverse)
        for b, L in enumerate(LENGTHS):
            t = np.arange(L)[::-1] if reverse else np.arange(L)
            ra, rkw = sel_row(args, kw, b, t)
            y_b, s_b = ss.selective_scan(*ra, **rkw)
            assert_all_equal((y[b, t], state[b]), (y_b[0], s_b[0]))
            assert not np.any(y[b, L:])                    # padding: exactly 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_linear_lengths_equal_rows_alone(backend, reverse):
    a, b, h0 = linear_problem(B=len(LENGTHS), T=7, D=21)
    with using_backend(backend):
        h = ss.linear_scan(a, b, h0, lengths=LENGTHS, reverse=reverse)
        for r, L in enumerate(LENGTHS):
            t = np.arange(L)[::-1] if reverse else np.arange(L)
            alone = ss.linear_scan(a[r:r + 1, t], b[r:r + 1, t], h0[r:r + 1])
            assert_all_equal((h[r, t],), (alone[0],))
            assert not np.any(h[r, L:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_selective_resets_equal_separate_sequences(backend, reverse):
    args, kw = sel_problem()
    reset = reset_mask()
    with using_backend(backend):
        y, state = ss.selective_scan(*args, **kw, lengths=LENGTHS, reverse=reverse,
                                     reset=reset)
        for b, L in enumerate(LENGTHS):
            order = np.arange(L)[::-1] if reverse else np.arange(L)
            s = kw["state"][b:b + 1]
            for p0, p1 in segments(L, reset[b, order]):
                ra, rkw = sel_row(args, kw, b, order[p0:p1])
                if reset[b, order[p0]]:
                    rkw["state"] = np.zeros_like(s)
                else:
                    rkw["state"] = s
                y_s, s = ss.selective_scan(*ra, **rkw)
                assert_all_equal((y[b, order[p0:p1]],), (y_s[0],))
            assert_all_equal((state[b],), (s[0],))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_resets_equal_separate_sequences(backend):
    a, b, h0 = linear_problem(B=len(LENGTHS), T=7, D=5)
    reset = reset_mask()
    with using_backend(backend):
        h = ss.linear_scan(a, b, h0, lengths=LENGTHS, reset=reset)
        for r, L in enumerate(LENGTHS):
            for p0, p1 in segments(L, reset[r]):
                start = np.zeros((1, 5)) if reset[r, p0] else (
                    h0[r:r + 1] if p0 == 0 else h[r:r + 1, p0 - 1])
                alone = ss.linear_scan(a[r:r + 1, p0:p1], b[r:r + 1, p0:p1], start)
                assert_all_equal((h[r, p0:p1],), (alone[0],))


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_lengths_bit_identical_to_none(backend):
    args, kw = sel_problem()
    full = np.full(len(LENGTHS), 7)
    a, b, h0 = linear_problem(B=4, T=7, D=21)
    rng = np.random.default_rng(3)
    with using_backend(backend):
        out, pb = ss.vjp(ss.selective_scan, *args, **kw)
        out_l, pb_l = ss.vjp(ss.selective_scan, *args, **kw, lengths=full)
        assert_all_equal(out_l, out)
        cot = (rng.standard_normal(out[0].shape), rng.standard_normal(out[1].shape))
        assert_all_equal(pb_l(cot), pb(cot))
        h, pbh = ss.vjp(ss.linear_scan, a, b, h0)
        h_l, pbh_l = ss.vjp(ss.linear_scan, a, b, h0, lengths=full,
                            reset=np.zeros((4, 7), bool))
        assert_all_equal((h_l,), (h,))
        assert_all_equal(pbh_l(np.cos(h)), pbh(np.cos(h)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("T", [7, 60])
def test_compiled_matches_reference_with_options(dtype, T):
    """T = 60: several checkpoint chunks of the compiled backward, rows ending inside them."""
    lengths = np.array([T, 0, T // 3, T - 1])
    reset = np.zeros((4, T), bool)
    reset[0, [1, T // 2]] = True
    reset[3, T - 2] = True
    args, kw = sel_problem(dtype, T=T, Dm=37, N=5)
    tol = 1e-11 if dtype == np.float64 else 2e-4
    for reverse in (False, True):
        opts = dict(lengths=lengths, reverse=reverse, reset=reset)
        res = {}
        rng = np.random.default_rng(4)
        for backend in BACKENDS:
            with using_backend(backend):
                out, pb = ss.vjp(ss.selective_scan, *args, **kw, **opts)
                cot = (rng.standard_normal(out[0].shape).astype(dtype), None)
                res[backend] = out + pb(cot)
                rng = np.random.default_rng(4)
        assert_all_close(res["compiled"], res["python"], tol=tol)


def test_backward_reads_only_the_checkpoints_the_forward_wrote():
    """The compiled vjp's checkpoints are uninitialised memory from statescan._memory's block
    cache: a cached block full of NaN handed out for them must reach no output or gradient,
    with rows that end early (their last checkpoint slots are never written), resets at and
    around chunk boundaries and the reverse direction, for any thread count."""
    from statescan import _dispatch, _memory
    T, Dm, N = 300, 37, 5                          # 18 chunks of 17 steps; 138 KB of them
    lengths = np.array([T, 0, T // 3 + 1, T - 17])
    reset = np.zeros((4, T), bool)
    reset[0, [1, 17, T // 2]] = True
    reset[3, [0, 16, 34, T - 18]] = True
    args, kw = sel_problem(T=T, Dm=Dm, N=N)
    shape = _dispatch.ext_module("scan").checkpoint_shape(4, T, Dm, N)
    for reverse in (False, True):
        opts = dict(kw, lengths=lengths, reverse=reverse, reset=reset)
        cot = np.cos(np.arange(4 * T * Dm)).reshape(4, T, Dm)
        with using_backend("python"):
            out, pb = ss.vjp(ss.selective_scan, *args, **opts)
            expected = out + pb((cot, None))
        for threads in (1, 2, 3):
            garbage = _memory.empty(shape, np.float64)
            garbage.fill(np.nan)
            address = garbage.ctypes.data
            del garbage                            # back to the cache ...
            probe = _memory.empty(shape, np.float64)
            assert probe.ctypes.data == address and np.isnan(probe).all()   # ... and reused
            del probe
            with using_backend("compiled"), using_threads(threads):
                out, pb = ss.vjp(ss.selective_scan, *args, **opts)
                actual = out + pb((cot, None))
            assert_all_close(actual, expected, tol=1e-11)


def test_threads_do_not_change_results_with_lengths():
    args, kw = sel_problem(T=40, Dm=70)
    lengths = np.array([40, 3, 17, 0])
    runs = []
    for threads in (1, 2, 3):
        with using_threads(threads):
            out, pb = ss.vjp(ss.selective_scan, *args, **kw, lengths=lengths, reverse=True)
            runs.append(out + pb((np.cos(out[0]), None)))
    for other in runs[1:]:
        assert_all_equal(other, runs[0])


# ---- gradients -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_selective_vjp_with_options_matches_finite_differences(backend, reverse):
    args, kw = sel_problem(T=7, Dm=18, N=3)
    kw = dict(kw, lengths=LENGTHS, reverse=reverse, reset=reset_mask())
    with using_backend(backend):
        (y, state), pb = ss.vjp(ss.selective_scan, *args, **kw)
        rng = np.random.default_rng(5)
        cot = (rng.standard_normal(y.shape), rng.standard_normal(state.shape))
        grads = pb(cot)
        names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "state"]
        _directional_check(ss.selective_scan, args, kw, ("x", "dt", "A", "B", "C", "D"),
                           grads, names, cot)
        by_name = dict(zip(names, grads))
        for r, L in enumerate(LENGTHS):                    # padded inputs: exactly 0
            for name in ("x", "dt", "B", "C", "z"):
                assert not np.any(by_name[name][r, L:]), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_linear_vjp_with_options_matches_finite_differences(backend, reverse):
    a, b, h0 = linear_problem(B=4, T=7, D=5)
    kw = dict(lengths=LENGTHS, reverse=reverse, reset=reset_mask())
    with using_backend(backend):
        out, pb = ss.vjp(ss.linear_scan, a, b, h0, **kw)
        cot = (np.random.default_rng(2).standard_normal(out.shape),)
        grads = pb(cot[0])
        _directional_check(ss.linear_scan, (a, b, h0), kw, ("a", "b", "state"), grads,
                           ("a", "b", "state"), cot)
        for r, L in enumerate(LENGTHS):
            assert not np.any(grads[0][r, L:]) and not np.any(grads[1][r, L:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_never_leaks(backend):
    """NaN in padded steps reaches no output, state or gradient."""
    args, kw = sel_problem()
    args = tuple(a.copy() if a is not None and a.ndim == 3 else a for a in args)
    for a in args[:2] + args[3:5]:
        a[2, 2:] = np.nan
    kw["z"] = kw["z"].copy()
    kw["z"][2, 2:] = np.nan
    lengths = np.array([7, 7, 2, 7])
    with using_backend(backend):
        out, pb = ss.vjp(ss.selective_scan, *args, **kw, lengths=lengths)
        grads = pb((np.ones_like(out[0]), np.ones_like(out[1])))
    assert np.isfinite(out[0]).all() and np.isfinite(out[1]).all()
    assert all(np.isfinite(g).all() for g in grads)


# ---- bad arguments ---------------------------------------------------------------------------

@pytest.mark.parametrize("value,error", [
    (np.array([1, 2, 3]), ValueError), (np.array([1, 2, 3, 8]), ValueError),
    (np.array([1, -1, 3, 4]), ValueError), (np.array([1.5, 2, 3, 4]), TypeError),
    ("abcd", TypeError), (np.ones((4, 1), int), ValueError)])
def test_bad_lengths_name_the_argument(value, error):
    args, kw = sel_problem()
    a, b, h0 = linear_problem(B=4, T=7, D=3)
    with pytest.raises(error, match="lengths"):
        ss.selective_scan(*args, **kw, lengths=value)
    with pytest.raises(error, match="lengths"):
        ss.linear_scan(a, b, h0, lengths=value)


@pytest.mark.parametrize("value,error", [
    (np.zeros((4, 6), bool), ValueError), (np.zeros(4, bool), ValueError),
    (np.full((4, 7), 0.5), TypeError), (np.full((4, 7), 2), TypeError)])
def test_bad_reset_names_the_argument(value, error):
    args, kw = sel_problem()
    a, b, h0 = linear_problem(B=4, T=7, D=3)
    with pytest.raises(error, match="reset"):
        ss.selective_scan(*args, **kw, reset=value)
    with pytest.raises(error, match="reset"):
        ss.linear_scan(a, b, h0, reset=value)
    with pytest.raises(TypeError, match="reverse"):
        ss.selective_scan(*args, **kw, reverse="yes")
