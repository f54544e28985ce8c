"""Fused RNN cells, forward and forward+backward (vjp), float32 and float64."""
import numpy as np
import pytest

import statescan

T = 64
GATES = {"elman": 1, "lstm": 4, "gru": 3, "slstm": 4}
GRID = [(1, 64, 1), (16, 256, 1), (16, 256, 4)]          # (B, H, heads), I = H


def _inputs(rand, cell, B, H, heads, dtype):
    G, D = GATES[cell], H // heads
    x = rand(B, T, H, dtype=dtype)
    W = rand(G * H, H, dtype=dtype, scale=H ** -0.5)
    R = rand(*((G * H, H) if heads == 1 else (heads, G * D, D)), dtype=dtype, scale=D ** -0.5)
    b = rand(G * H, dtype=dtype, scale=0.1)
    return x, W, R, b


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("B,H,heads", GRID, ids=lambda v: str(v))
@pytest.mark.parametrize("cell", list(GATES))
def test_forward(benchmark, kernel, rand, cell, B, H, heads, dtype):
    fn = kernel(cell)
    x, W, R, b = _inputs(rand, cell, B, H, heads, dtype)
    benchmark.group = f"rnn {cell} forward"
    benchmark.extra_info["steps"] = T
    y, _ = benchmark(fn, x, W, R, b, heads=heads)
    assert y.shape == (B, T, H) and np.isfinite(y).all()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("B,H,heads", GRID, ids=lambda v: str(v))
@pytest.mark.parametrize("cell", list(GATES))
def test_forward_backward(benchmark, kernel, rand, cell, B, H, heads, dtype):
    fn = kernel(cell)
    x, W, R, b = _inputs(rand, cell, B, H, heads, dtype)
    dy = rand(B, T, H, dtype=dtype)

    def step():
        _, pullback = statescan.vjp(fn, x, W, R, b, heads=heads)
        return pullback((dy, None))

    benchmark.group = f"rnn {cell} forward+backward"
    benchmark.extra_info["steps"] = T
    dx, dW, dR, db = benchmark(step)
    assert dx.shape == x.shape and dR.shape == R.shape
