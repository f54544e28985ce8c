"""Variable lengths, reverse direction and resets of the RNN cells (DESIGN.md, "Variable
lengths, reverse direction, resets"): each against running the rows' valid parts alone, the
gradients against finite differences, thread-count independence, bad arguments, hidden size 0,
and (torch-marked) PyTorch's packed LSTM/GRU, unidirectional and the reverse direction."""
import numpy as np
import pytest

import statescan as ss
from conftest import (CELLS, FNS, assert_all_close, assert_all_equal, assert_close,
                      flat_outputs, make_problem, random_cotangent, state_parts, using_backend,
                      using_threads)

DTYPES = (np.float64, np.float32)
LENGTHS = np.array([7, 0, 3, 1, 5, 7])          # B = 6, T = 7: full, empty and partial rows


def _problem(cell, dtype=np.float64, heads=1, B=6, T=7, **kw):
    return make_problem(cell, B=B, T=T, I=3, H=4, heads=heads, dtype=dtype, state=True, **kw)


def _row(p, b, t0=None, t1=None, reverse=False, state="given"):
    """Row b of problem p, time steps t0:t1 (flipped when `reverse`), run alone."""
    x = p.x[b:b + 1, t0:t1]
    if reverse:
        x = x[:, ::-1]
    st = None if state is None else tuple(s[b:b + 1] for s in p.state_parts())
    if st is not None and len(st) == 1:
        st = st[0]
    return p.fn(x, *p.args()[1:], heads=p.heads, state=st)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_lengths_equal_each_row_alone(backend, cell, heads, dtype):
    p = _problem(cell, dtype, heads)
    y, state = p.fn(*p.args(), **p.kwargs(), lengths=LENGTHS)
    parts = state_parts(cell, state)
    for b, L in enumerate(LENGTHS):
        y_b, st_b = _row(p, b, 0, L)
        assert_close(y[b, :L], y_b[0], what=f"y row {b}")
        assert np.all(y[b, L:] == 0), f"padded outputs of row {b} are not 0"
        for part, alone in zip(parts, state_parts(cell, st_b)):
            assert_close(part[b], alone[0], what=f"state row {b}")
    for part, given in zip(parts, p.state_parts()):       # an empty row keeps its state
        assert np.array_equal(part[1], given[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_reverse_equals_flipped_valid_prefix(backend, cell, heads, dtype):
    p = _problem(cell, dtype, heads)
    for lengths in (LENGTHS, None):
        y, state = p.fn(*p.args(), **p.kwargs(), lengths=lengths, reverse=True)
        parts = state_parts(cell, state)
        for b in range(p.x.shape[0]):
            L = p.x.shape[1] if lengths is None else lengths[b]
            y_b, st_b = _row(p, b, 0, L, reverse=True)
            assert_close(y[b, :L], y_b[0, ::-1], what=f"y row {b}")
            assert np.all(y[b, L:] == 0)
            for part, alone in zip(parts, state_parts(cell, st_b)):
                assert_close(part[b], alone[0], what=f"state row {b}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", CELLS)
def test_resets_pack_sequences_into_one_row(backend, cell, dtype):
    """Row 0 holds three sequences (steps 0:3 from the given state, 3:6 and 6:8 from zero)."""
    p = _problem(cell, dtype, T=9, B=2)
    reset = np.zeros((2, 9), bool)
    reset[0, [3, 6]] = True
    lengths = [8, 9]
    y, state = p.fn(*p.args(), **p.kwargs(), lengths=lengths, reset=reset)
    segments = [(0, 3, "given"), (3, 6, None), (6, 8, None)]
    for t0, t1, st in segments:
        y_s, st_s = _row(p, 0, t0, t1, state=st)
        assert_close(y[0, t0:t1], y_s[0], what=f"segment {t0}:{t1}")
    for part, alone in zip(state_parts(cell, state), state_parts(cell, st_s)):
        assert_close(part[0], alone[0], what="final state")
    y1, _ = _row(p, 1, 0, 9)
    assert_close(y[1], y1[0], what="row without resets")
    # reverse processes 7, 6, ..., 0; a reset at t zeroes the state before t is processed, so
    # the segments are {7} (given state), {6, 5, 4} and {3, 2, 1, 0} (zero states)
    yr, state_r = p.fn(*p.args(), **p.kwargs(), lengths=lengths, reset=reset, reverse=True)
    for t0, t1, st in ((7, 8, "given"), (4, 7, None), (0, 4, None)):
        y_s, st_s = _row(p, 0, t0, t1, reverse=True, state=st)
        assert_close(yr[0, t0:t1], y_s[0, ::-1], what=f"reverse segment {t0}:{t1}")
    for part, alone in zip(state_parts(cell, state_r), state_parts(cell, st_s)):
        assert_close(part[0], alone[0], what="reverse final state")


@pytest.mark.parametrize("cell", CELLS)
def test_full_lengths_bit_identical_to_none(backend, cell):
    p = _problem(cell, heads=2)
    full = np.full(p.x.shape[0], p.x.shape[1])
    assert_all_equal(flat_outputs(cell, p.fn(*p.args(), **p.kwargs(), lengths=full)),
                     flat_outputs(cell, p.call()))
    out, pb = ss.vjp(p.fn, *p.args(), **p.kwargs(), lengths=full)
    out0, pb0 = ss.vjp(p.fn, *p.args(), **p.kwargs())
    cot = random_cotangent(cell, out0)
    assert_all_equal(pb(cot), pb0(cot))


COMBOS = [dict(lengths=LENGTHS), dict(lengths=LENGTHS, reverse=True), dict(reverse=True),
          dict(lengths=LENGTHS, reset="random"), dict(lengths=LENGTHS, reverse=True, reset="random")]


def _combo(kw, B, T, seed=3):
    kw = dict(kw)
    if kw.get("reset") == "random":
        kw["reset"] = np.random.default_rng(seed).random((B, T)) < 0.25
    return kw


@pytest.mark.parametrize("combo", range(len(COMBOS)))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", CELLS)
def test_compiled_equals_reference(cell, dtype, combo):
    for heads, W in ((1, True), (2, False)):
        p = _problem(cell, dtype, heads, W=W)
        kw = _combo(COMBOS[combo], 6, 7)
        with using_backend("compiled"):
            out_c, pb_c = ss.vjp(p.fn, *p.args(), **p.kwargs(), **kw)
            cot = random_cotangent(cell, out_c)
            grads_c = pb_c(cot)
        with using_backend("python"):
            out_p, pb_p = ss.vjp(p.fn, *p.args(), **p.kwargs(), **kw)
            grads_p = pb_p(cot)
        assert_all_close(flat_outputs(cell, out_c), flat_outputs(cell, out_p), what="outputs")
        assert_all_close(grads_c, grads_p, what="gradients")


def _loss(p, args, state, kw, cot):
    y, st = p.fn(*args, heads=p.heads, state=st_of(p.cell, state), **kw)
    dy, dstate = cot
    total = np.sum(y * dy)
    for s, d in zip(state_parts(p.cell, st), state_parts(p.cell, dstate)):
        total += np.sum(s * d)
    return total


def st_of(cell, parts):
    return parts[0] if len(parts) == 1 else tuple(parts)


@pytest.mark.parametrize("combo", range(len(COMBOS)))
@pytest.mark.parametrize("cell", CELLS)
def test_vjp_equals_finite_differences(backend, cell, combo):
    B, T = 6, 7
    p = make_problem(cell, B=B, T=T, I=2, H=3, state=True, seed=combo)
    kw = _combo(COMBOS[combo], B, T, seed=combo)
    out, pb = ss.vjp(p.fn, *p.args(), **p.kwargs(), **kw)
    cot = random_cotangent(cell, out)
    grads = pb(cot)
    args, state = list(p.args()), [s.copy() for s in p.state_parts()]
    targets = [(args, k) for k in range(len(args))] + [(state, k) for k in range(len(state))]
    flat = list(grads[:len(args)]) + list(state_parts(cell, grads[len(args)]))
    eps = 1e-6
    for (holder, k), g in zip(targets, flat):
        a = holder[k] = holder[k].copy()
        fd = np.empty_like(a)
        for idx in np.ndindex(a.shape):
            keep = a[idx]
            a[idx] = keep + eps
            up = _loss(p, args, state, kw, cot)
            a[idx] = keep - eps
            down = _loss(p, args, state, kw, cot)
            a[idx] = keep
            fd[idx] = (up - down) / (2 * eps)
        assert_close(g, fd, tol=1e-6, what=f"gradient {k}")
    dx = grads[0]
    lengths = kw.get("lengths", np.full(B, T))
    for b in range(B):
        assert np.all(dx[b, lengths[b]:] == 0), f"gradient of padded inputs of row {b}"


@pytest.mark.parametrize("cell", CELLS)
def test_bit_identical_for_any_thread_count(cell):
    B, T = 37, 9
    p = make_problem(cell, B=B, T=T, I=5, H=8, heads=2, state=True)
    lengths = np.random.default_rng(0).integers(0, T + 1, B)
    for kw in (dict(lengths=lengths), dict(lengths=lengths, reverse=True,
                                           reset=np.random.default_rng(1).random((B, T)) < 0.2)):
        results = []
        for n in (1, 2, 3):
            with using_threads(n):
                out, pb = ss.vjp(p.fn, *p.args(), **p.kwargs(), **kw)
                results.append((flat_outputs(cell, out), pb(random_cotangent(cell, out))))
        for other in results[1:]:
            assert_all_equal(other[0], results[0][0], "outputs")
            assert_all_equal(other[1], results[0][1], "gradients")


@pytest.mark.parametrize("cell", CELLS)
def test_row_bits_do_not_depend_on_the_batch(cell):
    """A row's outputs and gradients are the same bits alone (one row per job: the state
    stride once changed how the sLSTM cell was vectorised) as in a batch, with lengths too."""
    B, T = 9, 5
    lengths = np.array([5, 2, 0, 4, 5, 1, 3, 5, 2])
    for heads, H in ((1, 4), (2, 8), (1, 5)):
        # W=None: dx is the kernel's own gradient (x @ W's BLAS rounding depends on B*T)
        p = make_problem(cell, B=B, T=T, I=3, H=H, heads=heads, R3=True, W=False)
        with using_threads(1):
            for kw in ({}, {"lengths": lengths}):
                out, pb = ss.vjp(p.fn, *p.args(), heads=heads, **kw)
                cot = random_cotangent(cell, out)
                dx = pb(cot)[0]
                for b in (0, 3, 8):
                    kw_b = {"lengths": lengths[b:b + 1]} if kw else {}
                    out_b, pb_b = ss.vjp(p.fn, p.x[b:b + 1], *p.args()[1:], heads=heads, **kw_b)
                    dy_b = (cot[0][b:b + 1], None)
                    assert np.array_equal(out_b[0][0], out[0][b]), f"y row {b}"
                    if not kw:
                        assert np.array_equal(pb_b(dy_b)[0][0], pb((cot[0], None))[0][b])
                    assert dx.shape == p.x.shape


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bad_lengths_and_reset_name_the_argument(backend, cell):
    p = _problem(cell)
    B, T = p.x.shape[:2]
    bad = [({"lengths": np.zeros(B + 1, int)}, ValueError, "lengths"),
           ({"lengths": np.zeros((B, 1), int)}, ValueError, "lengths"),
           ({"lengths": np.full(B, -1)}, ValueError, "lengths"),
           ({"lengths": np.full(B, T + 1)}, ValueError, "lengths"),
           ({"lengths": np.full(B, 2.5)}, TypeError, "lengths"),
           ({"lengths": ["a"] * B}, TypeError, "lengths"),
           ({"reset": np.zeros((B, T + 1), bool)}, ValueError, "reset"),
           ({"reset": np.zeros(B, bool)}, ValueError, "reset"),
           ({"reset": np.full((B, T), 0.5)}, TypeError, "reset")]
    for kw, exc, name in bad:
        with pytest.raises(exc, match=name):
            p.fn(*p.args(), **p.kwargs(), **kw)
        with pytest.raises(exc, match=name):
            ss.vjp(p.fn, *p.args(), **p.kwargs(), **kw)


@pytest.mark.parametrize("cell", CELLS)
def test_hidden_size_zero_returns_empty(backend, cell):
    S = {"elman": 1, "lstm": 2, "gru": 1, "slstm": 4}[cell]
    x = np.ones((2, 3, 5))
    fn = FNS[cell]
    for R, heads in ((np.zeros((0, 0)), 1), (np.zeros((2, 0, 0)), 2)):
        y, state = fn(x, np.zeros((0, 5)), R, heads=heads, lengths=[3, 1])
        assert y.shape == (2, 3, 0)
        assert all(s.shape == (2, 0) for s in state_parts(cell, state))
        out, pb = ss.vjp(fn, x, np.zeros((0, 5)), R, heads=heads)
        dx, dW, dR = pb((np.zeros((2, 3, 0)), None))
        assert np.array_equal(dx, np.zeros_like(x)) and dW.shape == (0, 5)
        assert dR.shape == R.shape
        step = ss.stream(fn, np.zeros((0, 5)), R, heads=heads)
        y, state = step(x[:, :1])
        assert y.shape == (2, 1, 0) and len(state_parts(cell, state)) == S


@pytest.mark.parametrize("cell", CELLS)
def test_stream_reset_starts_rows_over(backend, cell):
    p = make_problem(cell, B=3, T=4, I=3, H=4)
    step = ss.stream(p.fn, *p.args()[1:])
    _, state = step(p.x[:, :2])
    y, state = step(p.x[:, 2:], state, reset=[True, False, True])
    y_fresh, st_fresh = step(p.x[:, 2:])
    y_cont, st_cont = p.fn(*p.args())
    for b, fresh in ((0, True), (1, False), (2, True)):
        want = y_fresh[b] if fresh else y_cont[b, 2:]
        assert_close(y[b], want, what=f"row {b}")
        for part, f, c in zip(state_parts(cell, state), state_parts(cell, st_fresh),
                              state_parts(cell, st_cont)):
            assert_close(part[b], f[b] if fresh else c[b], what=f"state row {b}")
    with pytest.raises(ValueError, match="reset"):
        step(p.x[:, 2:], state, reset=[True, False])


# ---- PyTorch's packed LSTM / GRU (torch-marked) -------------------------------------------

def _torch_packed(cell, p, lengths, bidirectional):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    I, H = p.sizes["I"], p.sizes["H"]
    dtype = torch.float64 if p.x.dtype == np.float64 else torch.float32
    cls = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
    m = cls(I, H, batch_first=True, bidirectional=bidirectional, dtype=dtype)
    with torch.no_grad():
        for sfx in ("", "_reverse") if bidirectional else ("",):
            getattr(m, f"weight_ih_l0{sfx}").copy_(torch.from_numpy(p.W))
            getattr(m, f"weight_hh_l0{sfx}").copy_(torch.from_numpy(p.R))
            getattr(m, f"bias_ih_l0{sfx}").copy_(torch.from_numpy(p.b))
            getattr(m, f"bias_hh_l0{sfx}").copy_(torch.from_numpy(p.b_r))
    dirs = 2 if bidirectional else 1
    parts = [torch.from_numpy(np.stack([s] * dirs)) for s in p.state_parts()]
    keep = lengths > 0                    # torch rejects empty sequences in a packed batch
    packed = pack_padded_sequence(torch.from_numpy(p.x[keep]), torch.from_numpy(lengths[keep]),
                                  batch_first=True, enforce_sorted=False)
    with torch.no_grad():
        st = tuple(s[:, keep] for s in parts)
        out, st = m(packed, st if cell == "lstm" else st[0])
    y, _ = pad_packed_sequence(out, batch_first=True, total_length=p.x.shape[1])
    st = st if cell == "lstm" else (st,)
    return keep, y.numpy(), [s.numpy() for s in st]


@pytest.mark.torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_packed_torch_unidirectional(backend, cell, dtype):
    p = make_problem(cell, B=6, T=7, I=5, H=9, dtype=dtype, state=True)
    keep, y_t, st_t = _torch_packed(cell, p, LENGTHS, False)
    y, state = p.fn(*p.args(), **p.kwargs(), lengths=LENGTHS)
    assert_close(y[keep], y_t)
    for part, t in zip(state_parts(cell, state), st_t):
        assert_close(part[keep], t[0])


@pytest.mark.torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_packed_torch_reverse_half_of_bidirectional(backend, cell, dtype):
    p = make_problem(cell, B=6, T=7, I=5, H=9, dtype=dtype, state=True)
    keep, y_t, st_t = _torch_packed(cell, p, LENGTHS, True)
    H = p.sizes["H"]
    y, state = p.fn(*p.args(), **p.kwargs(), lengths=LENGTHS, reverse=True)
    assert_close(y[keep], y_t[..., H:])
    for part, t in zip(state_parts(cell, state), st_t):
        assert_close(part[keep], t[1])
    y_f, _ = p.fn(*p.args(), **p.kwargs(), lengths=LENGTHS)
    assert_close(y_f[keep], y_t[..., :H])
