"""The compiled input projection `project` (out = x @ W.T + b over every row): whole 32-column
panels are stored straight into out (never read) and a partial last panel goes through a
buffer; or, for a big W and fewer rows, x is packed and W read where it is.  A row's bits do not depend on how many rows are projected at once or on the thread
count (chunked calls equal one call), the values equal the numpy reference to rounding, and a
NaN stays in its row.  The kernel is called directly: small shapes reach every path."""
import numpy as np
import pytest

from statescan import _dispatch
from statescan._reference import rnn as reference

pytestmark = pytest.mark.skipif(not _dispatch.compiled_available(),
                                reason="compiled kernels not built")

DTYPES = (np.float32, np.float64)
# M: one partial panel, exactly one panel, one column past a panel, several panels plus a
# partial one; N = B*T rows: one row, fewer rows than the micro-kernel's row block, more than
# one job of 64 rows with a partial last job; I = 300: a long I runs in slices of the panel
# (a job of more than 8 rows) or in one piece (fewer rows, or a chunk of one row); the last two:
# fewer row jobs than threads and enough work that each job's panels are split across threads
# (in slices, and in one piece), with a partial last panel.  From 1 MB of W up, with no more
# rows than W has, x is packed instead of W (project_transposed): the last two shapes take
# that path (in chunks of x that the chunk tests split differently, fewer W rows than a job
# at the end) and, for (1, 300, 2048, 256), W packed for the whole call and x packed for its
# chunks and single rows -- the same bits
SHAPES = [(1, 1, 5, 31), (1, 3, 8, 32), (2, 5, 7, 33), (3, 50, 16, 135), (1, 130, 3, 256),
          (2, 40, 300, 70), (1, 40, 300, 1100), (1, 5, 256, 1001), (2, 70, 1100, 500),
          (1, 300, 2048, 256)]


def _problem(B, T, I, M, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, T, I)).astype(dtype),
            rng.standard_normal((M, I)).astype(dtype),
            rng.standard_normal(M).astype(dtype))


def _project(x, W, b, threads):
    """ext.project into an output filled with NaN: a kernel that read out would show it."""
    out = np.full(x.shape[:2] + (W.shape[0],), np.nan, x.dtype)
    _dispatch.ext_module("rnn").project(x, W, b, out, threads)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, I, M", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_project_matches_reference(B, T, I, M, dtype, with_bias):
    x, W, b = _problem(B, T, I, M, dtype)
    b = b if with_bias else None
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(_project(x, W, b, 1), reference.project(x, W, b),
                               rtol=tol, atol=tol * np.sqrt(I))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, I, M", SHAPES)
def test_project_rows_do_not_depend_on_the_call(B, T, I, M, dtype):
    x, W, b = _problem(B, T, I, M, dtype, seed=1)
    whole = _project(x, W, b, 1)
    _dispatch.ext_module("rnn")._force_handover()   # forget busy calls: panels split again
    for threads in (2, 3, 4):
        np.testing.assert_array_equal(_project(x, W, b, threads), whole)
    for t0, t1 in ((0, 1), (1, T), (T // 2, T)):        # chunks of the sequence
        if t1 > t0:
            chunk = _project(np.ascontiguousarray(x[:, t0:t1]), W, b, 2)
            np.testing.assert_array_equal(chunk, whole[:, t0:t1])
    row = _project(np.ascontiguousarray(x[-1:, -1:]), W, b, 1)     # one row alone
    np.testing.assert_array_equal(row, whole[-1:, -1:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_project_nan_stays_in_its_row(dtype):
    x, W, b = _problem(2, 20, 9, 70, dtype, seed=2)
    x[1, 7, 3] = np.nan
    out = _project(x, W, b, 2)
    assert np.isnan(out[1, 7]).all()
    out[1, 7] = 0
    assert np.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, I, M", [(2, 40, 300, 70), (2, 70, 1100, 500),
                                        (1, 300, 2048, 256)])
def test_project_bits_do_not_depend_on_the_l1_slices(B, T, I, M, dtype):
    """The projection's slices of each panel follow the L1d size (_set_l1d_bytes, set when the
    module loads): 32 KB slices for a 48 KB L1d; for 32 KB, whole panels in AVX-512 builds,
    16 KB slices in others.  Every element is the same sum in the same order either way."""
    from statescan import _caches
    rnn = _dispatch.ext_module("rnn")
    x, W, b = _problem(B, T, I, M, dtype, seed=3)
    try:
        outs = []
        for l1d in (48 * 1024, 32 * 1024):
            rnn._set_l1d_bytes(l1d)
            outs.append(_project(x, W, b, 1))
        np.testing.assert_array_equal(outs[0], outs[1])
    finally:
        rnn._set_l1d_bytes(_caches.cache_sizes()["l1d"])
