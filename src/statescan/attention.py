"""Chunked linear attention, SSD (Mamba-2) and memory-efficient softmax attention.

Linear attention and SSD run on one kernel, a causal linear recurrence with a scalar decay
per step, evaluated in blocks of ``chunk`` rows (intra-block masked quadratic part plus the
carried state): constant work per token for any T.  Softmax attention walks the keys in
chunks with a running max and denominator, so it never holds a T x T matrix.
"""
import math

import numpy as np

from . import _dispatch, _validate
from ._reference import attention as _ref
from .autodiff import defvjp

_ATTENTION_BLOCK_Q = 128      # query rows per block (softmax attention)
_ATTENTION_CHUNK = 256        # default key chunk


# ---- the shared linear recurrence ------------------------------------------------------------

def _linear_fwd(q, k, v, g, S0, chunk, out=None):
    """(o [B,NH,T,dv], S_T) for q/k [B,NH,T,dk] (any strides), g [B,NH,T] or None, S0 contiguous.
    `out` optionally gives o as a (strided) view to write into."""
    B, NH, T, dk = S0.shape[:2] + q.shape[2:]
    dv = v.shape[-1]
    if B * NH * T * dk * dv == 0 or not _dispatch.use_compiled():
        o, S = _ref.chunked_forward(q, k, v, g, S0, chunk)
        if out is not None:
            out[...] = o
            o = out
        return o, S
    o = np.empty((B, NH, T, dv), S0.dtype) if out is None else out
    S = np.empty_like(S0)
    _dispatch.ext_module("attention").linear_forward(q, k, v, g, S0, o, S, chunk,
                                                     _dispatch.get_num_threads())
    return o, S


def _linear_bwd(q, k, v, g, S0, S_T, do, dS, chunk):
    """(dq, dk, dv, dS0, dg) of `_linear_fwd`, dq/dk/dv per (batch, head): [B,NH,T,d]."""
    B, NH, T, dk = S0.shape[:2] + q.shape[2:]
    dv = v.shape[-1]
    if B * NH * T * dk * dv == 0 or not _dispatch.use_compiled():
        dq, dk_, dv_, dS0 = _ref.chunked_backward(q, k, v, g, S0, do, dS, chunk)
    else:
        dtype = S0.dtype
        dq, dk_ = np.empty((B, NH, T, dk), dtype), np.empty((B, NH, T, dk), dtype)
        dv_, dS0 = np.empty((B, NH, T, dv), dtype), np.empty_like(S0)
        _dispatch.ext_module("attention").linear_backward(
            q, k, v, g, S0, do, np.ascontiguousarray(dS), dq, dk_, dv_, dS0, chunk,
            _dispatch.get_num_threads())
    dg = None
    if g is not None:
        dg = _ref.log_decay_grad(q, k, dq, dk_, dS, S_T)
    return dq, dk_, dv_, dS0, dg


def _cotangent_pair(cot, o_shape, s_shape, dtype):
    """Split (do, dstate) into arrays; None entries mean zero."""
    if not isinstance(cot, (tuple, list)) or len(cot) != 2:
        raise TypeError("cotangent must be a pair (do, dstate) matching the output (o, state)")
    parts = []
    for name, c, shape in (("do", cot[0], o_shape), ("dstate", cot[1], s_shape)):
        if c is None:
            parts.append(np.zeros(shape, dtype))
            continue
        c = _validate.float_array(name, c)
        _validate.check_shape(name, c, shape, str(list(shape)))
        parts.append(_validate.contiguous(c, dtype))
    return parts


# ---- linear attention ------------------------------------------------------------------------

def _prepare_linear(q, k, v, decay, state, chunk):
    q = _validate.float_array("q", q)
    k = _validate.float_array("k", k)
    v = _validate.float_array("v", v)
    decay = None if decay is None else _validate.float_array("decay", decay)
    state = None if state is None else _validate.float_array("state", state)
    chunk = _validate.positive_int("chunk", chunk)
    dtype = _validate.common_dtype(q=q, k=k, v=v, decay=decay, state=state)
    if q.ndim != 4:
        raise ValueError(f"q must have shape [B, NH, T, dk], got {q.shape}")
    B, NH, T, dk = q.shape
    _validate.check_shape("k", k, q.shape, f"[B, NH, T, dk] = {list(q.shape)} (as q)")
    _validate.check_shape("v", v, (B, NH, T, None), f"[B, NH, T, dv] = [{B}, {NH}, {T}, dv]")
    dv = v.shape[3]
    if decay is not None:
        _validate.check_shape("decay", decay, (NH,), f"[NH] = [{NH}]")
        if np.any((decay <= 0) | (decay > 1)):
            raise ValueError(f"decay must lie in (0, 1], got values in "
                             f"[{np.nanmin(decay)}, {np.nanmax(decay)}]")
    if state is not None:
        _validate.check_shape("state", state, (B, NH, dk, dv), f"[B, NH, dk, dv] = "
                              f"[{B}, {NH}, {dk}, {dv}]")
    S0 = (np.zeros((B, NH, dk, dv), dtype) if state is None
          else _validate.contiguous(state, dtype))
    g = None
    if decay is not None:
        decay = decay.astype(dtype)
        g = np.broadcast_to(np.log(decay)[None, :, None], (B, NH, T))
    c = _validate.contiguous
    return c(q, dtype), c(k, dtype), c(v, dtype), decay, g, S0, chunk


