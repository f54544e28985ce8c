"""statescan.stream: weights packed once, token-by-token calls equal one whole-sequence call."""
import numpy as np
import pytest

import statescan as ss
from _helpers import CELL_SIZES


def _weights(cell, H, I, heads, dtype, rng, with_W=True):
    G = CELL_SIZES[cell][0]
    D = H // heads
    W = (rng.standard_normal((G * H, I)) / np.sqrt(I)).astype(dtype) if with_W else None
    R = rng.standard_normal((G * H, H) if heads == 1 else (heads, G * D, D)) / np.sqrt(D)
    b = rng.standard_normal(G * H).astype(dtype)
    b_r = rng.standard_normal(G * H).astype(dtype)
    return W, R.astype(dtype), b, b_r


@pytest.mark.parametrize("backend", ["compiled", "python"])
@pytest.mark.parametrize("cell", sorted(CELL_SIZES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("heads,with_W", [(1, True), (2, True), (1, False)])
def test_stream_token_by_token_is_bit_identical(backend, cell, dtype, heads, with_W):
    rng = np.random.default_rng(7)
    B, T, H = 3, 9, 10
    W, R, b, b_r = _weights(cell, H, 6, heads, dtype, rng, with_W)
    I = 6 if with_W else CELL_SIZES[cell][0] * H
    x = rng.standard_normal((B, T, I)).astype(dtype)
    previous = ss.backend()
    ss.set_backend(backend)
    try:
        fn = getattr(ss, cell)
        y_full, state_full = fn(x, W, R, b, b_r, heads=heads)
        s = ss.stream(fn, W, R, b, b_r, heads=heads)
        state, ys = None, []
        for t in range(T):
            y, state = s(x[:, t:t + 1], state)
            ys.append(y)
        # a chunk of several steps, fed a copy of the state (not the object the stream returned)
        y2, _ = s(x[:, :4], None)
    finally:
        ss.set_backend(previous)
    assert np.array_equal(np.concatenate(ys, axis=1), y_full)
    for got, want in zip(np.atleast_1d(state) if isinstance(state, tuple) else [state],
                         state_full if isinstance(state_full, tuple) else [state_full]):
        assert np.array_equal(got, want)
    assert np.array_equal(y2, y_full[:, :4])


def test_stream_accepts_a_state_it_did_not_make_and_validates_input():
    rng = np.random.default_rng(1)
    W, R, b, b_r = _weights("lstm", 8, 5, 1, np.float64, rng)
    s = ss.stream(ss.lstm, W, R, b, b_r)
    x = rng.standard_normal((2, 3, 5))
    h0, c0 = rng.standard_normal((2, 8)), rng.standard_normal((2, 8))
    y, (h, c) = s(x, (h0, c0))
    y_ref, (h_ref, c_ref) = ss.lstm(x, W, R, b, b_r, state=(h0, c0))
    assert np.array_equal(y, y_ref) and np.array_equal(h, h_ref) and np.array_equal(c, c_ref)
    with pytest.raises(ValueError, match="x"):
        s(rng.standard_normal((2, 3, 4)))                  # wrong input size
    with pytest.raises(TypeError, match="x"):
        s(x.astype(np.float32))                           # dtype differs from the weights
    with pytest.raises(ValueError, match="state h"):
        s(x, (h0[:1], c0))
    with pytest.raises(TypeError, match="fn"):
        ss.stream(np.tanh, W, R)
