"""Linear recurrences: the diagonal linear scan and Mamba-1's selective scan.

Both run the whole sequence in one compiled call (or the numpy step loops of
``_reference/scan.py`` when the python backend is active), accept an initial state and
return what is needed to continue the sequence, and have exact vjps.
"""
from dataclasses import dataclass

import numpy as np

from . import _dispatch, _validate
from ._reference import scan as _ref
from .autodiff import defvjp


def _ext():
    return _dispatch.ext_module("scan")


# ---- linear scan -----------------------------------------------------------------------------

def _prepare_linear(a, b, h0):
    a = _validate.float_array("a", a)
    b = _validate.float_array("b", b)
    h0 = None if h0 is None else _validate.float_array("h0", h0)
    dtype = _validate.common_dtype(a=a, b=b, h0=h0)
    if b.ndim != 3:
        raise ValueError(f"b must have shape [B, T, D], got {b.shape}")
    B, T, D = b.shape
    _validate.check_shape("a", a, b.shape, f"[B, T, D] = {list(b.shape)} (the shape of b)")
    if h0 is None:
        h0 = np.zeros((B, D), dtype)
    else:
        _validate.check_shape("h0", h0, (B, D), f"[B, D] = [{B}, {D}]")
    return (_validate.contiguous(a, dtype), _validate.contiguous(b, dtype),
            _validate.contiguous(h0, dtype))


def _linear_forward(a, b, h0):
    if b.size == 0 or not _dispatch.use_compiled():
        return _ref.linear_scan_forward(a, b, h0)
    h = np.empty_like(b)
    _ext().linear_forward(a, b, h0, h, _dispatch.get_num_threads())
    return h


def linear_scan(a, b, h0=None):
    """Diagonal linear recurrence ``h_t = a_t * h_{t-1} + b_t`` (elementwise), t = 1..T.

    Parameters
    ----------
    a : ndarray [B, T, D]
        Per-step multipliers (decays), float32 or float64.
    b : ndarray [B, T, D]
        Per-step inputs.
    h0 : ndarray [B, D], optional
        State before the first step (zeros when None).

    Returns
    -------
    h : ndarray [B, T, D]
        The state after every step.  ``h[:, -1]`` is the final state: passing it as ``h0``
        of the next call continues the sequence exactly (streaming).

    Gradients: ``vjp(linear_scan, a, b, h0)`` gives a pullback taking ``dh`` [B, T, D] and
    returning ``(da, db)``, followed by ``dh0`` when ``h0`` was given.
    """
    return _linear_forward(*_prepare_linear(a, b, h0))


def _linear_scan_vjp(a, b, h0=None):
    given = h0 is not None
    a, b, h0 = _prepare_linear(a, b, h0)
    h = _linear_forward(a, b, h0)

    def pullback(dh):
        dh = _cotangent_array("dh", dh, h.shape, "[B, T, D]", h.dtype)
        if h.size == 0:
            da, db, dh0 = np.zeros_like(h), np.zeros_like(h), np.zeros_like(h0)
        elif not _dispatch.use_compiled():
            da, db, dh0 = _ref.linear_scan_backward(a, h0, h, dh)
        else:
            da, db, dh0 = np.empty_like(h), np.empty_like(h), np.empty_like(h0)
            _ext().linear_backward(a, h0, h, dh, da, db, dh0, _dispatch.get_num_threads())
        return (da, db, dh0) if given else (da, db)

    return h, pullback


def _cotangent_array(name, value, shape, desc, dtype):
    """A cotangent as a contiguous array of `shape` (zeros when None)."""
    if value is None:
        return np.zeros(shape, dtype)
    value = _validate.float_array(name, value)
    _validate.check_shape(name, value, shape, f"{desc} = {list(shape)}")
    return _validate.contiguous(value, dtype)


# ---- selective scan --------------------------------------------------------------------------

@dataclass
class _Selective:
    """A validated selective-scan call: contiguous arrays of one dtype."""
    x: np.ndarray
    dt: np.ndarray
    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    D: object
    z: object
    dt_bias: object
    dt_softplus: bool
    state0: np.ndarray

    def arrays(self):
        return (self.x, self.dt, self.A, self.B, self.C, self.D, self.z, self.dt_bias,
                self.dt_softplus, self.state0)

    @property
    def empty(self):
        return self.x.size == 0 or self.A.shape[1] == 0


