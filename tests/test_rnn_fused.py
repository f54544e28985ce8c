"""The forward with the input projection fused into the time loop (`forward_projected`, the
compiled path of every plain cell call with W): bit-identical to `project` then `forward`, on
every path it takes -- jobs that project their own blocks of steps (row split, W small enough
to stay in cache), and the fall-backs that project the whole sequence first (column split,
heads split over jobs, a large W) -- with and without a bias, with no inputs (I = 0), with
lengths (rows ending inside a block of steps, rows of length 0), reverse and resets, for both
dtypes and 1 or 2 threads."""
import numpy as np
import pytest

from statescan import _dispatch
from conftest import CELL_SIZES, CELLS, assert_all_equal

pytestmark = pytest.mark.skipif(not _dispatch.compiled_available(),
                                reason="compiled kernels not built")

# (B, T, I, H, heads): one row and a time block longer than T; rows of several jobs and a
# last partial block of steps; G*H not a multiple of the 32-wide panel; no inputs; heads
# (split over jobs with 2 threads and B=1); W too large to stay in cache (float64: 1.2 MiB);
# grouped heads over several groups of rows, each projecting its own blocks; a job's smallest
# projected block over 2 MB on one thread (lstm, gru, slstm: projected first), not on two
SHAPES = [(1, 5, 3, 7, 1), (9, 70, 10, 48, 1), (3, 17, 5, 33, 1), (5, 9, 0, 16, 1),
          (1, 30, 16, 64, 4), (16, 40, 64, 64, 4), (2, 12, 300, 128, 1), (40, 23, 16, 64, 4),
          (96, 14, 8, 160, 1)]


def _problem(cell, B, T, I, H, heads, dtype, bias):
    G, S = CELL_SIZES[cell]
    D = H // heads
    rng = np.random.default_rng(B * 1000 + T)
    x = rng.standard_normal((B, T, I)).astype(dtype)
    W = (rng.standard_normal((G * H, I)) / np.sqrt(max(I, 1))).astype(dtype)
    b = rng.standard_normal(G * H).astype(dtype) if bias else None
    R = (rng.standard_normal((heads, G * D, D)) / np.sqrt(D)).astype(dtype)
    b_r = (0.5 * rng.standard_normal(G * H)).astype(dtype)
    state0 = (0.5 * rng.standard_normal((S, B, H))).astype(dtype)
    if cell == "slstm":
        state0[2] = np.abs(state0[2]) + 1
    return x, W, b, R, b_r, state0


def _assert_fused_is(y0, s0, cell, x, W, b, R, b_r, state0, lengths, reverse, reset, block,
                     threads):
    """forward_projected's outputs (into NaN-filled arrays) equal y0, s0 bit for bit."""
    ext = _dispatch.ext_module("rnn")
    y1, s1 = np.full_like(y0, np.nan), np.full_like(state0, np.nan)
    ext.forward_projected(cell, x, W, b, R, b_r, state0, lengths, reverse, reset, block, y1,
                          s1, threads)
    assert_all_equal(y1, y0)
    assert_all_equal(s1, s0)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", (np.float32, np.float64))
@pytest.mark.parametrize("threads,block", [(1, 0), (2, 0), (2, -1), (2, 3)])
def test_fused_equals_project_then_forward(cell, shape, dtype, threads, block):
    B, T, I, H, heads = shape
    ext = _dispatch.ext_module("rnn")
    for bias in (True, False):
        x, W, b, R, b_r, state0 = _problem(cell, B, T, I, H, heads, dtype, bias)
        ax = np.empty((B, T, W.shape[0]), dtype)
        ext.project(x, W, b, ax, threads)
        y0, s0 = np.empty((1, B, T, H), dtype), np.empty_like(state0)
        ext.forward(cell, ax, R, b_r, state0, False, None, False, None, block, y0, None, s0,
                    threads)
        _assert_fused_is(y0, s0, cell, x, W, b, R, b_r, state0, None, False, None, block,
                         threads)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reverse", (False, True))
@pytest.mark.parametrize("threads,block", [(1, 0), (2, 0), (2, -1)])
def test_fused_with_lengths_equals_project_valid_then_forward(cell, shape, reverse, threads,
                                                             block):
    B, T, I, H, heads = shape
    ext = _dispatch.ext_module("rnn")
    dtype = np.float64 if B % 2 else np.float32
    x, W, b, R, b_r, state0 = _problem(cell, B, T, I, H, heads, dtype, True)
    rng = np.random.default_rng(T)
    lengths = rng.integers(0, T + 1, B).astype(np.int64)
    lengths[0] = T
    reset = rng.random((B, T)) < 0.1
    x[np.arange(T)[None, :] >= lengths[:, None]] = np.nan    # padded steps are never read
    ax = np.empty((B, T, W.shape[0]), dtype)
    ext.project_valid(x, W, b, lengths, ax, threads)
    y0, s0 = np.empty((1, B, T, H), dtype), np.empty_like(state0)
    ext.forward(cell, ax, R, b_r, state0, False, lengths, reverse, reset, block, y0, None, s0,
                threads)
    assert not np.isnan(y0).any()
    _assert_fused_is(y0, s0, cell, x, W, b, R, b_r, state0, lengths, reverse, reset, block,
                     threads)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("varlen", (False, True))
@pytest.mark.parametrize("threads,block", [(1, 0), (2, 0), (2, -1)])
def test_fused_bias_of_given_wx_equals_forward_of_x_plus_b(cell, shape, varlen, threads, block):
    """W None, b given (x holds W x): the jobs add b to their block of x -- numpy's x + b."""
    B, T, _, H, heads = shape
    ext = _dispatch.ext_module("rnn")
    dtype = np.float32 if T % 2 else np.float64
    G = CELL_SIZES[cell][0]
    _, _, b, R, b_r, state0 = _problem(cell, B, T, 1, H, heads, dtype, True)
    x = np.random.default_rng(T).standard_normal((B, T, G * H)).astype(dtype)
    lengths = reset = None
    if varlen:
        lengths = np.random.default_rng(B).integers(0, T + 1, B).astype(np.int64)
        reset = np.random.default_rng(H).random((B, T)) < 0.1
    y0, s0 = np.empty((1, B, T, H), dtype), np.empty_like(state0)
    ext.forward(cell, x + b, R, b_r, state0, False, lengths, varlen, reset, block, y0, None, s0,
                threads)
    _assert_fused_is(y0, s0, cell, x, None, b, R, b_r, state0, lengths, varlen, reset, block,
                     threads)
