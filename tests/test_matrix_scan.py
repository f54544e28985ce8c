"""matrix_scan (diagonal, dense and blocked h_t = A_t h_{t-1} + b_t): compiled against the
numpy reference and naive loops, segmentation and thread counts, vjp, argument checking."""
import warnings

import numpy as np
import pytest

import statescan as ss
from statescan import parallel
from statescan._reference import parallel as ref
from statescan._reference import scan as ref_scan

compiled = pytest.mark.skipif(ss.backend() != "compiled", reason="compiled kernels not built")


# ---- matrix_scan ----------------------------------------------------------------------------

def naive_scan(A, b, h0):
    h, out = h0.copy(), np.empty_like(b)
    for t in range(b.shape[1]):
        for i in np.ndindex(b.shape[0]):
            h[i] = (A[i][t] * h[i] if A.ndim == b.ndim else A[i][t] @ h[i]
                    if A.ndim == 4 else np.einsum("kij,kj->ki", A[i][t], h[i])) + b[i][t]
        out[:, t] = h
    return out


SCAN_SHAPES = {"diagonal": ((3, 37, 5), (3, 37, 5)), "dense": ((3, 37, 4, 4), (3, 37, 4)),
               "blocked": ((2, 37, 3, 2, 2), (2, 37, 3, 2)),
               "blocked-diagonal": ((2, 37, 3, 2), (2, 37, 3, 2))}


