"""Fused nonlinear RNN cells: LSTM, GRU, Elman, sLSTM, with optional block-diagonal heads.

All four share one calling convention (see :func:`lstm`); the sequence runs in one compiled
call (or the numpy reference in ``_reference/rnn.py`` when the python backend is active).
"""
from dataclasses import dataclass

import numpy as np

from . import _dispatch, _memory, _validate
from ._reference import rnn as _ref
from .autodiff import defvjp

_CELL_IDS = {"elman": 0, "lstm": 1, "gru": 2, "slstm": 3}   # must match ext/_cells.pxd


@dataclass
class _Call:
    """A validated cell call: contiguous arrays of one dtype, and the sizes."""
    cell: str
    x: np.ndarray          # [B, T, I] (or [B, T, G*H] when W is None)
    W: object              # [G*H, I] or None
    R: np.ndarray          # [heads, G*D, D]
    b: object              # [G*H] or None
    b_r: object            # [G*H] or None
    state0: np.ndarray     # [S, B, H]
    R_ndim: int
    state_given: bool

    @property
    def shape(self):
        return self.x.shape[0], self.x.shape[1], self.state0.shape[2]


def _prepare(cell, x, W, R, b, b_r, heads, state):
    G, S = _ref.CELLS[cell]
    x = _validate.float_array("x", x)
    R = _validate.float_array("R", R)
    W = None if W is None else _validate.float_array("W", W)
    b = None if b is None else _validate.float_array("b", b)
    b_r = None if b_r is None else _validate.float_array("b_r", b_r)
    heads = _validate.positive_int("heads", heads)
    dtype = _validate.common_dtype(x=x, W=W, R=R, b=b, b_r=b_r)

    if R.ndim == 2:
        if heads != 1:
            raise ValueError(f"R must have shape [heads, {G}*D, D] = [{heads}, {G}*D, D] when "
                             f"heads={heads}, got {R.shape}")
        H = R.shape[1]
        _validate.check_shape("R", R, (G * H, H), f"[{G}*H, H] for {cell} ({G} gates)")
        R3 = R.reshape(1, G * H, H)
    elif R.ndim == 3:
        D = R.shape[2]
        _validate.check_shape("R", R, (heads, G * D, D),
                              f"[heads, {G}*D, D] with heads={heads} for {cell}")
        H = heads * D
        R3 = R
    else:
        raise ValueError(f"R must have shape [{G}*H, H] or [heads, {G}*D, D], got {R.shape}")

    if x.ndim != 3:
        raise ValueError(f"x must have shape [B, T, I], got {x.shape}")
    if W is None:
        _validate.check_shape("x", x, (None, None, G * H),
                              f"[B, T, {G}*H] = [B, T, {G * H}] when W is None")
    else:
        _validate.check_shape("W", W, (G * H, x.shape[2]),
                              f"[{G}*H, I] = [{G * H}, {x.shape[2]}]")
    for name, v in (("b", b), ("b_r", b_r)):
        if v is not None:
            _validate.check_shape(name, v, (G * H,), f"[{G}*H] = [{G * H}]")

    B = x.shape[0]
    state0 = _state_array(cell, state, S, B, H, dtype)
    return _Call(cell, _validate.contiguous(x, dtype),
                 None if W is None else _validate.contiguous(W, dtype),
                 _validate.contiguous(R3, dtype), b, b_r, state0, R.ndim, state is not None)


def _state_array(cell, state, S, B, H, dtype):
    """The initial state as one [S, B, H] array (zeros when None)."""
    if state is None:
        return np.zeros((S, B, H), dtype=dtype)
    names = _STATE_NAMES[cell]
    parts = (state,) if S == 1 else state
    if S > 1 and (not isinstance(state, (tuple, list)) or len(state) != S):
        raise TypeError(f"state must be a tuple ({', '.join(names)}) for {cell}, "
                        f"got {type(state).__name__}")
    arrays = []
    for name, part in zip(names, parts):
        part = _validate.float_array(f"state {name}", part)
        if part.dtype != dtype:
            raise TypeError(f"state {name} is {part.dtype} but x is {dtype}: "
                            "all arrays must share one dtype")
        _validate.check_shape(f"state {name}", part, (B, H), f"[B, H] = [{B}, {H}]")
        arrays.append(part)
    return _validate.contiguous(np.stack(arrays), dtype)   # stack keeps Fortran-order parts' layout


