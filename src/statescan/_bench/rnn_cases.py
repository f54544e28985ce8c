"""Benchmark grid of the RNN cells (lstm, gru, elman, slstm; heads = 1 and multi-head).

Peers: PyTorch's nn.LSTM/nn.GRU/nn.RNN and ONNX Runtime's LSTM/GRU/RNN operators for the cells
they implement (heads = 1); a vanilla PyTorch step loop and JAX lax.scan (jit) for sLSTM and the
multi-head cells, which no framework fuses; forward+backward of lstm/gru against PyTorch
autograd.  Every case also runs statescan's numpy reference on a shorter sequence.

ONNX Runtime packs its weights once, when the session is made, and is timed without it; a
plain ``statescan.lstm`` call packs W and R on every call (about 3 ms each for a 16 MB matrix).
Where ONNX Runtime runs, ``weights-packed`` times statescan the same way (``statescan.stream``,
made outside the timing, on the whole sequence), so both forms are in the table.
"""
import numpy as np

import statescan as ss

from .._cells import CELLS
from . import peers
from .core import NUMPY_REF, STATESCAN, Case, Runner, add_peer, numpy_reference

FUSED_PEERS = ("lstm", "gru", "elman")          # cells PyTorch and ONNX Runtime implement

# Seconds per step ~ overhead + flops / rate: picks each runner's sequence length so a call
# takes about the target time (a rough model; the measurement does not depend on it).
_COST = {STATESCAN: (1e-6, 30e9), "torch": (3e-6, 30e9), "onnxruntime": (3e-6, 30e9),
         "jax": (10e-6, 10e9), "torch-loop": (60e-6, 10e9), NUMPY_REF: (40e-6, 8e9)}
_MAX_STEPS = 32768


def cases(quick):
    grid = _QUICK if quick else _full_grid()
    out = []
    for cell, B, H, heads, backward in grid:
        for dtype in ("float32", "float64"):
            out.append(_case(cell, B, H, heads, backward, dtype, quick,
                             guard=quick and (cell, B, H, heads, backward) in _GUARD))
    for cell, B, H, heads in (_QUICK_RECURRENCE if quick else _RECURRENCE):
        for dtype in ("float32", "float64"):
            out.append(_case(cell, B, H, heads, False, dtype, quick, guard=False,
                             recurrence_only=True))
    return out


# FlashRNN's setting for the cells no framework fuses: the input projection W x is computed
# outside (x holds the pre-activations, W=None), so the recurrence itself is compared.
_RECURRENCE = [(cell, B, H, heads) for cell in ("slstm", "lstm", "gru")
               for H, heads in ((256, 4), (1024, 8)) for B in (1, 16)]
_QUICK_RECURRENCE = [("slstm", 16, 256, 4)]


