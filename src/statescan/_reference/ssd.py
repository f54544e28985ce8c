"""numpy reference of Mamba-2's SSD as stated by its own recurrence (the definition the tests
compare to), and of the one-step decode kernel.

  delta_t = dt_t (+ dt_bias), through softplus when dt_softplus
  h_t = exp(delta_t A_h) h_{t-1} + (delta_t x_t) B_t^T      per head h, state [P, N]
  y_t = (h_t C_t + D x_t) * silu(z_t)                         (D, z optional)

B, C are [Bt, T, N] (shared by all heads) or [Bt, T, G, N] (head h reads group
h // (NH / G)).  The chunked algorithm is the linear recurrence of
`_reference.linear_attention` with q = C, k = B, v = delta x and log-decay delta A.
"""
import numpy as np

from .linear_attention import linear_forward


def softplus(x):
    """log(1 + exp(x)), without overflow."""
    return np.logaddexp(0, x)


def silu(z):
    return z / (1 + np.exp(-z))


def per_head(M, NH):
    """B or C as [Bt, T, NH, N]."""
    if M.ndim == 3:
        return np.broadcast_to(M[:, :, None], M.shape[:2] + (NH,) + M.shape[2:])
    return np.repeat(M, NH // M.shape[2], axis=2)


def ssd_recurrence(x, dt, A, B, C, h0, D=None, z=None, dt_bias=None, dt_softplus=False,
                   lengths=None, reset=None, reverse=False):
    """The step loop, row by row.  x [Bt,T,NH,P], dt [Bt,T,NH], A [NH], h0 [Bt,NH,P,N];
    D [NH] or [NH,P]; z [Bt,T,NH,P]; dt_bias [NH]; lengths [Bt]; reset [Bt,T] bool.
    Padded steps give 0; `reverse` walks each row's valid steps from the last to the first.
    Returns (y, h_T)."""
    Bt, T, NH, P = x.shape
    Bh, Ch = per_head(B, NH), per_head(C, NH)
    delta = dt if dt_bias is None else dt + dt_bias
    if dt_softplus:
        delta = softplus(delta)
    Dm = None if D is None else (D[:, None] if np.ndim(D) == 1 else D)
    y = np.zeros_like(x)
    h_T = np.empty_like(h0)
    for b in range(Bt):
        n = T if lengths is None else int(lengths[b])
        h = h0[b].copy()
        for t in (range(n - 1, -1, -1) if reverse else range(n)):
            if reset is not None and reset[b, t]:
                h = np.zeros_like(h)
            a = np.exp(delta[b, t] * A)[:, None, None]
            h = a * h + (delta[b, t, :, None] * x[b, t])[..., None] * Bh[b, t, :, None, :]
            out = np.einsum("hpn,hn->hp", h, Ch[b, t])
            if Dm is not None:
                out = out + Dm * x[b, t]
            if z is not None:
                out = out * silu(z[b, t])
            y[b, t] = out
        h_T[b] = h
    return y, h_T


def ssd_step(x, dt, A, B, C, D, z, dt_bias, dt_softplus, state):
    """One step (T = 1) on the state: the reference of the compiled decode kernel.
    Returns (y [Bt,1,NH,P], state)."""
    return ssd_recurrence(x, dt, A, B, C, state, D, z, dt_bias, dt_softplus)


def ssd_forward(x, dt, dt_bias, dt_softplus, A, B, C, D, state, chunk, lengths, reset):
    """The chunked form without z: the reference of the compiled prefill kernel (the
    recurrence of `linear_attention.linear_forward` with q = C, k = B, v = delta x, log-decay
    delta A, delta = dt (+ dt_bias) through softplus when `dt_softplus`), then y += D x at
    every step, padded ones too (the caller zeroes them).  D None, [NH] or [NH,P]; state
    [Bt,NH,P,N] or None.  Returns (y [Bt,T,NH,P], state [Bt,NH,P,N])."""
    Bt, T, NH, P = x.shape
    N = B.shape[-1]
    delta = dt if dt_bias is None else dt + dt_bias
    if dt_softplus:
        delta = softplus(delta)
    if B.ndim == 4:
        q, k, group = C.transpose(0, 2, 1, 3), B.transpose(0, 2, 1, 3), NH // B.shape[2]
    else:
        q, k, group = C[:, None], B[:, None], max(NH, 1)
    v = (delta[..., None] * x).transpose(0, 2, 1, 3)
    g = (delta * A).transpose(0, 2, 1)
    S0 = (np.zeros((Bt, NH, N, P), x.dtype) if state is None
          else np.ascontiguousarray(np.swapaxes(state, -1, -2)))
    o, S = linear_forward(q, k, v, g, S0, chunk, group, lengths, reset)
    y = np.ascontiguousarray(o.transpose(0, 2, 1, 3))
    if D is not None:
        y = y + (D[:, None] if D.ndim == 1 else D) * x
    return y, np.swapaxes(S, -1, -2).copy()
