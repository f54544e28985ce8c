"""Benchmark grid of linear_attention, ssd and attention (forward, and forward+backward).

Peers: PyTorch's scaled_dot_product_attention for softmax attention; a PyTorch version of
the same chunked algorithm for linear attention (no framework ships one on CPU).  Every case
also runs statescan's numpy reference (the chunked / online-softmax numpy code) on a shorter
sequence.
"""
import numpy as np

import statescan as ss
from statescan.ssd import default_chunk

from .core import NUMPY_REF, STATESCAN, Case, Runner, add_peer, import_peer, numpy_reference

CHUNK = 64      # linear_attention's block size used by the cases (its default)


def cases(quick):
    out = []
    for dtype in ("float32", "float64"):
        for spec in (_QUICK if quick else _FULL):
            kind, params, backward = spec
            out.append(_CASE[kind](params, dtype, backward, quick,
                                   guard=quick and spec in _GUARD))
        for params in (_DECODE[:1] if quick else _DECODE):
            out.append(_decode_case(params, dtype))
    return out


# Mamba-2 prefill shapes (heads, head size P; N=128, ngroups 1, T=512): 130m-like, and P=80
# with 128 heads (the shapes llama.cpp's ggml was timed on)
_MAMBA2_PREFILL = [(48, 64), (128, 80)]
# (kind, params, forward+backward)
_FULL = ([("linear", dict(NH=8, d=d, decay=dec), bwd) for d in (64, 128) for dec in (0, 1)
          for bwd in (False, True)]
         + [("ssd", dict(NH=8, P=64, N=N), bwd) for N in (64, 128) for bwd in (False, True)]
         + [("ssd", dict(NH=NH, P=P, N=128, T=512), False) for NH, P in _MAMBA2_PREFILL]
         + [("softmax", dict(NH=8, T=T, d=64, causal=c), bwd) for T in (1024, 4096)
            for c in (0, 1) for bwd in (False, True)])
_QUICK = [("linear", dict(NH=8, d=64, decay=1), False), ("linear", dict(NH=8, d=64, decay=1), True),
          ("ssd", dict(NH=8, P=64, N=64), False),
          ("softmax", dict(NH=4, T=1024, d=64, causal=1), False),
          ("softmax", dict(NH=4, T=1024, d=64, causal=1), True)]
_GUARD = list(_QUICK)
# one-token decoding (T = 1 with a state, updated in place): Mamba-2 shapes (N=128; P=64 with
# 48 heads as Mamba-2-130m x2, P=80 with 128 heads) and a linear-attention head set
_DECODE = [dict(kind="ssd", NH=48, P=64, N=128), dict(kind="ssd", NH=128, P=80, N=128),
           dict(kind="linear", NH=8, d=128)]
DECODE_STEPS = 100      # decoding steps per timed call (us per step = us per token)


def _linear_flops(T, NH, dk, dv, C=CHUNK):
    """Matmul flops of the chunked algorithm per call (full C x C blocks): Q K^T, A V, Q S
    and K^T V per block."""
    return 2.0 * NH * T * (C * dk + C * dv + 2 * dk * dv)


def _rand(rng, shape, dtype, s=1.0):
    return (s * rng.standard_normal(shape)).astype(dtype)


def _runners(run_at, T, T_ref, torch_build=None):
    """statescan at T; numpy reference at T_ref (checked against statescan at T_ref)."""
    runners = {STATESCAN: run_at(T)}
    ref = run_at(T_ref)
    runners[NUMPY_REF] = Runner(numpy_reference(ref), steps=T_ref, expected=ref)
    if torch_build is not None:
        add_peer(runners, "torch", torch_build)
    return runners


