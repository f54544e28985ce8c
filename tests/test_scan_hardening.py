"""Defects found by fuzzing and sanitizers (issue 13), one regression test each: scratch
allocation failures raise MemoryError, padded SIMD lanes do not leak NaN, zero-size feature
axes with a huge T return at once, and non-finite inputs propagate like the reference."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import statescan as ss
from conftest import using_backend
from test_scan import linear_problem, selective_problem

compiled = pytest.mark.skipif(ss.backend() != "compiled", reason="compiled kernels not built")


def run_script(code, timeout=300):
    """Run `code` in a fresh interpreter (a crash or a hang fails the test, not the run)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env={"OMP_NUM_THREADS": "1",
                                                           "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@compiled
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is Linux's")
def test_selective_scratch_allocation_failure_raises_memory_error():
    """N = 10^7 states: ~2 GB of per-thread scratch in the forward, more in the backward.
    Under an address-space limit the kernels must raise MemoryError (they used to write
    through the NULL pointer malloc returned)."""
    out = run_script("""
        import resource, numpy as np, statescan as ss
        N = 10**7
        A = -np.ones((1, N), np.float32)
        x = np.ones((1, 2, 1), np.float32)
        B = np.zeros((1, 2, N), np.float32)
        inf = resource.RLIM_INFINITY
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**29, inf))      # 1.5 GiB
        try:
            ss.selective_scan(x, x, A, B, B)
        except MemoryError as e:
            print("forward:", e)
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, inf))      # 3 GiB
        out, pb = ss.vjp(ss.selective_scan, x, x, A, B, B)
        try:
            pb((np.ones_like(out[0]), None))
        except MemoryError as e:
            print("backward:", e)
    """)
    assert "forward: selective_scan" in out and "backward: selective_scan vjp" in out


@pytest.mark.parametrize("backend", ["compiled", "python"])
@pytest.mark.parametrize("where", ["B", "C"])
def test_padded_lanes_do_not_leak_nan(backend, where):
    """Dm = 19 (a 16-channel block with 13 padded lanes) and an infinite B or C: the
    compiled vjp used to compute 0*inf in the padded lanes and sum the NaN into dB/dC."""
    args, kw = selective_problem(Bt=2, T=5, Dm=19, N=3, dt_bias=True, softplus=True)
    args = list(args)
    i = 3 if where == "B" else 4
    args[i] = args[i].copy()
    args[i][1, 2, 1] = np.inf
    results = {}
    for name in ("compiled", "python"):
        with using_backend(name):
            out, pb = ss.vjp(ss.selective_scan, *args, **kw)
            results[name] = out + pb((np.ones_like(out[0]), np.ones_like(out[1])))
    for got, ref in zip(results["compiled"], results["python"]):
        assert np.array_equal(np.isnan(got), np.isnan(ref))
        assert np.array_equal(np.isposinf(got), np.isposinf(ref))
    grads = results[backend][2:]
    assert np.isfinite(grads[4 if where == "B" else 3][0]).all()    # row 0 is untouched


@pytest.mark.parametrize("backend", ["compiled", "python"])
def test_zero_size_features_with_huge_T_return_at_once(backend):
    """(1, 10^9, 0) as zero-stride broadcasts: no memory, and no loop over T (it used to
    run an interpreted loop over 10^9 steps)."""
    out = run_script(f"""
        import numpy as np, statescan as ss
        ss.set_backend({backend!r})
        T = 10**9
        z = np.broadcast_to(np.zeros((), np.float64), (1, T, 0))
        h, pb = ss.vjp(ss.linear_scan, z, z)
        da, db = pb(None)
        print(h.shape, da.shape, ss.matrix_scan(z, z).shape)
        y, s = ss.selective_scan(z, z, np.zeros((0, 0)), z, z, state=np.zeros((1, 0, 0)))
        (y2, s2), pb = ss.vjp(ss.selective_scan, z, z, np.zeros((0, 0)), z, z)
        print(y.shape, s.shape, len(pb((None, None))))
    """, timeout=120)
    assert out.split("\n")[:2] == ["(1, 1000000000, 0) (1, 1000000000, 0) (1, 1000000000, 0)",
                                   "(1, 1000000000, 0) (1, 0, 0) 5"]


@pytest.mark.parametrize("case", ["B", "C", "x", "dt", "A", "z", "state"])
def test_non_finite_inputs_propagate_like_the_reference(case):
    args, kw = selective_problem(Bt=2, T=5, Dm=19, N=3, z=True, dt_bias=True, softplus=True,
                                 state=True, seed=3)
    args = [a.copy() for a in args]
    kw = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    x, dt, A, B, C, D = args
    value = {"B": (B, (1, 2, 1), np.inf), "C": (C, (0, 3, 0), -np.inf),
             "x": (x, (1, 1, 4), np.nan), "dt": (dt, (0, 2, 7), np.inf),
             "A": (A, (3, 1), -np.inf), "z": (kw["z"], (1, 2, 2), np.inf),
             "state": (kw["state"], (0, 5, 1), np.nan)}[case]
    value[0][value[1]] = value[2]
    results = {}
    for name in ("compiled", "python"):
        with using_backend(name), np.errstate(all="ignore"):
            out, pb = ss.vjp(ss.selective_scan, *args, **kw)
            results[name] = out + pb((np.ones_like(out[0]), np.ones_like(out[1])))
    for got, ref in zip(results["compiled"], results["python"]):
        assert np.array_equal(np.isnan(got), np.isnan(ref))
        finite = np.isfinite(ref)
        assert np.array_equal(finite, np.isfinite(got))
        np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-9, atol=1e-9)
    with np.errstate(all="ignore"):
        a, b, h = linear_problem(B=2, T=5, D=19, seed=1)
        b[0, 1, 2], a[1, 2, 3], h[1, 4] = np.nan, np.inf, -np.inf
        lin = {}
        for name in ("compiled", "python"):
            with using_backend(name):
                out, pb = ss.vjp(ss.linear_scan, a, b, h, reset=np.eye(2, 5, 3, bool))
                lin[name] = (out,) + pb(np.ones_like(out))
    for got, ref in zip(lin["compiled"], lin["python"]):
        assert np.array_equal(np.isnan(got), np.isnan(ref))
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)   # inf == inf too


def test_solve_recurrence_with_a_zero_size_state():
    """A 0-size state used to fail in a reshape; nothing to solve, the trajectory is [B,T,0]."""
    f = lambda s, x: np.tanh(s + x)                              # noqa: E731
    s, info = ss.solve_recurrence(f, np.zeros((2, 0)), np.zeros((2, 5, 0)))
    assert s.shape == (2, 5, 0) and info.converged


@pytest.mark.parametrize("gate", [False, True])
def test_infinite_x_without_D_gives_inf_like_the_reference(gate):
    """Without D the kernels used to start y at 0*x, NaN for an infinite x (fuzz find)."""
    args, kw = selective_problem(Bt=1, T=3, Dm=2, N=1, D=False, z=gate, seed=4)
    x = args[0].copy()
    x[0, 1, 0] = np.inf
    results = {}
    for name in ("compiled", "python"):
        with using_backend(name), np.errstate(all="ignore"):
            out, pb = ss.vjp(ss.selective_scan, x, *args[1:], **kw)
            results[name] = out + pb((np.ones_like(out[0]), None))
    for got, ref in zip(results["compiled"], results["python"]):
        assert np.array_equal(np.isnan(got), np.isnan(ref))
        assert np.array_equal(np.isinf(got), np.isinf(ref))
    assert np.isinf(results["compiled"][0][0, 1, 0])
