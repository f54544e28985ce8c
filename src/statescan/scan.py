"""Linear recurrences: the diagonal linear scan and Mamba-1's selective scan.

Both run the whole sequence in one compiled call (or the numpy step loops of
``_reference/scan.py`` when the python backend is active), accept an initial state,
variable-length batches (``lengths=``), the reverse direction and resets, and have exact
vjps.  A one-step selective scan with a state (decoding) runs a dedicated step kernel.
"""
import warnings
from dataclasses import dataclass

import numpy as np

from . import _dispatch, _memory, _validate
from ._reference import scan as _ref
from .autodiff import cotangent, defvjp


def _ext():
    return _dispatch.ext_module("scan")


def _state_argument(state, deprecated, fn):
    """(initial state, its name): `state`, or the deprecated ``h0=`` keyword (warned)."""
    unknown = sorted(set(deprecated) - {"h0"})
    if unknown:
        raise TypeError(f"{fn}() got an unexpected keyword argument {unknown[0]!r}")
    if "h0" not in deprecated:
        return state, "state"
    if state is not None:
        raise TypeError(f"{fn}: pass state= (or the deprecated h0=), not both")
    warnings.warn(f"{fn}(h0=...) is deprecated; use state=", DeprecationWarning, stacklevel=3)
    return deprecated["h0"], "h0"


def _unbroadcast(grad, shape):
    """Sum `grad` down to `shape`: the gradient of an argument that was broadcast."""
    if grad is None or grad.shape == tuple(shape):
        return grad
    lead = grad.ndim - len(shape)
    grad = grad.sum(axis=tuple(range(lead))) if lead else grad
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and grad.shape[i] != 1)
    return grad.sum(axis=axes, keepdims=True) if axes else grad


def _options(lengths, reverse, reset, B, T):
    """Validated (lengths int64 [B] | None, reset uint8 [B, T] | None, reverse bool)."""
    lengths = _validate.lengths(lengths, B, T)
    reset = _validate.reset(reset, B, T)
    return lengths, None if reset is None else reset.view(np.uint8), \
        _validate.boolean("reverse", reverse)


# ---- linear scan -----------------------------------------------------------------------------

@dataclass
class _Linear:
    """A validated linear_scan call."""
    a: np.ndarray
    b: np.ndarray
    state: np.ndarray
    lengths: object
    reset: object
    reverse: bool
    a_shape: tuple         # the shape `a` was given in (a may broadcast)


def _prepare_linear(a, b, state, lengths, reverse, reset, deprecated):
    state, name = _state_argument(state, deprecated, "linear_scan")
    a_shape = np.shape(a) if a is not None else None
    arrs, dims, dtype = _validate.arrays({"b": "B T D", "a": "~B T D", name + "?": "B D"},
                                         {"b": b, "a": a, name: state})
    B, T, D = dims["B"], dims["T"], dims["D"]
    lengths, reset, reverse = _options(lengths, reverse, reset, B, T)
    state = arrs[name] if arrs[name] is not None else np.zeros((B, D), dtype)
    return _Linear(arrs["a"], arrs["b"], state, lengths, reset, reverse, a_shape)


def _linear_forward(c, nseg=1):
    return _dispatch.run("scan", "linear_scan", c.a, c.b, c.state, c.lengths, c.reset,
                         c.reverse, nseg, out=lambda: np.empty_like(c.b), empty=c.b.size == 0,
                         work=c.b.size)


