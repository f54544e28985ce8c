"""RMS normalisation for the Mamba models (plain and per group).

They run in the arrays' own dtype (float32 or float64).
"""
import numpy as np


def _normalize(x, eps):
    """x / sqrt(mean(x**2, axis=-1) + eps), a new array."""
    ms = np.square(x).mean(axis=-1, keepdims=True)
    ms += eps
    np.sqrt(ms, out=ms)
    return np.divide(x, ms)


def rms_norm(x, weight, eps):
    """``weight * x / sqrt(mean(x**2, axis=-1) + eps)`` over the last axis."""
    y = _normalize(x, eps)
    y *= weight
    return y


def grouped_rms_norm(x, weight, eps, groups):
    """RMS normalisation over `groups` equal parts of the last axis (Mamba-2's gated norm
    after the gate has been applied), then ``* weight``."""
    shape = x.shape
    y = _normalize(x.reshape(shape[:-1] + (groups, shape[-1] // groups)), eps).reshape(shape)
    y *= weight
    return y