def _linear_case(p, dtype, backward, quick, guard):
    NH, d, decay = p["NH"], p["d"], p["decay"]
    T = (4096 if quick else 16384) // (2 if backward else 1)
    T_ref = 1024 if quick else 2048
    flops = _linear_flops(T, NH, d, d) * (3 if backward else 1)

    def make():
        rng = np.random.default_rng(d)
        q, k, v = (_rand(rng, (1, NH, T, d), dtype, 0.1) for _ in range(3))
        do = _rand(rng, (1, NH, T, d), dtype)
        lam = np.linspace(0.9, 0.999, NH).astype(dtype) if decay else None

        def run_at(n):
            qs, ks, vs, dos = (a[:, :, :n] for a in (q, k, v, do))
            if backward:
                def run():
                    _, pb = ss.vjp(ss.linear_attention, qs, ks, vs, decay=lam)
                    return pb((dos, None))
            else:
                def run():
                    return ss.linear_attention(qs, ks, vs, decay=lam)
            return run
        torch_build = None if backward else (lambda: _torch_linear(q, k, v, lam))
        return _runners(run_at, T, T_ref, torch_build)

    name = "linear_attention-fwdbwd" if backward else "linear_attention"
    return Case("attention", name, dict(B=1, **p), dtype, T, flops, make, guard=guard)


def _torch_linear(q, k, v, lam, C=CHUNK):
    """The same chunked algorithm in PyTorch (batched over heads)."""
    torch = import_peer("torch")
    qt, kt, vt = (torch.from_numpy(a[0]) for a in (q, k, v))
    NH, T, d = qt.shape
    dtype = qt.dtype
    log_lam = (torch.zeros(NH, dtype=dtype) if lam is None
               else torch.log(torch.from_numpy(lam)))
    idx = torch.arange(C, dtype=dtype)
    diff = idx[:, None] - idx[None, :]
    mask = torch.where(diff >= 0, torch.exp(log_lam[:, None, None] * diff.clamp(min=0)),
                       torch.zeros((), dtype=dtype))
    w_in = torch.exp(log_lam[:, None] * (idx + 1))[..., None]           # lambda^(s+1)
    w_out = torch.exp(log_lam[:, None] * (C - 1 - idx))[..., None]      # lambda^(C-1-t)
    lam_c = torch.exp(log_lam * C)[:, None, None]

    def run():
        with torch.no_grad():
            S = torch.zeros(NH, d, d, dtype=dtype)
            out = torch.empty_like(vt)
            for t0 in range(0, T, C):
                Q, K, V = qt[:, t0:t0 + C], kt[:, t0:t0 + C], vt[:, t0:t0 + C]
                c = Q.shape[1]
                A = (Q @ K.transpose(1, 2)) * mask[:, :c, :c]
                out[:, t0:t0 + c] = A @ V + (Q * w_in[:, :c]) @ S
                S = lam_c * S + (K * w_out[:, C - c:]).transpose(1, 2) @ V
            return out[None], S[None]
    return run


def _ssd_case(p, dtype, backward, quick, guard):
    NH, P, N = p["NH"], p["P"], p["N"]
    T = p.get("T") or (4096 if quick else 16384) // (2 if backward else 1)
    T_ref = min(T, 1024 if quick else 2048)
    C = default_chunk(N, P)          # the block ssd picks by default (chunk=None)
    flops = (_linear_flops(T, NH, N, P, C) + 2.0 * NH * T * C * N) * (3 if backward else 1)

    def make():
        rng = np.random.default_rng(N)
        x = _rand(rng, (1, T, NH, P), dtype)
        dt = (0.01 + 0.1 * rng.random((1, T, NH))).astype(dtype)
        A = -np.linspace(0.5, 4.0, NH).astype(dtype)
        B, C = (_rand(rng, (1, T, N), dtype, N ** -0.5) for _ in range(2))
        dy = _rand(rng, x.shape, dtype)

        def run_at(n):
            args = (x[:, :n], dt[:, :n], A, B[:, :n], C[:, :n])
            if backward:
                def run():
                    _, pb = ss.vjp(ss.ssd, *args)
                    return pb((dy[:, :n], None))
            else:
                def run():
                    return ss.ssd(*args)
            return run
        return _runners(run_at, T, T_ref)

    return Case("attention", "ssd-fwdbwd" if backward else "ssd", dict(Bt=1, **p), dtype, T,
                flops, make, guard=guard)


