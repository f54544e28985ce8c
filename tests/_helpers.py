"""Helper functions shared by the test files (fixtures live in conftest.py): random cell
problems, tolerance and bit-identity checks, backend and thread switches."""
import contextlib
from dataclasses import dataclass, field

import numpy as np

import statescan as ss
from statescan._cells import CELLS as _REGISTRY

CELLS = tuple(_REGISTRY)
CELL_SIZES = {name: (c.gates, c.states) for name, c in _REGISTRY.items()}  # name -> (G, S)
FNS = {name: getattr(ss, name) for name in CELLS}
STATE_NAMES = {name: c.state_names for name, c in _REGISTRY.items()}
TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}


@dataclass
class Problem:
    """Arguments of one cell call: fn(x, W, R, b, b_r, heads=heads, state=state)."""
    cell: str
    x: np.ndarray
    W: object
    R: np.ndarray
    b: object
    b_r: object
    heads: int
    state: object
    sizes: dict = field(default_factory=dict)

    @property
    def fn(self):
        return FNS[self.cell]

    def args(self):
        return (self.x, self.W, self.R, self.b, self.b_r)

    def kwargs(self):
        return dict(heads=self.heads, state=self.state)

    def call(self):
        return self.fn(*self.args(), **self.kwargs())

    def state_parts(self):
        return state_parts(self.cell, self.state)


def make_problem(cell, B=2, T=4, I=3, H=4, *, heads=1, dtype=np.float64, W=True, b=True,
                 b_r=True, state=False, R3=False, seed=0, scale=1.0):
    """A random, well-conditioned (unsaturated) problem for `cell`.

    W=False makes x the pre-activations [B, T, G*H].  R is [G*H, H] when heads == 1 unless
    `R3`, else [heads, G*D, D].  `state=True` passes a random initial state (for the sLSTM:
    n >= 1 as reached after one step, so the non-initial branch is taken)."""
    G, S = CELL_SIZES[cell]
    assert H % heads == 0
    D = H // heads
    rng = np.random.default_rng(seed)

    def rand(*shape, s=1.0):
        return (scale * s * rng.standard_normal(shape)).astype(dtype)

    x = rand(B, T, I) if W else rand(B, T, G * H)
    Wa = rand(G * H, I, s=1 / np.sqrt(I)) if W else None
    if heads == 1 and not R3:
        R = rand(G * H, H, s=1 / np.sqrt(H))
    else:
        R = rand(heads, G * D, D, s=1 / np.sqrt(D))
    ba = rand(G * H, s=0.5) if b else None
    bra = rand(G * H, s=0.5) if b_r else None
    st = None
    if state:
        parts = [rand(B, H, s=0.5) for _ in range(S)]
        if cell == "slstm":
            parts[2] = (1 + rng.random((B, H))).astype(dtype)
        st = parts[0] if S == 1 else tuple(parts)
    return Problem(cell, x, Wa, R, ba, bra, heads, st,
                   dict(B=B, T=T, I=I, H=H, D=D, G=G, S=S))


def state_parts(cell, state):
    """The state of `cell` (array or tuple) as a tuple of arrays."""
    if state is None:
        return ()
    return (state,) if CELL_SIZES[cell][1] == 1 else tuple(state)


def flat_outputs(cell, out):
    """(y, state) -> (y, state part 0, part 1, ...)."""
    y, state = out
    return (y,) + state_parts(cell, state)


def assert_close(actual, expected, dtype=None, tol=None, what=""):
    """max|a - b| <= tol * max(1, max|b|), with NaN only where the expected value is NaN."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    dtype = np.dtype(dtype if dtype is not None else expected.dtype)
    tol = TOL[dtype] if tol is None else tol
    if expected.size == 0:
        return
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    assert np.array_equal(nan_a, nan_e), f"{what}: NaN pattern differs"
    ok = ~nan_e
    if not ok.any():
        return
    err = np.max(np.abs(actual[ok].astype(np.float64) - expected[ok].astype(np.float64)))
    ref = max(1.0, float(np.max(np.abs(expected[ok].astype(np.float64)))))
    assert err <= tol * ref, f"{what}: max abs error {err:.3e} > {tol:.1e} * {ref:.3g}"


def assert_all_close(actual, expected, dtype=None, tol=None, what=""):
    """assert_close over matching sequences; None entries must match None."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} != {len(expected)} entries"
    for k, (a, e) in enumerate(zip(actual, expected)):
        if e is None:
            assert a is None, f"{what}[{k}]: expected None"
            continue
        assert a is not None, f"{what}[{k}]: got None"
        if isinstance(e, tuple):
            assert_all_close(a, e, dtype, tol, f"{what}[{k}]")
        else:
            assert_close(a, e, dtype, tol, f"{what}[{k}]")