@pytest.mark.parametrize("kind", SCAN_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matrix_scan_compiled_reference_naive(kind, dtype):
    Ashape, bshape = SCAN_SHAPES[kind]
    rng = np.random.default_rng(4)
    A = (rng.standard_normal(Ashape) * 0.6).astype(dtype)
    b = rng.standard_normal(bshape).astype(dtype)
    h0 = rng.standard_normal((bshape[0],) + bshape[2:]).astype(dtype)
    h = ss.matrix_scan(A, b, h0)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(h, naive_scan(A, b, h0), atol=tol, rtol=tol)
    previous = ss.backend()
    ss.set_backend("python")
    try:
        np.testing.assert_allclose(ss.matrix_scan(A, b, h0), h, atol=tol, rtol=tol)
    finally:
        ss.set_backend(previous)
    assert h.dtype == dtype
    np.testing.assert_array_equal(ss.matrix_scan(A, b), ss.matrix_scan(A, b, np.zeros_like(h0)))


def test_matrix_scan_non_contiguous_and_empty():
    rng = np.random.default_rng(5)
    A = rng.standard_normal((6, 20, 4, 4))[::2] * 0.5
    b = rng.standard_normal((3, 20, 8))[:, :, ::2]
    np.testing.assert_allclose(ss.matrix_scan(A, b), naive_scan(A, b, np.zeros((3, 4))),
                               atol=1e-12)
    for shape in [(0, 5, 3), (2, 0, 3)]:
        assert ss.matrix_scan(np.ones(shape), np.ones(shape)).shape == shape


def test_matrix_scan_nan_propagates():
    a = np.full((1, 10, 2), 0.5)
    b = np.ones((1, 10, 2))
    b[0, 4, 1] = np.nan
    h = ss.matrix_scan(a, b)
    assert np.isnan(h[0, 4:, 1]).all() and np.isfinite(h[0, :, 0]).all()


@compiled
@pytest.mark.parametrize("kind", ["diagonal", "dense"])
def test_segmented_scan_thread_count_bit_identical(kind):
    rng = np.random.default_rng(6)
    T = 3001     # segments of unequal length
    if kind == "diagonal":
        a = rng.uniform(-1, 1, (1, T, 40))
        b = rng.standard_normal((1, T, 40))
        h0 = rng.standard_normal((1, 40))
        run = lambda: parallel._diag_scan(a, b, h0)          # long, few rows: segmented
        expected = ref_scan.linear_scan(a, b, h0)
    else:
        A = rng.standard_normal((1, T, 2, 3, 3)) * 0.4
        b = rng.standard_normal((1, T, 2, 3))
        h0 = rng.standard_normal((1, 2, 3))
        run = lambda: (parallel._block_scan(A, False, b, h0, nseg=7),
                       parallel._block_scan(A, True, b, h0, nseg=7))
        expected = (ref.block_scan(A, False, b, h0), ref.block_scan(A, True, b, h0))
    ss.set_num_threads(2)
    assert parallel._threads(7, b.size * 9) == 2    # big enough to really use the threads
    results = []
    for n in (1, 2, 3):
        ss.set_num_threads(n)
        results.append(run())
    np.testing.assert_allclose(results[0], expected, atol=1e-12, rtol=1e-12)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


@pytest.mark.parametrize("kind", SCAN_SHAPES)
def test_matrix_scan_vjp_finite_differences(kind):
    Ashape, bshape = SCAN_SHAPES[kind]
    rng = np.random.default_rng(7)
    A = rng.standard_normal(Ashape) * 0.5
    b = rng.standard_normal(bshape)
    h0 = rng.standard_normal((bshape[0],) + bshape[2:])
    dh = rng.standard_normal(bshape)
    h, pullback = ss.vjp(ss.matrix_scan, A, b, h0)
    np.testing.assert_array_equal(h, ss.matrix_scan(A, b, h0))
    dA, db, dh0 = pullback(dh)
    loss = lambda A_, b_, h0_: np.sum(dh * ss.matrix_scan(A_, b_, h0_))
    eps = 1e-6
    for arr, grad, which in ((A, dA, 0), (b, db, 1), (h0, dh0, 2)):
        for idx in [tuple(rng.integers(0, s) for s in arr.shape) for _ in range(4)]:
            plus, minus = [A.copy(), b.copy(), h0.copy()], [A.copy(), b.copy(), h0.copy()]
            plus[which][idx] += eps
            minus[which][idx] -= eps
            fd = (loss(*plus) - loss(*minus)) / (2 * eps)
            assert abs(fd - grad[idx]) < 1e-6 * max(1, abs(fd))
    assert len(ss.vjp(ss.matrix_scan, A, b)[1](dh)) == 2


def test_matrix_scan_bad_input():
    b = np.zeros((2, 5, 3))
    with pytest.raises(TypeError, match="A"):
        ss.matrix_scan(np.zeros((2, 5, 3), np.int64), b)
    with pytest.raises(TypeError, match="b"):
        ss.matrix_scan(np.zeros((2, 5, 3), np.float32), b)
    with pytest.raises(TypeError, match="A"):
        ss.matrix_scan(np.zeros((2, 5, 3), complex), b)
    with pytest.raises(ValueError, match=r"A must have shape \[B, T, n, n\] = \[2, 5, 3, 3\]"):
        ss.matrix_scan(np.zeros((2, 5, 3, 2)), b)
    with pytest.raises(ValueError, match="A must have shape"):
        ss.matrix_scan(np.zeros((2, 5)), b)
    with pytest.raises(ValueError, match=r"state must have shape \[B, n\] = \[2, 3\]"):
        ss.matrix_scan(np.zeros((2, 5, 3)), b, np.zeros((3,)))
    with pytest.warns(DeprecationWarning), \
            pytest.raises(ValueError, match=r"h0 must have shape \[B, n\] = \[2, 3\]"):
        ss.matrix_scan(np.zeros((2, 5, 3)), b, h0=np.zeros((3,)))
    with pytest.raises(ValueError, match="b must have shape"):
        ss.matrix_scan(np.zeros((5, 3)), np.zeros((5, 3)))


@pytest.mark.parametrize("kind", ["diagonal", "dense"])
def test_matrix_scan_pullback_none_is_zero(kind):
    Ashape, bshape = SCAN_SHAPES[kind]
    rng = np.random.default_rng(9)
    A, b = rng.standard_normal(Ashape) * 0.5, rng.standard_normal(bshape)
    h0 = rng.standard_normal((bshape[0],) + bshape[2:])
    _, pullback = ss.vjp(ss.matrix_scan, A, b, h0)
    grads = pullback(None)
    assert [g.shape for g in grads] == [A.shape, b.shape, h0.shape]
    assert not any(np.any(g) for g in grads)


def test_matrix_scan_state_keyword_and_deprecated_h0():
    rng = np.random.default_rng(10)
    A, b = rng.standard_normal((2, 6, 3, 3)) * 0.4, rng.standard_normal((2, 6, 3))
    h0 = rng.standard_normal((2, 3))
    expected = ss.matrix_scan(A, b, state=h0)
    with pytest.warns(DeprecationWarning, match="state="):
        np.testing.assert_array_equal(ss.matrix_scan(A, b, h0=h0), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(ss.matrix_scan(A, b, h0), expected)


@pytest.mark.parametrize("backend", ["compiled", "python"])
def test_diagonal_matrix_scan_is_linear_scan(backend):
    """One kernel serves both APIs: the same bits, forward and gradients."""
    rng = np.random.default_rng(11)
    a, b = rng.uniform(-1, 1, (3, 9, 20)), rng.standard_normal((3, 9, 20))
    h0 = rng.standard_normal((3, 20))
    previous = ss.backend()
    ss.set_backend(backend)
    try:
        h, pb = ss.vjp(ss.matrix_scan, a, b, h0)
        hl, pbl = ss.vjp(ss.linear_scan, a, b, h0)
        np.testing.assert_array_equal(h, hl)
        dh = rng.standard_normal(h.shape)
        for g, gl in zip(pb(dh), pbl(dh)):
            np.testing.assert_array_equal(g, gl)
    finally:
        ss.set_backend(previous)
