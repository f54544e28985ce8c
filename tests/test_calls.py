"""The small-call fast paths (already-valid C-contiguous arrays of one dtype): the same bits
as the general path, the same errors (a call the fast check refuses gets the full
validation), and small work kept on the calling thread."""
import importlib

import numpy as np
import pytest

import statescan as ss
from statescan import _cell_call, _dispatch, _tuning, _validate

# the modules (the package's names linear_attention etc. are the functions)
la_module = importlib.import_module("statescan.linear_attention")
scan_module = importlib.import_module("statescan.scan")
ssd_module = importlib.import_module("statescan.ssd")
from _helpers import (CELLS, CELL_SIZES, flat_outputs, make_problem, random_cotangent,
                      state_parts)

DTYPES = (np.float32, np.float64)


@pytest.fixture(autouse=True)
def _compiled_backend():
    """The fast paths serve the compiled backend: start each test on it whatever
    STATESCAN_BACKEND says (the python-backend tests switch to it themselves)."""
    if _dispatch.compiled_available():
        ss.set_backend("compiled")


class Spy:
    """Wraps a fast-path function: counts the calls it served (returned non-None)."""

    def __init__(self, monkeypatch, module, name):
        self.fn, self.served = getattr(module, name), 0
        monkeypatch.setattr(module, name, self)

    def __call__(self, *args):
        out = self.fn(*args)
        self.served += out is not None
        return out


def _equal(a, b):
    if a is None:
        assert b is None
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for u, v in zip(a, b):
            _equal(u, v)
    else:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b, equal_nan=True)


def _fast_and_general(monkeypatch, module, name, call):
    """(output with the fast path, output with it switched off); the fast path must serve."""
    spy = Spy(monkeypatch, module, name)
    fast = call()
    assert spy.served == 1
    monkeypatch.setattr(module, name, lambda *args: None)
    return fast, call()


# ---- selective_scan ----------------------------------------------------------------------------