_STATE_NAMES = {"elman": ("h",), "gru": ("h",), "lstm": ("h", "c"), "slstm": ("h", "c", "n", "m")}


def _input_preactivation(call):
    """W x + b over all B*T rows at once (one GEMM), [B, T, G*H].

    Each row is computed independently of how many rows there are, so a sequence fed in
    chunks sees exactly the same pre-activations as in one call (BLAS does not promise that).
    """
    x, W, b = call.x, call.W, call.b
    if W is None:
        return x if b is None else x + b
    B, T, I = x.shape
    M = W.shape[0]
    ax = _memory.empty((B, T, M), x.dtype)
    if not _dispatch.use_compiled():
        for t in range(T):           # one time step at a time: chunks see the same GEMMs
            np.matmul(x[:, t], W.T, out=ax[:, t])
        if b is not None:
            ax += b
        return ax
    bias = None if b is None else _validate.contiguous(b, x.dtype)
    _dispatch.ext_module("rnn").project(x.reshape(B * T, I), W, bias, ax.reshape(B * T, M),
                                        _dispatch.get_num_threads())
    return ax


def _kernel_forward(call, ax, save):
    B, T, H = call.shape
    G, S = _ref.CELLS[call.cell]
    dtype = ax.dtype
    b_r = np.zeros(G * H, dtype) if call.b_r is None else _validate.contiguous(call.b_r, dtype)
    if B == 0 or T == 0:
        seq = np.empty((S if save else 1, B, T, H), dtype)
        return seq, (np.empty_like(ax) if save else None), call.state0.copy()
    if not _dispatch.use_compiled():
        return _ref.forward(call.cell, ax, call.R, b_r, call.state0, save)
    seq = _memory.empty((S if save else 1, B, T, H), dtype)
    ar_seq = _memory.empty(ax.shape, dtype) if save else None
    state = np.empty_like(call.state0)
    _dispatch.ext_module("rnn").forward(_CELL_IDS[call.cell], ax, call.R, b_r, call.state0, seq,
                                        ar_seq, state, _dispatch.get_num_threads())
    return seq, ar_seq, state


def _kernel_backward(call, ax, ar_seq, seq, dy, dstate):
    B, T, H = call.shape
    if B == 0 or T == 0:
        return np.zeros_like(ax), np.zeros_like(ax), dstate.copy()
    if not _dispatch.use_compiled():
        return _ref.backward(call.cell, ax, ar_seq, call.R, call.state0, seq, dy, dstate)
    dgx = _memory.empty(ax.shape, ax.dtype)
    dgr = _memory.empty(ax.shape, ax.dtype) if call.cell == "gru" else dgx
    dstate0 = np.empty_like(dstate)
    _dispatch.ext_module("rnn").backward(_CELL_IDS[call.cell], ax, ar_seq, call.R, call.state0,
                                         seq, dy, dstate, dgx, dgr, dstate0,
                                         _dispatch.get_num_threads())
    return dgx, dgr, dstate0


def _outputs(cell, y, state):
    """Public return value: (y, state) with state an array or a tuple as for PyTorch."""
    if state.shape[0] == 1:
        return y, state[0]
    return y, tuple(state)


def _run(cell, x, W, R, b, b_r, heads, state, solver, solver_options):
    call = _prepare(cell, x, W, R, b, b_r, heads, state)
    ax = _input_preactivation(call)
    if solver != "sequential":
        from .parallel import solve_cell
        return solve_cell(call, ax, solver, **solver_options)
    seq, _, final = _kernel_forward(call, ax, save=False)
    return _outputs(cell, seq[0], final)


