"""numpy reference of the causal linear recurrence shared by linear attention and SSD.

  S_t = exp(g_t) S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t
  q, k [B, G, T, dk] (head h reads group h // group)   v [B, NH, T, dv]
  g [B, NH, T] or None (no decay)   S [B, NH, dk, dv]
  lengths [B] or None: steps t >= lengths[b] are padding (output 0, state untouched)
  reset [B, T] bool or None: the state is zeroed before step t (a zero decay at t)

Three forms of the same function: the step loop (`recurrence`, the definition), the
quadratic masked form (`quadratic`) and the chunked form (`linear_forward`, the fallback
backend, with its backward `linear_backward`; the compiled kernels carry the same names).
"""
import numpy as np


def _lead_shape(q, k, v, g, S0):
    shapes = [q.shape[:-2], k.shape[:-2], v.shape[:-2], S0.shape[:-2]]
    if g is not None:
        shapes.append(g.shape[:-1])
    return np.broadcast_shapes(*shapes)


def recurrence(q, k, v, g, S0):
    """The step loop (arrays broadcast over the leading dims): (o [..., T, dv], S_T)."""
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
    return np.exp(np.where(lower, G[..., :, None] - G[..., None, :], -np.inf))


def causal(scores, M):
    """scores * M with the entries above the diagonal exactly 0 (a future key's non-finite
    score must not reach the past)."""
    c = M.shape[-1]
    return np.where(np.tril(np.ones((c, c), dtype=bool)), scores * M, 0)


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


# ---- the chunked form, with groups, lengths and resets ---------------------------------------

def _per_head(a, group):
    """q or k [B, G, T, d] as [B, G*group, T, d] (head h reads group h // group)."""
    return a if group == 1 else np.repeat(a, group, axis=1)


def _valid(lengths, B, T):
    """[B, T] bool (True at valid steps), or None when every step is valid."""
    if lengths is None:
        return None
    return np.arange(T)[None, :] < lengths[:, None]


def _segments(n, reset_row):
    """The sequences packed in a row's n valid steps: [(start, end, starts_fresh)]."""
    if n == 0:
        return []
    if reset_row is None:
        return [(0, n, False)]
    cuts = [0] + [t for t in range(1, n) if reset_row[t]] + [n]
    return [(a, e, a > 0 or bool(reset_row[0])) for a, e in zip(cuts[:-1], cuts[1:])]


def _block(g, t0, t1, lead, dtype):
    """Cumulative log-decay within rows t0:t1 (zeros when there is no decay)."""
    if g is None:
        return np.zeros(lead + (t1 - t0,), dtype)
    return np.cumsum(g[..., t0:t1], axis=-1)


def _starts(T, chunk, offset):
    """Block starts of a sequence beginning at time `offset` of its row: blocks end at the
    row's multiples of `chunk` (the compiled kernel's blocks, so non-finite inputs spread
    alike)."""
    first = chunk - offset % chunk
    return [0] + list(range(first, T, chunk))


def linear_forward(q, k, v, g, S0, chunk, group=1, lengths=None, reset=None, offset=0,
                   fresh=False):
    """The tiled algorithm (blocks of `chunk` rows): intra-block masked quadratic part plus
    the inter-block contribution of the carried state.  Returns (o, S_T).  With lengths or
    resets each row, and each sequence packed in it, runs on its own; `offset` is where the
    sequence starts in its row; a `fresh` sequence (started by a reset) has no state term in
    its first block (not S0 = 0 times a non-finite q or decay: NaN)."""
    B, NH, T, dv = v.shape
    if q.size == 0 or v.size == 0 or S0.size == 0:     # nothing to loop over
        return np.zeros((B, NH, T, dv), S0.dtype), S0.copy()
    if lengths is not None or reset is not None:
        return _forward_by_sequence(q, k, v, g, S0, chunk, group, lengths, reset)
    q, k = _per_head(q, group), _per_head(k, group)
    lead = (B, NH)
    S = S0.copy()
    o = np.empty(lead + (T, dv), dtype=S0.dtype)
    starts = _starts(T, chunk, offset)
    for t0, t1 in zip(starts, starts[1:] + [T]):
        Q, K, V = q[..., t0:t1, :], k[..., t0:t1, :], v[..., t0:t1, :]
        G = _block(g, t0, t1, lead, S0.dtype)
        M = decay_mask(G)
        o[..., t0:t1, :] = causal(Q @ np.swapaxes(K, -1, -2), M) @ V
        w = np.exp(G[..., -1:] - G)
        new = np.swapaxes(K * w[..., None], -1, -2) @ V
        if fresh and t0 == 0:
            S = new
            continue
        o[..., t0:t1, :] += _decayed(np.exp(G)[..., None], Q, S)
        S = np.exp(G[..., -1])[..., None, None] * S + new
    return o, S


