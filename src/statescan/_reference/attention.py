"""numpy reference for linear attention, SSD (Mamba-2) and memory-efficient softmax attention.

Linear attention and SSD share one core, a causal linear recurrence with a scalar log-decay
per step (arrays broadcast over the leading dims, so SSD's B/C can be shared by all heads):

  S_t = exp(g_t) S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t
  q, k [..., T, dk]   v [..., T, dv]   g [..., T] or None (no decay)   S [..., dk, dv]

Three forms of the same function: the step loop (`recurrence`, the definition), the
quadratic masked form (`quadratic`) and the chunked form (`chunked_forward`, the fallback
backend, with its backward `chunked_backward`).  Softmax attention: `softmax_attention` (the
definition, materialises T x T) and the online-softmax key walk (`flash_forward`/`_backward`).
"""
import numpy as np


def _lead_shape(q, k, v, g, S0):
    shapes = [q.shape[:-2], k.shape[:-2], v.shape[:-2], S0.shape[:-2]]
    if g is not None:
        shapes.append(g.shape[:-1])
    return np.broadcast_shapes(*shapes)


def recurrence(q, k, v, g, S0):
    """The step loop: returns (o [..., T, dv], S_T [..., dk, dv])."""
    lead = _lead_shape(q, k, v, g, S0)
    T, dv = q.shape[-2], v.shape[-1]
    S = np.broadcast_to(S0, lead + S0.shape[-2:]).copy()
    o = np.empty(lead + (T, dv), dtype=S0.dtype)
    for t in range(T):
        if g is not None:
            S *= np.exp(g[..., t])[..., None, None]
        S += k[..., t, :, None] * v[..., t, None, :]
        o[..., t, :] = np.einsum("...kv,...k->...v", S, q[..., t, :])
    return o, S


def decay_mask(G):
    """M[..., s, t] = exp(G_s - G_t) for s >= t, else 0, from cumulative log-decays G [..., c].
    The exponents of kept entries are <= 0 (decays are <= 1), so nothing overflows."""
    c = G.shape[-1]
    lower = np.tril(np.ones((c, c), dtype=bool))
    diff = np.where(lower, G[..., :, None] - G[..., None, :], -np.inf)
    return np.exp(diff)


def quadratic(q, k, v, g, S0):
    """The masked quadratic form: o = ((Q K^T) * M) V + diag(exp(G)) Q S0."""
    T = q.shape[-2]
    lead = _lead_shape(q, k, v, g, S0)
    G = np.zeros(lead + (T,), S0.dtype) if g is None else np.cumsum(g, axis=-1)
    M = decay_mask(G)
    o = ((q @ np.swapaxes(k, -1, -2)) * M) @ v + np.exp(G)[..., None] * (q @ S0)
    if T == 0:
        return o, np.broadcast_to(S0, lead + S0.shape[-2:]).copy()
    w = np.exp(G[..., -1:] - G)                      # decay from step t to the end
    S = np.exp(G[..., -1])[..., None, None] * S0 + np.swapaxes(k * w[..., None], -1, -2) @ v
    return o, S


def _block(g, t0, t1, lead, dtype):
    """Cumulative log-decay within rows t0:t1 (zeros when there is no decay)."""
    if g is None:
        return np.zeros(lead + (t1 - t0,), dtype)
    return np.cumsum(g[..., t0:t1], axis=-1)


def chunked_forward(q, k, v, g, S0, chunk):
    """The tiled algorithm (blocks of `chunk` rows): intra-block masked quadratic part plus
    the inter-block contribution of the carried state.  Returns (o, S_T)."""
    lead = _lead_shape(q, k, v, g, S0)
    T, dv = q.shape[-2], v.shape[-1]
    S = np.broadcast_to(S0, lead + S0.shape[-2:]).copy()
    o = np.empty(lead + (T, dv), dtype=S0.dtype)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        Q, K, V = q[..., t0:t1, :], k[..., t0:t1, :], v[..., t0:t1, :]
        G = _block(g, t0, t1, lead, S0.dtype)
        M = decay_mask(G)
        o[..., t0:t1, :] = ((Q @ np.swapaxes(K, -1, -2)) * M) @ V + np.exp(G)[..., None] * (Q @ S)
        w = np.exp(G[..., -1:] - G)
        S = np.exp(G[..., -1])[..., None, None] * S + np.swapaxes(K * w[..., None], -1, -2) @ V
    return o, S


