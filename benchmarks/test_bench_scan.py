"""Linear recurrences: diagonal linear scan and Mamba-1's selective scan."""
import numpy as np
import pytest

import statescan

DTYPES = ["float32", "float64"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,D", [(1, 4096, 256), (16, 1024, 256)])
def test_linear_scan(benchmark, kernel, rand, B, T, D, dtype):
    fn = kernel("linear_scan")
    a = np.exp(-np.abs(rand(B, T, D, dtype=dtype, scale=0.1)))
    b = rand(B, T, D, dtype=dtype)
    benchmark.group = "linear_scan"
    h = benchmark(fn, a, b)
    assert h.shape == (B, T, D)


def _selective_inputs(rand, Bt, T, Dm, N, dtype):
    x = rand(Bt, T, Dm, dtype=dtype)
    dt = np.abs(rand(Bt, T, Dm, dtype=dtype, scale=0.1))
    A = -np.exp(rand(Dm, N, dtype=dtype, scale=0.5))
    return x, dt, A, rand(Bt, T, N, dtype=dtype), rand(Bt, T, N, dtype=dtype), rand(Dm, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Bt,T,Dm,N", [(1, 1024, 256, 16), (16, 256, 1024, 16)])
def test_selective_scan(benchmark, kernel, rand, Bt, T, Dm, N, dtype):
    fn = kernel("selective_scan")
    args = _selective_inputs(rand, Bt, T, Dm, N, dtype)
    benchmark.group = "selective_scan forward"
    y, _ = benchmark(fn, *args)
    assert y.shape == (Bt, T, Dm)


@pytest.mark.parametrize("dtype", DTYPES)
def test_selective_scan_backward(benchmark, kernel, rand, dtype):
    fn = kernel("selective_scan")
    args = _selective_inputs(rand, 1, 1024, 256, 16, dtype)
    dy = rand(1, 1024, 256, dtype=dtype)

    def step():
        _, pullback = statescan.vjp(fn, *args)
        return pullback((dy, None))

    benchmark.group = "selective_scan forward+backward"
    grads = benchmark(step)
    assert grads[0].shape == args[0].shape
