"""numpy reference for the RNN cells: a plain step loop over time.

Shapes (the same interface as the compiled ``statescan._ext.rnn``; ``cell`` is a name of
``statescan._cells.CELLS``, whose pointwise functions here are ``<cell>_step`` and
``<cell>_step_backward``):
  x       [B, T, I]     inputs; W [G*H, I] input weights, b [G*H] input-side bias
  ax      [B, T, G*H]   input-side pre-activations W x + b, gate-major (gate g at g*H:(g+1)*H)
  R       [heads, G*D, D] recurrent weights, H = heads*D
  b_r     [G*H]         recurrent-side bias
  state   [S, B, H]     stacked state components (0 = h; lstm: c; slstm: c, n, m)

The forward step functions take an ``ops`` namespace (numpy by default) so that the bench
peers run the very same equations in PyTorch and JAX.
"""
from typing import Callable, NamedTuple

import numpy as np
from scipy.special import expit as sigmoid, log_expit as log_sigmoid


class ArrayOps(NamedTuple):
    """The array functions the cell equations use, from one array library."""
    sigmoid: Callable
    log_sigmoid: Callable
    tanh: Callable
    exp: Callable
    where: Callable
    head_matmul: Callable   # head_matmul(h [B, heads, D], R [heads, GD, D]) -> [B, heads, GD]
    split: Callable         # split(a, k): k equal parts along the last axis
    permute: Callable       # permute(a, axes)


NUMPY = ArrayOps(sigmoid, log_sigmoid, np.tanh, np.exp, np.where,
                 lambda h, R: np.einsum("bkd,kgd->bkg", h, R),
                 lambda a, k: np.split(a, k, axis=-1), np.transpose)


def project(x, W, b):
    """W x + b over every row: x [B, T, I], W [M, I], b [M] or None -> [B, T, M].

    One time step at a time, so a sequence fed in chunks sees the same GEMMs."""
    B, T, _ = x.shape
    out = np.empty((B, T, W.shape[0]), x.dtype)
    for t in range(T):
        np.matmul(x[:, t], W.T, out=out[:, t])
    if b is not None:
        out += b
    return out


def project_valid(x, W, b, lengths):
    """`project` with the padded steps t >= lengths[b] set to 0 (the compiled kernel skips
    them: they are never read)."""
    out = project(x, W, b)
    out[np.arange(x.shape[1]) >= np.asarray(lengths)[:, None]] = 0
    return out


