"""Causal depthwise convolution along time (Mamba's conv1d), with a streaming state.

One compiled call per sequence (or the numpy step loop of ``_reference/conv.py`` when the
python backend is active), a dedicated one-token decode path, and an exact vjp.
"""
import numpy as np

from . import _dispatch, _memory, _validate
from .autodiff import cotangent, defvjp

_ACTIVATIONS = (None, "silu")
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _activation(activation):
    """True for "silu", False for None; ValueError listing the choices otherwise."""
    if activation is None:
        return False
    if isinstance(activation, str) and activation == "silu":
        return True
    raise ValueError("activation must be one of " + ", ".join(repr(a) for a in _ACTIVATIONS)
                     + f"; got {activation!r}")


def _check_out_state(out_state, shape, dtype, state):
    if not isinstance(out_state, np.ndarray):
        raise TypeError(f"out_state must be an ndarray, got {type(out_state).__name__}")
    if out_state.dtype != dtype:
        raise TypeError(f"out_state must have the call's dtype {dtype}, got {out_state.dtype}")
    _validate.check_shape("out_state", out_state, shape,
                          "[B, C, K-1] = [" + ", ".join(map(str, shape)) + "]")
    if not out_state.flags.c_contiguous or not out_state.flags.writeable:
        raise ValueError("out_state must be a writeable C-contiguous array")
    if out_state is not state and np.may_share_memory(out_state, state):
        raise ValueError("out_state must be the state array itself or not overlap it")
    return out_state


def _prepare(x, weight, bias, activation, state, lengths, reset, out_state):
    """Validated arguments: (x, weight, bias, silu, state, lengths, reset), out_state."""
    silu = _activation(activation)
    arrs, dims, dtype = _validate.arrays({"weight": "C K", "x": "B T C", "bias?": "C"},
                                         {"weight": weight, "x": x, "bias": bias})
    B, T, C, K = dims["B"], dims["T"], dims["C"], dims["K"]
    if K < 1:
        raise ValueError(f"weight must have shape [C, K] with K >= 1, got {arrs['weight'].shape}")
    if state is None:
        st = np.zeros((B, C, K - 1), dtype)
    else:
        st = _validate.arrays({"state": "B C K-1"}, {"state": state},
                              dims={"B": B, "C": C, "K-1": K - 1}, dtype=dtype)[0]["state"]
    lens = _validate.lengths(lengths, B, T)
    rst = _validate.reset(reset, B, T)
    if rst is not None:
        rst = rst.view(np.uint8)         # the kernels read it as bytes
    if out_state is not None:
        out_state = _check_out_state(out_state, (B, C, K - 1), dtype, st)
    return (arrs["x"], arrs["weight"], arrs["bias"], silu, st, lens, rst), out_state


def _run(name, args, out_state):
    """(y, new state) of kernel `name` on validated `args` (x, weight, bias, silu, state,
    ...); the new state is written into `out_state` when given."""
    x, st = args[0], args[4]
    y, new = _dispatch.run(
        "conv", name, *args, empty=x.size == 0,
        out=lambda: (_memory.empty(x.shape, x.dtype),
                     np.empty_like(st) if out_state is None else out_state))
    if out_state is not None and new is not out_state:
        out_state[...] = new
        new = out_state
    return y, new


def _forward(args, out_state):
    return _run("causal_conv1d_forward", args, out_state)


def _decode_args(x, weight, bias, state, out_state):
    """The arguments of a one-token step when every array is already a valid contiguous
    ndarray (the decode loop's case: a few attribute checks, no copies); else None."""
    if not (type(x) is np.ndarray and type(weight) is np.ndarray and type(state) is np.ndarray
            and x.ndim == 3 and weight.ndim == 2 and state.ndim == 3):
        return None
    B, T, C = x.shape
    K = weight.shape[1]
    dtype = x.dtype
    if (T != 1 or K < 1 or dtype not in _FLOATS or weight.dtype != dtype
            or state.dtype != dtype or weight.shape[0] != C or state.shape != (B, C, K - 1)
            or not (x.flags.c_contiguous and weight.flags.c_contiguous
                    and state.flags.c_contiguous)):
        return None
    if bias is not None and not (type(bias) is np.ndarray and bias.dtype == dtype
                                 and bias.shape == (C,) and bias.flags.c_contiguous):
        return None
    if out_state is not None and not (type(out_state) is np.ndarray
                                      and out_state.dtype == dtype
                                      and out_state.shape == state.shape
                                      and out_state.flags.c_contiguous
                                      and out_state.flags.writeable
                                      and (out_state is state
                                           or not np.may_share_memory(out_state, state))):
        return None
    return x, weight, bias


