"""numpy reference for the linear scans: plain step loops over time.

Shapes (the same interface as the compiled ``statescan._ext.scan``):
  linear scan     a, b [B, T, D]; h0 [B, D]
  selective scan  x, dt, z [Bt, T, Dm]; A [Dm, N]; Bm, C [Bt, T, N]; D, dt_bias [Dm];
                  state [Bt, Dm, N]
"""
import numpy as np
from scipy.special import expit as sigmoid


def linear_scan_forward(a, b, h0):
    """h_t = a_t * h_{t-1} + b_t; returns h [B, T, D]."""
    h = np.empty_like(b)
    prev = h0
    for t in range(b.shape[1]):
        prev = a[:, t] * prev + b[:, t]
        h[:, t] = prev
    return h


def linear_scan_backward(a, h0, h, dh):
    """Gradients (da, db, dh0) of sum(dh * h) for h = linear_scan_forward(a, b, h0)."""
    T = h.shape[1]
    da, db = np.empty_like(h), np.empty_like(h)
    carry = np.zeros_like(h0)               # a_{t+1} * g_{t+1}: what flows into h_t from later
    for t in range(T - 1, -1, -1):
        g = dh[:, t] + carry
        db[:, t] = g
        da[:, t] = g * (h[:, t - 1] if t > 0 else h0)
        carry = a[:, t] * g
    return da, db, carry


def softplus(v):
    return np.logaddexp(0, v)


def delta_of(dt, dt_bias, dt_softplus):
    """The step sizes the recurrence uses: dt (+ dt_bias), through softplus when asked."""
    v = dt if dt_bias is None else dt + dt_bias
    return softplus(v) if dt_softplus else v


def silu(z):
    return z * sigmoid(z)


def selective_scan_forward(x, dt, A, Bm, C, D, z, dt_bias, dt_softplus, state0, save=False):
    """Mamba-1 selective scan, one time step at a time over arrays [Bt, Dm, N].

    Returns y [Bt, T, Dm], the final state [Bt, Dm, N] and, when `save`, every state
    [Bt, T, Dm, N] (for the backward).
    """
    delta = delta_of(dt, dt_bias, dt_softplus)
    T = x.shape[1]
    y = np.empty_like(x)
    states = np.empty(x.shape + (A.shape[1],), x.dtype) if save else None
    h = state0
    for t in range(T):
        dA = np.exp(delta[:, t, :, None] * A)
        h = dA * h + (delta[:, t] * x[:, t])[:, :, None] * Bm[:, t, None, :]
        yt = np.einsum("bdn,bn->bd", h, C[:, t])
        if D is not None:
            yt = yt + D * x[:, t]
        y[:, t] = yt
        if save:
            states[:, t] = h
    if z is not None:
        y = y * silu(z)
    return y, h, states


def selective_scan_backward(x, dt, A, Bm, C, D, z, dt_bias, dt_softplus, state0, states,
                            dy, dstate):
    """Gradients of sum(dy * y) + sum(dstate * final state) for selective_scan_forward.

    Returns (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dstate0); dD, dz, ddt_bias are None
    when D, z, dt_bias are None.
    """
    v = dt if dt_bias is None else dt + dt_bias
    delta = softplus(v) if dt_softplus else v
    T = x.shape[1]
    dz = None
    if z is not None:
        y0, _, _ = selective_scan_forward(x, dt, A, Bm, C, D, None, dt_bias, dt_softplus, state0)
        sz = sigmoid(z)
        dz = dy * y0 * sz * (1 + z * (1 - sz))
        dy = dy * z * sz
    dx, ddelta = np.empty_like(x), np.empty_like(x)
    dB, dC = np.empty_like(Bm), np.empty_like(C)
    dA = np.zeros_like(A)
    g = dstate.copy()                       # gradient of h_t, carried back through a_{t+1}
    for t in range(T - 1, -1, -1):
        h = states[:, t]
        h_prev = states[:, t - 1] if t > 0 else state0
        dA_t = np.exp(delta[:, t, :, None] * A)
        g = g + dy[:, t, :, None] * C[:, t, None, :]
        dC[:, t] = np.einsum("bd,bdn->bn", dy[:, t], h)
        dxd = delta[:, t] * x[:, t]
        dB[:, t] = np.einsum("bdn,bd->bn", g, dxd)
        gB = np.einsum("bdn,bn->bd", g, Bm[:, t])
        dx[:, t] = gB * delta[:, t]
        decay = g * h_prev * dA_t            # d/d(delta*A) of the decay term
        ddelta[:, t] = np.einsum("bdn,dn->bd", decay, A) + gB * x[:, t]
        dA += np.einsum("bdn,bd->dn", decay, delta[:, t])
        g = g * dA_t
    if D is not None:
        dx += dy * D
    dD = None if D is None else np.einsum("btd,btd->d", dy, x)
    ddt = ddelta * sigmoid(v) if dt_softplus else ddelta
    ddt_bias = None if dt_bias is None else ddt.sum(axis=(0, 1))
    return dx, ddt, dA, dB, dC, dD, dz, ddt_bias, g