def _cotangent(cell, cot, call):
    """Split (dy, dstate) into arrays [B,T,H] and [S,B,H]; None entries mean zero."""
    B, T, H = call.shape
    G, S = _ref.CELLS[cell]
    dtype = call.state0.dtype
    if not isinstance(cot, (tuple, list)) or len(cot) != 2:
        raise TypeError("cotangent must be a pair (dy, dstate) matching the output (y, state)")
    dy, dstate = cot
    dy = (_memory.zeros((B, T, H), dtype) if dy is None
          else _validate.contiguous(_validate.float_array("dy", dy), dtype))
    _validate.check_shape("dy", dy, (B, T, H), f"[B, T, H] = [{B}, {T}, {H}]")
    parts = (dstate,) if S == 1 else (dstate if dstate is not None else (None,) * S)
    if len(parts) != S:
        raise TypeError(f"dstate must have {S} entries for {cell}, got {len(parts)}")
    ds = np.zeros((S, B, H), dtype)
    for s, part in enumerate(parts):
        if part is not None:
            part = _validate.float_array("dstate", part)
            _validate.check_shape("dstate", part, (B, H), f"[B, H] = [{B}, {H}]")
            ds[s] = part
    return dy, ds


def _cell_vjp(cell, x, W, R, b=None, b_r=None, *, heads=1, state=None, solver="sequential",
              **solver_options):
    call = _prepare(cell, x, W, R, b, b_r, heads, state)
    ax = _input_preactivation(call)
    if solver != "sequential":
        from .parallel import solve_cell_vjp
        return solve_cell_vjp(call, ax, solver, **solver_options)
    seq, ar_seq, final = _kernel_forward(call, ax, save=True)
    y = seq[0]

    def pullback(cotangent):
        dy, dstate = _cotangent(cell, cotangent, call)
        dgx, dgr, dstate0 = _kernel_backward(call, ax, ar_seq, seq, dy, dstate)
        return _parameter_grads(call, y, dgx, dgr, dstate0)

    return _outputs(cell, y, final), pullback


def _parameter_grads(call, y, dgx, dgr, dstate0):
    """Gradients of the positional arguments (and of state=) from the pre-activation gradients
    dgx, dgr [B,T,G*H] and dstate0 [S,B,H]; y [B,T,H] is the forward output."""
    cell, W, b, b_r = call.cell, call.W, call.b, call.b_r
    B, T, H = call.shape
    heads_, GD, D = call.R.shape
    G = GD // D
    N = B * T
    gx = dgx.reshape(N, G * H)
    if call.W is None:
        dx, dW = dgx, None
    else:
        dx = _memory.empty(call.x.shape, gx.dtype)
        np.matmul(gx, call.W, out=dx.reshape(N, call.W.shape[1]))
        dW = gx.T @ call.x.reshape(N, call.x.shape[2])
    h_prev = _memory.empty((B, T, H), y.dtype)
    if T:
        h_prev[:, 0] = call.state0[0]
        h_prev[:, 1:] = y[:, :-1]
    gr = dgr.reshape(N, G, heads_, D).transpose(2, 0, 1, 3).reshape(heads_, N, GD)
    dR = gr.transpose(0, 2, 1) @ h_prev.reshape(N, heads_, D).transpose(1, 0, 2)
    if call.R_ndim == 2:
        dR = dR[0]
    db = None if b is None else gx.sum(axis=0)
    if b_r is None:
        db_r = None
    elif dgr is dgx and db is not None:      # every cell but the GRU: the same gradient
        db_r = db.copy()
    else:
        db_r = dgr.reshape(N, G * H).sum(axis=0)
    grads = (dx, dW, dR, db, db_r)[:_n_positional(W, b, b_r)]
    if call.state_given:
        grads = grads + (_outputs(cell, None, dstate0)[1],)
    return grads


def _n_positional(W, b, b_r):
    # x, W, R always; b and b_r count when passed (positionally or by keyword).
    return 5 if b_r is not None else (4 if b is not None else 3)


