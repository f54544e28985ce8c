"""Benchmark grid of the linear scans: selective_scan (Mamba-1; forward, forward+backward, and
one-token decoding steps) and linear_scan.

Peers: a vanilla PyTorch step loop ("torch-loop": exp(delta*A) and delta*B*x precomputed for all
steps, then a Python loop over time, the shape of Mamba's reference code) and JAX lax.scan under
jit ("jax"; for forward+backward, jax.vjp of it).  Every case also runs statescan's numpy
reference on a shorter sequence.  Selective-scan cases use Mamba's usual options: D,
dt_bias and softplus.
"""
import numpy as np

import statescan as ss

from . import peers
from .core import NUMPY_REF, STATESCAN, Case, Runner, add_peer, import_peer, numpy_reference

# Rough seconds per element-step (B*Dm*N for the selective scan, B*D for the linear scan) per
# runner: picks sequence lengths so a call takes about the target time.
_SECONDS = {"selective": {STATESCAN: 0.6e-9, NUMPY_REF: 15e-9, "jax": 3e-9,
                          "torch-loop": 10e-9},
            "linear": {STATESCAN: 0.5e-9, NUMPY_REF: 3e-9, "jax": 2e-9, "torch-loop": 10e-9}}
_OVERHEAD = {STATESCAN: 0.2e-6, NUMPY_REF: 30e-6, "jax": 2e-6, "torch-loop": 20e-6}
_MAX_STEPS = 16384

# (B, Dm, N) and forward+backward; (B, D) for the linear scan
_SELECTIVE_FULL = [(1, 256, 16, False), (16, 1024, 16, False), (4, 2048, 16, False),
                   (64, 512, 16, False), (1, 256, 16, True), (16, 1024, 16, True)]
_SELECTIVE_QUICK = [(1, 256, 16, False), (16, 1024, 16, False), (1, 256, 16, True)]
_DECODE = [(1, 1536, 16), (8, 1536, 16)]        # (B, Dm, N): Mamba-130m..370m-like widths
_LINEAR_FULL = [(1, 1024), (16, 4096), (64, 256)]
_LINEAR_QUICK = [(16, 1024)]
_GUARD = {("selective", 1, 256, 16, False), ("selective", 1, 256, 16, True),
          ("linear", 16, 1024)}


def cases(quick):
    out = []
    for dtype in ("float32", "float64"):
        for B, Dm, N, backward in (_SELECTIVE_QUICK if quick else _SELECTIVE_FULL):
            out.append(_selective_case(B, Dm, N, backward, dtype, quick,
                                       quick and ("selective", B, Dm, N, backward) in _GUARD))
        for B, Dm, N in (_DECODE[:1] if quick else _DECODE):
            out.append(_decode_case(B, Dm, N, dtype))
        for B, D in (_LINEAR_QUICK if quick else _LINEAR_FULL):
            out.append(_linear_case(B, D, dtype, quick, quick and ("linear", B, D) in _GUARD))
    return out


def _steps(kind, runner, elements, target, backward, cap=_MAX_STEPS, floor=4):
    per_step = (_OVERHEAD[runner] + elements * _SECONDS[kind][runner]) * (3 if backward else 1)
    return int(min(cap, max(floor, target / per_step)))


def _capped(kind, runner, elements, backward, quick, T, build, statescan_run):
    """A runner on a prefix of the sequence short enough for its speed, checked against
    statescan on the same prefix."""
    slow = runner in (NUMPY_REF, "torch-loop")
    target = (0.05 if quick else 0.3) if slow else (0.02 if quick else 0.1)
    n = _steps(kind, runner, elements, target, backward, cap=T)
    run = build(n)
    return run if n == T else Runner(run, steps=n, expected=statescan_run(n))


# ---- selective scan --------------------------------------------------------------------------