def linear_scan(a, b, state=None, *, lengths=None, reverse=False, reset=None, **deprecated):
    """Diagonal linear recurrence ``h_t = a_t * h_{t-1} + b_t`` (elementwise), t = 1..T.

    Parameters
    ----------
    a : array_like [B, T, D]
        Per-step multipliers (decays), float32 or float64; anything that broadcasts to
        [B, T, D] (a scalar decay ``0.9``, a per-channel list [D]) is accepted.
    b : ndarray [B, T, D]
        Per-step inputs (fixes the dtype).
    state : ndarray [B, D], optional
        State before the first step (zeros when None).  ``h0=`` is a deprecated alias.
    lengths : int array_like [B], optional
        Valid steps per row, 0 <= lengths[b] <= T.  Steps t >= lengths[b] are padding:
        their output is 0 and they do not touch the state.
    reverse : bool
        Process each row from its last valid step down to step 0 (the output at t is the
        state after processing step t).
    reset : bool array_like [B, T], optional
        True at (b, t): the state is zeroed before step t (in processing order), so one row
        can hold several sequences.

    Returns
    -------
    h : ndarray [B, T, D]
        The state after every step.  The final state of row b is ``h[b, lengths[b] - 1]``
        (``h[b, 0]`` when reverse; ``h[:, -1]`` without lengths): passing it as ``state`` of
        the next call continues the sequence exactly (streaming).

    Gradients: ``vjp(linear_scan, a, b, state)`` gives a pullback taking ``dh`` [B, T, D]
    (None = zero) and returning ``(da, db)``, followed by ``dstate`` when a state was given;
    gradients at padded steps are exactly 0.

    Notes
    -----
    Memory, measured as the peak RSS increase in units of the output h (float64, B=16,
    T=2048, D=128): the forward 1.0x (h only); vjp with its pullback 3.0x (h, da, db).
    """
    if not deprecated and lengths is None and reset is None and reverse is False:
        h = _linear_fast_call(a, b, state)
        if h is not None:
            return h
    return _linear_forward(_prepare_linear(a, b, state, lengths, reverse, reset, deprecated))


# the initial state (zeros when None) and h (made) come after the sizes
_LINEAR_PLAN = _validate.plan({"b": "B T D", "a": "B T D", "state+0": "B D", "h+": "B T D"})[0]


def _linear_fast_call(a, b, state):
    """A call whose arrays are already valid -- C-contiguous ndarrays of one float dtype with
    matching nonzero sizes, `a` not broadcast (see :func:`_validate.match`), compiled backend;
    the caller has checked that lengths, reset, reverse and h0 are not given -- run with the
    arguments the general path would pass: h.  None for any other call, which then gets the
    full validation and its error messages."""
    kernel = _dispatch.compiled("scan", "linear_scan")
    if kernel is None:
        return None
    checked = _validate.match(_LINEAR_PLAN, b, a, state, None)
    if checked is None:
        return None
    B, T, D, state0, h = checked
    kernel(a, b, state0, None, None, False, 1, h, _dispatch.threads_for(B * T * D))
    return h


def _linear_backward(c, h, dh):
    """(da, db, dstate) of the call `c` whose output is h, for the cotangent dh."""
    return _dispatch.run("scan", "linear_scan_backward", c.a, c.state, c.lengths, c.reset,
                         c.reverse, h, dh,
                         out=lambda: (np.empty_like(h), np.empty_like(h),
                                      np.empty_like(c.state)),
                         empty=h.size == 0, work=2 * h.size)


def _linear_scan_vjp(a, b, state=None, *, lengths=None, reverse=False, reset=None,
                     **deprecated):
    c = _prepare_linear(a, b, state, lengths, reverse, reset, deprecated)
    given = state is not None or deprecated.get("h0") is not None
    h = _linear_forward(c)

    def pullback(dh):
        dh = cotangent(dh, ("dh", h.shape), h.dtype)
        da, db, dstate = _linear_backward(c, h, dh)
        da = _unbroadcast(da, c.a_shape)
        return (da, db, dstate) if given else (da, db)

    return h, pullback


# ---- selective scan --------------------------------------------------------------------------

_SELECTIVE_SPEC = {"x": "B T Dm", "dt": "B T Dm", "A": "Dm N", "B": "B T N", "C": "B T N",
                   "D?": "~Dm", "z?": "B T Dm", "dt_bias?": "~Dm", "state?": "B Dm N"}


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
    lengths: object
    reset: object
    reverse: bool

    def arrays(self):
        """The arguments of the kernels (compiled and reference), in their order."""
        return (self.x, self.dt, self.A, self.B, self.C, self.D, self.z, self.dt_bias,
                self.dt_softplus, self.state0, self.lengths, self.reset, self.reverse)

    @property
    def empty(self):
        return self.x.size == 0 or self.A.shape[1] == 0