def causal_conv1d(x, weight, bias=None, *, activation=None, state=None, lengths=None,
                  reset=None, out_state=None):
    """Causal depthwise convolution along time, with an optional SiLU::

        y_t[c] = act(bias[c] + sum_{j<K} weight[c, j] * x_{t-K+1+j}[c])

    where inputs at times before the first step are taken from `state` (zeros by default).
    This is torch's ``Conv1d(C, C, K, groups=C, padding=K-1)`` cut to its first T outputs
    (its weight [C, 1, K] squeezed to [C, K]), and mamba_ssm's ``causal_conv1d_fn``.

    Parameters
    ----------
    x : ndarray [B, T, C]
        Input sequence (float32 or float64; every array shares the dtype).
    weight : ndarray [C, K]
        One filter of K taps per channel; ``weight[c, K-1]`` multiplies the current input.
    bias : ndarray [C], optional
    activation : None or "silu"
        SiLU (``p * sigmoid(p)``) applied to the output, fused into the kernel.
    state : ndarray [B, C, K-1], optional
        The window of the last K-1 inputs before this call, oldest first:
        ``state[b, :, j]`` is the input at time ``j - (K-1)`` relative to this call's first
        step (mamba_ssm's ``conv_state`` without its newest column).  Zeros when None.
    lengths : int array-like [B], optional
        Valid steps per row; steps ``t >= lengths[b]`` give ``y = 0``, do not move the
        window and get zero input gradient.
    reset : bool array-like [B, T], optional
        True at (b, t) zeroes row b's window before step t: a new sequence starts there.
    out_state : ndarray [B, C, K-1], optional
        A writeable C-contiguous array of the call's dtype that receives the new window in
        place and is returned as ``state``; it may be the `state` array itself, so a decode
        loop updates its cache without allocating (``y, st = causal_conv1d(x_t, w, b,
        state=st, out_state=st)``).

    Returns
    -------
    y : ndarray [B, T, C]
    state : ndarray [B, C, K-1]
        The window after each row's last valid step.  Passing it as ``state=`` of the next
        call continues the sequence exactly: a sequence processed in chunks gives the same
        bits as one call.

    A call with T = 1, a `state`, no `lengths` / `reset`, and arrays that are already
    contiguous ndarrays of one dtype takes a decode path that skips the general validation
    and shifts the window in place (no transposes, no copies of the state).

    Gradients: ``vjp(causal_conv1d, x, weight, bias, state=...)`` gives a pullback taking
    ``(dy, dstate)`` (either may be None) and returning ``(dx, dweight)``, then ``dbias``
    when bias was given, then ``dstate`` when state was given.

    Notes
    -----
    Memory, measured as the peak RSS increase in units of the output y (float64, B=16,
    T=2048, C=128, K=4, silu): the forward 1.0x (y only); vjp with its pullback 2.0x (y, dx).
    """
    silu = _activation(activation)
    if lengths is None and reset is None and state is not None:
        fast = _decode_args(x, weight, bias, state, out_state)
        if fast is not None:
            return _run("causal_conv1d_step", fast + (silu, state), out_state)
    args, out_state = _prepare(x, weight, bias, activation, state, lengths, reset, out_state)
    return _forward(args, out_state)


def _causal_conv1d_vjp(x, weight, bias=None, *, activation=None, state=None, lengths=None,
                       reset=None, out_state=None):
    args, out_state = _prepare(x, weight, bias, activation, state, lengths, reset, out_state)
    kernel_args = args
    if out_state is not None and state is not None and np.may_share_memory(out_state, args[4]):
        # the backward re-reads the initial window, which the forward overwrites in place
        kernel_args = args[:4] + (args[4].copy(),) + args[5:]
    y, new = _forward(kernel_args, out_state)
    dtype = y.dtype

    def pullback(cot):
        dy, ds = cotangent(cot, [("dy", y.shape), ("dstate", new.shape)], dtype)
        dx, dw, db, dstate0 = _dispatch.run(
            "conv", "causal_conv1d_backward", *kernel_args, dy, ds, empty=y.size == 0,
            out=lambda: (_memory.empty(y.shape, dtype), np.empty_like(kernel_args[1]),
                         np.empty(y.shape[2], dtype), np.empty_like(new)))
        grads = (dx, dw)
        if bias is not None:
            grads += (db,)
        if state is not None:
            grads += (dstate0,)
        return grads

    return (y, new), pullback


defvjp(causal_conv1d, _causal_conv1d_vjp)
