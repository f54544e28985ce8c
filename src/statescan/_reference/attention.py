"""numpy reference of memory-efficient softmax attention: the definition
(`softmax_attention`, materialises the scores) and the online-softmax key walk
(`flash_forward` / `flash_backward`, the fallback backend; the compiled kernels carry the same
names)."""
import numpy as np


# ---- softmax attention -----------------------------------------------------------------------

def visible(Tq, Tk, causal, j0=0, j1=None):
    """Boolean [Tq, j1 - j0]: query i sees key j in j0..j1-1 (causal: j <= i + Tk - Tq,
    aligned at the end)."""
    j1 = Tk if j1 is None else j1
    if not causal:
        return np.ones((Tq, j1 - j0), dtype=bool)
    return np.arange(j0, j1)[None, :] <= np.arange(Tq)[:, None] + (Tk - Tq)


def _visible_matmul(w, vis, X):
    """w @ X over the visible pairs only (w [..., m, c], vis [m, c], X [..., c, d]): a
    masked weight (0) times a non-finite entry of X gives 0, so nothing crosses the causal
    mask."""
    if np.isfinite(X).all():
        return w @ X
    return np.where(vis[..., None], w[..., None] * X[..., None, :, :], 0).sum(axis=-2)


def softmax_attention(q, k, v, causal, scale):
    """softmax(q k^T * scale) v, materialising the [.., Tq, Tk] scores.  Queries that see no
    key (causal with Tk < Tq) output zeros."""
    s = (q @ np.swapaxes(k, -1, -2)) * scale
    vis = visible(q.shape[-2], k.shape[-2], causal)
    s = np.where(vis, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    p = np.exp(s - np.where(np.isfinite(m), m, 0))
    l = p.sum(axis=-1, keepdims=True)
    return _visible_matmul(p, vis, v) / np.where(l > 0, l, 1)


def flash_forward(q, k, v, causal, scale, chunk):
    """Walk the keys in chunks with a running max m, denominator l and numerator acc.
    Returns (o, lse) with lse = m + log l the log-sum-exp of each query's scores (-inf when
    it sees no key)."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    lead = q.shape[:-1]
    m = np.full(lead, -np.inf, q.dtype)
    l = np.zeros(lead, q.dtype)
    acc = np.zeros(lead[:-1] + (Tq, v.shape[-1]), q.dtype)
    for j0 in range(0, Tk, chunk):
        j1 = min(Tk, j0 + chunk)
        vis = visible(Tq, Tk, causal, j0, j1)
        s = np.where(vis, (q @ np.swapaxes(k[..., j0:j1, :], -1, -2)) * scale, -np.inf)
        m_new = np.maximum(m, s.max(axis=-1, initial=-np.inf))
        # all -inf so far: nothing to rescale; a +inf score makes the row NaN (inf - inf)
        base = np.where(m_new > -np.inf, m_new, 0)
        alpha = np.exp(m - base)
        p = np.exp(s - base[..., None])
        l = alpha * l + p.sum(axis=-1)
        acc = alpha[..., None] * acc + _visible_matmul(p, vis, v[..., j0:j1, :])
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
    dq = np.zeros_like(q)
    dk = np.empty_like(k)
    dv = np.empty_like(v)
    for j0 in range(0, Tk, chunk):
        j1 = min(Tk, j0 + chunk)
        K, V = k[..., j0:j1, :], v[..., j0:j1, :]
        vis = visible(Tq, Tk, causal, j0, j1)
        s = np.where(vis, (q @ np.swapaxes(K, -1, -2)) * scale, -np.inf)
        p = np.where(vis, np.exp(s - base[..., None]), 0)   # a NaN row's masked keys too
        dv[..., j0:j1, :] = _visible_matmul(np.swapaxes(p, -1, -2), vis.T, do)
        ds = np.where(vis, p * (do @ np.swapaxes(V, -1, -2) - D[..., None]) * scale, 0)
        dq += _visible_matmul(ds, vis, K)
        dk[..., j0:j1, :] = _visible_matmul(np.swapaxes(ds, -1, -2), vis.T, q)
    return dq, dk, dv