def _selective(dtype, Bt, T, Dm, N, seed, options=True, extreme=False):
    rng = np.random.default_rng(seed)

    def r(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(dtype)

    x, dt, A = r(Bt, T, Dm), r(Bt, T, Dm), -np.exp(r(Dm, N, scale=0.5))
    if extreme:              # overflowing decays, inf and NaN inputs: the same NaN/inf pattern
        dt = r(Bt, T, Dm, scale=60.0)
        x[0, 0, 0], x[-1, -1, -1] = np.inf, np.nan
    args = (x, dt, A, r(Bt, T, N), r(Bt, T, N), r(Dm) if options else None)
    kw = dict(z=r(Bt, T, Dm), dt_bias=r(Dm), dt_softplus=True) if options else {}
    return args, kw, r(Bt, Dm, N)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("options", [True, False])
@pytest.mark.parametrize("with_state", [False, True])
def test_selective_scan_fast_path_same_bits(monkeypatch, dtype, T, options, with_state):
    for seed, (Bt, Dm, N) in enumerate([(1, 64, 16), (3, 70, 5), (2, 130, 33)]):
        args, kw, state = _selective(dtype, Bt, T, Dm, N, seed, options)
        if with_state:
            kw["state"] = state
        fast, general = _fast_and_general(monkeypatch, scan_module, "_fast_call",
                                          lambda: ss.selective_scan(*args, **kw))
        _equal(fast, general)
        monkeypatch.undo()


@pytest.mark.parametrize("T", [1, 3])
def test_selective_scan_fast_path_nan_inf_patterns(monkeypatch, T):
    args, kw, _ = _selective(np.float32, 2, T, 40, 16, 7, extreme=True)
    fast, general = _fast_and_general(monkeypatch, scan_module, "_fast_call",
                                      lambda: ss.selective_scan(*args, **kw))
    _equal(fast, general)


@pytest.mark.parametrize("T", [1, 4])
def test_selective_scan_fast_path_out_state(monkeypatch, T):
    args, kw, state = _selective(np.float64, 2, T, 24, 8, 3)
    expected = ss.selective_scan(*args, **kw, state=state.copy())
    spy = Spy(monkeypatch, scan_module, "_fast_call")
    out = state.copy()
    y, final = ss.selective_scan(*args, **kw, state=out, out_state=out)     # in place
    assert spy.served == 1 and final is out
    _equal((y, final), expected)


def test_selective_scan_fast_path_refuses_what_it_cannot_run(monkeypatch):
    """Views, other dtypes, lists, options: the general path (it converts or explains)."""
    args, kw, state = _selective(np.float64, 2, 3, 16, 4, 5)
    x, dt, A, B, C, D = args
    spy = Spy(monkeypatch, scan_module, "_fast_call")
    expected = ss.selective_scan(*args, **kw)
    assert spy.served == 1
    refused = [((np.asfortranarray(x), dt, A, B, C, D), kw),
               ((x, dt, A, B, C, list(D)), kw),
               ((x, dt, A, B, C, D), dict(kw, dt_softplus=np.True_)),
               ((x, dt, A, B, C, D), dict(kw, reverse=np.False_))]
    for a, k in refused:
        _equal(ss.selective_scan(*a, **k), expected)
    assert not refused[0][0][0].flags.c_contiguous
    assert spy.served == 1


def test_selective_scan_bad_calls_still_explained():
    args, kw, state = _selective(np.float32, 2, 1, 16, 4, 5)
    x, dt, A, B, C, D = args
    bad = [((x, dt[:, :, :-1], A, B, C, D), {}, ValueError, "dt"),
           ((x, dt, A[:-1], B, C, D), {}, ValueError, "A"),
           ((x, dt, A, B, C[..., :-1], D), {}, ValueError, "C"),
           ((x, dt, A, B, C, D.astype(np.float64)), {}, TypeError, "D"),
           ((x, dt, A, B, C, D), dict(state=state[:, :-1]), ValueError, "state"),
           ((x, dt, A, B, C, D), dict(state=state, out_state=state.astype(np.float64)),
            TypeError, "out_state"),
           ((x, dt, A, B, C, D), dict(z=x[:1]), ValueError, "z"),
           ((x, dt, A, B, C, D), dict(dt_softplus=1), TypeError, "dt_softplus")]
    for a, k, error, name in bad:
        with pytest.raises(error, match=rf"\b{name}\b"):
            ss.selective_scan(*a, **k)


# ---- linear_scan -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_state", [False, True])
def test_linear_scan_fast_path_same_bits(monkeypatch, dtype, with_state):
    rng = np.random.default_rng(5)
    for B, T, D in [(1, 1, 64), (3, 7, 5), (2, 40, 130)]:
        a, b = (rng.uniform(-1, 1, (B, T, D)).astype(dtype) for _ in range(2))
        state = rng.standard_normal((B, D)).astype(dtype) if with_state else None
        fast, general = _fast_and_general(monkeypatch, scan_module, "_linear_fast_call",
                                          lambda: ss.linear_scan(a, b, state))
        _equal(fast, general)
        monkeypatch.undo()


def test_linear_scan_fast_path_refuses_what_it_cannot_run(monkeypatch):
    """Broadcast decays, views, lists, other dtypes, options, h0: the general path, which
    converts or explains."""
    rng = np.random.default_rng(6)
    a, b = (rng.uniform(-1, 1, (2, 3, 4)) for _ in range(2))
    state = rng.standard_normal((2, 4))
    spy = Spy(monkeypatch, scan_module, "_linear_fast_call")
    calls = [lambda: ss.linear_scan(0.9, b), lambda: ss.linear_scan(a[:, ::-1], b),
             lambda: ss.linear_scan(a.tolist(), b), lambda: ss.linear_scan(a, b, state.tolist()),
             lambda: ss.linear_scan(a, b, reverse=np.False_), lambda: ss.linear_scan(a, b[:, :2]),
             lambda: ss.linear_scan(a.astype(np.float32), b),
             lambda: ss.linear_scan(a, b, state[:, :3]),
             lambda: ss.linear_scan(a, b, lengths=[3, 2])]
    outcomes = [_outcome(c) for c in calls]
    assert spy.served == 0
    assert sum(isinstance(o[0], type) for o in outcomes) == 3        # the three bad sizes/dtypes
    monkeypatch.setattr(scan_module, "_linear_fast_call", lambda *args: None)
    for o, call in zip(outcomes, calls):
        _equal_or_same_error(o, _outcome(call))
    with pytest.warns(DeprecationWarning):
        h = ss.linear_scan(a, b, h0=state)
    _equal(h, ss.linear_scan(a, b, state))


# ---- linear_attention --------------------------------------------------------------------------

def _attention(dtype, B, NH, T, dk, dv, seed):
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)

    return (r(B, NH, T, dk), r(B, NH, T, dk), r(B, NH, T, dv)), r(B, NH, dk, dv), \
        rng.uniform(0.5, 1.0, NH).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 9])
