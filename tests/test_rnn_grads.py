"""The compiled parameter gradients (dx through `input_grads`, dW and dR through `weight_grads`,
taken from B*T = _cell_call.COMPILED_GRADS_MIN_ROWS rows on): they match the python backend's
numpy products within float tolerance for every cell, heads, W None or given, both dtypes and
odd sizes, and give the same bits for any thread count."""
import numpy as np
import pytest

import statescan as ss
from statescan import _cell_call, _dispatch
from _helpers import CELLS, assert_all_equal, make_problem, random_cotangent, using_backend

pytestmark = pytest.mark.skipif(not ss.build_info()["variant"], reason="no compiled backend")

TOL = {np.float32: 2e-4, np.float64: 1e-11}


def _grads(p, backend, threads=1):
    with using_backend(backend), ss.threads(threads):
        out, pullback = ss.vjp(p.fn, *p.args(), **p.kwargs())
        return pullback(random_cotangent(p.cell, out))


def _close(got, want, tol, what):
    assert len(got) == len(want), what
    for k, (g, w) in enumerate(zip(got, want)):
        if isinstance(w, tuple):
            _close(g, w, tol, f"{what}[{k}]")
        elif w is None:
            assert g is None, f"{what}[{k}]"
        else:
            scale = max(1.0, float(np.max(np.abs(w))) if w.size else 1.0)
            assert g.dtype == w.dtype, f"{what}[{k}]"
            np.testing.assert_allclose(g, w, rtol=0, atol=tol * scale, err_msg=f"{what}[{k}]")