def recurrent_preactivation(h, R, b_r, ops=NUMPY):
    """R h + b_r per head: h [B, H] -> [B, G*H], gate-major."""
    B = h.shape[0]
    heads, GD, D = R.shape
    ar = ops.head_matmul(h.reshape(B, heads, D), R)
    return ops.permute(ar.reshape(B, heads, GD // D, D), (0, 2, 1, 3)).reshape(B, -1) + b_r


def recurrent_transpose(dgr, R):
    """R^T dgr per head: dgr [B, G*H] -> [B, H]."""
    B = dgr.shape[0]
    heads, GD, D = R.shape
    g = dgr.reshape(B, GD // D, heads, D).transpose(0, 2, 1, 3).reshape(B, heads, GD)
    return np.einsum("bkg,kgd->bkd", g, R).reshape(B, heads * D)


# ---- one step of each cell: (ax, ar, state) -> state -----------------------------------------
# Equations: PyTorch's nn.RNN (tanh), nn.LSTM and nn.GRU; sLSTM as in Beck et al., "xLSTM:
# Extended Long Short-Term Memory" (2024), with the stabiliser m_t = max(log sigmoid(f~) +
# m_{t-1}, i~) taken as i~ while the normaliser is still 0 (the first step).

def elman_step(ax, ar, state, ops=NUMPY):
    return (ops.tanh(ax + ar),)


def lstm_step(ax, ar, state, ops=NUMPY):
    h, c = state
    i, f, g, o = ops.split(ax + ar, 4)
    c = ops.sigmoid(f) * c + ops.sigmoid(i) * ops.tanh(g)
    return (ops.sigmoid(o) * ops.tanh(c), c)


def gru_step(ax, ar, state, ops=NUMPY):
    (h,) = state
    xr, xz, xn = ops.split(ax, 3)
    hr, hz, hn = ops.split(ar, 3)
    r, z = ops.sigmoid(xr + hr), ops.sigmoid(xz + hz)
    n = ops.tanh(xn + r * hn)
    return ((1 - z) * n + z * h,)


def _slstm_parts(ax, ar, state, ops=NUMPY):
    h, c_prev, n_prev, m_prev = state
    it, ft, zt, ot = ops.split(ax + ar, 4)
    l = ops.log_sigmoid(ft) + m_prev
    m_is_i = ~((n_prev != 0) & (l > it))      # stabiliser m = i~ at the start, else max(i~, l)
    m = ops.where(m_is_i, it, l)
    # one of exp(i~ - m), exp(l - m) is exp(0) = 1: taken as 1 (also when i~ = m = +inf)
    e = ops.exp(ops.where(m_is_i, l - it, it - l))
    i, f = ops.where(m_is_i, 1, e), ops.where(m_is_i, e, 1)
    tz, o = ops.tanh(zt), ops.sigmoid(ot)
    c = f * c_prev + i * tz
    nn = f * n_prev + i
    n = ops.where(nn < 1, 1, nn)
    return locals()


def slstm_step(ax, ar, state, ops=NUMPY):
    p = _slstm_parts(ax, ar, state, ops)
    return (p["o"] * p["c"] / p["n"], p["c"], p["n"], p["m"])


# ---- one step backward: (ax, ar, prev state, dstate) -> (dgx, dgr, dprev) ------------------
# dstate is the gradient w.r.t. the state after the step; dprev's h entry holds only the direct
# pointwise part (the caller adds R^T dgr).

def elman_step_backward(ax, ar, prev, dstate):
    h = np.tanh(ax + ar)
    g = dstate[0] * (1 - h * h)
    return g, g, (np.zeros_like(g),)


def lstm_step_backward(ax, ar, prev, dstate):
    _, c_prev = prev
    dh, dc = dstate
    i, f, g, o = np.split(ax + ar, 4, axis=-1)
    i, f, g, o = sigmoid(i), sigmoid(f), np.tanh(g), sigmoid(o)
    tc = np.tanh(f * c_prev + i * g)
    dc = dc + dh * o * (1 - tc * tc)
    grads = np.concatenate([dc * g * i * (1 - i), dc * c_prev * f * (1 - f),
                            dc * i * (1 - g * g), dh * tc * o * (1 - o)], axis=-1)
    return grads, grads, (np.zeros_like(dh), dc * f)


def gru_step_backward(ax, ar, prev, dstate):
    (h_prev,) = prev
    (dh,) = dstate
    xr, xz, xn = np.split(ax, 3, axis=-1)
    hr, hz, hn = np.split(ar, 3, axis=-1)
    r, z = sigmoid(xr + hr), sigmoid(xz + hz)
    n = np.tanh(xn + r * hn)
    gn = dh * (1 - z) * (1 - n * n)
    gr = gn * hn * r * (1 - r)
    gz = dh * (h_prev - n) * z * (1 - z)
    dgx = np.concatenate([gr, gz, gn], axis=-1)
    dgr = np.concatenate([gr, gz, gn * r], axis=-1)
    return dgx, dgr, (dh * z,)


def slstm_step_backward(ax, ar, prev, dstate):
    p = _slstm_parts(ax, ar, prev)
    i, f, tz, o, c, n, nn = p["i"], p["f"], p["tz"], p["o"], p["c"], p["n"], p["nn"]
    dh, dc, dn, dm = dstate
    dc = dc + dh * o / n
    dn = np.where(nn < 1, 0, dn - dh * o * c / (n * n))
    go = dh * c / n * o * (1 - o)
    di = dc * tz + dn
    df = dc * p["c_prev"] + dn * p["n_prev"]
    gz = dc * i * (1 - tz * tz)
    dit, dl = di * i, df * f
    dm = dm - dit - dl                     # i and f both divide by exp(m)
    dit = np.where(p["m_is_i"], dit + dm, dit)
    dl = np.where(p["m_is_i"], dl, dl + dm)
    gf = dl * (1 - sigmoid(p["ft"]))
    grads = np.concatenate([dit, gf, gz, go], axis=-1)
    return grads, grads, (np.zeros_like(dh), dc * f, dn * f, dl)


def _pointwise(cell, suffix):
    """`cell`'s pointwise function here: <cell>_step or <cell>_step_backward."""
    return globals()[f"{cell}_{suffix}"]


# ---- whole sequences -----------------------------------------------------------------------
# Variable lengths, reverse direction and resets (DESIGN.md): processing step j of row b handles
# time step t = j (forward) or lengths[b] - 1 - j (reverse); a row is active at step j while
# j < lengths[b].  Inactive (padded) steps leave the state alone and output 0.  reset[b, t]
# zeroes the state of row b before time step t is processed.

def _time_index(j, lengths, reverse):
    """Time step each row processes at processing step j ([B] ints; clipped for inactive rows)."""
    t = lengths - 1 - j if reverse else np.full_like(lengths, j)
    return np.clip(t, 0, None)


def _row_lengths(B, T, lengths):
    return np.full(B, T, dtype=np.int64) if lengths is None else np.asarray(lengths, np.int64)


def forward(cell, ax, R, b_r, state0, save, lengths=None, reverse=False, reset=None, block=0):
    """Run `cell` over the sequence.

    lengths [B] ints or None (every row T steps), reverse bool, reset bool [B, T] or None.
    block: how the compiled kernel splits its work (tune()'s override); it does not change the
    results, so it is ignored here.
    Returns seq [S_save, B, T, H] (the states after each step, 0 at padded steps; S_save = S
    when `save`, else 1), ar_seq [B, T, G*H] (recurrent pre-activations R h + b_r, when `save`,
    else None), state [S, B, H] (each row's state after its last valid step).
    """
    step = _pointwise(cell, "step")
    B, T, _ = ax.shape
    S, _, H = state0.shape
    seq = np.zeros((S if save else 1, B, T, H), dtype=ax.dtype)
    ar_seq = np.zeros_like(ax) if save else None
    if B == 0 or T == 0 or H == 0:
        return seq, ar_seq, state0.copy()
    lengths = _row_lengths(B, T, lengths)
    rows = np.arange(B)
    state = tuple(state0)
    for j in range(T):
        active = (j < lengths)[:, None]
        t = _time_index(j, lengths, reverse)
        if reset is not None:
            zero = reset[rows, t][:, None] & active
            state = tuple(np.where(zero, 0, s) for s in state)
        ar = recurrent_preactivation(state[0], R, b_r)
        new = step(ax[rows, t], ar, state)
        state = tuple(np.where(active, n, s) for n, s in zip(new, state))
        if save:
            ar_seq[rows, t] = np.where(active, ar, ar_seq[rows, t])
        for s in range(seq.shape[0]):
            seq[s, rows, t] = np.where(active, state[s], seq[s, rows, t])
    return seq, ar_seq, np.stack(state)


def backward(cell, ax, ar_seq, R, state0, seq, dy, dstate, lengths=None, reverse=False,
             reset=None):
    """Backpropagate through `forward(..., save=True)` (same lengths, reverse, reset).

    dy [B, T, H]; dstate [S, B, H].  Returns dgx, dgr [B, T, G*H] (gradients of the input-side
    and recurrent-side pre-activations, 0 at padded steps) and dstate0 [S, B, H].
    """
    step_backward = _pointwise(cell, "step_backward")
    B, T, _ = ax.shape
    H = state0.shape[2]
    dgx = np.zeros_like(ax)
    dgr = np.zeros_like(ax)
    if B == 0 or T == 0 or H == 0:
        return dgx, dgr, dstate.copy()
    lengths = _row_lengths(B, T, lengths)
    rows = np.arange(B)
    d = [dstate[s].copy() for s in range(dstate.shape[0])]
    for j in range(T - 1, -1, -1):
        active = (j < lengths)[:, None]
        t = _time_index(j, lengths, reverse)
        # the state before processing step j: after step j-1, or the initial state
        prev = tuple(seq[:, rows, _time_index(j - 1, lengths, reverse)]) if j > 0 \
            else tuple(state0)
        zero = reset[rows, t][:, None] & active if reset is not None else np.zeros((B, 1), bool)
        prev = tuple(np.where(zero, 0, p) for p in prev)
        d[0] = np.where(active, d[0] + dy[rows, t], d[0])
        gx, gr, dprev = step_backward(ax[rows, t], ar_seq[rows, t], prev, tuple(d))
        dgx[rows, t] = np.where(active, gx, dgx[rows, t])
        dgr[rows, t] = np.where(active, gr, dgr[rows, t])
        dprev = list(dprev)
        dprev[0] = dprev[0] + recurrent_transpose(gr, R)
        # a reset cuts the gradient: the state before it did not influence anything after
        d = [np.where(active, np.where(zero, 0, n), o) for n, o in zip(dprev, d)]
    return dgx, dgr, np.stack(d)


def previous_hidden(y, state0, lengths=None, reverse=False, reset=None):
    """The hidden state each step's recurrent matmul saw, [B, T, H] (0 at padded steps).

    y [B, T, H] is the forward output (0 at padded steps), state0 [S, B, H]: the factor of
    the recurrent-weight gradient dR = sum over steps of dgr^T h_prev.
    """
    B, T, H = y.shape
    h_prev = np.zeros_like(y)
    if B == 0 or T == 0:
        return h_prev
    lengths = _row_lengths(B, T, lengths)
    valid = np.arange(T) < lengths[:, None]
    if reverse:          # time t follows time t+1; the row's last valid step follows state0
        h_prev[:, :-1] = y[:, 1:]
        first = lengths - 1
    else:
        h_prev[:, 1:] = y[:, :-1]
        first = np.zeros(B, np.int64)
    has = lengths > 0
    h_prev[np.nonzero(has)[0], first[has]] = state0[0][has]
    h_prev[~valid] = 0
    if reset is not None:
        h_prev[reset] = 0
    return h_prev
