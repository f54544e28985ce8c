"""numpy reference of the causal depthwise convolution (the definition the kernels follow).

Every function takes validated, C-contiguous arrays of one dtype: x [B, T, C],
weight [C, K], bias [C] or None, silu (bool), state [B, C, K-1] (the window of the last
K-1 inputs, oldest first), lengths int64 [B] or None, reset uint8/bool [B, T] or None.

The computation is a step loop over a window: step t appends x_t to the window (K values
per channel), y_t = act(bias + sum_j weight[:, j] * window[:, j]) with the terms added in
the order j = 0..K-1, then the window drops its oldest value.  A reset at (b, t) zeroes row
b's window before step t; steps t >= lengths[b] give y = 0 and leave the window alone.
"""
import numpy as np


def _sigmoid(p):
    return 1 / (1 + np.exp(-p))


def _steps(x, weight, bias, state, lengths, reset):
    """Yield (t, valid rows, full window [B, C, K], pre-activation [B, C]) for every step,
    updating `window` (returned first) as the steps go."""
    B, T, C = x.shape
    K = weight.shape[1]
    window = state.copy()
    yield window
    for t in range(T):
        valid = np.ones(B, bool) if lengths is None else t < lengths
        if reset is not None:
            window[valid & reset[:, t].astype(bool)] = 0
        full = np.concatenate([window, x[:, t, :, None]], axis=2)
        pre = np.zeros((B, C), x.dtype) if bias is None else np.repeat(bias[None], B, 0)
        for j in range(K):
            pre = pre + weight[:, j] * full[:, :, j]
        yield t, valid, full, pre
        window[valid] = full[valid, :, 1:]


def causal_conv1d_forward(x, weight, bias, silu, state, lengths, reset):
    """(y [B, T, C], the window after each row's last valid step [B, C, K-1])."""
    steps = _steps(x, weight, bias, state, lengths, reset)
    window = next(steps)
    y = np.zeros_like(x)
    for t, valid, _, pre in steps:
        out = pre * _sigmoid(pre) if silu else pre
        y[valid, t] = out[valid]
    return y, window


def causal_conv1d_backward(x, weight, bias, silu, state, lengths, reset, dy, dstate):
    """(dx, dweight, dbias, dstate0) given the cotangents dy [B, T, C] and dstate [B, C, K-1]
    of the forward's outputs (dbias is returned even when bias is None)."""
    B, T, C = x.shape
    K = weight.shape[1]
    steps = _steps(x, weight, bias, state, lengths, reset)
    next(steps)
    saved = list(steps)
    dx = np.zeros_like(x)
    dw = np.zeros_like(weight)
    db = np.zeros(C, x.dtype)
    dwindow = dstate.copy()            # gradient of the window after the current step
    for t, valid, full, pre in reversed(saved):
        # padded steps take no part (their inputs may hold anything, even inf)
        full, pre = full[valid], pre[valid]
        if silu:
            s = _sigmoid(pre)
            dpre = dy[valid, t] * (s * (1 + pre * (1 - s)))
        else:
            dpre = dy[valid, t]
        dfull = np.zeros_like(full)
        dfull[:, :, 1:] = dwindow[valid]
        for j in range(K):
            dfull[:, :, j] += weight[:, j] * dpre
            dw[:, j] += (dpre * full[:, :, j]).sum(axis=0)
        db += dpre.sum(axis=0)
        dx[valid, t] = dfull[:, :, K - 1]
        dwindow[valid] = dfull[:, :, :K - 1]
        if reset is not None:
            dwindow[valid & reset[:, t].astype(bool)] = 0
    return dx, dw, db, dwindow


def causal_conv1d_step(x, weight, bias, silu, state):
    """One-token decode (x [B, 1, C]): the forward without lengths or resets."""
    return causal_conv1d_forward(x, weight, bias, silu, state, None, None)