@pytest.mark.parametrize("with_decay", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_linear_attention_fast_path_same_bits(monkeypatch, dtype, T, with_decay, with_state):
    for seed, (B, NH, dk, dv) in enumerate([(1, 1, 16, 16), (2, 3, 5, 7)]):
        qkv, state, decay = _attention(dtype, B, NH, T, dk, dv, seed)
        kw = dict(chunk=4)
        if with_decay:
            kw["decay"] = decay
        if with_state:
            if T == 1:       # T = 1 with a state is the decode step's, not the fast path's
                continue
            kw["state"] = state
        fast, general = _fast_and_general(monkeypatch, la_module, "_fast_call",
                                          lambda: ss.linear_attention(*qkv, **kw))
        _equal(fast, general)
        monkeypatch.undo()


def test_linear_attention_fast_path_out_state(monkeypatch):
    qkv, state, decay = _attention(np.float64, 2, 2, 6, 4, 3, 1)
    expected = ss.linear_attention(*qkv, decay=decay, state=state.copy())
    spy = Spy(monkeypatch, la_module, "_fast_call")
    out = state.copy()
    o, final = ss.linear_attention(*qkv, decay=decay, state=out, out_state=out)
    assert spy.served == 1 and final is out
    _equal((o, final), expected)


def test_linear_attention_bad_calls_still_explained():
    (q, k, v), state, decay = _attention(np.float32, 2, 2, 3, 4, 5, 2)
    bad = [((q, k[..., :-1], v), {}, ValueError, "k"),
           ((q, k, v[:, :1]), {}, ValueError, "v"),
           ((q, k, v), dict(decay=np.array([0.5, 1.5], np.float32)), ValueError, "decay"),
           ((q, k, v), dict(decay=np.array([0.5, np.nan], np.float32)), ValueError, "decay"),
           ((q, k, v), dict(state=state.astype(np.float64)), TypeError, "state"),
           ((q, k, v), dict(chunk=0), ValueError, "chunk"),
           ((q, k, v), dict(chunk=2.0), TypeError, "chunk"),
           ((q, k, v), dict(out_state=state[:, :1]), ValueError, "out_state")]
    for a, kw, error, name in bad:
        with pytest.raises(error, match=rf"\b{name}\b"):
            ss.linear_attention(*a, **kw)


# ---- ssd ----------------------------------------------------------------------------------------

def _ssd(dtype, Bt, T, NH, P, N, G, seed, D_shape):
    rng = np.random.default_rng(seed)

    def r(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(dtype)

    bc = (Bt, T, N) if G is None else (Bt, T, G, N)
    args = (r(Bt, T, NH, P), r(Bt, T, NH), -np.exp(r(NH, scale=0.5)), r(*bc), r(*bc))
    D = None if D_shape is None else r(*D_shape)
    return args, dict(D=D, dt_bias=r(NH), dt_softplus=True, chunk=4), r(Bt, NH, P, N)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("variant", ["plain", "grouped", "D_per_channel", "gate", "state"])
def test_ssd_fast_path_same_bits(monkeypatch, dtype, T, variant):
    NH, P, N = 4, 8, 5
    args, kw, state = _ssd(dtype, 2, T, NH, P, N, 2 if variant == "grouped" else None, 3,
                           (NH, P) if variant == "D_per_channel" else (NH,))
    if variant == "gate":
        kw["z"] = np.random.default_rng(4).standard_normal(args[0].shape).astype(dtype)
    if variant == "state":
        if T == 1:           # T = 1 with a state is the decode step's, not the fast path's
            return
        kw["state"] = state
    if variant == "plain":
        kw.update(D=None, dt_bias=None, dt_softplus=False, chunk=None)
    fast, general = _fast_and_general(monkeypatch, ssd_module, "_fast_call",
                                      lambda: ss.ssd(*args, **kw))
    _equal(fast, general)
    monkeypatch.undo()
    y, pullback = ss.vjp(ss.ssd, *args, **kw)        # the vjp's forward: the same output
    _equal(y, fast)


def test_ssd_fast_path_out_state(monkeypatch):
    args, kw, state = _ssd(np.float64, 2, 5, 3, 4, 6, None, 1, (3,))
    expected = ss.ssd(*args, **kw, state=state.copy())
    spy = Spy(monkeypatch, ssd_module, "_fast_call")
    out = np.empty_like(state)
    y, final = ss.ssd(*args, **kw, state=state, out_state=out)
    assert spy.served == 1 and final is out
    _equal((y, final), expected)


def test_ssd_bad_calls_still_explained():
    (x, dt, A, B, C), kw, state = _ssd(np.float32, 2, 3, 4, 2, 3, None, 2, (4,))
    bad = [((x, dt[..., :-1], A, B, C), {}, ValueError, "dt"),
           ((x, dt, A, B, C[..., :-1]), {}, ValueError, "C"),
           ((x, dt, A, B[:, :, None].repeat(3, axis=2), C[:, :, None].repeat(3, axis=2)), {},
            ValueError, "G"),
           ((x, dt, A.astype(np.float64), B, C), {}, TypeError, "A"),
           ((x, dt, A, B, C), dict(chunk=0), ValueError, "chunk"),
           ((x, dt, A, B, C), dict(state=state[:, :1]), ValueError, "state"),
           ((x, dt, A, B, C), dict(out_state=state[:, :1]), ValueError, "out_state"),
           ((x, dt, A, B, C), dict(dt_softplus=None), TypeError, "dt_softplus"),
           ((x, dt, A, np.array(1.0, np.float32), C), {}, ValueError, "B"),
           ((x[:, :1], dt[:, :1], A, np.array(1.0, np.float32), C[:, :1]),
            dict(state=state), ValueError, "B")]          # (the decode step's check)
    for a, k, error, name in bad:
        with pytest.raises(error, match=rf"\b{name}\b"):
            ss.ssd(*a, **k)


# ---- the RNN cells ------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["plain", "state", "heads", "noW", "no_bias", "R3",
                                     "no_b_r", "T1"])
