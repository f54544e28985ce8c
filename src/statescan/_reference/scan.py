"""numpy reference for the linear scans: plain step loops over time.

Shapes (the same interface as the compiled ``statescan._ext.scan``, function for function):
  linear scan     a, b [B, T, D]; state [B, D]
  selective scan  x, dt, z [Bt, T, Dm]; A [Dm, N]; Bm, C [Bt, T, N]; D, dt_bias [Dm];
                  state [Bt, Dm, N]
  options         lengths int64 [B] or None; reset bool/uint8 [B, T] or None; reverse bool
                  (statescan.linear_scan documents them).

A row is processed one step p = 0, 1, ... at a time; the time index of its p-th step is p,
or lengths[b] - 1 - p when `reverse`; steps t >= lengths[b] are padding (output 0, state
untouched).  All rows advance together: a padded row keeps its state through `np.where`.
"""
import numpy as np
from scipy.special import expit as sigmoid


def _schedule(B, T, lengths, reverse):
    """Per processed step p: (time index of every row [B] (or one int), active rows [B] or
    None when every row is active)."""
    L = np.full(B, T, np.int64) if lengths is None else np.asarray(lengths, np.int64)
    for p in range(T):
        if lengths is None and not reverse:
            yield p, None
            continue
        active = p < L
        # a finished row (p >= L) points at step p: padding, whose output stays 0
        yield (np.where(active, L - 1 - p, p) if reverse else np.full(B, p)), active


def _where(active, new, old):
    """new where the row is active, else old (rows on the first axis)."""
    if active is None:
        return new
    return np.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)


def _reset_at(reset, rows, t, shape_tail):
    """The rows whose state is zeroed before their step at t, as a mask broadcastable to
    [B, *shape_tail]; None without resets."""
    if reset is None:
        return None
    return np.asarray(reset, bool)[rows, t].reshape((-1,) + (1,) * len(shape_tail))


def linear_scan(a, b, state, lengths=None, reset=None, reverse=False, nseg=1):
    """h_t = a_t * h_prev + b_t (h_prev = 0 at a reset); returns h [B, T, D].

    `nseg` (time segments of the compiled scan: a rounding difference only) is ignored.
    """
    B, T, D = b.shape
    h = np.zeros_like(b)
    if h.size == 0:
        return h
    rows = np.arange(B)
    prev = state
    for t, active in _schedule(B, T, lengths, reverse):
        r = _reset_at(reset, rows, t, (D,))
        p = prev if r is None else np.where(r, 0, prev)
        new = a[rows, t] * p + b[rows, t]
        h[rows, t] = _where(active, new, 0)
        prev = _where(active, new, prev)
    return h


def linear_scan_backward(a, state, lengths, reset, reverse, h, dh):
    """Gradients (da, db, dstate) of sum(dh * h) for h = linear_scan(a, b, state, ...)."""
    B, T, D = h.shape
    da, db = np.zeros_like(h), np.zeros_like(h)
    if h.size == 0:
        return da, db, np.zeros_like(state)
    rows = np.arange(B)
    steps = list(_schedule(B, T, lengths, reverse))
    carry = np.zeros_like(state)            # a_next * g_next: what flows into h_t from later
    for p in range(T - 1, -1, -1):
        t, active = steps[p]
        g = dh[rows, t] + carry
        if p > 0:
            prev_t, _ = steps[p - 1]
            h_prev = h[rows, prev_t]
        else:
            h_prev = state
        r = _reset_at(reset, rows, t, (D,))
        if r is not None:
            h_prev = np.where(r, 0, h_prev)
        db[rows, t] = _where(active, g, 0)
        da[rows, t] = _where(active, g * h_prev, 0)
        new_carry = a[rows, t] * g
        if r is not None:
            new_carry = np.where(r, 0, new_carry)
        carry = _where(active, new_carry, carry)
    return da, db, carry


def softplus(v):
    return np.logaddexp(0, v)


def delta_of(dt, dt_bias, dt_softplus):
    """The step sizes the recurrence uses: dt (+ dt_bias), through softplus when asked."""
    v = dt if dt_bias is None else dt + dt_bias
    return softplus(v) if dt_softplus else v


def silu(z):
    return z * sigmoid(z)