def _decayed(w, X, Y):
    """diag(w) X Y with w [..., c, 1].  Finite factors: w * (X Y).  Otherwise as the kernel
    (and the step loop) associate it, decay first: an infinite decay times a state of mixed
    signs is NaN there, not the +-inf of a decay applied after the sum."""
    if np.isfinite(w).all() and np.isfinite(X).all() and np.isfinite(Y).all():
        return w * (X @ Y)
    return (w * X) @ Y


def _rows(b, a, e, *arrays):
    return [None if x is None else x[b:b + 1, :, a:e] for x in arrays]


def _fresh_decay(g, fresh):
    """A sequence started by a reset: its first step's decay multiplies a zeroed state and is
    dropped (as a decay of 1), so even an infinite one leaves no trace."""
    if g is None or not fresh:
        return g
    g = g.copy()
    g[..., 0] = 0
    return g


# Variable lengths and resets: each row on its own, each packed sequence from its own start
# state, over the valid steps only (padded steps are never read).

def _forward_by_sequence(q, k, v, g, S0, chunk, group, lengths, reset):
    B, NH, T, dv = v.shape
    o = np.zeros((B, NH, T, dv), S0.dtype)
    S_T = S0.copy()
    for b in range(B):
        n = T if lengths is None else int(lengths[b])
        S = S0[b:b + 1]
        for a, e, fresh in _segments(n, None if reset is None else reset[b]):
            qs, ks, vs, gs = _rows(b, a, e, q, k, v, g)
            gs = _fresh_decay(gs, fresh)
            o[b:b + 1, :, a:e], S = linear_forward(qs, ks, vs, gs, np.zeros_like(S) if fresh else S,
                                                   chunk, group, offset=a, fresh=fresh)
        S_T[b:b + 1] = S
    return o, S_T


def linear_backward(q, k, v, g, S0, chunk, group, lengths, reset, do, dS, offset=0,
                    fresh=False):
    """Gradients (dq, dk, dv, dS0) of `linear_forward`, dq and dk per head [B, NH, T, dk]
    (the caller sums a group's heads).  The log-decay gradient follows from dq and dk, see
    `log_decay_grad`."""
    B, NH, T, dv_ = v.shape
    dtype = S0.dtype
    dk_ = q.shape[-1]
    if q.size == 0 or v.size == 0 or S0.size == 0:
        return (np.zeros((B, NH, T, dk_), dtype), np.zeros((B, NH, T, dk_), dtype),
                np.zeros((B, NH, T, dv_), dtype), dS.copy())
    if lengths is not None or reset is not None:
        return _backward_by_sequence(q, k, v, g, S0, chunk, group, lengths, reset, do, dS)
    q, k = _per_head(q, group), _per_head(k, group)
    lead = (B, NH)
    dq = np.empty(lead + (T, dk_), dtype)
    dk = np.empty(lead + (T, dk_), dtype)
    dv = np.empty(lead + (T, dv_), dtype)
    starts = _starts(T, chunk, offset)
    ends = starts[1:] + [T]
    # forward sweep: the state entering each block (for dq)
    S = S0.copy()
    for t0, t1 in zip(starts, ends):
        Q, K, V, dO = q[..., t0:t1, :], k[..., t0:t1, :], v[..., t0:t1, :], do[..., t0:t1, :]
        G = _block(g, t0, t1, lead, dtype)
        M = decay_mask(G)
        P = dO @ np.swapaxes(V, -1, -2)
        dq[..., t0:t1, :] = causal(P, M) @ K
        w = np.exp(G[..., -1:] - G)
        new = np.swapaxes(K * w[..., None], -1, -2) @ V
        if fresh and t0 == 0:            # no state term (see linear_forward)
            S = new
            continue
        dq[..., t0:t1, :] += _decayed(np.exp(G)[..., None], dO, np.swapaxes(S, -1, -2))
        S = np.exp(G[..., -1])[..., None, None] * S + new
    # reverse sweep: H is the gradient of the state leaving the block
    H = dS.copy()
    for t0, t1 in reversed(list(zip(starts, ends))):
        Q, K, V, dO = q[..., t0:t1, :], k[..., t0:t1, :], v[..., t0:t1, :], do[..., t0:t1, :]
        G = _block(g, t0, t1, lead, dtype)
        M = decay_mask(G)
        w = np.exp(G[..., -1:] - G)[..., None]
        P = causal(dO @ np.swapaxes(V, -1, -2), M)
        A = causal(Q @ np.swapaxes(K, -1, -2), M)
        dk[..., t0:t1, :] = np.swapaxes(P, -1, -2) @ Q + _decayed(w, V, np.swapaxes(H, -1, -2))
        dv[..., t0:t1, :] = np.swapaxes(A, -1, -2) @ dO + _decayed(w, K, H)
        H = (np.exp(G[..., -1])[..., None, None] * H
             + np.swapaxes(np.exp(G)[..., None] * Q, -1, -2) @ dO)
    return dq, dk, dv, H