def test_cell_fast_prepare_same_bits(monkeypatch, cell, dtype, variant):
    """The plain fast call (compiled), the fast prepare and the full validation: one result."""
    B, T = (1, 1) if variant == "T1" else (2, 3)
    p = make_problem(cell, B=B, T=T, I=5, H=8, heads=2 if variant == "heads" else 1,
                     dtype=dtype, W=variant != "noW", b=variant != "no_bias",
                     b_r=variant not in ("no_bias", "no_b_r"), state=variant == "state",
                     R3=variant == "R3")
    if ss.backend() == "compiled":
        fast, general = _fast_and_general(monkeypatch, _cell_call, "plain_forward", p.call)
        _equal(fast, general)
    else:
        monkeypatch.setattr(_cell_call, "plain_forward", lambda *args: None)
    fast, general = _fast_and_general(monkeypatch, _cell_call, "_prepare_valid", p.call)
    _equal(fast, general)
    monkeypatch.undo()
    spy = Spy(monkeypatch, _cell_call, "_prepare_valid")
    out, pullback = ss.vjp(p.fn, *p.args(), **p.kwargs())            # the vjp's prepare too
    cot = random_cotangent(cell, out)
    grads = pullback(cot)
    monkeypatch.setattr(_cell_call, "_prepare_valid", lambda *args: None)
    out2, pullback2 = ss.vjp(p.fn, *p.args(), **p.kwargs())
    assert spy.served == 1
    _equal(out, out2)
    _equal(grads, pullback2(cot))


@pytest.mark.parametrize("cell", CELLS)
def test_cell_fast_prepare_refuses_bad_states(cell):
    """Wrong state structures still get the general path's errors."""
    p = make_problem(cell, B=2, T=3, I=4, H=6, state=True)
    parts = state_parts(cell, p.state)
    S = CELL_SIZES[cell][1]
    if S > 1:
        with pytest.raises(TypeError, match=r"state c\b"):
            p.fn(*p.args(), state=(parts[0], None) + tuple(parts[2:]))
        with pytest.raises(ValueError, match=r"state c\b"):
            p.fn(*p.args(), state=(parts[0], parts[1][:, :-1]) + tuple(parts[2:]))
    with pytest.raises(ValueError, match=r"state h\b"):
        p.fn(*p.args(), state=(parts[0][:1],) + tuple(parts[1:]) if S > 1 else parts[0][:1])
    with pytest.raises(TypeError, match=r"state h\b"):
        p.fn(*p.args(), state=(parts[0].astype(np.float32),) + tuple(parts[1:])
             if S > 1 else parts[0].astype(np.float32))
    with pytest.raises(ValueError, match=r"\bx\b"):
        p.fn(p.x[..., :-1], *p.args()[1:])
    with pytest.raises(ValueError, match=r"\bheads\b"):
        p.fn(*p.args(), heads=2)


def _outcome(call):
    """The result of `call`, or the type and message of what it raised."""
    try:
        return call()
    except Exception as exc:
        return type(exc), str(exc)


