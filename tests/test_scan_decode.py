"""selective_scan decoding: one-token calls with a state (the step kernel on the [B, Dm, N]
state) equal one call over the sequence bit for bit, out_state updates in place, and the fast
argument path gives what the full validation gives."""
import numpy as np
import pytest

import statescan as ss
from conftest import assert_all_equal, using_backend, using_threads
from test_scan import selective_problem, strided

BACKENDS = ("compiled", "python")
SHAPES = [dict(Bt=2, T=6, Dm=21, N=16), dict(Bt=1, T=5, Dm=16, N=5), dict(Bt=3, T=4, Dm=70, N=1)]


def token(args, kw, t):
    """The arguments of step t alone (every per-step array cut to [B, 1, ...])."""
    cut = lambda a: np.ascontiguousarray(a[:, t:t + 1])            # noqa: E731
    x, dt, A, B, C, D = args
    return (cut(x), cut(dt), A, cut(B), cut(C), D), dict(kw, z=cut(kw["z"]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_token_by_token_equals_one_call(backend, dtype, shape):
    args, kw = selective_problem(dtype=dtype, z=True, dt_bias=True, softplus=True, state=True,
                                 **SHAPES[shape])
    with using_backend(backend):
        y, final = ss.selective_scan(*args, **kw)
        state = kw["state"].copy()
        ys = []
        for t in range(args[0].shape[1]):
            targs, tkw = token(args, kw, t)
            y_t, new = ss.selective_scan(*targs, **dict(tkw, state=state))
            assert new is not state
            ys.append(y_t)
            state = new
    assert_all_equal((np.concatenate(ys, axis=1), state), (y, final))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_state_updates_in_place(backend):
    args, kw = selective_problem(Bt=2, T=3, Dm=20, N=4, z=True, state=True)
    with using_backend(backend):
        y, final = ss.selective_scan(*args, **kw)
        state = kw["state"].copy()
        for t in range(3):
            targs, tkw = token(args, kw, t)
            _, returned = ss.selective_scan(*targs, **dict(tkw, state=state), out_state=state)
            assert returned is state
        assert_all_equal((state,), (final,))
        other = np.empty_like(final)                     # a different array, any T
        _, returned = ss.selective_scan(*args, **kw, out_state=other)
        assert returned is other
        assert_all_equal((other,), (final,))


def test_fast_path_equals_full_validation():
    """Strided or list arguments take the full validation; the results are the same bits."""
    args, kw = selective_problem(Bt=2, T=1, Dm=19, N=6, z=True, dt_bias=True, softplus=True,
                                 state=True)
    fast = ss.selective_scan(*args, **kw)
    slow = ss.selective_scan(*(strided(a) for a in args),
                             **{k: strided(v) if isinstance(v, np.ndarray) else v
                                for k, v in kw.items()})
    assert_all_equal(fast, slow)
    listed = ss.selective_scan(*args[:5], args[5].tolist(), **kw)
    assert_all_equal(fast, listed)


def test_step_kernel_threads_bit_identical():
    args, kw = selective_problem(Bt=3, T=1, Dm=1000, N=16, z=True, state=True)
    runs = []
    for threads in (1, 2, 3):
        with using_threads(threads):
            runs.append(ss.selective_scan(*args, **kw))
    for other in runs[1:]:
        assert_all_equal(other, runs[0])


def test_bad_out_state_names_it():
    args, kw = selective_problem(Bt=2, T=1, Dm=5, N=3, state=True)
    state = kw["state"]
    with pytest.raises(ValueError, match="out_state"):
        ss.selective_scan(*args, **kw, out_state=np.empty((2, 5, 4)))
    with pytest.raises(TypeError, match="out_state"):
        ss.selective_scan(*args, **kw, out_state=state.astype(np.float32))
    with pytest.raises(TypeError, match="out_state"):
        ss.selective_scan(*args, **kw, out_state=state.tolist())
    readonly = state.copy()
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="out_state"):
        ss.selective_scan(*args, **kw, out_state=readonly)
    with pytest.raises(ValueError, match="out_state"):
        ss.selective_scan(*args, **kw, out_state=np.empty((2, 3, 5)).transpose(0, 2, 1))