def selective_scan(x, dt, A, Bm, C, D, z, dt_bias, dt_softplus, state0, lengths=None,
                   reset=None, reverse=False, save=False):
    """Mamba-1 selective scan, one time step at a time over arrays [Bt, Dm, N].

    Returns y [Bt, T, Dm], the final state [Bt, Dm, N] and, when `save`, every state in
    processing order [Bt, T, Dm, N] (for the backward; else None).
    """
    Bt, T, Dm = x.shape
    N = A.shape[1]
    states = np.zeros(x.shape + (N,), x.dtype) if save else None
    y = np.zeros_like(x)
    if Bt == 0 or T == 0 or Dm == 0:
        return y, state0.copy(), states
    if N == 0:                              # no state: y = D x (gated) at the valid steps
        y = (x * D if D is not None else np.zeros_like(x))
        if z is not None:
            y = y * silu(z)
        if lengths is not None:
            y = np.where(np.arange(T)[None, :, None] < np.asarray(lengths)[:, None, None], y, 0)
        return y, state0.copy(), states
    delta = delta_of(dt, dt_bias, dt_softplus)
    rows = np.arange(Bt)
    h = state0
    for p, (t, active) in enumerate(_schedule(Bt, T, lengths, reverse)):
        r = _reset_at(reset, rows, t, (Dm, N))
        hp = h if r is None else np.where(r, 0, h)
        dA = np.exp(delta[rows, t][:, :, None] * A)
        new = dA * hp + (delta[rows, t] * x[rows, t])[:, :, None] * Bm[rows, t][:, None, :]
        yt = np.einsum("bdn,bn->bd", new, C[rows, t])
        if D is not None:
            yt = yt + D * x[rows, t]
        y[rows, t] = _where(active, yt, 0)
        h = _where(active, new, h)
        if save:
            states[:, p] = h
    if z is not None:
        y = y * silu(z)
        if lengths is not None:             # padding stays 0 whatever z holds there
            y = np.where(np.arange(T)[None, :, None] < np.asarray(lengths)[:, None, None], y, 0)
    return y, h, states


def selective_step(x, dt, A, Bm, C, D, z, dt_bias, dt_softplus, state):
    """One step (T = 1) from `state`: (y [Bt, 1, Dm], new state [Bt, Dm, N])."""
    return selective_scan(x, dt, A, Bm, C, D, z, dt_bias, dt_softplus, state)[:2]


def selective_scan_backward(x, dt, A, Bm, C, D, z, dt_bias, dt_softplus, state0, lengths,
                            reset, reverse, states, dy, dstate):
    """Gradients of sum(dy * y) + sum(dstate * final state) for selective_scan.

    `states`: what selective_scan saved.  Returns (dx, ddt, dA, dB, dC, dD, dz, ddt_bias,
    dstate0); dD, dz, ddt_bias are None when D, z, dt_bias are None.
    """
    Bt, T, Dm = x.shape
    N = A.shape[1]
    v = dt if dt_bias is None else dt + dt_bias
    delta = softplus(v) if dt_softplus else v
    valid = (np.ones((Bt, T, 1), bool) if lengths is None
             else np.arange(T)[None, :, None] < np.asarray(lengths)[:, None, None])
    dz = None
    if z is not None:
        y0, _, _ = selective_scan(x, dt, A, Bm, C, D, None, dt_bias, dt_softplus, state0,
                                  lengths, reset, reverse)
        sz = sigmoid(z)
        dz = np.where(valid, dy * y0 * sz * (1 + z * (1 - sz)), 0)
        dy = dy * z * sz
    dy = np.where(valid, dy, 0)
    dx, ddelta = np.zeros_like(x), np.zeros_like(x)
    dB, dC = np.zeros_like(Bm), np.zeros_like(C)
    dA = np.zeros_like(A)
    g = dstate.copy()                       # gradient of the state, carried back
    if x.size and N:
        rows = np.arange(Bt)
        steps = list(_schedule(Bt, T, lengths, reverse))
        for p in range(T - 1, -1, -1):
            t, active = steps[p]
            h = states[:, p]
            h_prev = states[:, p - 1] if p > 0 else state0
            r = _reset_at(reset, rows, t, (Dm, N))
            if r is not None:
                h_prev = np.where(r, 0, h_prev)
            dl = delta[rows, t]
            xt = x[rows, t]
            dA_t = np.exp(dl[:, :, None] * A)
            gn = g + dy[rows, t][:, :, None] * C[rows, t][:, None, :]
            dC_t = np.einsum("bd,bdn->bn", dy[rows, t], h)
            dB_t = np.einsum("bdn,bd->bn", gn, dl * xt)
            gB = np.einsum("bdn,bn->bd", gn, Bm[rows, t])
            decay = gn * h_prev * dA_t       # d/d(delta*A) of the decay term
            ddelta_t = np.einsum("bdn,dn->bd", decay, A) + gB * xt
            g_new = gn * dA_t
            if r is not None:
                g_new = np.where(r, 0, g_new)
            if active is not None:              # finished rows add nothing, even NaN
                decay = np.where(active[:, None, None], decay, 0)
                dl = np.where(active[:, None], dl, 0)
            dA += np.einsum("bdn,bd->dn", decay, dl)
            dC[rows, t] = _where(active, dC_t, dC[rows, t])
            dB[rows, t] = _where(active, dB_t, dB[rows, t])
            dx[rows, t] = _where(active, gB * dl, dx[rows, t])
            ddelta[rows, t] = _where(active, ddelta_t, ddelta[rows, t])
            g = _where(active, g_new, g)
    if D is not None:
        dx = np.where(valid, dx + dy * D, 0)
    dD = None if D is None else np.einsum("btd,btd->d", dy, np.where(valid, x, 0))
    ddt = ddelta * sigmoid(v) if dt_softplus else ddelta
    ddt = np.where(valid, ddt, 0)
    ddt_bias = None if dt_bias is None else ddt.sum(axis=(0, 1))
    return dx, ddt, dA, dB, dC, dD, dz, ddt_bias, g