def linear_attention(q, k, v, *, decay=None, chunk=64, state=None):
    """Causal linear attention with an optional per-head decay, in O(T) time and memory.

    ``S_t = decay * S_{t-1} + k_t v_t^T``,  ``o_t = S_t^T q_t``  (no softmax, no scaling).
    Evaluated in blocks of ``chunk`` rows (Lightning Attention-2 tiling): the intra-block part
    ``((Q K^T) * M) V`` with ``M[s, t] = decay**(s - t)`` for ``s >= t``, plus the carried
    state's contribution; the result does not depend on ``chunk`` (up to rounding).

    Parameters
    ----------
    q, k : ndarray [B, NH, T, dk]
        Queries and keys (float32 or float64).
    v : ndarray [B, NH, T, dv]
        Values.
    decay : ndarray [NH], optional
        Per-head decay lambda in (0, 1]; None means 1 (plain linear attention).
    chunk : int
        Block size of the tiled algorithm (speed only).
    state : ndarray [B, NH, dk, dv], optional
        Initial state S_0 (zeros when None); passing the returned state back continues the
        sequence exactly.

    Returns
    -------
    o : ndarray [B, NH, T, dv]
    state : ndarray [B, NH, dk, dv]
        The final state S_T.

    Notes
    -----
    ``statescan.vjp(linear_attention, q, k, v, decay=..., state=...)`` returns a pullback
    taking ``(do, dstate)`` (either may be None) and returning ``(dq, dk, dv)``, followed by
    ``ddecay`` when ``decay`` was passed and ``dstate`` when ``state`` was passed.
    """
    q, k, v, _, g, S0, chunk = _prepare_linear(q, k, v, decay, state, chunk)
    return _linear_fwd(q, k, v, g, S0, chunk)


def _linear_attention_vjp(q, k, v, *, decay=None, chunk=64, state=None):
    q, k, v, lam, g, S0, chunk = _prepare_linear(q, k, v, decay, state, chunk)
    o, S_T = _linear_fwd(q, k, v, g, S0, chunk)

    def pullback(cotangent):
        do, dS = _cotangent_pair(cotangent, o.shape, S_T.shape, o.dtype)
        dq, dk, dv, dS0, dg = _linear_bwd(q, k, v, g, S0, S_T, do, dS, chunk)
        grads = (dq, dk, dv)
        if lam is not None:
            # g = log(decay) at every step: d/d decay = sum of d/dg over steps / decay
            grads += (dg.sum(axis=(0, 2)) / lam,)
        if state is not None:
            grads += (dS0,)
        return grads

    return (o, S_T), pullback


# ---- SSD (Mamba-2) ---------------------------------------------------------------------------

def _prepare_ssd(x, dt, A, B, C, state, chunk):
    x = _validate.float_array("x", x)
    dt = _validate.float_array("dt", dt)
    A = _validate.float_array("A", A)
    B = _validate.float_array("B", B)
    C = _validate.float_array("C", C)
    state = None if state is None else _validate.float_array("state", state)
    chunk = _validate.positive_int("chunk", chunk)
    dtype = _validate.common_dtype(x=x, dt=dt, A=A, B=B, C=C, state=state)
    if x.ndim != 4:
        raise ValueError(f"x must have shape [Bt, T, NH, P], got {x.shape}")
    Bt, T, NH, P = x.shape
    _validate.check_shape("dt", dt, (Bt, T, NH), f"[Bt, T, NH] = [{Bt}, {T}, {NH}]")
    _validate.check_shape("A", A, (NH,), f"[NH] = [{NH}]")
    _validate.check_shape("B", B, (Bt, T, None), f"[Bt, T, N] = [{Bt}, {T}, N]")
    N = B.shape[2]
    _validate.check_shape("C", C, (Bt, T, N), f"[Bt, T, N] = [{Bt}, {T}, {N}] (as B)")
    if state is not None:
        _validate.check_shape("state", state, (Bt, NH, P, N),
                              f"[Bt, NH, P, N] = [{Bt}, {NH}, {P}, {N}]")
    c = _validate.contiguous
    x, dt, A, B, C = c(x, dtype), c(dt, dtype), c(A, dtype), c(B, dtype), c(C, dtype)
    S0 = (np.zeros((Bt, NH, N, P), dtype) if state is None
          else c(np.swapaxes(state, -1, -2), dtype))
    return x, dt, A, B, C, S0, chunk


