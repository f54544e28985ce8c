"""Fused nonlinear RNN cells: LSTM, GRU, Elman, sLSTM, with optional block-diagonal heads.

All four share one calling convention (see :func:`lstm`) and one path: ``_cell_call.prepare``
validates, ``_cell_call.input_preactivation`` computes W x + b, then the sequential kernel
(``_cell_call.forward``: the compiled ``statescan._ext.rnn.forward`` or the numpy reference
``_reference/rnn.py``) or a parallel solver (:mod:`statescan.cell_solvers`) runs the sequence.
The cells themselves are described once, in ``_cells.py``.  On the compiled backend a
sequential call with W runs ``_cell_call.projected_forward``: the kernel projects W x + b
itself, a block of time steps at a time, instead of the whole [B, T, G*H] array (the same
bits); a plain call of already-valid arrays also skips validation's intermediate steps
(``_cell_call.plain_forward``: small calls, the same bits).
"""
import numpy as np

from . import _cell_call, _cell_checkpoint, _dispatch, _validate
from ._cells import CELLS
from .autodiff import defvjp
from .cell_solvers import solve_cell, solve_cell_vjp
from .parallel import METHODS

_SOLVERS = ("sequential",) + METHODS


def _check_solver(solver, call):
    """The parallel-in-time solvers run the plain recurrence only."""
    if solver != "sequential" and call.varlen:
        given = [name for name, v in (("lengths", call.lengths is not None),
                                      ("reverse", call.reverse),
                                      ("reset", call.reset is not None)) if v]
        raise NotImplementedError(f"solver={solver!r} with {', '.join(given)} is not "
                                  "implemented; use solver='sequential'")


def _run(cell, x, W, R, b, b_r, heads, state, solver, tol, max_iter, guess, lengths,
         reverse, reset):
    cell = CELLS[cell]
    if type(solver) is not str or solver != "sequential":      # the default: no check
        solver = _validate.choice("solver", solver, _SOLVERS)
    elif lengths is None and reset is None and reverse is False:
        result = _cell_call.plain_forward(cell, x, W, R, b, b_r, heads, state)
        if result is not None:                 # small calls: a few microseconds less
            return result
    call = _cell_call.prepare(cell, x, W, R, b, b_r, heads, state, lengths, reverse, reset)
    _check_solver(solver, call)
    if solver == "sequential":
        result = _cell_call.projected_forward(call)
        if result is not None:
            return _cell_call.outputs(cell, *result)
    ax = _cell_call.input_preactivation(call)
    if solver != "sequential":
        return solve_cell(call, ax, solver, tol=tol, max_iter=max_iter, guess=guess)
    seq, _, final = _cell_call.forward(call, ax, save=False)
    return _cell_call.outputs(cell, seq[0], final)


def _cell_vjp(cell, x, W, R, b=None, b_r=None, *, heads=1, state=None, solver="sequential",
              lengths=None, reverse=False, reset=None, **solver_options):
    cell = CELLS[cell]
    solver = _validate.choice("solver", solver, _SOLVERS)
    call = _cell_call.prepare(cell, x, W, R, b, b_r, heads, state, lengths, reverse, reset)
    _check_solver(solver, call)
    if solver == "sequential" and _cell_checkpoint.applies(call):
        return _cell_checkpoint.vjp(call)      # saves too large: time blocks, recomputed
    ax = _cell_call.input_preactivation(call)
    if solver != "sequential":
        return solve_cell_vjp(call, ax, solver, **solver_options)
    seq, ar_seq, final = _cell_call.forward(call, ax, save=True)
    return (_cell_call.outputs(cell, seq[0], final),
            _cell_call.pullback(call, ax, ar_seq, seq))


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
    lengths : int array [B], optional
        Valid steps of each row (0 <= lengths[b] <= T); steps t >= lengths[b] are padding:
        their outputs are 0, they leave the state alone and get zero gradients, and the
        returned state of row b is the one after its last valid step.  Padded steps cost
        nothing (the work follows sum(lengths)).
    reverse : bool
        Process each row from its last valid step down to step 0 (the backward direction of
        a bidirectional RNN on a packed batch); y[:, t] is the state after processing t.
    reset : bool array [B, T], optional
        True at (b, t) zeroes row b's state before step t (in processing order): several
        sequences packed into one row, or episode boundaries.
    solver : {"sequential", "newton", "quasi-newton", "jacobi"}
        "sequential" (default) runs the time loop.  The others solve the T step equations
        in parallel over time (see :mod:`statescan.parallel`) and return a third value, info.
    tol, max_iter, guess :
        Convergence tolerance, iteration cap and initial guess of the parallel solvers.