def _prepare_selective(x, dt, A, B, C, D, z, dt_bias, dt_softplus, state, lengths=None,
                       reverse=False, reset=None):
    arrs, dims, _ = _validate.arrays(
        _SELECTIVE_SPEC, {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z,
                          "dt_bias": dt_bias, "state": state})
    dt_softplus = _validate.boolean("dt_softplus", dt_softplus)
    Bt, T, Dm, N = dims["B"], dims["T"], dims["Dm"], dims["N"]
    lengths, reset, reverse = _options(lengths, reverse, reset, Bt, T)
    state0 = arrs["state"]
    if state0 is None:
        state0 = np.zeros((Bt, Dm, N), arrs["x"].dtype)
    return _Selective(arrs["x"], arrs["dt"], arrs["A"], arrs["B"], arrs["C"], arrs["D"],
                      arrs["z"], arrs["dt_bias"], dt_softplus, state0, lengths, reset, reverse)


def _selective_forward(call, save=False):
    """(y, final state, saved): saved is what _selective_backward needs, when `save`."""
    def out():
        y, state = np.empty_like(call.x), np.empty_like(call.state0)
        shape = _ext().checkpoint_shape(*call.x.shape, call.A.shape[1])
        # uninitialised: the backward reads only the slots the forward wrote (a row's first
        # ceil(lengths[r] / K) checkpoints, each written whether or not a reset follows)
        return y, state, (_memory.empty(shape, y.dtype) if save else None)

    return _dispatch.run("scan", "selective_scan", *call.arrays(), save, out=out,
                         empty=call.empty, work=4 * call.x.size * call.A.shape[1])


def _step(x, dt, A, B, C, D, z, dt_bias, dt_softplus, state, out_state):
    """One decoding step on validated arrays: (y, new state), the new state written into
    out_state when it is given."""
    y, new = _dispatch.run("scan", "selective_step", x, dt, A, B, C, D, z, dt_bias,
                           dt_softplus, state,
                           out=lambda: (np.empty_like(x), np.empty_like(state)
                                        if out_state is None else out_state),
                           work=4 * state.size)
    if out_state is not None and new is not out_state:     # the reference returns new arrays
        np.copyto(out_state, new)
        new = out_state
    return y, new


# state0 (zeros when None), the final state (out_state, or made) and y come after the sizes
_FAST_PLAN = _validate.plan({"x": "B T Dm", "dt": "B T Dm", "A": "Dm N", "B": "B T N",
                             "C": "B T N", "D?": "Dm", "z?": "B T Dm", "dt_bias?": "Dm",
                             "state+0": "B Dm N", "out_state!+": "B Dm N",
                             "y+": "B T Dm"})[0]


def _fast_call(x, dt, A, B, C, D, z, dt_bias, dt_softplus, state, out_state):
    """A call whose arrays are already valid -- C-contiguous ndarrays of one float dtype with
    matching nonzero sizes, D and dt_bias not broadcast, out_state writeable (see
    :func:`_validate.match`), compiled backend; the caller has checked that lengths, reset
    and reverse are not given -- checked in a fraction of a microsecond and run: (y, final
    state).  None for any other call, which then gets the full validation and its error
    messages.

    T = 1 runs the one-step kernel (from a zero state when none is given: the same bits as
    the sequence kernel), longer calls the sequence kernel, both with the arguments the
    general path would pass."""
    if type(dt_softplus) is not bool:
        return None
    checked = _validate.match(_FAST_PLAN, x, dt, A, B, C, D, z, dt_bias, state, out_state,
                              None)
    if checked is None:
        return None
    Bt, T, Dm, N, state0, final, y = checked
    kernel = _dispatch.compiled("scan", "selective_step" if T == 1 else "selective_scan")
    if kernel is None:
        return None
    threads = _dispatch.threads_for(4 * Bt * T * Dm * N)
    if T == 1:               # the step kernel may write the state in place
        kernel(x, dt, A, B, C, D, z, dt_bias, dt_softplus, state0, y, final, threads)
        return y, final
    if out_state is not None:
        final = np.empty(out_state.shape, out_state.dtype)
    kernel(x, dt, A, B, C, D, z, dt_bias, dt_softplus, state0, None, None, False, False, y,
           final, None, threads)
    if out_state is not None:
        np.copyto(out_state, final)
        final = out_state
    return y, final


