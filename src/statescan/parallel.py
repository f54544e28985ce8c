"""Parallel-in-time evaluation of nonlinear recurrences s_t = f(s_{t-1}, x_t).

The T step equations are solved for all t at once (DEER / ParaRNN): each iteration evaluates f
(and, for Newton, its Jacobian) over all B*T rows in one batched computation, then solves the
linearised recurrence s_t = J_t s_{t-1} + u_t with a compiled scan (:func:`matrix_scan`).

Solvers (``solver=`` of :func:`solve_recurrence` and of the RNN cells, see
:mod:`statescan.cell_solvers`):
  "newton"        exact Jacobian, dense per block (per head for the RNN cells);
  "quasi-newton"  diagonal of the Jacobian only: an O(T*n) scan per iteration;
  "jacobi"        fixed point s^{k+1}_t = f(s^k_{t-1}): no Jacobian, no scan.
After k iterations at least the first k steps are exact, whatever the Jacobian approximation,
so every solver is exact after T iterations (the default ``max_iter``).  The iteration stops
when max |s^{k+1} - s^k| <= tol.  A solver that stops above tol (max_iter reached, or a
non-finite iterate) warns and returns ``info.converged = False`` with the sequential result in
``info.sequential``: never a silent wrong answer.

Cost: an iteration does the work of the whole sequential pass as one GEMM over B*T rows plus
pointwise passes (newton adds dense per-head Jacobians: T*(S*D)^2 memory and scan work).  On a
few CPU cores the sequential compiled kernel is faster whenever the solver needs more than ~2
iterations; the solvers beat interpreted step loops, and scale with cores only in the GEMM.
"""
import warnings
from dataclasses import dataclass

import numpy as np

from . import _dispatch, _validate
from ._reference import parallel as _ref
from .autodiff import cotangent, defvjp
from .scan import _state_argument

METHODS = ("newton", "quasi-newton", "jacobi")

# Time segmentation of the compiled scan: only for diagonal recurrences (composing m x m maps
# costs m times a step) with too few independent rows to occupy the threads.  A function of
# the shape alone, so results never depend on the thread count.
_SEGMENTS = 8
_SEGMENT_MIN_T = 2048
_SEGMENT_MAX_JOBS = 8
_DIAG_CHUNK = 64
_MIN_WORK_PER_THREAD = 1 << 15      # multiply-adds


@dataclass
class SolverInfo:
    """What a parallel solve did.

    solver : the solver that ran ("newton", "quasi-newton" or "jacobi").
    iterations : iterations run.
    residual : max |s^{k+1} - s^k| of the last iteration.
    converged : residual <= tol, or T iterations run (then the trajectory is exact).
    sequential : when not converged, the sequential result (``(y, state)`` for the RNN cells,
        the trajectory [B,T,n] for :func:`solve_recurrence`); None otherwise.
    """
    solver: str
    iterations: int
    residual: float
    converged: bool
    tol: float
    sequential: object = None

    @property
    def method(self):
        """Deprecated name of :attr:`solver`."""
        warnings.warn("SolverInfo.method is deprecated; use SolverInfo.solver",
                      DeprecationWarning, stacklevel=2)
        return self.solver


# ---- compiled scans --------------------------------------------------------------------------

