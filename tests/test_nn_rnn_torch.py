"""statescan.nn.LSTM / GRU / RNN against torch.nn.LSTM / GRU / RNN with the same weights
(from_torch): outputs, final states and autograd gradients of every parameter, the input and
the initial state; padded batches against pack_padded_sequence."""
import itertools
import pickle

import numpy as np
import pytest

import statescan as ss
from statescan import nn

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

KINDS = {"lstm": (nn.LSTM, "LSTM"), "gru": (nn.GRU, "GRU"), "rnn": (nn.RNN, "RNN")}
B, T, I, H = 4, 6, 5, 7
LENGTHS = np.array([6, 2, 5, 1])


def _torch_module(kind, num_layers, bidirectional, bias, batch_first, dtype, seed=0):
    torch.manual_seed(seed)
    m = getattr(torch.nn, KINDS[kind][1])(I, H, num_layers, bias=bias, batch_first=batch_first,
                                          bidirectional=bidirectional)
    return m.to(torch.float64 if dtype == np.float64 else torch.float32)


def _run_torch(m, kind, x, state, lengths, dy, dstate):
    """Forward, and (dy given) the gradients of sum(y*dy) + sum(state*dstate)."""
    xt = torch.from_numpy(x.copy()).requires_grad_(dy is not None)
    xin = xt if m.batch_first else xt.transpose(0, 1)
    st = None
    if state is not None:
        st = tuple(torch.from_numpy(s.copy()).requires_grad_(dy is not None)
                   for s in (state if kind == "lstm" else (state,)))
    arg = st if kind == "lstm" or st is None else st[0]
    if lengths is not None:
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            xin, torch.from_numpy(lengths), batch_first=m.batch_first, enforce_sorted=False)
        y, s_n = m(packed, arg)
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(y, batch_first=m.batch_first,
                                                      total_length=T)
    else:
        y, s_n = m(xin, arg)
    y = y if m.batch_first else y.transpose(0, 1)
    s_n = s_n if kind == "lstm" else (s_n,)
    outs = [y.detach().numpy()] + [s.detach().numpy() for s in s_n]
    if dy is None:
        return outs, None
    loss = (y * torch.from_numpy(dy)).sum()
    for s, d in zip(s_n, dstate if kind == "lstm" else (dstate,)):
        loss = loss + (s * torch.from_numpy(d)).sum()
    loss.backward()
    grads = {"x": xt.grad.numpy()}
    grads.update({k: p.grad.numpy() for k, p in m.named_parameters()})
    if st is not None:
        grads.update({f"state{i}": s.grad.numpy() for i, s in enumerate(st)})
    return outs, grads


def _err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b), initial=0.0)) / max(1.0, float(np.max(np.abs(b),
                                                                            initial=0.0)))


def _problem(kind, num_layers, bidirectional, with_state, dtype, seed=1):
    rng = np.random.default_rng(seed)
    n = num_layers * (2 if bidirectional else 1)
    x = rng.standard_normal((B, T, I)).astype(dtype)
    state = None
    if with_state:
        parts = tuple(rng.standard_normal((n, B, H)).astype(dtype)
                      for _ in range(2 if kind == "lstm" else 1))
        state = parts if kind == "lstm" else parts[0]
    dirs = 2 if bidirectional else 1
    dy = rng.standard_normal((B, T, dirs * H)).astype(dtype)
    dparts = tuple(rng.standard_normal((n, B, H)).astype(dtype)
                   for _ in range(2 if kind == "lstm" else 1))
    return x, state, dy, dparts if kind == "lstm" else dparts[0]


GRID = list(itertools.product(KINDS, (1, 2, 3), (False, True), (False, True)))


@pytest.mark.parametrize("kind,num_layers,bidirectional,lengths", GRID,
                         ids=[f"{k}-L{n}-{'bi' if b else 'uni'}-{'len' if ln else 'full'}"
                              for k, n, b, ln in GRID])
@pytest.mark.parametrize("bias,batch_first,with_state",
                         [(True, True, True), (False, False, True), (True, False, False),
                          (False, True, False)], ids=["bias-bf-state", "nobias-tf-state",
                                                      "bias-tf-nostate", "nobias-bf-nostate"])