def _softmax_case(p, dtype, backward, quick, guard):
    NH, T, d, causal = p["NH"], p["T"], p["d"], bool(p["causal"])
    T_ref = T // 2
    flops = 4.0 * NH * T * T * d * (0.5 if causal else 1) * (2.5 if backward else 1)

    def make():
        rng = np.random.default_rng(T)
        q, k, v, do = (_rand(rng, (1, NH, T, d), dtype) for _ in range(4))

        def run_at(n):
            qs, ks, vs, dos = (a[:, :, :n] for a in (q, k, v, do))
            if backward:
                def run():
                    _, pb = ss.vjp(ss.attention, qs, ks, vs, causal=causal)
                    return pb(dos)
            else:
                def run():
                    return ss.attention(qs, ks, vs, causal=causal)
            return run
        return _runners(run_at, T, T_ref, lambda: _torch_sdpa(q, k, v, do, causal, backward))

    name = "attention-fwdbwd" if backward else "attention"
    return Case("attention", name, dict(B=1, **p), dtype, T, flops, make, guard=guard)


def _torch_sdpa(q, k, v, do, causal, backward):
    torch = import_peer("torch")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    qt, kt, vt, dot = (torch.from_numpy(a) for a in (q, k, v, do))
    if not backward:
        def run():
            with torch.no_grad():
                return sdpa(qt, kt, vt, is_causal=causal)
        return run

    def run_bwd():
        qs, ks, vs = (a.detach().requires_grad_() for a in (qt, kt, vt))
        sdpa(qs, ks, vs, is_causal=causal).backward(dot)
        return qs.grad, ks.grad, vs.grad
    return run_bwd


def _decode_case(p, dtype):
    """DECODE_STEPS one-token calls on one state, updated in place with ``out_state=`` (the
    state is reset from a saved copy first, so every call returns the same result)."""
    kind = p["kind"]
    params = {k: v for k, v in p.items() if k != "kind"}
    if kind == "ssd":
        NH, P, N = p["NH"], p["P"], p["N"]
        flops = 5.0 * NH * P * N * DECODE_STEPS
    else:
        NH, P, N = p["NH"], p["d"], p["d"]
        flops = 4.0 * NH * P * N * DECODE_STEPS

    def make():
        rng = np.random.default_rng(NH)
        if kind == "ssd":
            x = _rand(rng, (1, DECODE_STEPS, NH, P), dtype)
            dt = (0.01 + 0.1 * rng.random((1, DECODE_STEPS, NH))).astype(dtype)
            A = -np.linspace(0.5, 4.0, NH).astype(dtype)
            B, C = (_rand(rng, (1, DECODE_STEPS, N), dtype, N ** -0.5) for _ in range(2))
            D = _rand(rng, (NH,), dtype)
            s0 = _rand(rng, (1, NH, P, N), dtype, 0.1)
            tokens = [tuple(np.ascontiguousarray(a[:, t:t + 1]) for a in (x, dt))
                      + (A,) + tuple(np.ascontiguousarray(a[:, t:t + 1]) for a in (B, C))
                      for t in range(DECODE_STEPS)]

            def step(tok, state):
                return ss.ssd(*tok, D=D, state=state, out_state=state)
        else:
            q, k, v = (_rand(rng, (1, NH, DECODE_STEPS, P), dtype, 0.1) for _ in range(3))
            lam = np.linspace(0.9, 0.999, NH).astype(dtype)
            s0 = _rand(rng, (1, NH, P, N), dtype, 0.1)
            tokens = [tuple(np.ascontiguousarray(a[:, :, t:t + 1]) for a in (q, k, v))
                      for t in range(DECODE_STEPS)]

            def step(tok, state):
                return ss.linear_attention(*tok, decay=lam, state=state, out_state=state)
        state = s0.copy()

        def run():
            np.copyto(state, s0)
            for tok in tokens:
                y, _ = step(tok, state)
            return y, state.copy()
        runners = {STATESCAN: run}
        runners[NUMPY_REF] = Runner(numpy_reference(run))
        return runners

    name = "ssd-decode" if kind == "ssd" else "linear_attention-decode"
    return Case("attention", name, dict(B=1, **params), dtype, DECODE_STEPS, flops, make)


_CASE = {"linear": _linear_case, "ssd": _ssd_case, "softmax": _softmax_case}