@pytest.mark.parametrize("cell", CELLS)
def test_cell_plain_call_refuses_what_it_cannot_run(monkeypatch, cell):
    """Calls the plain fast call does not take (other dtypes mixed, non-contiguous or
    non-ndarray arguments, list states, lengths/reverse/reset, a solver, wrong sizes) give the
    general path's result or its error, word for word."""
    p = make_problem(cell, B=2, T=3, I=4, H=6, state=True)
    x, W, R, b, b_r = p.args()
    kw = dict(state=p.state)
    parts = state_parts(cell, p.state)
    S = len(parts)
    calls = [
        lambda: p.fn(x[:, ::-1], W, R, b, b_r, **kw),                  # runs, copied
        lambda: p.fn(x.tolist(), W, R, b, b_r, **kw),
        lambda: p.fn(x, np.asfortranarray(W), R, b, b_r, **kw),
        lambda: p.fn(x.astype(np.float32), W, R, b, b_r, **kw),
        lambda: p.fn(x, W, R, b, b_r, state=list(parts) if S > 1 else parts[0].tolist()),
        lambda: p.fn(x, W, R, b, b_r, state=p.state, lengths=[3, 2]),
        lambda: p.fn(x, W, R, b, b_r, state=p.state, reverse=True),
        lambda: p.fn(x, W, R, b, b_r, state=p.state, reset=np.zeros((2, 3), bool)),
        lambda: p.fn(x, W, R, b, b_r, state=p.state, solver="jacobi")[:2],
        lambda: p.fn(x, W, R, b, b_r, heads=np.int64(1), **kw),
        lambda: p.fn(x[..., :-1], W, R, b, b_r, **kw),                 # errors from here
        lambda: p.fn(x, W[:-1], R, b, b_r, **kw),
        lambda: p.fn(x, W, R[:, :-1], b, b_r, **kw),
        lambda: p.fn(x, W, R, b[:-1], b_r, **kw),
        lambda: p.fn(x, W, R, b, b_r[:-1], **kw),
        lambda: p.fn(x, W, R, b, b_r, heads=0, **kw),
        lambda: p.fn(x, W, R, b, b_r, heads=4, **kw),
        lambda: p.fn(x[:, :, None], W, R, b, b_r, **kw),
        lambda: p.fn(x, W, R, b, b_r, state=(parts[0][:1],) + parts[1:]),
        lambda: p.fn(x, W, R, b.astype(np.float32), b_r, **kw),
        lambda: p.fn(x, W, R, b, b_r, state=(parts[0].astype(np.float32),) + parts[1:]),
        lambda: p.fn(x, W, R, b, b_r, state=(None,) * S if S > 1 else "h"),
        lambda: p.fn(x, W, R, b, b_r, state=parts + parts[:1]),
    ]
    p.fn(x, W, R, b, b_r, **kw)       # its remembered decisions must not serve the calls below
    spy = Spy(monkeypatch, _cell_call, "plain_forward")
    outcomes = [_outcome(c) for c in calls]
    assert spy.served == 0
    assert sum(type(o) is not tuple or isinstance(o[0], type) for o in outcomes) >= 13
    monkeypatch.setattr(_cell_call, "plain_forward", lambda *args: None)
    monkeypatch.setattr(_cell_call, "_prepare_valid", lambda *args: None)
    for o, call in zip(outcomes, calls):
        _equal_or_same_error(o, _outcome(call))


def _equal_or_same_error(a, b):
    if isinstance(a[0], type):
        assert a == b
    else:
        _equal(a, b)


@pytest.mark.skipif(ss.backend() != "compiled", reason="the plain fast call is compiled only")
@pytest.mark.parametrize("cell", CELLS)
def test_cell_plain_call_returns_fresh_writeable_arrays(monkeypatch, cell):
    """The shared zero inputs (b_r, state0) of the plain fast call never reach the caller:
    writing to one call's outputs changes no later call."""
    p = make_problem(cell, B=1, T=1, I=4, H=6, b_r=False)
    spy = Spy(monkeypatch, _cell_call, "plain_forward")
    first = p.call()
    expected = [a.copy() for a in flat_outputs(cell, first)]
    for a in flat_outputs(cell, first):
        assert a.flags.writeable
        a[...] = 7.0
    again = p.call()
    assert spy.served == 2
    for a, e in zip(flat_outputs(cell, again), expected):
        np.testing.assert_array_equal(a, e)


@pytest.mark.skipif(ss.backend() != "compiled", reason="the plain fast call is compiled only")
def test_cell_plain_call_remembers_per_thread_count_and_tuning(monkeypatch):
    """The plain fast call's decisions, remembered per shape, follow the thread count and a
    forced rnn block (the tuning's memo is cleared when the tuning changes)."""
    p = make_problem("lstm", B=2, T=3, I=4, H=6)
    seen = []
    real = _dispatch.ext_module

    class Recording:
        def __init__(self, module):
            self.module = module

        def __getattr__(self, name):
            def run(*args):
                seen.append((args[-4], args[-1]))    # forward_projected: block, threads
                return getattr(self.module, name)(*args)
            return run

    monkeypatch.setattr(_dispatch, "ext_module", lambda name: Recording(real(name)))
    with ss.threads(1):
        one = p.call()
    with ss.threads(2):
        two = p.call()
        with _tuning.forcing("rnn", 8):
            forced = p.call()
        p.call()
    assert [t for _, t in seen] == [1, 2, 2, 2]
    assert seen[2][0] == 8 and seen[3][0] == seen[1][0] == _tuning.AUTOMATIC
    for a, b in ((one, two), (one, forced)):
        _equal(a, b)