def test_float64_outputs_and_gradients(kind, num_layers, bidirectional, lengths, bias,
                                       batch_first, with_state):
    m = _torch_module(kind, num_layers, bidirectional, bias, batch_first, np.float64)
    layer = KINDS[kind][0].from_torch(m)
    x, state, dy, dstate = _problem(kind, num_layers, bidirectional, with_state, np.float64)
    lens = LENGTHS if lengths else None
    expected, expected_grads = _run_torch(m, kind, x, state, lens, dy, dstate)

    y, s_n = layer(x, state=state, lengths=lens)
    got = [y] + list(s_n if kind == "lstm" else (s_n,))
    assert max(_err(a, b) for a, b in zip(got, expected)) <= 1e-12

    (y2, s2), pullback = ss.vjp(layer, x, state=state, lengths=lens)
    np.testing.assert_array_equal(y2, y)       # the same forward with and without vjp
    grads = pullback((dy, dstate))
    assert len(grads) == (3 if with_state else 2)
    assert _err(grads[0], expected_grads["x"]) <= 1e-9
    assert set(grads[1]) == set(layer.state_dict())
    for name, g in grads[1].items():
        assert _err(g, expected_grads[name]) <= 1e-9, name
    if with_state:
        for i, g in enumerate(grads[2] if kind == "lstm" else (grads[2],)):
            assert _err(g, expected_grads[f"state{i}"]) <= 1e-9
    if lengths:          # padded inputs get no gradient
        for b, n in enumerate(LENGTHS):
            assert not np.any(grads[0][b, n:])


F32_GRID = list(itertools.product(KINDS, (1, 3), (False, True), (False, True)))


@pytest.mark.parametrize("kind,num_layers,bidirectional,lengths", F32_GRID,
                         ids=[f"{k}-L{n}-{'bi' if b else 'uni'}-{'len' if ln else 'full'}"
                              for k, n, b, ln in F32_GRID])
def test_float32_outputs(kind, num_layers, bidirectional, lengths):
    m = _torch_module(kind, num_layers, bidirectional, True, False, np.float32)
    layer = KINDS[kind][0].from_torch(m)
    assert layer.dtype == np.float32
    x, state, _, _ = _problem(kind, num_layers, bidirectional, True, np.float32)
    lens = LENGTHS if lengths else None
    expected, _ = _run_torch(m, kind, x, state, lens, None, None)
    y, s_n = layer(x, state=state, lengths=lens)
    got = [y] + list(s_n if kind == "lstm" else (s_n,))
    assert max(_err(a, b) for a, b in zip(got, expected)) <= 2e-5


def test_torch_state_dict_loads_directly():
    m = _torch_module("lstm", 2, True, True, True, np.float32)
    layer = nn.LSTM(I, H, 2, bidirectional=True, seed=5)
    layer.load_state_dict({k: v.numpy() for k, v in m.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((B, T, I)).astype(np.float32)
    np.testing.assert_array_equal(layer(x)[0], nn.LSTM.from_torch(m)(x)[0])
    assert list(layer.state_dict()) == list(m.state_dict())


def test_from_torch_rejects_unsupported_options():
    with pytest.raises(NotImplementedError, match="proj_size"):
        nn.LSTM.from_torch(torch.nn.LSTM(3, 8, proj_size=4))
    with pytest.raises(NotImplementedError, match="nonlinearity"):
        nn.RNN.from_torch(torch.nn.RNN(3, 8, nonlinearity="relu"))
    with pytest.raises(NotImplementedError, match="float16"):
        nn.GRU.from_torch(torch.nn.GRU(3, 8).half())
    with pytest.raises(TypeError, match="torch.nn.LSTM"):
        nn.LSTM.from_torch(torch.nn.GRU(3, 8))
    with pytest.raises(NotImplementedError, match="SLSTM"):
        nn.SLSTM.from_torch(torch.nn.LSTM(3, 8))


def test_from_torch_dropout_is_inference_only():
    # torch applies dropout between layers only in training mode; eval mode is what we match
    m = torch.nn.GRU(I, H, 2, dropout=0.5, batch_first=True).double().eval()
    x = np.random.default_rng(0).standard_normal((B, T, I))
    y, _ = nn.GRU.from_torch(m)(x)
    assert _err(y, m(torch.from_numpy(x))[0].detach().numpy()) <= 1e-12


def test_pickled_layer_matches_torch():
    m = _torch_module("lstm", 2, False, True, True, np.float64)
    layer = pickle.loads(pickle.dumps(nn.LSTM.from_torch(m)))
    x, _, _, _ = _problem("lstm", 2, False, False, np.float64)
    expected, _ = _run_torch(m, "lstm", x, None, None, None, None)
    assert _err(layer(x)[0], expected[0]) <= 1e-12