def _check_out_state(out_state, call):
    if out_state is None:
        return None
    shape = call.state0.shape
    if not isinstance(out_state, np.ndarray):
        raise TypeError(f"out_state must be an ndarray, got {type(out_state).__name__}")
    if out_state.dtype != call.x.dtype:
        raise TypeError(f"out_state is {out_state.dtype} but x is {call.x.dtype}")
    if out_state.shape != shape or not out_state.flags.c_contiguous \
            or not out_state.flags.writeable:
        raise ValueError(f"out_state must be a writeable C-contiguous array of shape "
                         f"[B, Dm, N] = {list(shape)}, got shape {out_state.shape}")
    return out_state


def selective_scan(x, dt, A, B, C, D=None, *, z=None, dt_bias=None, dt_softplus=False,
                   state=None, lengths=None, reverse=False, reset=None, out_state=None):
    """Mamba-1 selective scan (S6) over a whole sequence.

    With ``delta = dt (+ dt_bias)``, passed through softplus when ``dt_softplus``::

        h_t[d, n] = exp(delta_t[d] * A[d, n]) * h_{t-1}[d, n] + delta_t[d] * B_t[n] * x_t[d]
        y_t[d]    = sum_n C_t[n] * h_t[d, n] + D[d] * x_t[d]
        y_t[d]   *= silu(z_t[d])            (when z is given; silu(z) = z * sigmoid(z))

    Parameters
    ----------
    x : ndarray [B, T, Dm]
        Input sequence (float32 or float64; every array shares the dtype).
    dt : ndarray [B, T, Dm]
        Step sizes (before dt_bias and softplus).
    A : ndarray [Dm, N]
        State matrix (diagonal per channel; negative entries make the state decay).
    B, C : ndarray [B, T, N]
        Input and output projections, shared by all channels.
    D : array_like [Dm], optional
        Skip connection; a scalar broadcasts to every channel.
    z : ndarray [B, T, Dm], optional
        Gate: the output is multiplied by silu(z).
    dt_bias : array_like [Dm], optional
        Added to dt before the optional softplus (Mamba's delta_bias); a scalar broadcasts.
    dt_softplus : bool
        Pass dt (+ dt_bias) through softplus (Mamba's delta_softplus).
    state : ndarray [B, Dm, N], optional
        State before the first step (zeros when None).
    lengths : int array_like [B], optional
        Valid steps per row (0 <= lengths[b] <= T): steps t >= lengths[b] are padding, with
        output 0; the returned state of row b is the one after its last valid step.
    reverse : bool
        Process each row from its last valid step down to step 0.
    reset : bool array_like [B, T], optional
        True at (b, t): the state of row b is zeroed before step t (in processing order).
    out_state : ndarray [B, Dm, N], optional
        Where to write the final state (C-contiguous, the call's dtype); it may be `state`
        itself, which is then updated in place -- the decoding loop's way to avoid a new
        state array per token.  The returned state is `out_state`.

    Returns
    -------
    y : ndarray [B, T, Dm]
    state : ndarray [B, Dm, N]
        The final state; passing it as ``state=`` of the next call continues the sequence
        exactly, so a sequence processed in chunks (or token by token) gives the result of
        one call, bit for bit.

    Decoding: a call with T = 1, a state and neither lengths nor reset runs a one-step
    kernel on the state in its [B, Dm, N] layout (no transposes or copies).  When every array
    is already a C-contiguous ndarray of the same dtype (and lengths, reset, reverse are not
    given), argument checking takes about a microsecond, for any T.

    Gradients: ``vjp(selective_scan, x, dt, A, B, C, D, z=..., dt_bias=..., state=...)``
    gives a pullback taking ``(dy, dstate)`` (either may be None) and returning
    ``(dx, ddt, dA, dB, dC)``, then ``dD`` when D was given, then, in this order, ``dz``,
    ``ddt_bias`` and ``dstate`` for each of z, dt_bias, state that was given (gradients at
    padded steps are exactly 0).

    Notes
    -----
    Memory, measured as the peak RSS increase in units of the output y (float64, B=8,
    T=2048, Dm=256, N=16, with D): the forward 1.0x (y and the state); vjp with its pullback
    4.0x (the compiled vjp keeps the state every ~sqrt(T) steps, B*Dm*N*sqrt(T) values, and
    allocates dx, ddt (and dz) plus dB, dC partial sums per group of 64 channels).
    The compiled kernel evaluates exp with its own vectorised polynomial (about 1 ulp);
    decays below 2^-125 (float32) or 2^-1021 (float64) are flushed to 0.
    """
    if lengths is None and reset is None and reverse is False:
        fast = _fast_call(x, dt, A, B, C, D, z, dt_bias, dt_softplus, state, out_state)
        if fast is not None:
            return fast
    call = _prepare_selective(x, dt, A, B, C, D, z, dt_bias, dt_softplus, state, lengths,
                              reverse, reset)
    out_state = _check_out_state(out_state, call)
    if (call.x.shape[1] == 1 and state is not None and call.lengths is None
            and call.reset is None and not call.empty):
        return _step(*call.arrays()[:10], out_state)
    y, final, _ = _selective_forward(call)
    if out_state is not None:
        np.copyto(out_state, final)
        final = out_state
    return y, final