@pytest.mark.parametrize("kernel", ["ssd", "linear_attention"])
def test_remembered_blocking_keeps_the_chunk_errors(kernel):
    """A fast call remembers (chunk, threads) per sizes and chunk; a chunk equal to a
    remembered one but not an int (1.0, True) still gets the general path's error."""
    rng = np.random.default_rng(0)
    if kernel == "ssd":
        x, dt, A = rng.standard_normal((1, 4, 2, 3)), rng.uniform(0.1, 1, (1, 4, 2)), -np.ones(2)
        Bm, C = rng.standard_normal((1, 4, 5)), rng.standard_normal((1, 4, 5))
        run = lambda chunk: ss.ssd(x, dt, A, Bm, C, chunk=chunk)
    else:
        q, k, v = (rng.standard_normal((1, 2, 4, 3)) for _ in range(3))
        run = lambda chunk: ss.linear_attention(q, k, v, chunk=chunk)
    _equal(run(1), run(1))
    for bad in (1.0, True):
        with pytest.raises(TypeError, match="chunk must be an integer"):
            run(bad)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        run(0)


# ---- dispatch ------------------------------------------------------------------------------------

def test_threads_for_keeps_small_work_on_the_calling_thread():
    ss.set_num_threads(4)
    per = _dispatch.MIN_WORK_PER_THREAD
    assert _dispatch.threads_for(None) == 4
    assert _dispatch.threads_for(0) == 1
    assert _dispatch.threads_for(per - 1) == 1
    assert _dispatch.threads_for(2 * per) == 2
    assert _dispatch.threads_for(100 * per) == 4
    with ss.threads(1):
        assert _dispatch.threads_for(100 * per) == 1


def test_compiled_kernel_only_on_the_compiled_backend():
    if not _dispatch.compiled_available():
        pytest.skip("no compiled kernels in this build")
    assert _dispatch.compiled("scan", "selective_step") is _dispatch.ext_module(
        "scan").selective_step
    ss.set_backend("python")
    assert _dispatch.compiled("scan", "selective_step") is None


def test_python_backend_takes_the_general_path(monkeypatch):
    """The fast paths run compiled kernels only; the python backend keeps the references."""
    ss.set_backend("python")
    args, kw, _ = _selective(np.float64, 1, 2, 8, 4, 0)
    spy = Spy(monkeypatch, scan_module, "_fast_call")
    ss.selective_scan(*args, **kw)
    assert spy.served == 0


_MATCH = [_validate._match_python] + ([] if _validate.match is _validate._match_python
                                       else [_validate.match])


@pytest.mark.parametrize("match", _MATCH, ids=lambda f: f.__name__)
def test_match_accepts_only_valid_arrays(match):
    """The fast paths' check (compiled, and its Python twin): the sizes when every array is
    a C-contiguous ndarray of one float dtype with the plan's rank and matching sizes."""
    plan, names = _validate.plan({"x": "B T D", "A": "D N", "b?": "D", "out?!": "B _ N",
                                  "extra?": "E"})
    assert names == ("B", "T", "D", "N", "E")
    x, A, b, out = np.ones((2, 3, 4)), np.ones((4, 5)), np.ones(4), np.ones((2, 7, 5))
    assert match(plan, x, A, b, out, None) == (2, 3, 4, 5, -1)      # E: only in absent arrays
    assert match(plan, x, A, None, None, np.ones(6)) == (2, 3, 4, 5, 6)
    assert match(plan, *(a.astype(np.float32) for a in (x, A, b, out)), None) \
        == (2, 3, 4, 5, -1)
    readonly = out.copy()
    readonly.flags.writeable = False
    frozen_x = x.copy()
    frozen_x.flags.writeable = False
    assert match(plan, frozen_x, A, b, out, None) == (2, 3, 4, 5, -1)   # only "!" must be
    refused = [
        (None, A, b, out, None),                          # required
        (x, A, b, readonly, None),                        # not writeable
        (np.asfortranarray(x), A, b, out, None),          # not C-contiguous
        (x[:, ::2], A, b, out, None),
        (x.view(_Subclass), A, b, out, None),             # a subclass
        (x.tolist(), A, b, out, None),
        (x, A.astype(np.float32), b, out, None),          # mixed dtypes
        (x.astype(np.float16), A.astype(np.float16), None, None, None),
        (x.astype(np.int64), A.astype(np.int64), None, None, None),
        (x.astype(">f8"), A.astype(">f8"), None, None, None),      # byte-swapped
        (x, A, b[None], out, None),                       # rank
        (x, A, b[:3].copy(), out, None),                  # D differs
        (x, A, b, out[:, :, :4].copy(), None),            # N differs
        (x, np.ones((5, 5)), b, out, None),
        (x, A, b, out, np.ones((2, 2))),
    ]
    for arrays in refused:
        assert match(plan, *arrays) is None
    with pytest.raises(ValueError, match="takes 5 arrays"):
        match(plan, x, A)


