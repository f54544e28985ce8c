"""Chunked linear attention (with decay), Mamba-2's SSD, and O(T)-memory softmax attention."""
import numpy as np
import pytest

DTYPES = ["float32", "float64"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", [False, True], ids=["plain", "decay"])
@pytest.mark.parametrize("B,NH,T,d", [(1, 4, 2048, 64), (4, 8, 512, 64)])
def test_linear_attention(benchmark, kernel, rand, B, NH, T, d, decay, dtype):
    fn = kernel("linear_attention")
    q, k, v = (rand(B, NH, T, d, dtype=dtype, scale=d ** -0.5) for _ in range(3))
    lam = np.linspace(0.9, 0.999, NH).astype(dtype) if decay else None
    benchmark.group = "linear_attention"
    o, _ = benchmark(fn, q, k, v, decay=lam)
    assert o.shape == (B, NH, T, d)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Bt,T,NH,P,N", [(1, 2048, 8, 64, 64), (4, 512, 8, 64, 128)])
def test_ssd(benchmark, kernel, rand, Bt, T, NH, P, N, dtype):
    fn = kernel("ssd")
    x = rand(Bt, T, NH, P, dtype=dtype)
    dt = np.abs(rand(Bt, T, NH, dtype=dtype, scale=0.1))
    A = -np.exp(rand(NH, dtype=dtype, scale=0.5))
    B, C = rand(Bt, T, N, dtype=dtype), rand(Bt, T, N, dtype=dtype)
    benchmark.group = "ssd"
    y, _ = benchmark(fn, x, dt, A, B, C)
    assert y.shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("B,NH,T,d", [(1, 4, 1024, 64), (2, 8, 512, 64)])
def test_attention(benchmark, kernel, rand, B, NH, T, d, causal, dtype):
    fn = kernel("attention")
    q, k, v = (rand(B, NH, T, d, dtype=dtype) for _ in range(3))
    benchmark.group = "attention"
    o = benchmark(fn, q, k, v, causal=causal)
    assert o.shape == (B, NH, T, d)