"""

_DOC_RETURNS = """
    Returns
    -------
    y : ndarray [B, T, H]
        Hidden state after every step.
    {state} : {kind} [B, H]
        Final state, the structure ``state=`` takes.
    info : SolverInfo
        Only with a parallel solver: iterations, residual, converged.
"""


# Peak RSS increase in units of y, float64, B=16, T=1024, H=I=256: (forward, vjp with its
# pullback, vjp not blocked), measured for each cell.
_MEMORY = {"lstm": (5.1, 3.7, 17.7), "gru": (4.1, 3.6, 16.6), "elman": (2.0, 2.5, 7.1),
           "slstm": (5.1, 3.7, 19.7)}

_DOC_MEMORY = """Notes
    -----
    Memory, measured as the peak RSS increase in units of the output y (float64, B=16,
    T=1024, H=I=256): the forward {fwd}x (y and the input projection W x, G={G} times y);
    1.1x when W packs into 1 MiB or less (float32 H=I=256, float64 H=I=128), whose calls
    project W x a block of time steps at a time inside the time loop.
    vjp with its pullback {vjp}x: calls whose saved arrays exceed 64 MiB run in 16 time
    blocks, keep y and the state at each block boundary, and recompute one block at a time
    in the pullback (one more forward pass of work); {unblocked}x when not blocked (smaller
    calls, and lengths with reverse=True)."""


def lstm(x, W, R, b=None, b_r=None, *, heads=1, state=None, lengths=None, reverse=False,
         reset=None, solver="sequential", tol=None, max_iter=None, guess=None):
    """Long short-term memory over a whole sequence (PyTorch's nn.LSTM equations, G=4 gates
    i, f, g, o): ``c_t = f*c + i*g``, ``h_t = o*tanh(c_t)``.
    {common}
    {memory}  With solver="newton" the peak grows with H (H x H
    Jacobians per step): 300x at H=32, 560x at H=64 (B=16, T=256).
    """
    return _run("lstm", x, W, R, b, b_r, heads, state, solver, tol,
                max_iter, guess, lengths, reverse, reset)


def gru(x, W, R, b=None, b_r=None, *, heads=1, state=None, lengths=None, reverse=False,
        reset=None, solver="sequential", tol=None, max_iter=None, guess=None):
    """Gated recurrent unit over a whole sequence (PyTorch's nn.GRU equations, G=3 gates
    r, z, n): ``n = tanh(W_n x + b_n + r*(R_n h + b_r,n))``, ``h_t = (1-z)*n + z*h``.
    {common}
    {memory}
    """
    return _run("gru", x, W, R, b, b_r, heads, state, solver, tol,
                max_iter, guess, lengths, reverse, reset)


def elman(x, W, R, b=None, b_r=None, *, heads=1, state=None, lengths=None, reverse=False,
          reset=None, solver="sequential", tol=None, max_iter=None, guess=None):
    """Elman (vanilla tanh) RNN over a whole sequence, G=1: ``h_t = tanh(W x + b + R h + b_r)``.
    {common}
    {memory}
    """
    return _run("elman", x, W, R, b, b_r, heads, state, solver, tol,
                max_iter, guess, lengths, reverse, reset)


def slstm(x, W, R, b=None, b_r=None, *, heads=1, state=None, lengths=None, reverse=False,
          reset=None, solver="sequential", tol=None, max_iter=None, guess=None):
    """sLSTM (xLSTM's scalar LSTM with exponential gating and a stabiliser; Beck et al.,
    "xLSTM: Extended Long Short-Term Memory", 2024), G=4 gates i, f, z, o; state (h, c, n, m):
    ``m_t = max(log sigmoid(f~) + m, i~)`` (i~ at the first step), ``i = exp(i~ - m_t)``,
    ``f = exp(log sigmoid(f~) + m - m_t)``, ``c_t = f*c + i*tanh(z~)``,
    ``n_t = max(f*n + i, 1)``, ``h_t = sigmoid(o~) * c_t / n_t``.
    {common}
    {memory}
    """
    return _run("slstm", x, W, R, b, b_r, heads, state, solver, tol,
                max_iter, guess, lengths, reverse, reset)


for _fn in (lstm, gru, elman, slstm):
    _names = CELLS[_fn.__name__].state_names
    _fwd, _vjp, _unblocked = _MEMORY[_fn.__name__]
    _fn.__doc__ = _fn.__doc__.format(
        common=_DOC_COMMON + _DOC_RETURNS.format(
            state=_names[0] if len(_names) == 1 else f"({', '.join(_names)})",
            kind="ndarray" if len(_names) == 1 else "ndarrays"),
        memory=_DOC_MEMORY.format(fwd=_fwd, G=CELLS[_fn.__name__].gates, vjp=_vjp,
                                  unblocked=_unblocked))
    defvjp(_fn, lambda *a, _cell=_fn.__name__, **kw: _cell_vjp(_cell, *a, **kw))


class CellStream:
    """A cell with its weights validated and packed once, for many short calls.

    Made by :func:`stream`.  ``s(x, state)`` returns ``(y, state)`` exactly like calling the
    cell function with these weights, but without re-validating and re-packing the weights on
    every call: the way to run a recurrent model token by token (streaming inference).
    The weights are copied at construction; build a new stream after changing them.
    """

    def __init__(self, fn, W, R, b=None, b_r=None, *, heads=1):
        name = getattr(fn, "__name__", None)
        if name not in CELLS or fn is not globals()[name]:
            raise TypeError(f"fn must be one of statescan.lstm/gru/elman/slstm, got {fn!r}")
        cell = CELLS[name]
        G, S = cell.gates, cell.states
        R_arr = _validate.float_array("R", R)
        H = R_arr.shape[1] if R_arr.ndim == 2 else heads * R_arr.shape[-1]
        I = G * H if W is None else np.shape(W)[-1]
        probe = np.zeros((1, 0, I), R_arr.dtype)          # validates every weight once
        call = _cell_call.prepare(cell, probe, W, R, b, b_r, heads, None)
        self._cell, self._fn, self._heads, self._S = cell, fn, heads, S
        self._W, self._R, self._b, self._b_r = call.W, call.R, call.b, call.b_r
        self._dtype, self._in, self._H = call.R.dtype, probe.shape[2], H
        self._packed = (_dispatch.ext_module("rnn").CellStream(
            name, S, call.W, call.R, call.b, call.b_r)
            if _dispatch.compiled_available() else None)
        self._last_state = self._last_array = None

    def __call__(self, x, state=None, reset=None):
        """Advance the stream: x [B, T, I] (T is usually 1) -> (y [B, T, H], state).

        reset : bool array [B], optional: True starts that row over from a zero state (a
        finished request's row taking a new one).
        """
        if reset is not None:
            state = self._reset_rows(x, state, reset)
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
            state0 = _cell_call.state_array(self._cell, state, B, self._H, self._dtype)
        if state0.shape[1] != B:
            raise ValueError(f"state has batch size {state0.shape[1]} but x has {B}")
        y = np.empty((B, T, self._H), self._dtype)
        out = np.empty((self._S, B, self._H), self._dtype)
        self._packed.step(x, state0, y, out, _dispatch.get_num_threads())
        final = out[0] if self._S == 1 else tuple(out)
        self._last_state, self._last_array = final, out
        return y, final

    def _reset_rows(self, x, state, reset):
        """`state` with the rows where `reset` is True set to zero (a new state tuple)."""
        B = np.shape(x)[0]
        rows = np.asarray(reset)
        if rows.dtype != np.bool_:
            raise TypeError(f"reset must be a bool array [B], got dtype {rows.dtype}")
        if rows.shape != (B,):
            raise ValueError(f"reset must have shape [B] = [{B}], got {rows.shape}")
        if state is None or not rows.any():
            return state
        state0 = _cell_call.state_array(self._cell, state, B, self._H, self._dtype).copy()
        state0[:, rows] = 0
        return state0[0] if self._S == 1 else tuple(state0)


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
