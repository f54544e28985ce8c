"""statescan.nn recurrent stacks without torch: construction, state_dict, pickling, dtype,
streams, vjp structure, bad input, and SLSTM gradients against finite differences."""
import copy
import pickle

import numpy as np
import pytest

import statescan as ss
from statescan import nn

CLASSES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN, "slstm": nn.SLSTM}
GATES = {"lstm": 4, "gru": 3, "rnn": 1, "slstm": 4}
STATE_PARTS = {"lstm": 2, "gru": 1, "rnn": 1, "slstm": 4}


def _x(B=3, T=5, I=4, dtype=np.float64, seed=0):
    return np.random.default_rng(seed).standard_normal((B, T, I)).astype(dtype)


def _parts(state):
    return state if isinstance(state, tuple) else (state,)


@pytest.mark.parametrize("kind", CLASSES)
def test_parameters_have_torch_names_shapes_and_init(kind):
    layer = CLASSES[kind](4, 6, 2, bidirectional=True, seed=3)
    sd = layer.state_dict()
    G = GATES[kind]
    expected = {}
    for l, I in ((0, 4), (1, 12)):
        for sfx in ("", "_reverse"):
            expected[f"weight_ih_l{l}{sfx}"] = (G * 6, I)
            expected[f"weight_hh_l{l}{sfx}"] = (G * 6, 6)
            expected[f"bias_ih_l{l}{sfx}"] = (G * 6,)
            expected[f"bias_hh_l{l}{sfx}"] = (G * 6,)
    assert {k: v.shape for k, v in sd.items()} == expected
    assert list(sd)[:4] == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
    bound = 1 / np.sqrt(6)
    assert all(v.dtype == np.float32 and np.abs(v).max() <= bound for v in sd.values())
    assert all(np.abs(v).max() > 0.5 * bound for v in sd.values())
    again = CLASSES[kind](4, 6, 2, bidirectional=True, seed=3).state_dict()
    assert all(np.array_equal(sd[k], again[k]) for k in sd)


def test_heads_and_no_bias_shapes():
    sd = nn.SLSTM(8, 8, heads=4, bias=False).state_dict()
    assert {k: v.shape for k, v in sd.items()} == {"weight_ih_l0": (32, 8),
                                                   "weight_hh_l0": (4, 8, 2)}


@pytest.mark.parametrize("kind", CLASSES)
def test_state_dict_round_trip_is_bit_identical(kind):
    a = CLASSES[kind](4, 6, 2, bidirectional=kind != "slstm", dtype="float64", seed=1)
    b = CLASSES[kind](4, 6, 2, bidirectional=kind != "slstm", dtype="float64", seed=2)
    x = _x()
    assert not np.array_equal(a(x)[0], b(x)[0])
    b.load_state_dict(a.state_dict())
    ya, sa = a(x)
    yb, sb = b(x)
    np.testing.assert_array_equal(ya, yb)
    for p, q in zip(_parts(sa), _parts(sb)):
        np.testing.assert_array_equal(p, q)


def test_state_dict_is_a_copy_and_load_accepts_lists():
    layer = nn.GRU(2, 3, dtype="float64", seed=0)
    sd = layer.state_dict()
    sd["weight_ih_l0"][...] = 0
    assert np.any(layer.state_dict()["weight_ih_l0"])
    sd = {k: v.tolist() for k, v in sd.items()}
    layer.load_state_dict(sd)
    assert not np.any(layer.state_dict()["weight_ih_l0"])


def test_load_state_dict_errors_name_the_entry():
    layer = nn.LSTM(4, 6, 2)
    sd = layer.state_dict()
    before = layer.state_dict()
    missing = dict(sd)
    del missing["bias_hh_l1"]
    with pytest.raises(KeyError, match="missing bias_hh_l1"):
        layer.load_state_dict(missing)
    with pytest.raises(KeyError, match="unexpected weight_ih_l2"):
        layer.load_state_dict({**sd, "weight_ih_l2": sd["weight_ih_l1"]})
    bad = {**sd, "weight_hh_l1": np.zeros((24, 5)), "weight_ih_l0": np.ones_like(sd["weight_ih_l0"])}
    with pytest.raises(ValueError, match=r"weight_hh_l1 must have shape \[24, 6\], got \[24, 5\]"):
        layer.load_state_dict(bad)
    after = layer.state_dict()           # nothing was changed by the failed load
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind", CLASSES)
def test_pickle_and_deepcopy_are_bit_identical(kind):
    layer = CLASSES[kind](4, 6, 2, bidirectional=kind == "gru", seed=0, heads=2)
    x = _x(dtype=np.float32)
    y, s = layer(x)
    for other in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        y2, s2 = other(x)
        np.testing.assert_array_equal(y, y2)
        for p, q in zip(_parts(s), _parts(s2)):
            np.testing.assert_array_equal(p, q)
        assert repr(other) == repr(layer)