def chunked_backward(q, k, v, g, S0, do, dS, chunk):
    """Gradients (dq, dk, dv, dS0) of the chunked recurrence, shapes of the broadcast lead.

    The log-decay gradient follows from dq and dk, see `log_decay_grad`."""
    lead = _lead_shape(q, k, v, g, S0)
    T = q.shape[-2]
    dtype = S0.dtype
    dq = np.empty(lead + q.shape[-2:], dtype)
    dk = np.empty(lead + k.shape[-2:], dtype)
    dv = np.empty(lead + v.shape[-2:], dtype)
    starts = list(range(0, T, chunk))
    # forward sweep: the state entering each block (for dq)
    S = np.broadcast_to(S0, lead + S0.shape[-2:]).copy()
    for t0 in starts:
        t1 = min(T, t0 + chunk)
        Q, K, V, dO = q[..., t0:t1, :], k[..., t0:t1, :], v[..., t0:t1, :], do[..., t0:t1, :]
        G = _block(g, t0, t1, lead, dtype)
        M = decay_mask(G)
        P = dO @ np.swapaxes(V, -1, -2)
        dq[..., t0:t1, :] = (P * M) @ K + np.exp(G)[..., None] * (dO @ np.swapaxes(S, -1, -2))
        w = np.exp(G[..., -1:] - G)
        S = np.exp(G[..., -1])[..., None, None] * S + np.swapaxes(K * w[..., None], -1, -2) @ V
    # reverse sweep: H is the gradient of the state leaving the block
    H = np.broadcast_to(dS, lead + S0.shape[-2:]).copy()
    for t0 in reversed(starts):
        t1 = min(T, t0 + chunk)
        Q, K, V, dO = q[..., t0:t1, :], k[..., t0:t1, :], v[..., t0:t1, :], do[..., t0:t1, :]
        G = _block(g, t0, t1, lead, dtype)
        M = decay_mask(G)
        w = np.exp(G[..., -1:] - G)[..., None]
        P = (dO @ np.swapaxes(V, -1, -2)) * M
        A = (Q @ np.swapaxes(K, -1, -2)) * M
        dk[..., t0:t1, :] = np.swapaxes(P, -1, -2) @ Q + w * (V @ np.swapaxes(H, -1, -2))
        dv[..., t0:t1, :] = np.swapaxes(A, -1, -2) @ dO + w * (K @ H)
        H = (np.exp(G[..., -1])[..., None, None] * H
             + np.swapaxes(np.exp(G)[..., None] * Q, -1, -2) @ dO)
    return dq, dk, dv, H


def log_decay_grad(q, k, dq, dk, dS, S_T):
    """Gradient of the per-step log-decays g [..., T] from the other gradients.

    The output depends on g only through cumulative sums G_u; dL/dG_u = q_u.dq_u - k_u.dk_u
    (plus <dS, S_T> at the last step), and dL/dg_t = sum over u >= t of dL/dG_u."""
    dG = np.sum(q * dq, axis=-1) - np.sum(k * dk, axis=-1)
    if dG.shape[-1] > 0:
        dG[..., -1] += np.sum(dS * S_T, axis=(-2, -1))
    return np.flip(np.cumsum(np.flip(dG, -1), axis=-1), -1)


# ---- SSD (Mamba-2) as stated by its own recurrence -------------------------------------------

