"""Memory-efficient softmax attention: walks the keys in chunks with a running max and
denominator, so it never holds a Tq x Tk matrix."""
import math

import numpy as np

from . import _dispatch, _validate
from .autodiff import cotangent, defvjp

_ATTENTION_CHUNK = 256        # default key chunk
_MAX_CHUNK = 4096


def _prepare(q, k, v, causal, chunk, scale):
    arr, dims, dtype = _validate.arrays({"q": "B NH Tq d", "k": "B NH Tk d", "v": "B NH Tk dv"},
                                        {"q": q, "k": k, "v": v})
    causal = _validate.boolean("causal", causal)
    Tk, d = dims["Tk"], dims["d"]
    chunk = _ATTENTION_CHUNK if chunk is None else _validate.positive_int("chunk", chunk)
    # a chunk longer than Tk is one of Tk keys; beyond _MAX_CHUNK only the scratch would grow
    chunk = min(chunk, max(Tk, 1), _MAX_CHUNK)
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    elif isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.floating,
                                                                       np.integer)):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    try:
        scale = float(scale)
    except OverflowError:
        scale = math.inf
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale}")
    return arr["q"], arr["k"], arr["v"], causal, chunk, scale


def _empty(q, k, v):
    """No score to compute: a zero-size batch, head, query, key or value axis (d = 0 is not
    empty: every visible key then scores 0)."""
    B, NH, Tq, _ = q.shape
    return B * NH * Tq * k.shape[2] * v.shape[3] == 0


def _work(q, k, v):
    """About the multiply-adds of the forward: scores and weighted values of every (query,
    key) pair (a causal mask skips about half, which does not change the thread choice
    much)."""
    B, NH, Tq, d = q.shape
    return B * NH * Tq * k.shape[2] * (d + v.shape[3])


def _forward(q, k, v, causal, chunk, scale):
    """(o, lse) -- lse [B,NH,Tq] is what the backward needs besides the inputs."""
    B, NH, Tq, _ = q.shape
    dv = v.shape[3]
    if _empty(q, k, v):      # no key or no value column: the output is all zeros
        return np.zeros((B, NH, Tq, dv), q.dtype), np.full((B, NH, Tq), -np.inf, q.dtype)
    return _dispatch.run("attention", "flash_forward", q, k, v, causal, scale, chunk,
                         out=lambda: (np.empty((B, NH, Tq, dv), q.dtype),
                                      np.empty((B, NH, Tq), q.dtype)),
                         work=_work(q, k, v))


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
        Keys per chunk (speed and scratch size only; values above 4096 act as 4096);
        default 256.
    scale : float, optional
        Score scale (finite); default ``1/sqrt(d)``.

    Returns
    -------
    o : ndarray [B, NH, Tq, dv]

    Notes
    -----
    The vjp pullback takes ``do`` [B, NH, Tq, dv] and returns ``(dq, dk, dv)``; it recomputes
    each chunk's probabilities from the saved log-sum-exp (flash-attention style).
    Memory, measured as the peak RSS increase in units of the output o (float64, B=8, NH=8,
    Tq=Tk=2048, d=dv=32, causal): the forward 1.05x (o plus [B, NH, Tq] log-sum-exps); vjp
    with its pullback 4.1x (gradients of the inputs' size).
    """
    return _forward(*_prepare(q, k, v, causal, chunk, scale))[0]


def _attention_vjp(q, k, v, *, causal=True, chunk=None, scale=None):
    q, k, v, causal, chunk, scale = _prepare(q, k, v, causal, chunk, scale)
    o, lse = _forward(q, k, v, causal, chunk, scale)

    def pullback(cot):
        do = cotangent(cot, ("do", o.shape), o.dtype)
        if _empty(q, k, v):
            return np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
        return _dispatch.run("attention", "flash_backward", q, k, v, o, lse, do, causal, scale,
                             chunk, out=lambda: (np.empty_like(q), np.empty_like(k),
                                                 np.empty_like(v)),
                             work=2 * _work(q, k, v))

    return o, pullback


defvjp(attention, _attention_vjp)