def test_repr_shows_the_configuration():
    assert repr(nn.LSTM(4, 6)) == "LSTM(4, 6, dtype=float32)"
    assert repr(nn.SLSTM(4, 8, 3, bias=False, bidirectional=True, heads=2, dtype="float64")) \
        == "SLSTM(4, 8, num_layers=3, bias=False, bidirectional=True, heads=2, dtype=float64)"


def test_to_changes_dtype():
    layer = nn.GRU(4, 6, seed=0)
    y32 = layer(_x(dtype=np.float32))[0]
    assert layer.to("float64") is layer and layer.dtype == np.float64
    y64 = layer(_x())[0]
    assert y64.dtype == np.float64
    np.testing.assert_allclose(y64, y32, atol=1e-5)
    with pytest.raises(TypeError, match="float32 or float64"):
        layer.to("float16")


@pytest.mark.parametrize("kind", CLASSES)
def test_stream_is_bit_identical_to_one_call(kind):
    layer = CLASSES[kind](4, 8, 3, heads=2 if kind == "slstm" else 1, seed=0)
    x = _x(T=7, dtype=np.float32)
    state0 = tuple(np.full((3, 3, 8), 0.1, np.float32) for _ in range(STATE_PARTS[kind]))
    state0 = state0 if len(state0) > 1 else state0[0]
    y, s = layer(x, state0)
    step = pickle.loads(pickle.dumps(layer.stream()))      # streams pickle too
    state, ys = state0, []
    for t in range(7):
        y_t, state = step(x[:, t:t + 1], state)
        ys.append(y_t)
    np.testing.assert_array_equal(np.concatenate(ys, axis=1), y)
    for p, q in zip(_parts(state), _parts(s)):
        np.testing.assert_array_equal(p, q)


def test_stream_needs_a_unidirectional_layer():
    with pytest.raises(ValueError, match="unidirectional"):
        nn.LSTM(4, 6, bidirectional=True).stream()


@pytest.mark.parametrize("kind", CLASSES)
def test_chunked_calls_equal_one_call(kind):
    layer = CLASSES[kind](4, 6, 2, seed=0, dtype="float64")
    x = _x(T=9)
    y, s = layer(x)
    y1, s1 = layer(x[:, :4])
    y2, s2 = layer(x[:, 4:], s1)
    np.testing.assert_array_equal(np.concatenate([y1, y2], axis=1), y)
    for p, q in zip(_parts(s2), _parts(s)):
        np.testing.assert_array_equal(p, q)


def test_vjp_structure_and_zero_cotangent():
    layer = nn.LSTM(4, 6, 2, bidirectional=True, dtype="float64", seed=0)
    x = _x()
    (y, (h, c)), pullback = ss.vjp(layer, x)
    assert y.shape == (3, 5, 12) and h.shape == c.shape == (4, 3, 6)
    dx, grads = pullback((None, None))
    assert not np.any(dx) and not any(np.any(g) for g in grads.values())
    state = (np.zeros((4, 3, 6)), np.zeros((4, 3, 6)))
    _, pullback = ss.vjp(layer, x, state=state)
    dx, grads, (dh, dc) = pullback((np.ones_like(y), None))
    assert dh.shape == dc.shape == (4, 3, 6) and np.any(dh)


