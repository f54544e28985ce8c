"""Grouped small heads (rnn.pyx forward_group): when a job steps several heads whose D is a
multiple of the vector width (D = 16 and 32 here, for every build), their gates and states
share one layout and a block-diagonal micro-kernel.  Each head must still get, bit for bit,
what a one-head call on its slices gives (which runs the per-head path), with lengths,
reverse, resets, several groups of rows (B = 40: 16 + 16 + 8, each its own whole sequence)
and any thread count (2 threads split 3 or 4 heads into groups of 2 and 1).
The gated cells' 3 heads of D = 32 at B < 4 take the per-head path (few rows on heads whose
weights exceed L1): also checked.  Plain calls (only h saved per step) and vjp's forward (every
state component and the recurrent pre-activations saved) must agree as well."""
import numpy as np
import pytest

import statescan as ss
from conftest import (CELLS, CELL_SIZES, assert_all_equal, make_problem, state_parts,
                      using_threads)

T = 6


def _lengths(B, rng):
    return np.array([T] if B == 1 else [T, 0] + list(rng.integers(0, T + 1, B - 2)))


def _slice_gates(a, G, heads, D, k):
    """[..., G*H] -> head k's [..., G*D]."""
    lead = a.shape[:-1]
    return np.ascontiguousarray(a.reshape(*lead, G, heads, D)[..., k, :].reshape(*lead, G * D))


def _state(cell, parts):
    return parts[0] if CELL_SIZES[cell][1] == 1 else tuple(parts)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", ["plain", "lengths", "reverse", "reset"])
@pytest.mark.parametrize("heads,D", [(4, 16), (3, 32)])
@pytest.mark.parametrize("B", [1, 3, 16, 40])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", CELLS)
def test_grouped_heads_equal_heads_run_alone(cell, dtype, B, heads, D, mode, threads):
    G = CELL_SIZES[cell][0]
    p = make_problem(cell, B=B, T=T, H=heads * D, heads=heads, dtype=dtype, W=False, b=False,
                     state=True, seed=B + heads)
    rng = np.random.default_rng(B)
    kw = {}
    if mode in ("lengths", "reverse"):
        kw["lengths"] = _lengths(B, rng)
        kw["reverse"] = mode == "reverse"
    elif mode == "reset":
        kw["reset"] = rng.random((B, T)) < 0.3
    dy = rng.standard_normal((B, T, heads * D)).astype(dtype)
    parts = p.state_parts()
    with using_threads(threads):
        (y, state), pullback = ss.vjp(p.fn, p.x, None, p.R, None, p.b_r, heads=heads,
                                      state=p.state, **kw)
        dx = pullback((dy, None))[0]
        plain = p.fn(p.x, None, p.R, None, p.b_r, heads=heads, state=p.state, **kw)
        assert_all_equal((plain[0],) + state_parts(cell, plain[1]),
                         (y,) + state_parts(cell, state), f"{cell} {mode} B={B} plain vs vjp")
        for k in range(heads):
            units = slice(k * D, (k + 1) * D)
            st_k = _state(cell, [np.ascontiguousarray(s[:, units]) for s in parts])
            args = (_slice_gates(p.x, G, heads, D, k), None, p.R[k:k + 1], None,
                    _slice_gates(p.b_r, G, heads, D, k))
            (y_k, state_k), pb_k = ss.vjp(p.fn, *args, heads=1, state=st_k, **kw)
            what = f"{cell} {mode} B={B} head {k}"
            assert_all_equal((y_k,), (np.ascontiguousarray(y[..., units]),), f"{what} y")
            assert_all_equal(state_parts(cell, state_k),
                             tuple(np.ascontiguousarray(s[:, units])
                                   for s in state_parts(cell, state)), f"{what} state")
            dx_k = pb_k((np.ascontiguousarray(dy[..., units]), None))[0]
            assert_all_equal((dx_k,), (_slice_gates(dx, G, heads, D, k),), f"{what} dx")
