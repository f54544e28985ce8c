"""Small numpy pieces of the Mamba models: RMS normalisation and SiLU.

They run in the arrays' own dtype (float32 or float64); `out=` lets the decoding step reuse
its buffers instead of allocating per token.
"""
import numpy as np


def silu(x, out=None):
    """x * sigmoid(x), computed as x / (1 + exp(-x)) (exp overflow gives 0, not NaN)."""
    with np.errstate(over="ignore"):
        d = np.exp(-x)
    d += 1
    return np.divide(x, d, out=out)


def rms_norm(x, weight, eps, out=None):
    """``weight * x / sqrt(mean(x**2, axis=-1) + eps)`` over the last axis."""
    ms = np.einsum("...i,...i->...", x, x)[..., None]
    ms *= 1.0 / x.shape[-1]
    ms += eps
    np.sqrt(ms, out=ms)
    out = np.divide(x, ms, out=out)
    out *= weight
    return out


def grouped_rms_norm(x, weight, eps, groups, out=None):
    """RMS normalisation over `groups` equal parts of the last axis (Mamba-2's gated norm
    after the gate has been applied), then ``* weight``."""
    shape = x.shape
    xg = x.reshape(shape[:-1] + (groups, shape[-1] // groups))
    y = rms_norm(xg, 1.0, eps, out=None if out is None else out.reshape(xg.shape))
    y = y.reshape(shape)
    y *= weight
    return y