def ssd_recurrence(x, dt, A, B, C, h0):
    """Mamba-2 step loop.  x [Bt,T,NH,P], dt [Bt,T,NH], A [NH], B/C [Bt,T,N], h0 [Bt,NH,P,N].
    h_t = exp(dt_t A) h_{t-1} + (dt_t x_t) B_t^T;  y_t = h_t C_t.  Returns (y, h_T)."""
    h = h0.copy()
    y = np.empty_like(x)
    for t in range(x.shape[1]):
        a = np.exp(dt[:, t] * A)[:, :, None, None]
        h = a * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, None, None, :]
        y[:, t] = np.einsum("bhpn,bn->bhp", h, C[:, t])
    return y, h


# ---- softmax attention -----------------------------------------------------------------------

def visible(Tq, Tk, causal):
    """Boolean [Tq, Tk]: query i sees key j (causal: j <= i + Tk - Tq, aligned at the end)."""
    if not causal:
        return np.ones((Tq, Tk), dtype=bool)
    return np.arange(Tk)[None, :] <= np.arange(Tq)[:, None] + (Tk - Tq)


def softmax_attention(q, k, v, causal, scale):
    """softmax(q k^T * scale) v, materialising the [.., Tq, Tk] scores.  Queries that see no
    key (causal with Tk < Tq) output zeros."""
    s = (q @ np.swapaxes(k, -1, -2)) * scale
    vis = visible(q.shape[-2], k.shape[-2], causal)
    s = np.where(vis, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    p = np.exp(s - np.where(np.isfinite(m), m, 0))
    l = p.sum(axis=-1, keepdims=True)
    return (p @ v) / np.where(l > 0, l, 1)


def flash_forward(q, k, v, causal, scale, chunk):
    """Walk the keys in chunks with a running max m, denominator l and numerator acc.
    Returns (o, lse) with lse = m + log l the log-sum-exp of each query's scores (-inf when
    it sees no key)."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    lead = q.shape[:-1]
    m = np.full(lead, -np.inf, q.dtype)
    l = np.zeros(lead, q.dtype)
    acc = np.zeros(lead[:-1] + (Tq, v.shape[-1]), q.dtype)
    vis = visible(Tq, Tk, causal)
    for j0 in range(0, Tk, chunk):
        j1 = min(Tk, j0 + chunk)
        s = np.where(vis[:, j0:j1], (q @ np.swapaxes(k[..., j0:j1, :], -1, -2)) * scale, -np.inf)
        m_new = np.maximum(m, s.max(axis=-1, initial=-np.inf))
        base = np.where(np.isfinite(m_new), m_new, 0)      # all -inf so far: nothing to rescale
        alpha = np.exp(m - base)
        p = np.exp(s - base[..., None])
        l = alpha * l + p.sum(axis=-1)
        acc = alpha[..., None] * acc + p @ v[..., j0:j1, :]
        m = m_new
    with np.errstate(divide="ignore"):
        lse = m + np.log(l)
    return acc / np.where(l > 0, l, 1)[..., None], lse


def flash_backward(q, k, v, o, lse, do, causal, scale, chunk):
    """Gradients (dq, dk, dv), recomputing each chunk's probabilities from the saved lse:
    P = exp(S - lse), dS = P * (dO V^T - D) with D_i = dO_i . O_i."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    D = np.sum(do * o, axis=-1)
    base = np.where(lse == -np.inf, np.inf, lse)          # rows seeing no key: P = 0
    vis = visible(Tq, Tk, causal)
    dq = np.zeros_like(q)
    dk = np.empty_like(k)
    dv = np.empty_like(v)
    for j0 in range(0, Tk, chunk):
        j1 = min(Tk, j0 + chunk)
        K, V = k[..., j0:j1, :], v[..., j0:j1, :]
        s = np.where(vis[:, j0:j1], (q @ np.swapaxes(K, -1, -2)) * scale, -np.inf)
        p = np.exp(s - base[..., None])
        dv[..., j0:j1, :] = np.swapaxes(p, -1, -2) @ do
        ds = p * (do @ np.swapaxes(V, -1, -2) - D[..., None]) * scale
        dq += ds @ K
        dk[..., j0:j1, :] = np.swapaxes(ds, -1, -2) @ q
    return dq, dk, dv
