"""Many small heads: the compiled kernels step several heads together in one job (one pass over
each row's pre-activations per step).  Each head's arithmetic must stay that of the head run
alone, bit for bit, whatever the grouping of heads into jobs (thread count, batch size)."""
import numpy as np
import pytest

import statescan as ss
from conftest import CELL_SIZES, CELLS, assert_all_equal, make_problem, using_threads


def _head(p, k):
    """The arguments of head k alone: a one-head call on its slices of x, R, b_r and state."""
    G, D, heads = p.sizes["G"], p.sizes["D"], p.heads
    B, T = p.x.shape[:2]

    def gate_slice(a):      # [..., G*H] -> head k's [..., G*D]
        lead = a.shape[:-1]
        return np.ascontiguousarray(a.reshape(*lead, G, heads, D)[..., k, :].reshape(*lead, G * D))

    parts = p.state_parts()
    state = tuple(np.ascontiguousarray(s[:, k * D:(k + 1) * D]) for s in parts)
    return (gate_slice(p.x), None, p.R[k:k + 1], None, gate_slice(p.b_r)), \
        (state[0] if len(state) == 1 else state)


def _split_state(cell, state, heads, D):
    parts = state if isinstance(state, tuple) else (state,)
    return [tuple(s[:, k * D:(k + 1) * D] for s in parts) for k in range(heads)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("heads,D,B", [(4, 16, 9), (3, 5, 4), (4, 32, 1)])
def test_each_head_as_if_run_alone(cell, dtype, heads, D, B):
    p = make_problem(cell, B=B, T=5, H=heads * D, heads=heads, dtype=dtype, W=False,
                     b=False, state=True, seed=3)
    with using_threads(1):
        y, state = p.call()
        out, pb = ss.vjp(p.fn, *p.args(), **p.kwargs())
        rng = np.random.default_rng(7)
        dy = rng.standard_normal(y.shape).astype(dtype)
        grads = pb((dy, None))
        for k in range(heads):
            args, st = _head(p, k)
            yk, sk = p.fn(*args, state=st)
            assert_all_equal(yk, y[..., k * D:(k + 1) * D], f"{cell} head {k} y")
            assert_all_equal(sk, _split_state(cell, state, heads, D)[k][0]
                             if CELL_SIZES[cell][1] == 1 else _split_state(cell, state, heads, D)[k],
                             f"{cell} head {k} state")
            _, pbk = ss.vjp(p.fn, *args, state=st)
            gk = pbk((np.ascontiguousarray(dy[..., k * D:(k + 1) * D]), None))
            G = CELL_SIZES[cell][0]
            dx = grads[0].reshape(B, 5, G, heads, D)[..., k, :].reshape(B, 5, G * D)
            assert_all_equal(gk[0], dx, f"{cell} head {k} dx")
            dst = _split_state(cell, grads[-1], heads, D)[k]
            assert_all_equal(gk[-1], dst[0] if CELL_SIZES[cell][1] == 1 else dst,
                             f"{cell} head {k} dstate")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("B", [1, 3, 17])
def test_head_groups_do_not_change_results(cell, B):
    """1, 2 and 3 threads group 5 heads into jobs differently (all in one job, or split)."""
    p = make_problem(cell, B=B, T=6, I=7, H=5 * 8, heads=5, dtype=np.float32, state=True, seed=4)
    res = {}
    for n in (1, 2, 3):
        with using_threads(n):
            out, pb = ss.vjp(p.fn, *p.args(), **p.kwargs())
            dy = np.random.default_rng(1).standard_normal(out[0].shape).astype(np.float32)
            res[n] = (out, pb((dy, None)))
    for n in (2, 3):
        assert_all_equal(res[n][0], res[1][0], f"{cell} B={B} outputs, {n} threads vs 1")
        assert_all_equal(res[n][1], res[1][1], f"{cell} B={B} gradients, {n} threads vs 1")
