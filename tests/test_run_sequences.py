"""ss.run_sequences (continuous batching) returns, bit for bit, what one call per sequence
returns, for the cells, the scans and the nn layers; and keeps the input order."""
import numpy as np
import pytest

import statescan as ss
from statescan import nn

LENGTHS = [7, 1, 30, 0, 12, 3, 3, 25, 9, 17, 2, 40, 5]


def _sequences(feature_shape, dtype=np.float64, seed=0, lengths=LENGTHS):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n,) + feature_shape).astype(dtype) for n in lengths]


def _equal(a, b):
    """Bit for bit with the compiled kernels (each row is computed the same whatever batch it
    sits in); the numpy reference's matmuls may round differently per batch size."""
    if ss.backend() == "compiled":
        np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def _assert_same(results, expected):
    assert len(results) == len(expected)
    for (y, s), (y_e, s_e) in zip(results, expected):
        _equal(y, y_e)
        for p, q in zip(s if isinstance(s, tuple) else (s,),
                        s_e if isinstance(s_e, tuple) else (s_e,)):
            _equal(p, q)


def _row0(state, axis=0):
    if isinstance(state, tuple):
        return tuple(np.take(s, 0, axis=axis) for s in state)
    return np.take(state, 0, axis=axis)


def _cell_weights(cell, I, H, heads=1, dtype=np.float64):
    G = {"lstm": 4, "gru": 3, "elman": 1, "slstm": 4}[cell]
    rng = np.random.default_rng(1)
    D = H // heads
    R = rng.standard_normal((heads, G * D, D)) / np.sqrt(D)
    return tuple(a.astype(dtype) for a in (rng.standard_normal((G * H, I)) / np.sqrt(I),
                                           R[0] if heads == 1 else R,
                                           0.1 * rng.standard_normal(G * H),
                                           0.1 * rng.standard_normal(G * H)))


@pytest.mark.parametrize("cell,heads", [("lstm", 1), ("gru", 1), ("elman", 1), ("slstm", 1),
                                        ("lstm", 2),
                                        ("slstm", 2)])
@pytest.mark.parametrize("batch_size,min_chunk", [(4, 1), (5, 8), (64, 16)])
def test_cells_equal_one_call_per_sequence(cell, heads, batch_size, min_chunk):
    fn = getattr(ss, cell)
    weights = _cell_weights(cell, 3, 8, heads)
    seqs = _sequences((3,))
    got = ss.run_sequences(fn, seqs, *weights, heads=heads, batch_size=batch_size,
                           min_chunk=min_chunk)
    expected = []
    for x in seqs:
        y, s = fn(x[None], *weights, heads=heads)
        expected.append((y[0], _row0(s)))
    _assert_same(got, expected)


def test_float32_lstm():
    weights = _cell_weights("lstm", 3, 16, dtype=np.float32)
    seqs = _sequences((3,), np.float32)
    got = ss.run_sequences(ss.lstm, seqs, *weights, batch_size=3, min_chunk=2)
    expected = [(y[0], _row0(s)) for y, s in (ss.lstm(x[None], *weights) for x in seqs)]
    _assert_same(got, expected)
    assert got[0][0].dtype == np.float32


def test_linear_scan_pairs_state_is_last_output():
    rng = np.random.default_rng(0)
    seqs = [(rng.uniform(0.5, 1, (n, 4)), rng.standard_normal((n, 4))) for n in LENGTHS]
    got = ss.run_sequences(ss.linear_scan, seqs, batch_size=4, min_chunk=3)
    for (h, s), (a, b), n in zip(got, seqs, LENGTHS):
        expected = ss.linear_scan(a[None], b[None])[0]
        _equal(h, expected)
        if n:
            _equal(s, expected[-1])


def test_selective_scan_keywords():
    rng = np.random.default_rng(0)
    D, N = 4, 3
    A = -rng.uniform(0.5, 2, (D, N))
    seqs = [{"x": rng.standard_normal((n, D)), "dt": rng.uniform(0.01, 0.2, (n, D)),
             "B": rng.standard_normal((n, N)), "C": rng.standard_normal((n, N))}
            for n in LENGTHS]
    got = ss.run_sequences(ss.selective_scan, seqs, A=A, batch_size=5, min_chunk=4)
    expected = []
    for s in seqs:
        y, st = ss.selective_scan(A=A, **{k: v[None] for k, v in s.items()})
        expected.append((y[0], _row0(st)))
    _assert_same(got, expected)


@pytest.mark.parametrize("kind,bidirectional,heads", [
    ("lstm", False, 1), ("gru", True, 1), ("slstm", True, 1), ("rnn", True, 1),
    ("lstm", False, 2), ("slstm", False, 2)])
def test_layers_equal_one_call_per_sequence(kind, bidirectional, heads):
    cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN, "slstm": nn.SLSTM}[kind]
    layer = cls(3, 8, 2, bidirectional=bidirectional, heads=heads, dtype="float64", seed=0)
    seqs = _sequences((3,))
    got = ss.run_sequences(layer, seqs, batch_size=4, min_chunk=2)
    expected = []
    for x in seqs:
        y, s = layer(x[None])
        expected.append((y[0], _row0(s, axis=1)))
    _assert_same(got, expected)
    state = got[2][1]
    h = state[0] if isinstance(state, tuple) else state
    assert h.shape == (2 * (2 if bidirectional else 1), 8)       # [num_layers*dirs, H]


def test_order_and_empty_input():
    weights = _cell_weights("gru", 2, 4)
    assert ss.run_sequences(ss.gru, [], *weights) == []
    seqs = _sequences((2,), lengths=[50, 1, 1, 1, 1, 1, 1])
    got = ss.run_sequences(ss.gru, seqs, *weights, batch_size=2)
    assert [y.shape[0] for y, _ in got] == [50, 1, 1, 1, 1, 1, 1]


def test_bad_input():
    weights = _cell_weights("gru", 2, 4)
    seqs = _sequences((2,), lengths=[3, 4])
    with pytest.raises(TypeError, match="manages state"):
        ss.run_sequences(ss.gru, seqs, *weights, state=None)
    with pytest.raises(ValueError, match=r"sequences\[1\] differs"):
        ss.run_sequences(ss.gru, [seqs[0], np.zeros((3, 5))], *weights)
    with pytest.raises(ValueError, match=r"sequences\[0\]: every array must have shape"):
        ss.run_sequences(ss.linear_scan, [(np.zeros((3, 2)), np.zeros((4, 2)))])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ss.run_sequences(ss.gru, seqs, *weights, batch_size=0)