def _ssd_operands(x, dt, A, B, C):
    """The linear-attention view: q = C, k = B (shared by heads), v = dt x, g = dt A,
    as [Bt, NH, T, .] views (no copies of B and C)."""
    Bt, T, NH, P = x.shape
    N = B.shape[2]
    q = np.broadcast_to(C[:, None], (Bt, NH, T, N))
    k = np.broadcast_to(B[:, None], (Bt, NH, T, N))
    v = (dt[..., None] * x).transpose(0, 2, 1, 3)
    g = (dt * A).transpose(0, 2, 1)
    return q, k, v, g


def ssd(x, dt, A, B, C, *, chunk=64, state=None):
    """Mamba-2's state-space duality layer (scalar decay per head), chunked.

    ``a_t = exp(dt_t * A)``,  ``h_t = a_t h_{t-1} + (dt_t x_t) B_t^T``,  ``y_t = h_t C_t``
    per head; computed as linear attention with q = C, k = B, v = dt x and data-dependent
    decay (cumulative log-decays within a block, differences only, so nothing overflows).
    T = 1 with ``state`` is the O(1) decoding step.

    Parameters
    ----------
    x : ndarray [Bt, T, NH, P]
        Input per head.
    dt : ndarray [Bt, T, NH]
        Step sizes (after softplus, typically positive).
    A : ndarray [NH]
        Per-head scalar (negative for a decaying state).
    B, C : ndarray [Bt, T, N]
        Input and output projections, shared by all heads.
    chunk : int
        Block size (speed only).
    state : ndarray [Bt, NH, P, N], optional
        Initial state h_0 (zeros when None).

    Returns
    -------
    y : ndarray [Bt, T, NH, P]
    state : ndarray [Bt, NH, P, N]

    Notes
    -----
    The vjp pullback takes ``(dy, dstate)`` and returns ``(dx, ddt, dA, dB, dC)``, then
    ``dstate`` when ``state`` was passed.
    """
    x, dt, A, B, C, S0, chunk = _prepare_ssd(x, dt, A, B, C, state, chunk)
    q, k, v, g = _ssd_operands(x, dt, A, B, C)
    y = np.empty_like(x)
    _, S = _linear_fwd(q, k, v, g, S0, chunk, out=y.transpose(0, 2, 1, 3))
    return y, np.swapaxes(S, -1, -2).copy()


def _ssd_vjp(x, dt, A, B, C, *, chunk=64, state=None):
    x, dt, A, B, C, S0, chunk = _prepare_ssd(x, dt, A, B, C, state, chunk)
    q, k, v, g = _ssd_operands(x, dt, A, B, C)
    y = np.empty_like(x)
    _, S = _linear_fwd(q, k, v, g, S0, chunk, out=y.transpose(0, 2, 1, 3))
    h = np.swapaxes(S, -1, -2).copy()

    def pullback(cotangent):
        dy, dh = _cotangent_pair(cotangent, y.shape, h.shape, y.dtype)
        dS = np.swapaxes(dh, -1, -2)
        dq, dk, dv, dS0, dg = _linear_bwd(q, k, v, g, S0, S, dy.transpose(0, 2, 1, 3), dS,
                                             chunk)
        dv = dv.transpose(0, 2, 1, 3)                  # [Bt, T, NH, P]
        dg = dg.transpose(0, 2, 1)                     # [Bt, T, NH]
        dx = dv * dt[..., None]
        ddt = np.sum(dv * x, axis=-1) + dg * A
        dA = np.sum(dg * dt, axis=(0, 1))
        grads = (dx, ddt, dA, dk.sum(axis=1), dq.sum(axis=1))
        if state is not None:
            grads += (np.swapaxes(dS0, -1, -2).copy(),)
        return grads

    return (y, h), pullback


# ---- softmax attention -----------------------------------------------------------------------