def _selective_backward(call, kernel, saved, dy, dstate):
    """(dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dstate0) of the call, given (dy, dstate) and
    what the forward saved (every state for the reference, checkpoints for the kernel).

    The backend is the one that ran the forward (`kernel`), not the active one: what was
    saved only suits its own backward."""
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
    ext.selective_scan_backward(*call.arrays(), saved, dy, dstate, dx, ddt, dA_p, dB_p, dC_p,
                                dD_p, dz, dbias_p, dstate0,
                                _dispatch.threads_for(8 * call.x.size * N))
    # partial sums over batch rows / channel groups, added in a fixed order
    return (dx, ddt, dA_p.sum(axis=0), dB_p.sum(axis=0), dC_p.sum(axis=0),
            None if call.D is None else dD_p.sum(axis=0), dz,
            None if call.dt_bias is None else dbias_p.sum(axis=0), dstate0)


def _selective_scan_vjp(x, dt, A, B, C, D=None, *, z=None, dt_bias=None, dt_softplus=False,
                        state=None, lengths=None, reverse=False, reset=None):
    call = _prepare_selective(x, dt, A, B, C, D, z, dt_bias, dt_softplus, state, lengths,
                              reverse, reset)
    kernel = _dispatch.use_compiled()       # the backward must match what the forward saved
    y, final, saved = _selective_forward(call, save=True)
    shapes = {"D": np.shape(D), "dt_bias": np.shape(dt_bias)}

    def pullback(cot):
        dy, ds = cotangent(cot, [("dy", y.shape), ("dstate", final.shape)], y.dtype)
        dx, ddt, dA, dB, dC, dD, dz, dbias, dstate0 = _selective_backward(call, kernel, saved,
                                                                          dy, ds)
        grads = (dx, ddt, dA, dB, dC)
        if D is not None:
            grads += (_unbroadcast(dD, shapes["D"]),)
        for given, grad in ((z, dz), (dt_bias, _unbroadcast(dbias, shapes["dt_bias"])),
                            (state, dstate0)):
            if given is not None:
                grads += (grad,)
        return grads

    return (y, final), pullback


defvjp(linear_scan, _linear_scan_vjp)
defvjp(selective_scan, _selective_scan_vjp)