def _threads(jobs, work):
    # Waking a thread team costs microseconds (milliseconds on a loaded machine): only worth
    # it with several jobs and enough work.
    return max(1, min(_dispatch.get_num_threads(), jobs, work // _MIN_WORK_PER_THREAD))


def _diag_scan(a, b, h0, nseg=None):
    """h_t = a_t * h_{t-1} + b_t; a, b [B,T,n], h0 [B,n] (contiguous); segmented by shape
    when nseg is None.  The one compiled diagonal scan: linear_scan's kernel."""
    B, T, n = b.shape
    if nseg is None:
        rows = B * -(-n // _DIAG_CHUNK)
        nseg = _SEGMENTS if T >= _SEGMENT_MIN_T and rows < _SEGMENT_MAX_JOBS else 1
    a, b, h0 = (np.ascontiguousarray(v) for v in (a, b, h0))
    return _dispatch.run("scan", "linear_scan", a, b, h0, None, None, False, nseg,
                         out=lambda: np.empty_like(b), empty=b.size == 0)


def _block_scan(M, transposed, b, h0, nseg=1):
    """h_t = A_t h_{t-1} + b_t per block; b [B,T,K,m], h0 [B,K,m]; M [B,T,K,m,m] holds A, or
    A transposed when `transposed` (whichever layout the caller has: no copy).

    Never segmented by default: composing dense m x m maps costs m times a sequential step.
    """
    if b.size == 0:
        return np.empty_like(b)
    if not _dispatch.use_compiled():
        return _ref.block_scan(M, transposed, b, h0)
    M, b, h0 = (np.ascontiguousarray(v) for v in (M, b, h0))
    h = np.empty_like(b)
    B, T, K, m = b.shape
    work = b.size * m * (m if nseg > 1 else 1)
    _dispatch.ext_module("parallel").block_scan(M, transposed, b, h0, h, nseg,
                                                _threads(B * K * nseg, work))
    return h


def _prepare_scan(A, b, state, deprecated):
    """Validate matrix_scan's arguments: (kind, A, b, state) contiguous, state zeros when
    None; `deprecated` holds the old ``h0=`` keyword, if used."""
    state, name = _state_argument(state, deprecated, "matrix_scan")
    b_ndim = np.ndim(b) if b is not None else 3
    if b_ndim not in (3, 4):
        raise ValueError(f"b must have shape [B, T, n] or [B, T, K, m], got {np.shape(b)}")
    dims = "B T n" if b_ndim == 3 else "B T K n"
    A_ndim = np.ndim(A) if A is not None else b_ndim
    if A_ndim == b_ndim:
        kind, A_spec = "diagonal", dims
    elif A_ndim == b_ndim + 1:
        kind, A_spec = "dense", dims + " n"
    else:
        shape = list(np.shape(b))
        raise ValueError(f"A must have shape {shape} (diagonal) or {shape + shape[-1:]} "
                         f"(dense), got {np.shape(A)}")
    arrs, _, dtype = _validate.arrays(
        {"b": dims, "A": A_spec, name + "?": dims.replace(" T", "")},
        {"A": A, "b": b, name: state})
    b = arrs["b"]
    state = arrs[name]
    if state is None:
        state = np.zeros((b.shape[0],) + b.shape[2:], dtype)
    return kind, arrs["A"], b, state


def _scan(kind, A, b, h0, transposed=False):
    B, T = b.shape[:2]
    K, m = (b.shape[2] if b.ndim == 4 else 1), b.shape[-1]
    if kind == "diagonal":
        return _diag_scan(A.reshape(B, T, K * m), b.reshape(B, T, K * m),
                          h0.reshape(B, K * m)).reshape(b.shape)
    return _block_scan(A.reshape(B, T, K, m, m), transposed, b.reshape(B, T, K, m),
                       h0.reshape(B, K, m)).reshape(b.shape)


def matrix_scan(A, b, state=None, **deprecated):
    """Linear recurrence ``h_t = A_t h_{t-1} + b_t`` over a whole sequence (compiled).

    Parameters
    ----------
    A : ndarray
        [B, T, n, n] dense, [B, T, n] diagonal (elementwise ``a_t * h``), or with K
        independent blocks: [B, T, K, m, m] dense blocks / [B, T, K, m] diagonal.
    b : ndarray [B, T, n] or [B, T, K, m]
    state : ndarray [B, n] or [B, K, m], optional
        Initial state (zeros when None).  ``h0=`` is a deprecated alias.

    Returns
    -------
    h : ndarray, the shape of b
        The state after every step.

    Gradients: ``vjp(matrix_scan, A, b, state)`` gives a pullback taking ``dh`` (None =
    zero) and returning ``(dA, db)``, then ``dstate`` when a state was given.

    Parallel over batch rows and blocks; long diagonal scans with few rows are also split into
    a fixed number of time segments (composed as affine maps, then chained).  Results do not
    depend on the thread count.  The diagonal case runs :func:`statescan.linear_scan`'s kernel.

    Notes
    -----
    Memory, measured as the peak RSS increase in units of the output h (float64): the
    forward 1.0x (h; segmented diagonal scans add 3 [B, segments, n] carries); vjp with its
    pullback 3.0x for diagonal A (B=16, T=2048, n=128) and 20x for dense 8 x 8 A (B=16,
    T=8192): the pullback allocates dA (n x h for dense A), db, the reversed coefficients
    and lam.
    """
    return _scan(*_prepare_scan(A, b, state, deprecated))


def _matrix_scan_vjp(A, b, state=None, **deprecated):
    given = state is not None or deprecated.get("h0") is not None
    kind, A, b, h0 = _prepare_scan(A, b, state, deprecated)
    h = _scan(kind, A, b, h0)

    def pullback(dh):
        dh = cotangent(dh, ("dh", b.shape), b.dtype)
        B, T = b.shape[:2]
        if kind == "diagonal":
            # the diagonal scan's own backward (linear_scan's kernel)
            n = h0.size // max(B, 1)
            dA, db, dh0 = _dispatch.run(
                "scan", "linear_scan_backward", A.reshape(B, T, n), h0.reshape(B, n), None,
                None, False, h.reshape(B, T, n), dh.reshape(B, T, n),
                out=lambda: (np.empty((B, T, n), b.dtype), np.empty((B, T, n), b.dtype),
                             np.empty((B, n), b.dtype)),
                empty=b.size == 0)
            dA, db, dh0 = dA.reshape(b.shape), db.reshape(b.shape), dh0.reshape(h0.shape)
            return (dA, db, dh0) if given else (dA, db)
        # lam_t = dh_t + A_{t+1}^T lam_{t+1}: the transposed recurrence, run backwards in time
        # (A itself is the transposed layout of the coefficient A^T).
        coeff = np.concatenate([np.zeros_like(A[:, :1]), A[:, :0:-1]], axis=1)
        lam = _scan(kind, coeff, dh[:, ::-1], np.zeros_like(h0), transposed=True)[:, ::-1]
        h_prev = np.concatenate([h0[:, None], h[:, :-1]], axis=1)
        dA = lam[..., :, None] * h_prev[..., None, :]
        dh0 = (np.matmul(lam[:, 0, ..., None, :], A[:, 0])[..., 0, :] if A.shape[1]
               else np.zeros_like(h0))
        db = np.ascontiguousarray(lam)
        return (dA, db, dh0) if given else (dA, db)

    return h, pullback


defvjp(matrix_scan, _matrix_scan_vjp)


# ---- the iteration shared by every problem ----------------------------------------------------

def _tolerance(tol, dtype):
    if tol is None:
        return 1e-10 if dtype == np.float64 else 1e-5
    if isinstance(tol, (bool, np.bool_)) or not isinstance(tol, (int, float, np.integer,
                                                                   np.floating)):
        raise TypeError(f"tol must be a number, got {type(tol).__name__}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    return float(tol)


def _shift(s, s0):
    """The previous state of every step: [s0, s_1, ..., s_{T-1}]."""
    return np.concatenate([s0[:, None], s[:, :-1]], axis=1)


def _apply_blocks(Jt, v, K):
    """J v per block, J stored transposed: Jt [B,T,K,m,m], v [B,T,K*m] -> [B,T,K*m]."""
    B, T, n = v.shape
    vb = v.reshape(B, T, K, 1, n // K)
    return np.matmul(vb, Jt).reshape(B, T, n)


def _iterate(evaluate, s0, s, solver, tol, max_iter, K):
    """Solve s_t = f(s_{t-1}) for all t starting from the trajectory s [B,T,n].

    evaluate(prev [B,T,n], jac) returns f(prev) [B,T,n] and, for jac "diagonal", the Jacobian
    diagonal [B,T,n], for jac "dense", the K per-block Jacobians transposed [B,T,K,m,m].
    """
    B, T, n = s.shape
    jac = {"newton": "dense", "quasi-newton": "diagonal", "jacobi": None}[solver]
    residual, k = 0.0, 0
    for k in range(1, min(max_iter, T) + 1):     # exact after T: more cannot help
        prev = _shift(s, s0)
        fs, J = evaluate(prev, jac)
        if jac is None:
            new = fs
        elif jac == "diagonal":
            new = _diag_scan(J, fs - J * prev, s0)
        else:
            m = n // K
            u = (fs - _apply_blocks(J, prev, K)).reshape(B, T, K, m)
            new = _block_scan(J, True, u, s0.reshape(B, K, m)).reshape(B, T, n)
        residual = float(np.max(np.abs(new - s)))
        s = new
        if residual <= tol or not np.isfinite(residual):
            break
    converged = bool(np.isfinite(residual) and (residual <= tol or k >= T))
    return s, SolverInfo(solver, k, residual, converged, tol)


def _not_converged_warning(info, where, stacklevel):
    warnings.warn(f"{where}: {info.solver} stopped after {info.iterations} iterations with "
                  f"residual {info.residual:.3g} > tol {info.tol:.3g}; the sequential result is "
                  "in info.sequential", RuntimeWarning, stacklevel=stacklevel + 1)


# ---- user recurrences ------------------------------------------------------------------------

class _UserProblem:
    """s_t = f(s_{t-1}, x_t) for a user function f vectorised over rows."""

    def __init__(self, f, xs, B, T, n, dtype, jac):
        self.f, self.jac, self.dtype = f, jac, dtype
        self.B, self.T, self.n = B, T, n
        self.xs = xs.reshape((B * T,) + xs.shape[2:])

    def call_f(self, s, x):
        out = np.asarray(self.f(s, x))
        if out.shape != s.shape:
            raise ValueError(f"f must return shape [N, n] = {list(s.shape)} (the shape of "
                             f"s_prev), got {out.shape}")
        return out.astype(self.dtype, copy=False)

    def evaluate(self, prev, jac):
        p = prev.reshape(-1, self.n)
        fs = self.call_f(p, self.xs)
        if jac is None:
            return fs.reshape(prev.shape), None
        if self.jac is not None:
            J = self._user_jacobian(p)
        elif jac == "diagonal":
            # One simultaneous perturbation of every component: exact for elementwise f,
            # an approximation otherwise (any approximation keeps the solver exact after T).
            step = np.sqrt(np.finfo(self.dtype).eps) * np.maximum(1, np.abs(p))
            J = (self.call_f(p + step, self.xs) - fs) / step
        else:
            J = self._fd_dense(p, fs)
        if jac == "diagonal":
            if J.ndim == 3:
                J = np.diagonal(J, axis1=1, axis2=2)
            return fs.reshape(prev.shape), np.ascontiguousarray(J).reshape(prev.shape)
        if J.ndim == 2:
            J = J[:, :, None] * np.eye(self.n, dtype=self.dtype)
        Jt = np.ascontiguousarray(np.swapaxes(J, 1, 2))
        return fs.reshape(prev.shape), Jt.reshape(self.B, self.T, 1, self.n, self.n)

    def _user_jacobian(self, p):
        N, n = p.shape
        J = np.asarray(self.jac(p, self.xs))
        if J.shape not in ((N, n, n), (N, n)):
            raise ValueError(f"jac must return shape [N, n, n] = [{N}, {n}, {n}] or [N, n] "
                             f"(diagonal), got {J.shape}")
        return J.astype(self.dtype, copy=False)

    def _fd_dense(self, p, fs):
        # Forward differences, one column per evaluation of f.
        N, n = p.shape
        J = np.empty((N, n, n), self.dtype)
        step = np.sqrt(np.finfo(self.dtype).eps) * np.maximum(1, np.abs(p))
        for j in range(n):
            q = p.copy()
            q[:, j] += step[:, j]
            J[:, :, j] = (self.call_f(q, self.xs) - fs) / step[:, j, None]
        return J

    def sequential(self, s0):
        out = np.empty((self.B, self.T, self.n), self.dtype)
        xs = self.xs.reshape((self.B, self.T) + self.xs.shape[1:])
        s = s0
        for t in range(self.T):
            s = self.call_f(s, xs[:, t])
            out[:, t] = s
        return out


def solve_recurrence(f, state=None, xs=None, jac=None, solver="newton", tol=None,
                     max_iter=None, guess=None, *, method=None, s0=None):
    """Solve ``s_t = f(s_{t-1}, x_t)``, t = 1..T, for all t at once.

    Parameters
    ----------
    f : callable ``f(s_prev [N, n], x [N, ...]) -> s [N, n]``
        One step, vectorised over N rows (the solver calls it with all N = B*T rows at once).
    state : ndarray [B, n]
        Initial state (float32 or float64; fixes the dtype).
    xs : ndarray [B, T, ...]
        Per-step inputs, passed through to f row by row.
    jac : callable ``jac(s_prev, x) -> [N, n, n]`` (or [N, n] when diagonal), optional
        d f / d s_prev.  Without it, "newton" uses n forward differences and "quasi-newton"
        one simultaneous perturbation (exact when f acts elementwise on s).
    solver : {"newton", "quasi-newton", "jacobi"}
    tol : float, optional
        Stop when ``max |s^{k+1} - s^k| <= tol`` (default 1e-10 float64, 1e-5 float32).
    max_iter : int, optional
        Iteration cap (default and upper limit T: every solver is exact after T iterations).
    guess : ndarray [B, T, n], optional
        Initial trajectory (zeros when None).

    Returns
    -------
    s : ndarray [B, T, n]
        The state after every step.
    info : SolverInfo
        iterations, residual, converged (and the sequential result when not converged).

    ``method=`` and ``s0=`` are deprecated spellings of ``solver=`` and ``state=``.

    Notes
    -----
    Memory, measured as the peak RSS increase in units of the output s (float64, B=16,
    T=2048, f = tanh(0.5 s + x) with a diagonal ``jac``, solver="newton"): 37x at n=8, 103x
    at n=32 -- it grows with n (the Newton step works on n x n Jacobians for all B*T steps,
    plus f's own temporaries).
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    if jac is not None and not callable(jac):
        raise TypeError(f"jac must be callable or None, got {type(jac).__name__}")
    s0, state_name = _renamed("state", state, "s0", s0)
    solver, solver_name = _renamed("solver", solver, "method", method, default="newton")
    if xs is None:
        raise TypeError("solve_recurrence() missing required argument: 'xs'")
    solver = _validate.choice(solver_name, solver, METHODS)
    s0 = _validate.float_array(state_name, s0)
    if s0.ndim != 2:
        raise ValueError(f"{state_name} must have shape [B, n], got {s0.shape}")
    dtype = s0.dtype
    B, n = s0.shape
    xs = np.asarray(xs)
    if xs.ndim < 2 or xs.shape[0] != B:
        raise ValueError(f"xs must have shape [B, T, ...] with B = {B} (from {state_name}), "
                         f"got {xs.shape}")
    T = xs.shape[1]
    tol = _tolerance(tol, dtype)
    max_iter = T if max_iter is None else _validate.positive_int("max_iter", max_iter)
    if guess is None:
        s = np.zeros((B, T, n), dtype)
    else:
        s = _validate.float_array("guess", guess)
        _validate.check_shape("guess", s, (B, T, n), f"[B, T, n] = [{B}, {T}, {n}]")
        s = _validate.contiguous(s, dtype)
    if B == 0 or T == 0 or n == 0:      # nothing to solve (a 0-size state: no loop, no reshape)
        return s, SolverInfo(solver, 0, 0.0, True, tol)
    problem = _UserProblem(f, xs, B, T, n, dtype, jac)
    s0 = _validate.contiguous(s0, dtype)
    s, info = _iterate(problem.evaluate, s0, s, solver, tol, max_iter, 1)
    if not info.converged:
        info.sequential = problem.sequential(s0)
        _not_converged_warning(info, "solve_recurrence", stacklevel=2)
    return s, info


def _renamed(name, value, old_name, old_value, default=None):
    """The value of a keyword argument that `old_name` used to spell: (value, name used).
    The old spelling still works, with a DeprecationWarning."""
    if old_value is None:
        if value is None and default is None:
            raise TypeError(f"solve_recurrence() missing required argument: {name!r}")
        return value, name
    if value is not default:
        raise TypeError(f"solve_recurrence() got both {name}= and its deprecated spelling "
                        f"{old_name}=")
    warnings.warn(f"solve_recurrence: {old_name}= is deprecated; use {name}=",
                  DeprecationWarning, stacklevel=3)
    return old_value, old_name
