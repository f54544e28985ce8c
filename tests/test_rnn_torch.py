"""lstm/gru against PyTorch's nn.LSTM/nn.GRU (batch_first) with the same weights: outputs,
final states and gradients (autograd) in float64 and float32."""
import numpy as np
import pytest

import statescan as ss
from _helpers import assert_all_close, make_problem, random_cotangent

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

CASES = [dict(B=3, T=7, I=5, H=37), dict(B=1, T=1, I=3, H=5), dict(B=5, T=6, I=33, H=70),
         dict(B=4, T=5, I=4, H=32)]
MAX_ERR = {}


def _torch_module(cell, p):
    I, H = p.sizes["I"], p.sizes["H"]
    cls = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
    dtype = torch.float64 if p.x.dtype == np.float64 else torch.float32
    m = cls(I, H, batch_first=True, bias=p.b is not None, dtype=dtype)
    with torch.no_grad():
        m.weight_ih_l0.copy_(torch.from_numpy(p.W))
        m.weight_hh_l0.copy_(torch.from_numpy(p.R))
        if p.b is not None:
            m.bias_ih_l0.copy_(torch.from_numpy(p.b))
            m.bias_hh_l0.copy_(torch.from_numpy(p.b_r))
    return m


def _torch_run(cell, p, cot):
    """Forward and autograd of sum(y*dy) + sum(state*dstate) in torch."""
    m = _torch_module(cell, p)
    x = torch.from_numpy(p.x.copy()).requires_grad_()
    parts = [torch.from_numpy(s.copy())[None].requires_grad_()
             for s in (p.state if cell == "lstm" else (p.state,))]
    y, st = m(x, tuple(parts) if cell == "lstm" else parts[0])
    st = st if cell == "lstm" else (st,)
    dy, dstate = cot
    dstate = dstate if cell == "lstm" else (dstate,)
    loss = (y * torch.from_numpy(dy)).sum()
    for s, d in zip(st, dstate):
        loss = loss + (s[0] * torch.from_numpy(d)).sum()
    loss.backward()
    params = [m.weight_ih_l0, m.weight_hh_l0]
    if p.b is not None:
        params += [m.bias_ih_l0, m.bias_hh_l0]
    grads = [x.grad] + [q.grad for q in params] + [s.grad[0] for s in parts]
    out = [y] + [s[0] for s in st]
    return ([a.detach().numpy() for a in out], [g.numpy() for g in grads])


def _max_err(a, b):
    return max(float(np.max(np.abs(u.astype(np.float64) - v.astype(np.float64)), initial=0))
               for u, v in zip(a, b))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=[f"B{c['B']}_T{c['T']}_H{c['H']}" for c in CASES])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_matches_torch(cell, case, dtype, bias, backend, record_property):
    p = make_problem(cell, dtype=dtype, b=bias, b_r=bias, state=True, seed=7, **case)
    out, pb = ss.vjp(p.fn, *p.args(), **p.kwargs())
    cot = random_cotangent(cell, out, seed=11)
    grads = pb(cot)
    t_out, t_grads = _torch_run(cell, p, cot)

    ours_out = [out[0]] + (list(out[1]) if cell == "lstm" else [out[1]])
    ours_grads = [g for g in grads[:-1] if g is not None]
    ours_grads += list(grads[-1]) if cell == "lstm" else [grads[-1]]
    assert_all_close(ours_out, t_out, dtype, what=f"{cell} (y, state) vs torch")
    assert_all_close(ours_grads, t_grads, dtype, what=f"{cell} grads vs torch")

    key = (cell, np.dtype(dtype).name, backend)
    err = (_max_err(ours_out, t_out), _max_err(ours_grads, t_grads))
    old = MAX_ERR.get(key, (0.0, 0.0))
    MAX_ERR[key] = (max(old[0], err[0]), max(old[1], err[1]))
    record_property("max_abs_err_forward", err[0])
    record_property("max_abs_err_grad", err[1])
    print(f"\n{key}: max abs error forward {err[0]:.3e}, gradients {err[1]:.3e}")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_matches_torch_without_initial_state(cell, backend):
    """state=None is the zero state, as torch's default h0/c0."""
    p = make_problem(cell, B=3, T=5, I=4, H=9, seed=3)
    y, st = p.call()
    m = _torch_module(cell, p)
    with torch.no_grad():
        ty, tst = m(torch.from_numpy(p.x))
    assert_all_close(y, ty.numpy(), tol=1e-12)
    tst = tst if cell == "lstm" else (tst,)
    st = st if cell == "lstm" else (st,)
    for a, b in zip(st, tst):
        assert_all_close(a, b[0].numpy(), tol=1e-12)


def teardown_module(module):
    for key, (f, g) in sorted(MAX_ERR.items()):
        print(f"torch max abs error {key}: forward {f:.3e}, gradients {g:.3e}")