def _prepare_attention(q, k, v, causal, chunk, scale):
    q = _validate.float_array("q", q)
    k = _validate.float_array("k", k)
    v = _validate.float_array("v", v)
    dtype = _validate.common_dtype(q=q, k=k, v=v)
    if q.ndim != 4:
        raise ValueError(f"q must have shape [B, NH, Tq, d], got {q.shape}")
    B, NH, Tq, d = q.shape
    _validate.check_shape("k", k, (B, NH, None, d), f"[B, NH, Tk, d] = [{B}, {NH}, Tk, {d}]")
    Tk = k.shape[2]
    _validate.check_shape("v", v, (B, NH, Tk, None), f"[B, NH, Tk, dv] = [{B}, {NH}, {Tk}, dv]")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    chunk = _ATTENTION_CHUNK if chunk is None else _validate.positive_int("chunk", chunk)
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    elif isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.floating,
                                                                       np.integer)):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    c = _validate.contiguous
    return c(q, dtype), c(k, dtype), c(v, dtype), bool(causal), chunk, float(scale)


def _attention_fwd(q, k, v, causal, chunk, scale):
    """(o, lse) -- lse [B,NH,Tq] is what the backward needs besides the inputs."""
    B, NH, Tq, d = q.shape
    Tk, dv = k.shape[2], v.shape[3]
    if B * NH * Tq * Tk * d * dv == 0 or not _dispatch.use_compiled():
        return _ref.flash_forward(q, k, v, causal, scale, chunk)
    o = np.empty((B, NH, Tq, dv), q.dtype)
    lse = np.empty((B, NH, Tq), q.dtype)
    _dispatch.ext_module("attention").flash_forward(q, k, v, o, lse, causal, scale,
                                                    _ATTENTION_BLOCK_Q, chunk,
                                                    _dispatch.get_num_threads())
    return o, lse


def attention(q, k, v, *, causal=True, chunk=None, scale=None):
    """Softmax attention ``softmax(q k^T * scale) v`` in O(T) extra memory.

    Walks the keys in chunks keeping, per query, the running max, the running denominator and
    the running numerator, rescaled by ``exp(m_old - m_new)`` at every chunk; the T x T score
    matrix is never formed (extra memory: one block of queries x one chunk of keys per thread).

    Parameters
    ----------
    q : ndarray [B, NH, Tq, d]
    k : ndarray [B, NH, Tk, d]
    v : ndarray [B, NH, Tk, dv]
    causal : bool
        Query i sees key j only when ``j <= i + (Tk - Tq)``: queries are aligned with the
        *last* Tq keys (with Tk > Tq the extra keys are a prefix every query sees, as in
        decoding with a cache).  A query that sees no key (Tk < Tq) outputs zeros.
    chunk : int, optional
        Keys per chunk (speed and scratch size only); default 256.
    scale : float, optional
        Score scale; default ``1/sqrt(d)``.

    Returns
    -------
    o : ndarray [B, NH, Tq, dv]

    Notes
    -----
    The vjp pullback takes ``do`` [B, NH, Tq, dv] and returns ``(dq, dk, dv)``; it recomputes
    each chunk's probabilities from the saved log-sum-exp (flash-attention style).
    """
    q, k, v, causal, chunk, scale = _prepare_attention(q, k, v, causal, chunk, scale)
    return _attention_fwd(q, k, v, causal, chunk, scale)[0]


def _attention_vjp(q, k, v, *, causal=True, chunk=None, scale=None):
    q, k, v, causal, chunk, scale = _prepare_attention(q, k, v, causal, chunk, scale)
    o, lse = _attention_fwd(q, k, v, causal, chunk, scale)

    def pullback(do):
        if do is None:
            return np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
        do = _validate.float_array("do", do)
        _validate.check_shape("do", do, o.shape, str(list(o.shape)))
        do = _validate.contiguous(do, o.dtype)
        B, NH, Tq, d = q.shape
        Tk, dv = k.shape[2], v.shape[3]
        if B * NH * Tq * Tk * d * dv == 0 or not _dispatch.use_compiled():
            return _ref.flash_backward(q, k, v, o, lse, do, causal, scale, chunk)
        D = np.einsum("bhtd,bhtd->bht", do, o)
        dq, dk, dv_ = np.empty_like(q), np.empty_like(k), np.empty_like(v)
        _dispatch.ext_module("attention").flash_backward(
            q, k, v, lse, D, do, dq, dk, dv_, causal, scale, _ATTENTION_BLOCK_Q, chunk,
            _dispatch.get_num_threads())
        return dq, dk, dv_

    return o, pullback


defvjp(linear_attention, _linear_attention_vjp)
defvjp(ssd, _ssd_vjp)
defvjp(attention, _attention_vjp)