@pytest.mark.parametrize("match", _MATCH, ids=lambda f: f.__name__)
def test_match_makes_the_missing_arrays(match):
    """Entries marked "+" ("+0") come after the sizes: the argument when given (checked like
    any other), else a new empty (zero) C-contiguous array of the call's dtype and sizes."""
    plan, _ = _validate.plan({"x": "B T D", "s?+0": "B D", "o?!+": "B D", "y+": "B T D"})
    for dtype in (np.float32, np.float64):
        x = np.ones((2, 3, 4), dtype)
        B, T, D, s, o, y = match(plan, x, None, None, None)
        assert (B, T, D) == (2, 3, 4)
        for a, shape in ((s, (2, 4)), (o, (2, 4)), (y, (2, 3, 4))):
            assert type(a) is np.ndarray and a.dtype == dtype and a.shape == shape
            assert a.flags.c_contiguous and a.flags.writeable
        assert not s.any()
        s0, o0 = np.ones((2, 4), dtype), np.ones((2, 4), dtype)
        made = match(plan, x, s0, o0, None)
        assert made[3] is s0 and made[4] is o0 and made[5].shape == (2, 3, 4)
        assert match(plan, x, s0, o0[:, :3].copy(), None) is None     # checked when given
        readonly = o0.copy()
        readonly.flags.writeable = False
        assert match(plan, x, s0, readonly, None) is None
    big = match(plan, np.ones((1, 2, 1000)), None, None, None)      # sizes past the small
    junk = [list(range(300, 1300)) for _ in range(3)]                 # ints Python shares
    assert big[:3] == (1, 2, 1000) and big[5].shape == (1, 2, 1000) and junk
    unknown, _ = _validate.plan({"x?": "B", "y+": "C"})
    assert match(unknown, np.ones(2), None) is None               # C named by no argument
    assert match(unknown, None, None) is None                     # no dtype to make it in
    with pytest.raises(ValueError, match="every size named"):
        _validate.plan({"y+": "B _"})


@pytest.mark.skipif(_validate.match is _validate._match_python,
                    reason="the compiled check is not built (the Python twin cannot overrun)")
def test_compiled_match_refuses_malformed_plans():
    """The compiled check reads the plan's bytes: one that does not come from plan() (cut
    short, a dimension index past its table) raises instead of reading out of bounds."""
    plan, _ = _validate.plan({"x": "B T"})
    for bad in (b"", plan[:-1], plan[:2] + bytes([0, 2, 0, 7])):
        with pytest.raises(ValueError, match="not a plan"):
            _validate.match(bad, np.ones((2, 3)))


def test_match_declines_zero_sizes():
    """A size-0 axis, named or not, declines the call: the general path handles it (every
    fast path left it there)."""
    plan, _ = _validate.plan({"x": "B T", "y": "T", "z?": "_"})
    for match in _MATCH:
        assert match(plan, np.ones((0, 3)), np.ones(3), None) is None
        assert match(plan, np.ones((2, 0)), np.ones(0), None) is None
        assert match(plan, np.ones((2, 3)), np.ones(3), np.ones(0)) is None
        assert match(plan, np.ones((2, 3)), np.ones(3), np.ones(1)) == (2, 3)


