"""The vjp's backward writes dgx over the saved input pre-activations ax (the vjp's own array):
the same bits as a separate dgx, x itself never written when it is the pre-activation (W and
b None), and a pullback called again recomputes ax."""
import numpy as np
import pytest

import statescan as ss
from statescan import _cell_call
from statescan._cells import CELLS as CELL_SPECS
from _helpers import CELLS, assert_all_equal, make_problem, random_cotangent, using_backend


def _saved(p, lengths=None, reset=None, reverse=False):
    """(call, ax, ar_seq, seq, dy, dstate) of the vjp's forward for problem p."""
    call = _cell_call.prepare(CELL_SPECS[p.cell], p.x, p.W, p.R, p.b, p.b_r, p.heads, p.state,
                              lengths, reverse, reset)
    ax = _cell_call.input_preactivation(call)
    seq, ar_seq, final = _cell_call.forward(call, ax, save=True)
    out = _cell_call.outputs(call.cell, seq[0], final)
    dy, dstate = _cell_call.cotangent(call, random_cotangent(p.cell, out))
    return call, ax, ar_seq, seq, dy, dstate


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("varlen", ["plain", "lengths", "reset_reverse"])
@pytest.mark.parametrize("cell", CELLS)
def test_dgx_over_ax_gives_the_same_bits(cell, varlen, dtype):
    p = make_problem(cell, B=5, T=6, I=3, H=40, heads=2, dtype=dtype, state=True, seed=3)
    kw = {}
    if varlen != "plain":
        kw["lengths"] = np.array([6, 0, 3, 6, 1])
    if varlen == "reset_reverse":
        kw["reset"] = np.random.default_rng(4).random((5, 6)) < 0.3
        kw["reverse"] = True
    with using_backend("compiled"):
        call, ax, ar_seq, seq, dy, dstate = _saved(p, **kw)
        kept = ax.copy()
        separate = _cell_call.backward(call, ax, ar_seq, seq, dy, dstate)
        assert_all_equal(ax, kept, "ax after a backward that does not consume it")
        consumed = _cell_call.backward(call, ax, ar_seq, seq, dy, dstate, consume=True)
    assert consumed[0] is ax
    assert_all_equal(consumed, separate, f"{cell} {varlen}: dgx over ax vs a new dgx")


@pytest.mark.parametrize("b", [False, True], ids=["no_b", "b"])
@pytest.mark.parametrize("cell", CELLS)
def test_x_as_preactivation_is_not_written(cell, b, backend):
    """W None: ax is x itself (b None) or x + b; the pullback must leave x alone and give the
    same gradients when called again (the consumed ax is recomputed)."""
    p = make_problem(cell, B=3, T=5, H=37, W=False, b=b, state=True, seed=2)
    x_before = p.x.copy()
    out, pb = ss.vjp(p.fn, *p.args(), **p.kwargs())
    cot = random_cotangent(cell, out)
    g1 = pb(cot)
    g1_kept = [g if g is None or isinstance(g, tuple) else g.copy() for g in g1]
    g2 = pb(cot)
    assert_all_equal(p.x, x_before, "x after the pullback")
    assert_all_equal(g2, g1_kept, "pullback called twice")
    assert_all_equal(g1, g1_kept, "first gradients after a second pullback call")


def test_consume_follows_ownership():
    """Only an ax the vjp computed (W x + b, or x + b) may be written over."""
    for W, b, owned in ((True, True, True), (True, False, True), (False, True, True),
                        (False, False, False)):
        p = make_problem("lstm", W=W, b=b)
        call = _cell_call.prepare(CELL_SPECS["lstm"], p.x, p.W, p.R, p.b, p.b_r, 1, None)
        assert _cell_call.owns_preactivation(call) is owned
        ax = _cell_call.input_preactivation(call)
        if owned:
            assert not np.shares_memory(ax, p.x)