def _prepare_selective(x, dt, A, B, C, D, z, dt_bias, dt_softplus, state):
    names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "state")
    values = (x, dt, A, B, C, D, z, dt_bias, state)
    optional = {"D", "z", "dt_bias", "state"}
    arr = {n: (None if v is None and n in optional else _validate.float_array(n, v))
           for n, v in zip(names, values)}
    if not isinstance(dt_softplus, (bool, np.bool_)):
        raise TypeError(f"dt_softplus must be a bool, got {type(dt_softplus).__name__}")
    dtype = _validate.common_dtype(**arr)
    x = arr["x"]
    if x.ndim != 3:
        raise ValueError(f"x must have shape [Bt, T, Dm], got {x.shape}")
    Bt, T, Dm = x.shape
    if arr["A"].ndim != 2:
        raise ValueError(f"A must have shape [Dm, N] = [{Dm}, N], got {arr['A'].shape}")
    N = arr["A"].shape[1]
    expected = {"dt": ((Bt, T, Dm), "[Bt, T, Dm]"), "A": ((Dm, N), "[Dm, N]"),
                "B": ((Bt, T, N), "[Bt, T, N]"), "C": ((Bt, T, N), "[Bt, T, N]"),
                "D": ((Dm,), "[Dm]"), "z": ((Bt, T, Dm), "[Bt, T, Dm]"),
                "dt_bias": ((Dm,), "[Dm]"), "state": ((Bt, Dm, N), "[Bt, Dm, N]")}
    for name, (shape, desc) in expected.items():
        if arr[name] is not None:
            _validate.check_shape(name, arr[name], shape, f"{desc} = {list(shape)}")
            arr[name] = _validate.contiguous(arr[name], dtype)
    state0 = arr["state"] if arr["state"] is not None else np.zeros((Bt, Dm, N), dtype)
    return _Selective(_validate.contiguous(x, dtype), arr["dt"], arr["A"], arr["B"], arr["C"],
                      arr["D"], arr["z"], arr["dt_bias"], bool(dt_softplus), state0)


def _selective_forward(call, save=False):
    """(y, final state, saved): saved is what _selective_backward needs, when `save`."""
    if call.empty or not _dispatch.use_compiled():
        return _ref.selective_scan_forward(*call.arrays(), save=save)
    ext = _ext()
    y = np.empty_like(call.x)
    state = np.empty_like(call.state0)
    ckpt = None
    if save:
        ckpt = np.empty(ext.checkpoint_shape(*call.x.shape, call.A.shape[1]), y.dtype)
    ext.selective_forward(*call.arrays(), y, state, ckpt, _dispatch.get_num_threads())
    return y, state, ckpt


def selective_scan(x, dt, A, B, C, D=None, *, z=None, dt_bias=None, dt_softplus=False,
                   state=None):
    """Mamba-1 selective scan (S6) over a whole sequence.

    With ``delta = dt (+ dt_bias)``, passed through softplus when ``dt_softplus``::

        h_t[d, n] = exp(delta_t[d] * A[d, n]) * h_{t-1}[d, n] + delta_t[d] * B_t[n] * x_t[d]
        y_t[d]    = sum_n C_t[n] * h_t[d, n] + D[d] * x_t[d]
        y_t[d]   *= silu(z_t[d])            (when z is given; silu(z) = z * sigmoid(z))

    Parameters
    ----------
    x : ndarray [Bt, T, Dm]
        Input sequence (float32 or float64; every array shares the dtype).
    dt : ndarray [Bt, T, Dm]
        Step sizes (before dt_bias and softplus).
    A : ndarray [Dm, N]
        State matrix (diagonal per channel; negative entries make the state decay).
    B, C : ndarray [Bt, T, N]
        Input and output projections, shared by all channels.
    D : ndarray [Dm], optional
        Skip connection.
    z : ndarray [Bt, T, Dm], optional
        Gate: the output is multiplied by silu(z).
    dt_bias : ndarray [Dm], optional
        Added to dt before the optional softplus (Mamba's delta_bias).
    dt_softplus : bool
        Pass dt (+ dt_bias) through softplus (Mamba's delta_softplus).
    state : ndarray [Bt, Dm, N], optional
        State before the first step (zeros when None).

    Returns
    -------
    y : ndarray [Bt, T, Dm]
    state : ndarray [Bt, Dm, N]
        The final state; passing it as ``state=`` of the next call continues the sequence
        exactly, so a sequence processed in chunks gives the result of one call.

    Gradients: ``vjp(selective_scan, x, dt, A, B, C, D, z=..., dt_bias=..., state=...)``
    gives a pullback taking ``(dy, dstate)`` (either may be None) and returning
    ``(dx, ddt, dA, dB, dC)``, then ``dD`` when D was given, then, in this order, ``dz``,
    ``ddt_bias`` and ``dstate`` for each of z, dt_bias, state that was given.  The compiled
    vjp keeps the state every ~sqrt(T) steps (Bt*Dm*N*sqrt(T) values) and recomputes the
    rest in the backward.

    Notes
    -----
    The compiled kernel evaluates exp with its own vectorised polynomial (about 1 ulp);
    decays below 2^-125 (float32) or 2^-1021 (float64) are flushed to 0.
    """
    call = _prepare_selective(x, dt, A, B, C, D, z, dt_bias, dt_softplus, state)
    return _selective_forward(call)[:2]


