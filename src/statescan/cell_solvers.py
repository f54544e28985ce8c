"""The RNN cells solved in parallel over time (``solver="newton" | "quasi-newton" | "jacobi"``
of :func:`statescan.lstm` and the other cells).

A cell call becomes the recurrence s_t = f(s_{t-1}) over all B*T rows, f given by the cell's
pointwise step from the registry (``_cells``) and the reference recurrent projection; the
generic iteration and scans of :mod:`statescan.parallel` solve it.  See that module for the
solvers, their convergence rule and their cost.
"""
import numpy as np

from . import _validate
from ._cell_call import cotangent, forward, outputs, parameter_grads
from ._reference.rnn import NUMPY, recurrent_preactivation, recurrent_transpose
from .parallel import (METHODS, SolverInfo, _block_scan, _iterate, _not_converged_warning,
                       _shift, _tolerance)


# The reference's equations with one batched GEMM per head for R h: rows = B*T here, where BLAS
# pays (and the solvers' results were recorded with it).
_GEMM_OPS = NUMPY._replace(head_matmul=lambda h, R: np.matmul(
    h.transpose(1, 0, 2), R.transpose(0, 2, 1)).transpose(1, 0, 2))


class _CellProblem:
    """A cell call as the recurrence s_t = f(s_{t-1}) over all B*T rows.

    The state of a row is laid out [heads, S, D] (n = S*H): head k's block of the Jacobian
    covers all S components of its D units, an (S*D) x (S*D) block.
    """

    def __init__(self, call, ax):
        self.call = call
        self.cell = call.cell
        self.B, self.T, self.H = call.shape
        self.G, self.S = call.cell.gates, call.cell.states
        self.heads, GD, self.D = call.R.shape
        self.N = self.B * self.T
        self.n = self.S * self.H
        self.dtype = ax.dtype
        self.ax = ax
        self.ax2 = ax.reshape(self.N, self.G * self.H)
        self.R = call.R
        self.b_r = (np.zeros(self.G * self.H, self.dtype) if call.b_r is None
                    else call.b_r.astype(self.dtype, copy=False))
        self.step = call.cell.step
        self.step_backward = call.cell.step_backward

    # layout conversions
    def components(self, s):
        """[..., n] in solver layout -> tuple of S arrays [rows, H]."""
        v = s.reshape(-1, self.heads, self.S, self.D)
        return tuple(np.ascontiguousarray(v[:, :, c]).reshape(-1, self.H) for c in range(self.S))

    def pack(self, comps, shape):
        v = np.stack([c.reshape(-1, self.heads, self.D) for c in comps], axis=2)
        return v.reshape(shape)

    def recurrent(self, h):
        """R h + b_r per head over all rows: h [rows, H] -> [rows, G*H] gate-major."""
        return recurrent_preactivation(h, self.R, self.b_r, _GEMM_OPS)

    def evaluate(self, prev, jac):
        comps = self.components(prev)
        ar = self.recurrent(comps[0])
        fs = self.pack(self.step(self.ax2, ar, comps), prev.shape)
        if jac is None:
            return fs, None
        if jac == "diagonal":
            return fs, self.jacobian_diagonal(ar, comps).reshape(prev.shape)
        return fs, self.jacobian_blocks(ar, comps).reshape(
            self.B, self.T, self.heads, self.S * self.D, self.S * self.D)

    def _partials(self, ar, comps):
        """For each output component s: d s_new / d ar (per gate, pointwise) [N, G, heads, D]
        and the direct d s_new / d s_prev[c] (pointwise) [N, heads, D] for every c.

        The cell is pointwise given ar, so one step-backward per component with a cotangent
        of ones recovers those diagonal derivatives exactly."""
        ones = np.ones((self.N, self.H), self.dtype)
        zeros = np.zeros_like(ones)
        shape = (self.N, self.heads, self.D)
        for s in range(self.S):
            cot = tuple(ones if c == s else zeros for c in range(self.S))
            _, dgr, dprev = self.step_backward(self.ax2, ar, comps, cot)
            yield (dgr.reshape(self.N, self.G, self.heads, self.D),
                   [d.reshape(shape) for d in dprev])

    def jacobian_diagonal(self, ar, comps):
        Rk = self.R.reshape(self.heads, self.G, self.D, self.D)
        Rdiag = np.diagonal(Rk, axis1=2, axis2=3)                 # [heads, G, D]
        out = np.empty((self.N, self.heads, self.S, self.D), self.dtype)
        for s, (pg, pd) in enumerate(self._partials(ar, comps)):
            out[:, :, s] = pd[s]
            if s == 0:
                out[:, :, 0] += np.einsum("ngkd,kgd->nkd", pg, Rdiag)
        return out

    def jacobian_blocks(self, ar, comps):
        """Per-head Jacobians, stored transposed: Jt[n, k, (c, e), (s, d)] = d s_new[s, d] /
        d s_prev[c, e] for head k."""
        S, D = self.S, self.D
        Jt = np.zeros((self.N, self.heads, S, D, S, D), self.dtype)
        RkT = self.R.reshape(self.heads, self.G, D, D).transpose(1, 0, 3, 2)  # [G, k, e, d]
        idx = np.arange(D)
        for s, (pg, pd) in enumerate(self._partials(ar, comps)):
            for c in range(1, S):
                Jt[:, :, c, idx, s, idx] = pd[c]
            np.einsum("ngkd,gked->nked", pg, RkT, out=Jt[:, :, 0, :, s, :])
            Jt[:, :, 0, idx, s, idx] += pd[0]
        return Jt

    # the state and initial guess in solver layout
    def state0(self):
        return self.pack(tuple(self.call.state0), (self.B, self.n))

    def guess(self, guess):
        if guess is None:
            return np.zeros((self.B, self.T, self.n), self.dtype)
        g = _validate.float_array("guess", guess)
        if g.dtype != self.dtype:
            raise TypeError(f"guess is {g.dtype} but x is {self.dtype}: "
                            "all arrays must share one dtype")
        B, T, H, S = self.B, self.T, self.H, self.S
        if g.ndim == 3 and g.shape[2] == H:
            comps = (g.reshape(-1, H),) + (np.zeros((B * T, H), self.dtype),) * (S - 1)
        else:
            _validate.check_shape("guess", g, (B, T, S * H),
                                  f"[B, T, H] = [{B}, {T}, {H}] or [B, T, S*H] = "
                                  f"[{B}, {T}, {S * H}] (all {S} state components)")
            comps = tuple(g.reshape(B * T, S, H)[:, c] for c in range(S))
        return self.pack(comps, (B, T, self.n))

    def trajectory(self, s):
        """Solver layout [B,T,n] -> the states after every step [S,B,T,H]."""
        return np.stack([c.reshape(self.B, self.T, self.H) for c in self.components(s)])

    def outputs(self, seq):
        return outputs(self.cell, np.ascontiguousarray(seq[0]),
                       np.ascontiguousarray(seq[:, :, -1]))