def _loss(layer, x, state, lengths, dy, ds):
    y, s = layer(x, state=state, lengths=lengths)
    return float(np.sum(y * dy) + sum(np.sum(p * q) for p, q in zip(s, ds)))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_slstm_stack_gradients_match_finite_differences(bidirectional):
    rng = np.random.default_rng(0)
    layer = nn.SLSTM(3, 4, 2, heads=2, bidirectional=bidirectional, dtype="float64", seed=1)
    n, dirs = 2 * (2 if bidirectional else 1), 2 if bidirectional else 1
    x = rng.standard_normal((2, 4, 3))
    state = (0.3 * rng.standard_normal((n, 2, 4)), 0.3 * rng.standard_normal((n, 2, 4)),
             1 + rng.random((n, 2, 4)), 0.2 * rng.standard_normal((n, 2, 4)))
    lengths = np.array([4, 2])
    dy = rng.standard_normal((2, 4, dirs * 4))
    ds = tuple(rng.standard_normal((n, 2, 4)) for _ in range(4))
    _, pullback = ss.vjp(layer, x, state=state, lengths=lengths)
    dx, grads, dstate = pullback((dy, ds))
    eps = 1e-6

    def fd(perturb):
        return (perturb(eps) - perturb(-eps)) / (2 * eps)

    def check(analytic, array, loss_of):
        for idx in np.ndindex(array.shape):
            def perturb(e, idx=idx):
                old = array[idx]
                array[idx] = old + e
                try:
                    return loss_of()
                finally:
                    array[idx] = old
            assert abs(fd(perturb) - analytic[idx]) <= 1e-6 * max(1, abs(analytic[idx])), idx

    check(dx, x, lambda: _loss(layer, x, state, lengths, dy, ds))
    sd = layer.state_dict()
    for name, value in sd.items():
        def loss_of(name=name):
            layer.load_state_dict(sd)
            return _loss(layer, x, state, lengths, dy, ds)
        check(grads[name], value, loss_of)
    layer.load_state_dict(sd)
    for part, grad in zip(state, dstate):
        check(grad, part, lambda: _loss(layer, x, state, lengths, dy, ds))
    assert not np.any(dx[1, 2:])            # padded inputs get no gradient


def test_bad_input_names_the_argument_and_shape():
    layer = nn.LSTM(4, 6, 2, bidirectional=True)
    x = _x(dtype=np.float32)
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, input_size\] = "
                                         r"\[B, T, 4\], got \(3, 5, 3\)"):
        layer(x[..., :3])
    with pytest.raises(ValueError, match=r"state h must have shape \[num_layers\*num_directions,"
                                         r" B, H\] = \[4, 3, 6\], got \(2, 3, 6\)"):
        layer(x, state=(np.zeros((2, 3, 6), np.float32), np.zeros((4, 3, 6), np.float32)))
    with pytest.raises(TypeError, match=r"state must be a tuple \(h, c\)"):
        layer(x, state=np.zeros((4, 3, 6), np.float32))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T\] = \[0, 5\]"):
        layer(x, lengths=[5, 6, 1])
    with pytest.raises(ValueError, match=r"lengths must have shape \[B\] = \[3\]"):
        layer(x, lengths=[5, 1])
    with pytest.raises(TypeError, match="x is float64 but the layer is float32"):
        layer(x.astype(np.float64))
    with pytest.raises(ValueError, match="divisible by heads"):
        nn.SLSTM(4, 6, heads=4)
    with pytest.raises(TypeError, match="hidden_size must be an integer"):
        nn.GRU(4, 6.0)
    with pytest.raises(NotImplementedError, match="nonlinearity='relu'"):
        nn.RNN(4, 6, nonlinearity="relu")


def test_lengths_pad_outputs_with_zero_and_keep_last_valid_state():
    layer = nn.GRU(4, 6, 2, dtype="float64", seed=0)
    x = _x()
    y, h = layer(x, lengths=[5, 2, 0])
    y1, h1 = layer(x[1:2, :2])
    np.testing.assert_allclose(y[1, :2], y1[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(h[:, 1], h1[:, 0], rtol=1e-12, atol=1e-14)
    assert not np.any(y[1, 2:]) and not np.any(y[2]) and not np.any(h[:, 2])


def test_training_example_loss_decreases():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / "train_char_lstm.py"
    if not path.exists():
        pytest.skip("examples/ is not next to the tests (installed package)")
    spec = importlib.util.spec_from_file_location("train_char_lstm", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses = example.train(steps=15, hidden=32, log_every=0)
    assert np.mean(losses[-3:]) < losses[0] - 0.2