def _selective_case(B, Dm, N, backward, dtype, quick, guard):
    elements = B * Dm * N
    T = _steps("selective", STATESCAN, elements, 0.02 if quick else 0.1, backward)
    # per element-step: exp(delta*A) ~ 10, then 2 FMAs (state) and 1 FMA (output)
    flops = 16.0 * elements * T * (3 if backward else 1)
    name = "selective_scan-fwdbwd" if backward else "selective_scan"
    return Case("scan", name, {"B": B, "Dm": Dm, "N": N}, dtype, T, flops,
                lambda: _selective_make(B, Dm, N, T, dtype, backward, quick), guard=guard)


def _selective_inputs(B, Dm, N, T, dtype):
    rng = np.random.default_rng(B * 7919 + Dm * 31 + N)
    x = rng.standard_normal((B, T, Dm)).astype(dtype)
    dt = (rng.standard_normal((B, T, Dm)) - 1).astype(dtype)
    A = (-np.exp(0.5 * rng.standard_normal((Dm, N)))).astype(dtype)
    Bm = rng.standard_normal((B, T, N)).astype(dtype)
    C = rng.standard_normal((B, T, N)).astype(dtype)
    D = rng.standard_normal(Dm).astype(dtype)
    bias = (0.1 * rng.standard_normal(Dm)).astype(dtype)
    dy = rng.standard_normal((B, T, Dm)).astype(dtype)
    return x, dt, A, Bm, C, D, bias, dy


def _prefix(arrays, n):
    return tuple(a if a.ndim != 3 or a.shape[1] == n else np.ascontiguousarray(a[:, :n])
                 for a in arrays)


def _selective_make(B, Dm, N, T, dtype, backward, quick):
    inputs = _selective_inputs(B, Dm, N, T, dtype)

    def statescan_run(n):
        x, dt, A, Bm, C, D, bias, dy = _prefix(inputs, n)
        if backward:
            def run():
                _, pullback = ss.vjp(ss.selective_scan, x, dt, A, Bm, C, D, dt_bias=bias,
                                     dt_softplus=True)
                return pullback((dy, None))[0]
        else:
            def run():
                return ss.selective_scan(x, dt, A, Bm, C, D, dt_bias=bias, dt_softplus=True)[0]
        return run

    def capped(runner, build):
        return _capped("selective", runner, B * Dm * N, backward, quick, T,
                       lambda n: build(*_prefix(inputs, n)), statescan_run)

    runners = {STATESCAN: statescan_run(T),
               NUMPY_REF: capped(NUMPY_REF, lambda *a: numpy_reference(statescan_run(
                   a[0].shape[1])))}
    add_peer(runners, "jax", capped, "jax", lambda *a: _jax_selective(*a, backward=backward))
    if not backward:
        add_peer(runners, "torch-loop", capped, "torch-loop", _torch_selective)
    return runners


def _torch_selective(x, dt, A, Bm, C, D, bias, dy):
    torch = import_peer("torch")
    tx, tdt, tA, tB, tC, tD, tb = (torch.from_numpy(a) for a in (x, dt, A, Bm, C, D, bias))

    def run():
        with torch.no_grad():
            delta = torch.nn.functional.softplus(tdt + tb)
            dA = torch.exp(delta[..., None] * tA)
            dBx = (delta * tx)[..., None] * tB[:, :, None, :]
            h = torch.zeros(tx.shape[0], tx.shape[2], tA.shape[1], dtype=tx.dtype)
            ys = []
            for t in range(tx.shape[1]):
                h = dA[:, t] * h + dBx[:, t]
                ys.append(torch.einsum("bdn,bn->bd", h, tC[:, t]))
            return (torch.stack(ys, dim=1) + tD * tx).numpy()
    return run


