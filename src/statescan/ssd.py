"""Mamba-2's SSD (state-space duality) operator: chunked prefill on the linear recurrence of
`linear_attention` (q = C, k = B, v = delta x, log-decay delta A) and a one-step decoding
kernel on the state in its public layout."""
import numpy as np

from . import _dispatch, _tuning, _validate
from ._reference.ssd import softplus
from .autodiff import cotangent, defvjp
from .linear_attention import (check_chunk, fast_call_blocking, out_state_array, permute,
                               recurrence_backward, recurrence_work, steps, store_state,
                               zero_padding)



def default_chunk(N, P):
    """The block size `chunk=None` picks when :func:`statescan.tune` cached none (the rule
    is in :func:`statescan._tuning.automatic_chunk`)."""
    return _tuning.automatic_chunk("ssd", N, P)


def _plans(made):
    """{(grouped B and C, D per channel): the fast check's plan} (see _validate.plan); with
    `made`, the final state (out_state, or made) and y follow the sizes."""
    plans = {}
    for grouped in (False, True):
        for per_channel in (False, True):
            bc = "B T G N" if grouped else "B T N"
            plans[grouped, per_channel] = _validate.plan(
                {"x": "B T NH P", "dt": "B T NH", "A": "NH", "B": bc, "C": bc,
                 "D?": "NH P" if per_channel else "NH", "z?": "B T NH P", "dt_bias?": "NH",
                 "state?": "B NH P N", "out_state?!" + "+" * made: "B NH P N",
                 "y+" if made else "y?": "B T NH P"})[0]
    return plans


_PLANS, _MADE_PLANS = _plans(False), _plans(True)


def _matched(x, dt, A, B, C, D, z, dt_bias, state, out_state, plans):
    """What _validate.match answers for the plan of `plans` these arrays take, in that plan's
    order -- (Bt, T, NH, P, N) or, for grouped B and C [Bt, T, G, N], (Bt, T, NH, P, G, N);
    with `plans` _MADE_PLANS followed by the final state (out_state, or a new array) and a
    new y -- when the arrays are already valid: C-contiguous ndarrays of one float dtype
    with matching nonzero sizes, A, dt_bias and D not broadcast, G dividing NH, out_state
    writeable (see :func:`_validate.match`).  None for anything else, which then gets the
    full validation and its error messages."""
    if type(B) is not np.ndarray:
        return None
    grouped = B.ndim == 4
    checked = _validate.match(plans[grouped, type(D) is np.ndarray and D.ndim == 2],
                              x, dt, A, B, C, D, z, dt_bias, state, out_state, None)
    if checked is None or (grouped and checked[2] % checked[4]):
        return None
    return checked


def _sizes(x, dt, A, B, C, D, z, dt_bias, state, out_state):
    """(Bt, T, NH, P, N, G) -- G None for B, C [Bt, T, N] -- when the arrays are already
    valid (see :func:`_matched`), else None."""
    checked = _matched(x, dt, A, B, C, D, z, dt_bias, state, out_state, _PLANS)
    if checked is None:
        return None
    if len(checked) == 6:
        Bt, T, NH, P, G, N = checked
        return Bt, T, NH, P, N, G
    return checked + (None,)


def _valid_arrays(x, dt, A, B, C, D, z, dt_bias, state):
    """What ``_validate.arrays`` returns -- ({name: array}, {dim: size}, dtype) -- for arrays
    that are already valid (see :func:`_sizes`); None for anything else."""
    sizes = _sizes(x, dt, A, B, C, D, z, dt_bias, state, None)
    if sizes is None:
        return None
    Bt, T, NH, P, N, G = sizes
    dims = {"B": Bt, "T": T, "NH": NH, "P": P, "N": N}
    if G is not None:
        dims["G"] = G
    return ({"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias,
             "state": state}, dims, x.dtype)


def _delta(dt, dt_bias, softplus_):
    """(dt + dt_bias, delta): delta is that through softplus when `softplus_`."""
    dtr = dt if dt_bias is None else dt + dt_bias
    return dtr, (softplus(dtr) if softplus_ else dtr)


def _output(y, z):
    """(output, output before the gate): the kernel's output `y` (D skip included) with the
    silu(z) gate."""
    y_pre = y
    if z is not None:
        y = y_pre * (z / (1 + np.exp(-z)))
    return y, y_pre