# (H, heads): 1, 7, 33 and 130 units, with one head and several (D = 1, 11, 65)
SIZES = [(1, 1), (7, 1), (7, 7), (33, 1), (33, 3), (130, 1), (130, 2)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("W", [True, False], ids=["W", "W_none"])
@pytest.mark.parametrize("H,heads", SIZES)
@pytest.mark.parametrize("cell", CELLS)
def test_compiled_gradients_match_python(cell, H, heads, W, dtype):
    # B*T = 141 rows (past the threshold, a multiple of nothing the kernels block by)
    p = make_problem(cell, B=3, T=47, I=13, H=H, heads=heads, W=W, dtype=dtype, state=True,
                     seed=H + heads)
    assert 3 * 47 >= _cell_call.COMPILED_GRADS_MIN_ROWS
    _close(_grads(p, "compiled"), _grads(p, "python"), TOL[dtype], f"{cell} H={H} heads={heads}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cell", CELLS)
def test_long_k_gradients_match_python(cell, dtype):
    """B*T = 5000 rows: many chunks of k (the accumulators carried through them)."""
    p = make_problem(cell, B=2, T=2500, I=40, H=36, heads=2, dtype=dtype, state=True, seed=9)
    _close(_grads(p, "compiled"), _grads(p, "python"), TOL[dtype], f"{cell} long")


@pytest.mark.parametrize("cell", CELLS)
def test_gradients_bit_identical_across_threads(cell):
    p = make_problem(cell, B=4, T=300, I=96, H=128, heads=2, dtype=np.float32, state=True,
                     seed=4)
    assert_all_equal(_grads(p, "compiled", threads=2), _grads(p, "compiled", threads=1),
                     f"{cell}: 2 threads vs 1")


def _weight_grads_reference(a, b, groups, heads, M, N):
    K = a.shape[0]
    da = M // groups
    return np.stack([
        a.reshape(K, groups, heads, da)[:, :, h].reshape(K, M).T.astype(np.float64)
        @ b[:, h * N:(h + 1) * N].astype(np.float64) for h in range(heads)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("K,groups,heads,da,N", [
    (1, 1, 1, 1, 1), (7, 1, 1, 33, 7), (130, 4, 3, 11, 11), (5000, 1, 1, 130, 33),
    (777, 3, 2, 65, 65), (300, 1, 1, 1024, 256), (64, 4, 1, 7, 130)])
def test_weight_grads_kernel(K, groups, heads, da, N, dtype):
    """out[h] = A_h^T B_h (A_h: each gate block's head slice) against float64 numpy, for any
    K, including K chunks and panels that end part-way; the same bits on 1, 2 and 3 threads."""
    ext = _dispatch.ext_module("rnn")
    rng = np.random.default_rng(K + N)
    M = groups * da
    a = rng.standard_normal((K, groups * heads * da)).astype(dtype)
    b = rng.standard_normal((K, heads * N)).astype(dtype)
    want = _weight_grads_reference(a, b, groups, heads, M, N)
    outs = []
    for threads in (1, 2, 3):
        out = np.full((heads, M, N), np.nan, dtype)
        ext.weight_grads(a, b, groups, out, threads)
        outs.append(out)
    tol = (3e-6 if dtype == np.float32 else 1e-14) * np.sqrt(K)
    np.testing.assert_allclose(outs[0], want, rtol=0, atol=tol * max(1.0, np.abs(want).max()))
    assert_all_equal(outs[1:], outs[:1] * 2, "threads 2, 3 vs 1")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("K,groups,M,N1,N2", [(1, 1, 4, 3, 5), (300, 1, 256, 64, 64),
                                             (1500, 4, 100, 37, 50), (700, 1, 40, 0, 9),
                                             (700, 1, 40, 9, 0)])
def test_weight_grads_pair_same_bits_as_two_calls(K, groups, M, N1, N2, dtype):
    """A^T b and A^T b2 in one pass (b2=, out2=): the bits of two separate calls, on 1, 2 and
    3 threads, including an empty half."""
    ext = _dispatch.ext_module("rnn")
    rng = np.random.default_rng(K + N1 + N2)
    a = rng.standard_normal((K, M)).astype(dtype)
    b, b2 = rng.standard_normal((K, N1)).astype(dtype), rng.standard_normal((K, N2)).astype(dtype)
    want, want2 = np.empty((1, M, N1), dtype), np.empty((1, M, N2), dtype)
    ext.weight_grads(a, b, groups, want, 1)
    ext.weight_grads(a, b2, groups, want2, 1)
    for threads in (1, 2, 3):
        out, out2 = np.full((1, M, N1), np.nan, dtype), np.full((1, M, N2), np.nan, dtype)
        ext.weight_grads(a, b, groups, out, threads, b2, out2)
        assert_all_equal([out, out2], [want, want2], f"pair on {threads} threads vs two calls")


def test_weight_grads_pair_bad_shapes():
    ext = _dispatch.ext_module("rnn")
    a, b, out = np.zeros((4, 6)), np.zeros((4, 2)), np.zeros((1, 6, 2))
    with pytest.raises(ValueError, match="b2"):
        ext.weight_grads(a, b, 1, out, 1, np.zeros((4, 3)), None)
    with pytest.raises(ValueError, match="b2"):
        ext.weight_grads(a, b, 1, out, 1, np.zeros((5, 3)), np.zeros((1, 6, 3)))
    with pytest.raises(ValueError, match="b2"):
        ext.weight_grads(a, b, 1, out, 1, np.zeros((4, 3)), np.zeros((1, 5, 3)))
    with pytest.raises(ValueError, match="b2"):
        ext.weight_grads(np.zeros((4, 12)), np.zeros((4, 4)), 1, np.zeros((2, 6, 2)), 1,
                         np.zeros((4, 3)), np.zeros((1, 6, 3)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_gradient_bits_do_not_depend_on_the_panel_chunks(dtype):
    """The parameter gradients' chunks of k follow the L1d size (_set_l1d_bytes: 64 KB panel
    chunks for a 32 KB L1d in AVX-512 builds, 32 KB otherwise): the same bits either way."""
    from statescan import _caches
    ext = _dispatch.ext_module("rnn")
    rng = np.random.default_rng(7)
    a = rng.standard_normal((3000, 256)).astype(dtype)
    b = rng.standard_normal((3000, 72)).astype(dtype)
    W = rng.standard_normal((256, 72)).astype(dtype)
    try:
        outs = []
        for l1d in (48 * 1024, 32 * 1024):
            ext._set_l1d_bytes(l1d)
            dW, dx = np.empty((1, 256, 72), dtype), np.empty((3000, 72), dtype)
            ext.weight_grads(a, b, 1, dW, 2)
            ext.input_grads(a, W, dx, 2)
            outs.append([dW, dx])
        assert_all_equal(outs[1], outs[0], "32 KB vs 48 KB L1d")
    finally:
        ext._set_l1d_bytes(_caches.cache_sizes()["l1d"])


def test_weight_grads_empty_k_and_bad_shapes():
    ext = _dispatch.ext_module("rnn")
    out = np.full((2, 6, 3), np.nan)
    ext.weight_grads(np.zeros((0, 12)), np.zeros((0, 6)), 3, out, 1)
    assert np.array_equal(out, np.zeros_like(out))
    with pytest.raises(ValueError):
        ext.weight_grads(np.zeros((4, 11)), np.zeros((4, 6)), 3, out, 1)
    with pytest.raises(ValueError):
        ext.weight_grads(np.zeros((4, 12)), np.zeros((5, 6)), 3, out, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("N,M,I", [(1, 1, 1), (7, 33, 7), (141, 520, 130), (600, 1000, 64),
                                   (5000, 28, 33), (300, 4096, 96)])
def test_input_grads_kernel(N, M, I, dtype):
    """dx = g W against float64 numpy, rows in several blocks and I not a whole panel; the same
    bits on 1, 2 and 3 threads."""
    ext = _dispatch.ext_module("rnn")
    rng = np.random.default_rng(N + M + I)
    g = rng.standard_normal((N, M)).astype(dtype)
    W = rng.standard_normal((M, I)).astype(dtype)
    want = g.astype(np.float64) @ W.astype(np.float64)
    outs = []
    for threads in (1, 2, 3):
        out = np.full((N, I), np.nan, dtype)
        ext.input_grads(g, W, out, threads)
        outs.append(out)
    tol = (3e-6 if dtype == np.float32 else 1e-14) * np.sqrt(M)
    np.testing.assert_allclose(outs[0], want, rtol=0, atol=tol * max(1.0, np.abs(want).max()))
    assert_all_equal(outs[1:], outs[:1] * 2, "threads 2, 3 vs 1")