def _jax_selective(x, dt, A, Bm, C, D, bias, dy, backward):
    peers._configure_jax_threads()
    jax = import_peer("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy

    def forward(x, dt, A, Bm, C, D, bias):
        delta = jax.nn.softplus(dt + bias)

        def step(h, inp):
            d, xt, bt, ct = inp
            h = jnp.exp(d[:, :, None] * A) * h + (d * xt)[:, :, None] * bt[:, None, :]
            return h, jnp.einsum("bdn,bn->bd", h, ct)

        h0 = jnp.zeros((x.shape[0], x.shape[2], A.shape[1]), x.dtype)
        seq = tuple(jnp.swapaxes(a, 0, 1) for a in (delta, x, Bm, C))
        _, ys = jax.lax.scan(step, h0, seq)
        return jnp.swapaxes(ys, 0, 1) + D * x

    args = [jax.device_put(a) for a in (x, dt, A, Bm, C, D, bias)]
    if backward:
        args.append(jax.device_put(dy))

        @jax.jit
        def fn(x, dt, A, Bm, C, D, bias, dy):
            _, pullback = jax.vjp(lambda x_: forward(x_, dt, A, Bm, C, D, bias), x)
            return pullback(dy)[0]
    else:
        fn = jax.jit(forward)
    return lambda: np.asarray(fn(*args).block_until_ready())


# ---- selective scan: one decoding step -------------------------------------------------------

def _decode_case(B, Dm, N, dtype):
    """One token with a state (the T = 1 step kernel, the state in its [B, Dm, N] layout),
    the new state written into a preallocated array (out_state), as a decoding loop does."""
    return Case("scan", "selective_scan-decode", {"B": B, "Dm": Dm, "N": N}, dtype, 1,
                16.0 * B * Dm * N, lambda: _decode_make(B, Dm, N, dtype))


def _decode_make(B, Dm, N, dtype):
    x, dt, A, Bm, C, D, bias, _ = _selective_inputs(B, Dm, N, 1, dtype)
    z = np.random.default_rng(Dm).standard_normal((B, 1, Dm)).astype(dtype)
    state = (0.1 * np.random.default_rng(N).standard_normal((B, Dm, N))).astype(dtype)
    new_state = np.empty_like(state)

    def run():
        return ss.selective_scan(x, dt, A, Bm, C, D, z=z, dt_bias=bias, dt_softplus=True,
                                 state=state, out_state=new_state)[0]
    return {STATESCAN: run, NUMPY_REF: numpy_reference(run)}


# ---- linear scan -----------------------------------------------------------------------------

def _linear_case(B, D, dtype, quick, guard):
    T = _steps("linear", STATESCAN, B * D, 0.02 if quick else 0.1, False)
    return Case("scan", "linear_scan", {"B": B, "D": D}, dtype, T, 2.0 * B * D * T,
                lambda: _linear_make(B, D, T, dtype, quick), guard=guard)


def _linear_make(B, D, T, dtype, quick):
    rng = np.random.default_rng(B * 13 + D)
    a = rng.uniform(0.5, 1.0, (B, T, D)).astype(dtype)
    b = rng.standard_normal((B, T, D)).astype(dtype)

    def statescan_run(n):
        an, bn = _prefix((a, b), n)
        return lambda: ss.linear_scan(an, bn)

    def capped(runner, build):
        return _capped("linear", runner, B * D, False, quick, T,
                       lambda n: build(*_prefix((a, b), n)), statescan_run)

    runners = {STATESCAN: statescan_run(T),
               NUMPY_REF: capped(NUMPY_REF, lambda an, bn: numpy_reference(
                   statescan_run(an.shape[1])))}
    add_peer(runners, "jax", capped, "jax", _jax_linear)
    add_peer(runners, "torch-loop", capped, "torch-loop", _torch_linear)
    return runners


def _torch_linear(a, b):
    torch = import_peer("torch")
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)

    def run():
        h = torch.zeros_like(tb[:, 0])
        out = []
        for t in range(tb.shape[1]):
            h = ta[:, t] * h + tb[:, t]
            out.append(h)
        return torch.stack(out, dim=1).numpy()
    return run


def _jax_linear(a, b):
    peers._configure_jax_threads()
    jax = import_peer("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy

    @jax.jit
    def fn(a, b):
        def step(h, ab):
            h = ab[0] * h + ab[1]
            return h, h
        _, hs = jax.lax.scan(step, jnp.zeros_like(b[:, 0]), (jnp.swapaxes(a, 0, 1),
                                                            jnp.swapaxes(b, 0, 1)))
        return jnp.swapaxes(hs, 0, 1)

    args = (jax.device_put(a), jax.device_put(b))
    return lambda: np.asarray(fn(*args).block_until_ready())