def _fast_call(x, dt, A, B, C, D, z, dt_bias, dt_softplus, chunk, state, out_state):
    """A prefill whose arrays are already valid (see :func:`_matched`) on the compiled backend;
    the caller has checked that lengths, reset and reverse are not given and that
    dt_softplus is a bool.  Runs what :class:`_Call` would, without its set-up for the
    backward: (y, final state).  None for any other call."""
    kernel = _dispatch.compiled("ssd", "ssd_forward")
    if kernel is None:
        return None
    checked = _matched(x, dt, A, B, C, D, z, dt_bias, state, out_state, _MADE_PLANS)
    if checked is None:
        return None
    Bt, T, NH, P = checked[:4]          # (read in place: re-tupling them costs ~0.3 us)
    N, h, y = checked[-3:]
    chunk, threads = fast_call_blocking("ssd", Bt, NH, T, N, P, x.dtype, chunk)
    kernel(x, dt, dt_bias, dt_softplus, A, B, C, D, state, chunk, None, None, y, h, threads)
    return (y if z is None else _output(y, z)[0]), h


class _Call:
    """One validated call: the arrays in processing order and the recurrence's operands."""

    def __init__(self, x, dt, A, B, C, D, z, dt_bias, dt_softplus, chunk, state, lengths,
                 reverse, reset):
        grouped = np.ndim(B) == 4
        valid = None
        if lengths is None and reset is None and reverse is False:
            valid = _valid_arrays(x, dt, A, B, C, D, z, dt_bias, state)
        if valid is None:
            bc = "B T G N" if grouped else "B T N"
            valid = _validate.arrays(
                {"x": "B T NH P", "dt": "B T NH", "A": "~NH", "B": bc, "C": bc,
                 "D?": "NH P" if np.ndim(D) == 2 else "~NH", "z?": "B T NH P",
                 "dt_bias?": "~NH", "state?": "B NH P N"},
                {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias,
                 "state": state})
        arr, dims, dtype = valid
        Bt, T, NH, P, N = (dims[n] for n in ("B", "T", "NH", "P", "N"))
        G = dims.get("G", 1)
        if grouped and (NH % G if G else NH):
            raise ValueError(f"B and C must have shape [B, T, G, N] with G (ngroups) dividing "
                             f"NH = {NH}, got G = {G}")
        self.sp = _validate.boolean("dt_softplus", dt_softplus)
        if chunk is None:                 # the cached choice of statescan.tune(), if any
            chunk = _tuning.chunk("ssd", N, P, dtype)
        self.chunk = check_chunk(chunk, T)
        self.lengths, _, self.reset, self.perm = steps(lengths, reverse, reset, Bt, T)
        self.x, self.dt, self.B, self.C, self.z = (permute(arr[n], self.perm, 1)
                                                    for n in ("x", "dt", "B", "C", "z"))
        self.A, self.D, self.dt_bias = arr["A"], arr["D"], arr["dt_bias"]
        self.dtype, self.G, self.grouped = dtype, G, grouped
        self.dtr, self.delta = _delta(self.dt, self.dt_bias, self.sp)
        # the recurrence's view: q = C, k = B shared by the heads of a group
        if grouped:
            self.q, self.k = self.C.transpose(0, 2, 1, 3), self.B.transpose(0, 2, 1, 3)
            self.group = NH // G if G else 1
        else:
            self.q, self.k = self.C[:, None], self.B[:, None]
            self.group = max(NH, 1)
        self.state = arr["state"]
        self.Dm = None if self.D is None else (self.D[:, None] if self.D.ndim == 1 else self.D)

    def forward(self, out_state=None):
        """(y, y_pre, h, S): output in processing order, the output before the gate, the
        final state [B, NH, P, N] (written into `out_state` when given) and its transposed
        kernel layout (a view)."""
        Bt, T, NH, P = self.x.shape
        N = self.B.shape[-1]

        def alloc():
            return (np.empty_like(self.x),
                    np.empty((Bt, NH, P, N), self.dtype) if out_state is None else out_state)

        y, h = _dispatch.run("ssd", "ssd_forward", self.x, self.dt, self.dt_bias, self.sp,
                             self.A, self.B, self.C, self.D, self.state, self.chunk,
                             self.lengths, self.reset, out=alloc, empty=self.x.size * N == 0,
                             work=recurrence_work(Bt, NH, T, N, P, self.chunk))
        y, y_pre = _output(y, self.z)
        if self.Dm is not None or self.z is not None:
            zero_padding(y, self.lengths, 1)
        return y, y_pre, h, np.swapaxes(h, -1, -2)

    def backward(self, y_pre, S, dy, dh):
        """Gradients (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dstate) in processing order."""
        if self.lengths is not None:
            dy = zero_padding(dy.copy(), self.lengths, 1)
        dz = None
        if self.z is not None:
            sz = 1 / (1 + np.exp(-self.z))
            dz = dy * y_pre * (sz * (1 + self.z * (1 - sz)))
            dy = dy * (self.z * sz)
        dD = None
        if self.Dm is not None:
            dD = np.sum(zero_padding(dy * self.x, self.lengths, 1), axis=(0, 1))
            dD = dD.sum(axis=-1) if self.D.ndim == 1 else dD
        Bt, T, NH, P = self.x.shape
        v = (self.delta[..., None] * self.x).transpose(0, 2, 1, 3)
        g = (self.delta * self.A).transpose(0, 2, 1)
        S0 = (np.zeros((Bt, NH, self.B.shape[-1], P), self.dtype) if self.state is None
              else np.ascontiguousarray(np.swapaxes(self.state, -1, -2)))
        dq, dk, dv, dS0, dg = recurrence_backward(
            self.q, self.k, v, g, S0, np.ascontiguousarray(S), dy.transpose(0, 2, 1, 3),
            np.swapaxes(dh, -1, -2), self.chunk, self.group, self.lengths, self.reset)
        dv = dv.transpose(0, 2, 1, 3)                  # [B, T, NH, P]
        dg = dg.transpose(0, 2, 1)                     # [B, T, NH]
        dx = dv * self.delta[..., None]
        if self.Dm is not None:
            dx = dx + self.Dm * dy
        ddelta = np.sum(dv * self.x, axis=-1) + dg * self.A
        dA = np.sum(zero_padding(dg * self.delta, self.lengths, 1), axis=(0, 1))
        ddt = ddelta * (1 / (1 + np.exp(-self.dtr))) if self.sp else ddelta
        for a in (dx, ddt, dz):             # padded inputs may hold anything, even NaN
            zero_padding(a, self.lengths, 1)
        dbias = None if self.dt_bias is None else ddt.sum(axis=(0, 1))
        dB, dC = self._group_sum(dk), self._group_sum(dq)
        return dx, ddt, dA, dB, dC, dD, dz, dbias, np.swapaxes(dS0, -1, -2).copy()

    def _group_sum(self, d):
        """Per-head gradients [B, NH, T, N] summed over each group's heads, as B / C."""
        if not self.grouped:
            return d.sum(axis=1)
        Bt, NH, T, N = d.shape
        return np.ascontiguousarray(
            d.reshape(Bt, self.G, NH // self.G, T, N).sum(axis=2).transpose(0, 2, 1, 3))


def ssd(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False, chunk=None,
        state=None, lengths=None, reverse=False, reset=None, out_state=None):
    """Mamba-2's state-space duality operator (scalar decay per head), chunked.

    With ``delta = dt (+ dt_bias)``, passed through softplus when ``dt_softplus``, per head h
    (state [P, N]) and group g = h // (NH / G)::

        h_t = exp(delta_t[h] * A[h]) h_{t-1} + (delta_t[h] x_t[h]) B_t[g]^T
        y_t[h] = h_t C_t[g] + D[h] * x_t[h]
        y_t[h] *= silu(z_t[h])          (z given: the gate multiplies the whole output,
                                          D skip included, as mamba_ssm's chunk scan with z)

    computed as linear attention with q = C, k = B, v = delta x and data-dependent decay
    (cumulative log-decays within a block, differences only, so nothing overflows).

    Parameters
    ----------
    x : ndarray [B, T, NH, P]
        Input per head (float32 or float64; every array shares the dtype).
    dt : ndarray [B, T, NH]
        Step sizes (before dt_bias and softplus).
    A : ndarray [NH] (or a scalar)
        Per-head scalar (negative for a decaying state).
    B, C : ndarray [B, T, N] or [B, T, G, N]
        Input and output projections: shared by all heads, or per group (ngroups G dividing
        NH; heads are split evenly over the groups, head h uses group h // (NH / G)).
    D : ndarray [NH] or [NH, P] (or a scalar), optional
        Skip connection: ``y += D * x``.
    z : ndarray [B, T, NH, P], optional
        Gate: the output (after the D skip) is multiplied by ``silu(z) = z * sigmoid(z)``.
        (Mamba-2 blocks that normalise with RMSNormGated apply z there instead.)
    dt_bias : ndarray [NH] (or a scalar), optional
        Added to dt before the optional softplus.
    dt_softplus : bool
        Pass dt (+ dt_bias) through softplus.
    chunk : int, optional
        Block size (speed only; values above 2048 act as 2048); None: the one
        :func:`statescan.tune` cached for N, P, the dtype and the thread count on this
        machine, else one from the sizes (32 when N or P >= 64, else 64).
    state : ndarray [B, NH, P, N], optional
        Initial state h_0 (zeros when None).
    lengths : int array-like [B], optional
        Valid steps per row; outputs at padded steps are 0, the returned state is the one
        after each row's last valid step.
    reverse : bool
        Process each row's valid steps from the last to the first.
    reset : bool array-like [B, T], optional
        True at (b, t) zeroes row b's state before step t (in processing order).
    out_state : ndarray [B, NH, P, N], optional
        A C-contiguous array of the call's dtype that receives the final state and is
        returned as it; it may be ``state`` itself (in-place decoding, no allocation).

    Returns
    -------
    y : ndarray [B, T, NH, P]
    state : ndarray [B, NH, P, N]

    Notes
    -----
    T = 1 with ``state`` (and C-contiguous arrays of one dtype, no lengths / reset /
    reverse) runs a dedicated decoding step on the state in its public layout: no
    transposes or copies of the state, a few microseconds of checks.
    The vjp pullback takes ``(dy, dstate)`` (either may be None) and returns
    ``(dx, ddt, dA, dB, dC)``, then, in this order, ``dD``, ``dz``, ``ddt_bias`` and
    ``dstate`` for each of D, z, dt_bias, state that was given.
    Memory, measured as the peak RSS increase in units of the output y (float64, B=8,
    T=2048, NH=8, P=32, N=64, one group): the forward 1.2x (y, one ``T x chunk`` block of
    scores per row and group, a few ``chunk``-row blocks per thread); vjp with its pullback
    9.2x (delta x and per-head gradients of B and C, [B, NH, T, N] each).
    """
    if lengths is None and reset is None and reverse is False and type(dt_softplus) is bool:
        fast = (_decode(x, dt, A, B, C, D, z, dt_bias, dt_softplus, state, out_state)
                if state is not None and type(x) is np.ndarray and x.shape[1:2] == (1,)
                else _fast_call(x, dt, A, B, C, D, z, dt_bias, dt_softplus, chunk, state,
                                out_state))
        if fast is not None:
            return fast
    call = _Call(x, dt, A, B, C, D, z, dt_bias, dt_softplus, chunk, state, lengths, reverse,
                 reset)
    out_state = out_state_array(out_state, call.x.shape[:1] + call.x.shape[2:]
                                + call.B.shape[-1:], call.dtype)
    y, _, h, _ = call.forward(out_state)
    return permute(y, call.perm, 1), store_state(h, out_state)


def _decode(x, dt, A, B, C, D, z, dt_bias, dt_softplus, state, out_state):
    """The T = 1 step with a state on already-valid arrays (see :func:`_sizes`); the caller
    has checked that lengths, reset and reverse are not given and that dt_softplus is a bool.
    None otherwise: the general path then validates and explains."""
    sizes = _sizes(x, dt, A, B, C, D, z, dt_bias, state, out_state)
    if sizes is None or sizes[1] != 1:
        return None
    y, S = _dispatch.run("ssd", "ssd_step", x, dt, A, B, C, D, z, dt_bias, dt_softplus, state,
                         out=lambda: (np.empty_like(x), np.empty_like(state)
                                      if out_state is None else out_state),
                         work=2 * state.size)
    return y, store_state(S, out_state)        # the reference returns a new state


def _ssd_vjp(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False, chunk=None,
             state=None, lengths=None, reverse=False, reset=None):
    call = _Call(x, dt, A, B, C, D, z, dt_bias, dt_softplus, chunk, state, lengths, reverse,
                 reset)
    y, y_pre, h, S = call.forward()

    def pullback(cot):
        dy, dh = cotangent(cot, [("dy", y.shape), ("dstate", h.shape)], call.dtype)
        grads = call.backward(y_pre, S, permute(dy, call.perm, 1), dh)
        dx, ddt, dA, dB, dC, dD, dz, dbias, dstate = grads
        out = tuple(permute(a, call.perm, 1) for a in (dx, ddt)) + (dA,)
        out += tuple(permute(a, call.perm, 1) for a in (dB, dC))
        for given, grad in ((D, dD), (z, permute(dz, call.perm, 1)), (dt_bias, dbias),
                            (state, dstate)):
            if given is not None:
                out += (grad,)
        return out

    return (permute(y, call.perm, 1), h), pullback


defvjp(ssd, _ssd_vjp)