def _backward_by_sequence(q, k, v, g, S0, chunk, group, lengths, reset, do, dS):
    """Each packed sequence's backward on its own: the gradient leaving a sequence that a
    reset ends is 0, and only a first sequence that starts from S0 passes a gradient to it."""
    B, NH, T, dv_ = v.shape
    dtype = S0.dtype
    dq = np.zeros((B, NH, T, q.shape[-1]), dtype)
    dk = np.zeros_like(dq)
    dv = np.zeros((B, NH, T, dv_), dtype)
    dS0 = dS.copy()
    for b in range(B):
        n = T if lengths is None else int(lengths[b])
        H = dS[b:b + 1]
        for a, e, fresh in reversed(_segments(n, None if reset is None else reset[b])):
            qs, ks, vs, gs, dos = _rows(b, a, e, q, k, v, g, do)
            gs = _fresh_decay(gs, fresh)
            start = np.zeros_like(S0[b:b + 1]) if fresh else S0[b:b + 1]
            grads = linear_backward(qs, ks, vs, gs, start, chunk, group, None, None, dos, H,
                                    offset=a, fresh=fresh)
            dq[b:b + 1, :, a:e], dk[b:b + 1, :, a:e], dv[b:b + 1, :, a:e], H_in = grads
            H = np.zeros_like(H_in) if fresh else H_in
        dS0[b:b + 1] = H
    return dq, dk, dv, dS0


def log_decay_grad(q, k, dq, dk, dS, S_T, group=1, lengths=None, reset=None):
    """Gradient of the per-step log-decays g [B, NH, T] from the other gradients.

    Within a segment (between resets) the output depends on g only through cumulative sums
    G_u; dL/dG_u = q_u.dq_u - k_u.dk_u (plus <dS, S_T> at each row's last valid step), and
    dL/dg_t = sum over u >= t in t's segment of dL/dG_u (0 at a reset step, whose own decay
    multiplies a zeroed state)."""
    B, NH, T, d = dq.shape
    G = q.shape[1]
    dG = (np.sum(dq.reshape(B, G, NH // G, T, d) * q[:, :, None], axis=-1)
          - np.sum(dk.reshape(B, G, NH // G, T, d) * k[:, :, None], axis=-1)).reshape(B, NH, T)
    if T == 0:
        return dG
    final = np.sum(dS * S_T, axis=(-2, -1))
    if lengths is None:
        dG[..., -1] += final
    else:       # padded q, k may hold anything: their (zero-gradient) terms must not spread
        dG = np.where(_valid(lengths, B, T)[:, None], dG, 0)
        rows = np.flatnonzero(lengths > 0)
        dG[rows, :, lengths[rows] - 1] += final[rows]
    R = np.flip(np.cumsum(np.flip(dG, -1), axis=-1), -1)
    if reset is None:
        return R
    # R_t - R_(next reset after t): the suffix sum stops at the segment's end
    pos = np.where(reset, np.arange(T), T)
    nxt = np.flip(np.minimum.accumulate(np.flip(pos, -1), axis=-1), -1)
    nxt = np.concatenate([nxt[:, 1:], np.full((B, 1), T)], axis=1)
    R_ext = np.concatenate([R, np.zeros((B, NH, 1), R.dtype)], axis=-1)
    dg = R - np.take_along_axis(R_ext, np.broadcast_to(nxt[:, None], (B, NH, T)), axis=-1)
    return np.where(reset[:, None], 0, dg)


# ---- one decoding step -------------------------------------------------------------------------

def linear_step(q, k, v, decay, state):
    """T = 1 on the state: S = decay S + k v^T, o = S^T q.  q, k [B,NH,1,dk], v [B,NH,1,dv],
    decay [NH] or None, state [B,NH,dk,dv].  Returns (o [B,NH,1,dv], S)."""
    S = state if decay is None else decay[:, None, None] * state
    S = S + k[:, :, 0, :, None] * v[:, :, 0, None, :]
    return np.einsum("bhkv,bhk->bhv", S, q[:, :, 0])[:, :, None], S