def _selective_backward(call, kernel, saved, dy, dstate):
    """(dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dstate0) of the call, given (dy, dstate) and
    what the forward saved (every state for the reference, checkpoints for the kernel)."""
    if call.empty or not kernel:
        return _ref.selective_scan_backward(*call.arrays(), saved, dy, dstate)
    ext = _ext()
    Bt, T, Dm = call.x.shape
    N = call.A.shape[1]
    G = ext.backward_groups(Dm)
    dtype = call.x.dtype
    dx, ddt = np.empty_like(call.x), np.empty_like(call.x)
    dz = None if call.z is None else np.empty_like(call.x)
    dA_p = np.empty((Bt, Dm, N), dtype)
    dB_p, dC_p = np.zeros((G, Bt, T, N), dtype), np.zeros((G, Bt, T, N), dtype)
    dD_p, dbias_p = np.empty((Bt, Dm), dtype), np.empty((Bt, Dm), dtype)
    dstate0 = np.empty_like(call.state0)
    ext.selective_backward(*call.arrays(), dy, dstate, dx, ddt, dA_p, dB_p, dC_p, dD_p, dz,
                           dbias_p, dstate0, saved, _dispatch.get_num_threads())
    # partial sums over batch rows / channel groups, added in a fixed order
    return (dx, ddt, dA_p.sum(axis=0), dB_p.sum(axis=0), dC_p.sum(axis=0),
            None if call.D is None else dD_p.sum(axis=0), dz,
            None if call.dt_bias is None else dbias_p.sum(axis=0), dstate0)


def _selective_scan_vjp(x, dt, A, B, C, D=None, *, z=None, dt_bias=None, dt_softplus=False,
                        state=None):
    call = _prepare_selective(x, dt, A, B, C, D, z, dt_bias, dt_softplus, state)
    kernel = _dispatch.use_compiled()       # the backward must match what the forward saved
    y, final, saved = _selective_forward(call, save=True)

    def pullback(cotangent):
        if not isinstance(cotangent, (tuple, list)) or len(cotangent) != 2:
            raise TypeError("cotangent must be a pair (dy, dstate) matching the output "
                            "(y, state)")
        dy = _cotangent_array("dy", cotangent[0], y.shape, "[Bt, T, Dm]", y.dtype)
        ds = _cotangent_array("dstate", cotangent[1], final.shape, "[Bt, Dm, N]", y.dtype)
        dx, ddt, dA, dB, dC, dD, dz, dbias, dstate0 = _selective_backward(call, kernel, saved,
                                                                          dy, ds)
        grads = (dx, ddt, dA, dB, dC) + ((dD,) if D is not None else ())
        for given, grad in ((z, dz), (dt_bias, dbias), (state, dstate0)):
            if given is not None:
                grads += (grad,)
        return grads

    return (y, final), pullback


defvjp(linear_scan, _linear_scan_vjp)
defvjp(selective_scan, _selective_scan_vjp)