def _solve_cell_trajectory(call, ax, solver, tol, max_iter, guess, stacklevel):
    solver = _validate.choice("solver", solver, METHODS)
    problem = _CellProblem(call, ax)
    tol = _tolerance(tol, ax.dtype)
    T = problem.T
    max_iter = T if max_iter is None else _validate.positive_int("max_iter", max_iter)
    s = problem.guess(guess)
    if problem.B == 0 or T == 0:
        return problem, s, SolverInfo(solver, 0, 0.0, True, tol)
    s, info = _iterate(problem.evaluate, problem.state0(), s, solver, tol, max_iter,
                       problem.heads)
    if not info.converged:
        seq, _, final = forward(call, ax, save=False)
        info.sequential = outputs(call.cell, seq[0], final)
        _not_converged_warning(info, call.cell.name, stacklevel)
    return problem, s, info


def solve_cell(call, ax, solver, tol=None, max_iter=None, guess=None):
    """Run an RNN cell (a validated ``_cell_call.CellCall`` with ax = W x + b) with a parallel
    solver.

    Returns (y [B,T,H], state as the sequential call returns it, info)."""
    # a warning points at the user's call: user -> lstm -> _run -> solve_cell -> here
    problem, s, info = _solve_cell_trajectory(call, ax, solver, tol, max_iter, guess, 5)
    if problem.B == 0 or problem.T == 0:
        y = np.empty((problem.B, problem.T, problem.H), ax.dtype)
        return outputs(call.cell, y, call.state0.copy()) + (info,)
    return problem.outputs(problem.trajectory(s)) + (info,)