@pytest.mark.skipif(not _dispatch.compiled_available(), reason="compiled kernels only")
def test_pointer_kernels_check_their_arrays():
    """The kernels that read their arrays through pointers (no typed memoryviews: small calls)
    refuse what a typed memoryview refused -- another dtype, rank or layout, a read-only
    output -- with a ValueError instead of reading out of bounds."""
    f = np.float32
    x, A, Bv = np.ones((1, 1, 8), f), -np.ones((8, 4), f), np.ones((1, 1, 4), f)
    state, y, out = np.zeros((1, 8, 4), f), np.empty((1, 1, 8), f), np.empty((1, 8, 4), f)
    step = _dispatch.ext_module("scan").selective_step

    def run_step(**changes):
        args = dict(x=x, dt=x, A=A, Bm=Bv, C=Bv, D=None, z=None, dt_bias=None, softplus=False,
                    state=state, y=y, state_out=out, num_threads=1)
        args.update(changes)
        return step(*args.values())

    run_step()
    readonly = y.copy()
    readonly.flags.writeable = False
    for bad in (dict(x=x.astype(np.float64)), dict(A=A[None]), dict(C=Bv[..., ::2]),
                dict(D=np.ones((1, 8), f)), dict(y=readonly), dict(state=[0.0]),
                dict(x=np.ones((1, 2, 8), f), dt=np.ones((1, 2, 8), f))):
        with pytest.raises(ValueError):
            run_step(**bad)
    q, S0 = np.ones((1, 1, 2, 4), f), np.zeros((1, 1, 4, 4), f)
    o, S = np.empty((1, 1, 2, 4), f), np.empty((1, 1, 4, 4), f)
    forward = _dispatch.ext_module("linear_attention").linear_forward

    def run_forward(**changes):
        args = dict(q=q, k=q, v=q, g=None, S0=S0, chunk=2, group=1, lengths=None, reset=None,
                    o=o, S_out=S, num_threads=1)
        args.update(changes)
        return forward(*args.values())

    run_forward()
    run_forward(q=np.ones((1, 1, 4, 4), f)[:, :, ::2], o=np.empty((1, 1, 4, 4), f)[:, :, ::2])
    S_readonly = S.copy()
    S_readonly.flags.writeable = False
    step = _dispatch.ext_module("linear_attention").linear_step
    q1 = q[:, :, :1].copy()
    step(q1, q1, q1, None, S0, q1.copy(), S, 1)
    for bad in ((q1, q1.astype(np.float64), q1, None, S0, q1.copy(), S, 1),
                (q1, q1, q1, np.ones((1, 1), f), S0, q1.copy(), S, 1),
                (q1, q1, q1, None, S0, q1.copy(), S_readonly, 1)):
        with pytest.raises(ValueError):
            step(*bad)
    for bad in (dict(k=q.astype(np.float64)), dict(v=np.ones((1, 1, 2, 8), f)[..., ::2]),
                dict(S0=np.zeros((1, 1, 4, 8), f)[..., ::2]), dict(S_out=S_readonly),
                dict(g=np.zeros((1, 1, 2), np.float64)), dict(o=q[0])):
        with pytest.raises(ValueError):
            run_forward(**bad)


@pytest.mark.skipif(not _dispatch.compiled_available(), reason="compiled kernels only")
def test_ssd_kernels_check_their_arrays():
    """ssd_forward and ssd_step read their arrays through pointers: another dtype, rank or
    layout, or a read-only output, is a ValueError."""
    f = np.float32
    x, dt, A, Bv = np.ones((1, 1, 2, 4), f), np.ones((1, 1, 2), f), -np.ones(2, f), \
        np.ones((1, 1, 3), f)
    state, y, h = np.zeros((1, 2, 4, 3), f), np.empty((1, 1, 2, 4), f), np.empty((1, 2, 4, 3), f)
    ext = _dispatch.ext_module("ssd")

    def forward(**changes):
        args = dict(x=x, dt=dt, dt_bias=None, sp=False, A=A, B=Bv, C=Bv, D=None, state=state,
                    chunk=1, lengths=None, reset=None, y=y, h_out=h, num_threads=1)
        args.update(changes)
        return ext.ssd_forward(*args.values())

    def step(**changes):
        args = dict(x=x, dt=dt, A=A, B=Bv, C=Bv, D=None, z=None, dt_bias=None, sp=False,
                    state=state, y=y, out_state=h, num_threads=1)
        args.update(changes)
        return ext.ssd_step(*args.values())

    readonly = h.copy()
    readonly.flags.writeable = False
    forward()
    forward(lengths=np.ones(1, np.int64), reset=np.zeros((1, 1), bool))
    step()
    bad = [dict(x=x.astype(np.float64)), dict(A=A[None]), dict(C=Bv[:, :, None]),
           dict(D=np.ones((2, 4, 1), f)), dict(state=np.zeros((1, 2, 8, 3), f)[:, :, ::2])]
    for fn, extra in ((forward, [dict(h_out=readonly), dict(lengths=np.ones(1, np.int32))]),
                      (step, [dict(out_state=readonly), dict(B=[1.0, 2.0, 3.0])])):
        for changes in bad + extra:
            with pytest.raises(ValueError):
                fn(**changes)


class _Subclass(np.ndarray):
    """An ndarray subclass: the fast paths leave it to the general path's conversion."""