_DOC_COMMON = """
    Parameters
    ----------
    x : ndarray [B, T, I]
        Input sequence, batch-first (float32 or float64).  When ``W`` is None, ``x`` holds the
        input-side pre-activations ``W x`` instead, shape [B, T, G*H].
    W : ndarray [G*H, I] or None
        Input weights, gate-major (rows g*H:(g+1)*H belong to gate g).
    R : ndarray [G*H, H] (heads=1) or [heads, G*D, D] with H = heads*D
        Recurrent weights; with heads > 1 the recurrence is block-diagonal: head k's gates
        see only h[k*D:(k+1)*D].  Row g*D + d of R[k] is gate g, unit k*D + d.
    b, b_r : ndarray [G*H], optional
        Input-side and recurrent-side biases.
    heads : int
        Number of heads (blocks of the recurrence).
    state : initial state, optional (zeros when None); same structure as the returned state.
        Passing the returned state back in continues the sequence exactly.
    solver : {"sequential", "newton", "quasi-newton", "jacobi"}
        "sequential" (default) runs the time loop.  The others solve the T step equations
        in parallel over time (see :mod:`statescan.parallel`) and return a third value, info.
    tol, max_iter, guess :
        Convergence tolerance, iteration cap and initial guess of the parallel solvers.
"""


def lstm(x, W, R, b=None, b_r=None, *, heads=1, state=None, solver="sequential",
         tol=None, max_iter=None, guess=None):
    """Long short-term memory over a whole sequence (PyTorch's nn.LSTM equations, G=4 gates
    i, f, g, o): ``c_t = f*c + i*g``, ``h_t = o*tanh(c_t)``.
    {common}
    Returns
    -------
    y : ndarray [B, T, H]
        Hidden state after every step.
    (h, c) : ndarrays [B, H]
        Final state.
    """
    return _run("lstm", x, W, R, b, b_r, heads, state, solver,
                dict(tol=tol, max_iter=max_iter, guess=guess))


def gru(x, W, R, b=None, b_r=None, *, heads=1, state=None, solver="sequential",
        tol=None, max_iter=None, guess=None):
    """Gated recurrent unit over a whole sequence (PyTorch's nn.GRU equations, G=3 gates
    r, z, n): ``n = tanh(W_n x + b_n + r*(R_n h + b_r,n))``, ``h_t = (1-z)*n + z*h``.
    {common}
    Returns
    -------
    y : ndarray [B, T, H]
    h : ndarray [B, H]
        Final hidden state.
    """
    return _run("gru", x, W, R, b, b_r, heads, state, solver,
                dict(tol=tol, max_iter=max_iter, guess=guess))


def elman(x, W, R, b=None, b_r=None, *, heads=1, state=None, solver="sequential",
          tol=None, max_iter=None, guess=None):
    """Elman (vanilla tanh) RNN over a whole sequence, G=1: ``h_t = tanh(W x + b + R h + b_r)``.
    {common}
    Returns
    -------
    y : ndarray [B, T, H]
    h : ndarray [B, H]
        Final hidden state.
    """
    return _run("elman", x, W, R, b, b_r, heads, state, solver,
                dict(tol=tol, max_iter=max_iter, guess=guess))


def slstm(x, W, R, b=None, b_r=None, *, heads=1, state=None, solver="sequential",
          tol=None, max_iter=None, guess=None):
    """sLSTM (xLSTM's scalar LSTM with exponential gating and a stabiliser), G=4 gates
    i, f, z, o; state (h, c, n, m) -- see REFERENCES for the stabilised equations.
    {common}
    Returns
    -------
    y : ndarray [B, T, H]
    (h, c, n, m) : ndarrays [B, H]
        Final state: hidden, cell, normaliser, stabiliser.
    """
    return _run("slstm", x, W, R, b, b_r, heads, state, solver,
                dict(tol=tol, max_iter=max_iter, guess=guess))


for _fn in (lstm, gru, elman, slstm):
    _fn.__doc__ = _fn.__doc__.format(common=_DOC_COMMON)
    defvjp(_fn, lambda *a, _cell=_fn.__name__, **kw: _cell_vjp(_cell, *a, **kw))


