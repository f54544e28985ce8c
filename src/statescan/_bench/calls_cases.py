"""Benchmark family ``calls``: the fixed cost of a small call.

One token (T = 1, B = 1, small sizes) through the public functions ``selective_scan``, ``ssd``,
``linear_attention`` and ``lstm``, without a state (a plain call, not a stream).  Runners:

* ``statescan``: the public call, with the run's thread count;
* ``statescan-1t``: the public call with one thread (``statescan.threads(1)``);
* ``kernel-only``: the compiled kernels that public call runs, with its arguments and its
  already allocated outputs, replayed (recorded from one public call, so they follow any
  change of the call path).

A runner makes :data:`CALLS` calls, so the table's "us/step" is microseconds per call; the
fixed cost of a call is ``statescan`` minus ``kernel-only`` (the "kernel-only x" ratio
column shows kernel-only's time over the public call's).
"""
import numpy as np

import statescan as ss

from .. import _dispatch
from .core import STATESCAN, Case, Runner, Skipped

CALLS = 200          # calls per runner invocation: one timed call of a runner is ~1 ms


def cases(quick):
    out = []
    for dtype in ("float32", "float64"):
        for name, params, build in _CASES:
            out.append(Case("calls", name, dict(B=1, T=1, **params), dtype, CALLS, 0.0,
                            lambda build=build, params=params, dtype=dtype:
                            _runners(build(np.dtype(dtype), **params))))
    return out


def _runners(call):
    """{runner: fn} for one public call `call` (a zero-argument callable)."""
    def public():
        for _ in range(CALLS):
            out = call()
        return out

    def public_one_thread():
        with ss.threads(1):
            return public()

    runners = {STATESCAN: public, "statescan-1t": Runner(public_one_thread)}
    kernels = _recorded_kernels(call)
    if kernels is None:
        runners["kernel-only"] = Skipped("the compiled backend is not active")
    else:
        def kernel_only():
            for _ in range(CALLS):
                for fn, args in kernels:
                    fn(*args)

        runners["kernel-only"] = Runner(kernel_only)   # returns None: nothing to verify
    return runners


class _Recording:
    """A compiled module whose functions record each call (function, arguments)."""

    def __init__(self, module, calls):
        self._module, self._calls = module, calls

    def __getattr__(self, name):
        fn = getattr(self._module, name)

        def record(*args):
            self._calls.append((fn, args))
            return fn(*args)
        return record


def _recorded_kernels(call):
    """[(kernel, arguments)] of the compiled kernels one call of `call` runs (outputs and
    thread count included), or None on the python backend."""
    if not _dispatch.use_compiled():
        return None
    calls = []
    real = _dispatch.ext_module
    _dispatch.ext_module = lambda family: _Recording(real(family), calls)
    try:
        call()
    finally:
        _dispatch.ext_module = real
    return calls


# ---- the four calls ---------------------------------------------------------------------------

def _rand(dtype, seed):
    rng = np.random.default_rng(seed)
    return lambda *shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(dtype)


def _selective(dtype, Dm, N):
    r = _rand(dtype, 1)
    x, dt, A = r(1, 1, Dm), r(1, 1, Dm), -np.exp(r(Dm, N, scale=0.5))
    B, C, D, bias = r(1, 1, N), r(1, 1, N), r(Dm), r(Dm)
    return lambda: ss.selective_scan(x, dt, A, B, C, D, dt_bias=bias, dt_softplus=True)


def _ssd(dtype, NH, P, N):
    r = _rand(dtype, 2)
    x, dt, A = r(1, 1, NH, P), r(1, 1, NH), -np.exp(r(NH, scale=0.5))
    B, C, D, bias = r(1, 1, N), r(1, 1, N), r(NH), r(NH)
    return lambda: ss.ssd(x, dt, A, B, C, D=D, dt_bias=bias, dt_softplus=True)


def _linear_attention(dtype, NH, d):
    r = _rand(dtype, 3)
    q, k, v = r(1, NH, 1, d), r(1, NH, 1, d), r(1, NH, 1, d)
    return lambda: ss.linear_attention(q, k, v)


def _lstm(dtype, H, I):
    r = _rand(dtype, 4)
    x, W, R, b = r(1, 1, I), r(4 * H, I, scale=0.2), r(4 * H, H, scale=0.2), r(4 * H)
    return lambda: ss.lstm(x, W, R, b)


_CASES = [("selective_scan", {"Dm": 64, "N": 16}, _selective),
          ("ssd", {"NH": 4, "P": 16, "N": 16}, _ssd),
          ("linear_attention", {"NH": 1, "d": 16}, _linear_attention),
          ("lstm", {"H": 32, "I": 32}, _lstm)]