def assert_all_equal(actual, expected, what=""):
    """Bit-identical (np.array_equal with NaN == NaN) over matching sequences."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} != {len(expected)} entries"
    for k, (a, e) in enumerate(zip(actual, expected)):
        if e is None or a is None:
            assert a is None and e is None, f"{what}[{k}]: None mismatch"
        elif isinstance(e, tuple):
            assert_all_equal(a, e, f"{what}[{k}]")
        else:
            assert a.dtype == e.dtype and a.shape == e.shape, f"{what}[{k}]: dtype/shape"
            assert np.array_equal(a, e, equal_nan=True), (
                f"{what}[{k}]: not bit-identical, max diff {np.nanmax(np.abs(a - e)):.3e}")


@contextlib.contextmanager
def using_backend(name):
    """Run the body on backend `name`, restoring the previous backend afterwards."""
    old = ss.backend()
    ss.set_backend(name)
    try:
        yield
    finally:
        ss.set_backend(old)


@contextlib.contextmanager
def using_threads(n):
    """Run the body with `n` kernel threads (in this Python thread), then the previous count.

    Small calls normally stay on the calling thread (``_dispatch.MIN_WORK_PER_THREAD``); here
    every call uses the `n` threads, so thread-count tests exercise the parallel paths."""
    from statescan import _dispatch
    old = _dispatch.MIN_WORK_PER_THREAD
    _dispatch.MIN_WORK_PER_THREAD = 1
    try:
        with ss.threads(n):
            yield
    finally:
        _dispatch.MIN_WORK_PER_THREAD = old


def on_backends(fn, *args, **kwargs):
    """{backend: fn(*args, **kwargs)} for the compiled and the python backend."""
    out = {}
    for name in ("compiled", "python"):
        with using_backend(name):
            out[name] = fn(*args, **kwargs)
    return out


def random_cotangent(cell, out, seed=1):
    """(dy, dstate) of the structure of `out`, random normal."""
    rng = np.random.default_rng(seed)
    y, state = out
    dy = rng.standard_normal(y.shape).astype(y.dtype)
    parts = tuple(rng.standard_normal(p.shape).astype(p.dtype) for p in state_parts(cell, state))
    return dy, parts[0] if len(parts) == 1 else parts


def vjp_grads(problem, cot_seed=1):
    """(out, grads) of statescan.vjp on `problem` with a random cotangent."""
    out, pb = ss.vjp(problem.fn, *problem.args(), **problem.kwargs())
    return out, pb(random_cotangent(problem.cell, out, cot_seed))


# ---- the parallel solvers -----------------------------------------------------------------

SOLVERS = ("newton", "quasi-newton", "jacobi")


def make_cell(cell, B=2, T=24, H=8, heads=1, dtype=np.float64, seed=0, scale=0.4, state=False):
    """((x, W, R, b, b_r), kwargs) of a random call of `cell` for the parallel solvers."""
    G, S = CELL_SIZES[cell]
    D = H // heads
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, 5)).astype(dtype)
    W = (rng.standard_normal((G * H, 5)) * 0.5).astype(dtype)
    shape = (G * H, H) if heads == 1 else (heads, G * D, D)
    R = (rng.standard_normal(shape) * scale).astype(dtype)
    b = (rng.standard_normal(G * H) * 0.1).astype(dtype)
    b_r = (rng.standard_normal(G * H) * 0.1).astype(dtype)
    kw = {"heads": heads}
    if state:
        s = (rng.standard_normal((S, B, H)) * 0.3).astype(dtype)
        if cell == "slstm":
            s[2] = np.abs(s[2]) + 1     # normaliser n >= 1 as the cell produces it
        kw["state"] = s[0] if S == 1 else tuple(s)
    return (x, W, R, b, b_r), kw


def assert_outputs_close(out, ref_out, atol):
    """(y, state) pairs equal to `atol`."""
    np.testing.assert_allclose(out[0], ref_out[0], rtol=0, atol=atol)
    for a, r in zip(flat_state(out[1]), flat_state(ref_out[1])):
        np.testing.assert_allclose(a, r, rtol=0, atol=atol)


def flat_state(state):
    """A cell's state (array or tuple) as a tuple."""
    return state if isinstance(state, tuple) else (state,)


def user_problem(n=4, B=2, T=25, seed=8):
    """(f, jac, s0, xs, expected trajectory) of a contracting tanh recurrence."""
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((n, n)) * 0.6
    f = lambda s, x: np.tanh(s @ M.T + x)
    jac = lambda s, x: (1 - f(s, x) ** 2)[:, :, None] * M
    s0 = rng.standard_normal((B, n))
    xs = rng.standard_normal((B, T, n))
    expected = np.empty((B, T, n))
    s = s0
    for t in range(T):
        s = f(s, xs[:, t])
        expected[:, t] = s
    return f, jac, s0, xs, expected