def _full_grid():
    grid = []
    for cell in CELLS:
        for B in (1, 4, 16, 64):
            for H in (64, 256, 1024):
                if B == 4 and H != 1024:    # a few sequences on a large model (column split)
                    continue
                for heads in sorted({1, 4, H // 64}):
                    grid.append((cell, B, H, heads, False))
                    if (heads == 1 and cell in ("lstm", "gru")) or cell == "slstm":
                        grid.append((cell, B, H, heads, True))
    return grid


# (cell, B, H, heads, forward+backward)
_QUICK = [("lstm", 1, 64, 1, False), ("lstm", 16, 256, 1, False), ("gru", 16, 256, 1, False),
          ("elman", 16, 256, 1, False), ("slstm", 16, 256, 4, False), ("lstm", 16, 64, 1, True)]
_GUARD = {("lstm", 16, 256, 1, False), ("gru", 16, 256, 1, False),
          ("slstm", 16, 256, 4, False), ("lstm", 16, 64, 1, True)}


def _flops_per_step(cell, B, H, heads, recurrence_only=False):
    """Input projection (I = H; none when W x is given) plus the block-diagonal recurrent
    matmul, multiply-add = 2."""
    G, D = CELLS[cell].gates, H // heads
    return 2.0 * B * G * H * (D if recurrence_only else H + D)


def _steps(runner, flops, target, backward, cap=_MAX_STEPS, floor=8):
    overhead, rate = _COST[runner]
    per_step = (overhead + flops / rate) * (3 if backward else 1)
    return int(min(cap, max(floor, target / per_step)))


def _case(cell, B, H, heads, backward, dtype, quick, guard, recurrence_only=False):
    forward_flops = _flops_per_step(cell, B, H, heads, recurrence_only)
    # At least 16 steps in the full grid: the per-call work (packing the weights) is then
    # amortised as in a real sequence, and a call still stays within ~0.1-0.5 s.
    T = _steps(STATESCAN, forward_flops, 0.02 if quick else 0.1, backward,
               floor=8 if quick else 16)
    params = {"B": B, "H": H, "heads": heads}
    name = (f"{cell}-fwdbwd" if backward else cell) + ("-Wx-given" if recurrence_only else "")
    flops = forward_flops * (3 if backward else 1) * T     # backward: two GEMMs per forward one
    return Case("rnn", name, params, dtype, T, flops,
                lambda: _make(cell, B, H, heads, T, dtype, quick, backward, recurrence_only),
                guard=guard)


def _inputs(cell, B, T, H, heads, dtype, recurrence_only=False):
    G, D = CELLS[cell].gates, H // heads
    rng = np.random.default_rng(B * 7919 + H * 31 + heads)
    x = rng.standard_normal((B, T, G * H if recurrence_only else H)).astype(dtype)
    W = None if recurrence_only else (rng.standard_normal((G * H, H)) / np.sqrt(H)).astype(dtype)
    R3 = (rng.standard_normal((heads, G * D, D)) / np.sqrt(D)).astype(dtype)
    b = (0.1 * rng.standard_normal(G * H)).astype(dtype)
    b_r = (0.1 * rng.standard_normal(G * H)).astype(dtype)
    return x, W, R3, b, b_r


def _make(cell, B, H, heads, T, dtype, quick, backward, recurrence_only=False):
    x, W, R3, b, b_r = _inputs(cell, B, T, H, heads, dtype, recurrence_only)
    R = R3[0] if heads == 1 else R3
    fn = getattr(ss, cell)
    flops = _flops_per_step(cell, B, H, heads, recurrence_only)
    slow_target = 0.05 if quick else 0.3
    fast_target = 0.02 if quick else 0.1
    dy = np.random.default_rng(1).standard_normal((B, T, H)).astype(dtype)

    def statescan_run(n):
        xs, dys = _prefix(x, n), _prefix(dy, n)
        if backward:
            def run():
                _, pullback = ss.vjp(fn, xs, W, R, b, b_r, heads=heads)
                return pullback((dys, None))[0]
        else:
            def run():
                return fn(xs, W, R, b, b_r, heads=heads)[0]
        return run

    def capped(peer, build, target):
        n = _steps(peer, flops, target, backward, cap=T, floor=2 if peer == NUMPY_REF else 8)
        xs = _prefix(x, n)
        run = build(xs)
        if n == T:
            return run
        return Runner(run, steps=n, expected=statescan_run(n))

    runners = {STATESCAN: statescan_run(T),
               NUMPY_REF: capped(NUMPY_REF, lambda xs: numpy_reference(statescan_run(xs.shape[1])),
                                 slow_target)}
    if cell in FUSED_PEERS and heads == 1:
        if backward:
            add_peer(runners, "torch", peers.build_torch_backward, cell, x, W, R, b, b_r, dy)
        else:
            add_peer(runners, "torch", peers.build_torch, cell, x, W, R, b, b_r)
            add_peer(runners, "onnxruntime", peers.build_onnxruntime, cell, x, W, R, b, b_r)
            if "onnxruntime" in runners:
                packed = ss.stream(fn, W, R, b, b_r)
                runners["weights-packed"] = Runner(lambda: packed(x)[0])
    if cell == "slstm" or heads > 1:
        def loop_peer(build):
            return lambda xs: build(cell, xs, W, R3, b, b_r,
                                    _prefix(dy, xs.shape[1]) if backward else None)
        add_peer(runners, "jax", capped, "jax", loop_peer(peers.build_jax), fast_target)
        add_peer(runners, "torch-loop", capped, "torch-loop", loop_peer(peers.build_torch_loop),
                 slow_target)
    return runners


def _prefix(a, n):
    return a if n == a.shape[1] else np.ascontiguousarray(a[:, :n])