class CellStream:
    """A cell with its weights validated and packed once, for many short calls.

    Made by :func:`stream`.  ``s(x, state)`` returns ``(y, state)`` exactly like calling the
    cell function with these weights, but without re-validating and re-packing the weights on
    every call: the way to run a recurrent model token by token (streaming inference).
    The weights are copied at construction; build a new stream after changing them.
    """

    def __init__(self, fn, W, R, b=None, b_r=None, *, heads=1):
        cell = getattr(fn, "__name__", None)
        if cell not in _CELL_IDS or fn is not globals()[cell]:
            raise TypeError(f"fn must be one of statescan.lstm/gru/elman/slstm, got {fn!r}")
        G, S = _ref.CELLS[cell]
        R_arr = _validate.float_array("R", R)
        H = R_arr.shape[1] if R_arr.ndim == 2 else heads * R_arr.shape[-1]
        I = G * H if W is None else np.shape(W)[-1]
        probe = np.zeros((1, 0, I), R_arr.dtype)          # validates every weight once
        call = _prepare(cell, probe, W, R, b, b_r, heads, None)
        self._cell, self._fn, self._heads, self._S = cell, fn, heads, S
        self._W, self._R, self._b, self._b_r = call.W, call.R, call.b, call.b_r
        self._dtype, self._in, self._H = call.R.dtype, probe.shape[2], H
        b_c = None if call.b is None else _validate.contiguous(call.b, self._dtype)
        b_r_c = None if call.b_r is None else _validate.contiguous(call.b_r, self._dtype)
        self._packed = (_dispatch.ext_module("rnn").CellStream(
            _CELL_IDS[cell], S, call.W, call.R, b_c, b_r_c)
            if _dispatch.compiled_available() else None)
        self._last_state = self._last_array = None

    def __call__(self, x, state=None):
        """Advance the stream: x [B, T, I] (T is usually 1) -> (y [B, T, H], state)."""
        if (self._packed is None or not _dispatch.use_compiled() or type(x) is not np.ndarray
                or x.dtype != self._dtype or x.ndim != 3 or x.shape[2] != self._in
                or x.shape[0] == 0 or x.shape[1] == 0):
            x = _validate.float_array("x", x)
            _validate.check_shape("x", x, (None, None, self._in), f"[B, T, {self._in}]")
            if x.dtype != self._dtype:
                raise TypeError(f"x is {x.dtype} but the stream's weights are {self._dtype}")
            return self._fn(x, self._W, self._R, self._b, self._b_r, heads=self._heads,
                            state=state)
        B, T = x.shape[0], x.shape[1]
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        if state is None:
            state0 = np.zeros((self._S, B, self._H), self._dtype)
        elif state is self._last_state:          # the state this stream just returned
            state0 = self._last_array
        else:
            state0 = _state_array(self._cell, state, self._S, B, self._H, self._dtype)
        if state0.shape[1] != B:
            raise ValueError(f"state has batch size {state0.shape[1]} but x has {B}")
        y = np.empty((B, T, self._H), self._dtype)
        out = np.empty((self._S, B, self._H), self._dtype)
        self._packed.step(x, state0, y, out, _dispatch.get_num_threads())
        final = out[0] if self._S == 1 else tuple(out)
        self._last_state, self._last_array = final, out
        return y, final


def stream(fn, W, R, b=None, b_r=None, *, heads=1):
    """Prepare a cell for streaming: validate and pack its weights once.

    Parameters
    ----------
    fn : statescan.lstm, gru, elman or slstm
    W, R, b, b_r, heads :
        The cell's weights, as for `fn` (W [G*H, I] or None, R [G*H, H] or [heads, G*D, D],
        b, b_r [G*H]).

    Returns
    -------
    CellStream
        ``s(x, state=None) -> (y, state)`` with x [B, T, I], y [B, T, H]; identical results to
        ``fn(x, W, R, b, b_r, heads=heads, state=state)``.

    Examples
    --------
    >>> s = statescan.stream(statescan.lstm, W, R, b)
    >>> state = None
    >>> for x_t in tokens:                      # x_t [B, 1, I]
    ...     y_t, state = s(x_t, state)
    """
    return CellStream(fn, W, R, b, b_r, heads=heads)