def solve_cell_vjp(call, ax, solver, tol=None, max_iter=None, guess=None):
    """vjp of :func:`solve_cell`: ``((y, state, info), pullback)``.

    The backward is the transposed linear recurrence lam_t = g_t + J_{t+1}^T lam_{t+1} with
    the per-head Jacobians at the solution, solved backwards in time by the same scan; the
    pre-activation gradients then come from the step backward functions over all rows."""
    # user -> vjp -> the registered rule -> _cell_vjp -> solve_cell_vjp -> here
    problem, s, info = _solve_cell_trajectory(call, ax, solver, tol, max_iter, guess, 6)
    if problem.B == 0 or problem.T == 0:
        y = np.empty((problem.B, problem.T, problem.H), ax.dtype)
        out = outputs(call.cell, y, call.state0.copy()) + (info,)
    else:
        out = problem.outputs(problem.trajectory(s)) + (info,)
    if not info.converged:   # differentiate the exact trajectory, not the stalled iterate
        seq, _, _ = forward(call, ax, save=True)
        s = problem.pack(tuple(c.reshape(-1, problem.H) for c in seq), s.shape)

    def pullback(value):
        if isinstance(value, (tuple, list)) and len(value) == 3:
            value = value[:2]                # info carries no gradient
        B, T, H, n = problem.B, problem.T, problem.H, problem.n
        dy, dstate = cotangent(call, value)
        y = np.ascontiguousarray(problem.trajectory(s)[0]) if B and T else out[0]
        if B == 0 or T == 0:
            dgx = np.zeros_like(ax)
            return parameter_grads(call, y, dgx, dgx, dstate.copy())
        s0 = problem.state0()
        comps = problem.components(_shift(s, s0))
        ar = problem.recurrent(comps[0])
        K, m = problem.heads, problem.S * problem.D
        Jt = problem.jacobian_blocks(ar, comps).reshape(B, T, K, m, m)
        g = np.zeros((B, T, n), ax.dtype)
        zeros = np.zeros((B * T, H), ax.dtype)
        g[:] = problem.pack((dy.reshape(-1, H),) + (zeros,) * (problem.S - 1), g.shape)
        g[:, -1] += problem.pack(tuple(dstate), (B, n))
        # reversed time tau = T-1-t; coefficient J_{t+1}^T, which Jt holds row-major.
        coeff = np.concatenate([np.zeros_like(Jt[:, :1]), Jt[:, :0:-1]], axis=1)
        rev = np.ascontiguousarray(g[:, ::-1]).reshape(B, T, K, m)
        lam = _block_scan(coeff, False, rev, np.zeros((B, K, m), ax.dtype))[:, ::-1]
        lam = lam.reshape(B, T, n)
        dgx, dgr, dprev = problem.step_backward(problem.ax2, ar, comps, problem.components(lam))
        dgx = dgx.reshape(ax.shape)
        dgr = dgr.reshape(ax.shape)
        dstate0 = np.stack([d.reshape(B, T, H)[:, 0] for d in dprev])
        dstate0[0] += recurrent_transpose(np.ascontiguousarray(dgr[:, 0]), call.R)
        return parameter_grads(call, y, dgx, dgr, dstate0)

    return out, pullback
