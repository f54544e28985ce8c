"""The pool of huge-page blocks behind the RNN kernels' packed weights and large buffers
(ext/_page_pool.h): every block comes back after a call, reused blocks carry no stale
values into a result, the idle bytes stay under the bound, and calls from several Python
threads at once share it safely."""
import gc
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import statescan as ss
from statescan import _dispatch

pytestmark = [pytest.mark.skipif(not _dispatch.compiled_available(),
                                 reason="compiled kernels not built"),
              pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="the pool keeps huge pages: Linux only")]


def _pool():
    """(idle blocks, their bytes, blocks in use, the bound on idle bytes)."""
    return _dispatch.ext_module("rnn")._pool_state()


def _weights(H, I, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 12, I)).astype(dtype)
    W = (rng.standard_normal((4 * H, I)) / np.sqrt(I)).astype(dtype)
    R = (rng.standard_normal((4 * H, H)) / np.sqrt(H)).astype(dtype)
    return x, W, R


@pytest.mark.parametrize("threads", [1, 2])
def test_every_block_returns_and_reused_blocks_leave_no_trace(threads):
    # H = 300: packs of 1.5 MB (huge pages) with a partial last panel, whose zero padding a
    # reused block must not take from the call before (that one leaves NaN everywhere)
    x, W, R = _weights(300, 200, np.float32)
    with ss.threads(threads):
        first = ss.lstm(x, W, R)
        assert _pool()[2] == 0
        idle_after_one = _pool()[0]
        assert idle_after_one > 0            # the packs stay for the next call
        nan = np.full_like(R, np.nan)
        bad, _ = ss.lstm(x, np.full_like(W, np.nan), nan)
        assert np.isnan(bad).all()
        again = ss.lstm(x, W, R)
    assert _pool()[2] == 0
    np.testing.assert_array_equal(again[0], first[0])
    for got, want in zip(again[1], first[1]):
        np.testing.assert_array_equal(got, want)


def test_backward_and_streams_return_their_blocks():
    x, W, R = _weights(300, 200, np.float64, seed=1)
    out, pullback = ss.vjp(ss.lstm, x, W, R)
    grads = pullback((np.ones_like(out[0]), None))
    assert all(np.isfinite(g).all() for g in grads)
    s = ss.stream(ss.lstm, W, R)
    y, _ = s(x[:, :3])
    np.testing.assert_array_equal(y, out[0][:, :3])
    assert _pool()[2] == 2                   # the stream keeps its packed R and W
    del s, pullback
    gc.collect()
    assert _pool()[2] == 0


def test_idle_bytes_stay_under_the_bound():
    # a stream holds its packs of R (32 MiB) and W (36 MiB) at once; freed together they
    # exceed the 64 MiB bound, so the older one goes back to the system
    H, I = 1024, 1100
    W, R = np.ones((4 * H, I)), np.ones((4 * H, H))
    s = ss.stream(ss.lstm, W, R)
    idle, idle_bytes, used, bound = _pool()
    assert used == 2 and bound == 64 << 20
    del s
    gc.collect()
    idle, idle_bytes, used, bound = _pool()
    assert used == 0 and idle > 0 and (36 << 20) <= idle_bytes <= bound


def test_calls_from_several_python_threads_share_the_pool():
    x, W, R = _weights(300, 200, np.float32, seed=2)
    want = ss.lstm(x, W, R)[0]

    def call(_):
        return ss.lstm(x, W, R)[0]

    with ss.threads(1), ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(24)))
    for got in results:
        np.testing.assert_array_equal(got, want)
    assert _pool()[2] == 0
