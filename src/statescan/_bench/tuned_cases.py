"""Tuned vs default blocking: each kernel :func:`statescan.tune` tunes, on its default shapes.

``statescan`` runs the kernel as a user calls it (``chunk=None``; the cells' block from the
tuning cache), ``default`` with the automatic value, so the ``default x`` column is the
speed-up the cached choice gives on this machine at the run's thread count (about 1 where
nothing is cached or the default won).  ``tuned=`` in a case's sizes is the cached value
(``auto``: none cached).  Run ``python -c "import statescan; statescan.tune()"`` first.
"""
import numpy as np

import statescan as ss
from statescan import _tuning
from statescan._cells import CELLS as REGISTRY
from statescan.tune import CELLS, rnn_block_supported

from .core import Case

DEFAULT = "default"


def cases(quick):
    out = []
    for dtype in ("float32", "float64"):
        cells = ("lstm",) if quick else CELLS
        shapes = [(1, 256)] if quick else [(B, H) for B in (1, 16, 64) for H in (64, 256, 1024)]
        if rnn_block_supported():
            out += [_cell_case(cell, B, H, dtype, quick) for cell in cells for B, H in shapes]
        out += [_ssd_case(N, dtype, quick) for N in ((128,) if quick else (64, 128))]
        out += [_la_case(d, dtype, quick) for d in ((64,) if quick else (64, 128))]
    return out


def _tuned(kernel, key):
    value = _tuning.lookup(kernel, key)
    return "auto" if value is None else value


def _cell_case(cell, B, H, dtype, quick):
    G = REGISTRY[cell].gates
    per_step = 2.0 * B * G * H * H
    T = int(max(4, min(2048, 2e9 / per_step) // (5 if quick else 1)))
    key = (cell, B, H, 1, dtype, ss.get_num_threads())

    def make():
        rng = np.random.default_rng(B * H)
        x = (0.5 * rng.standard_normal((B, T, G * H))).astype(dtype)
        R = (rng.standard_normal((G * H, H)) / np.sqrt(H)).astype(dtype)
        fn = getattr(ss, cell)

        def default():
            with _tuning.forcing("rnn", _tuning.AUTOMATIC):
                return fn(x, None, R)
        return {"statescan": lambda: fn(x, None, R), DEFAULT: default}

    return Case("tuned", cell, dict(B=B, H=H, tuned=_tuned("rnn", key)), dtype, T,
                per_step * T, make)


def _ssd_case(N, dtype, quick):
    NH, P, T = 8, 64, 2048 if quick else 8192
    key = (N, P, dtype, ss.get_num_threads())

    def make():
        rng = np.random.default_rng(N)
        x = rng.standard_normal((1, T, NH, P)).astype(dtype)
        dt = rng.uniform(0.01, 0.1, (1, T, NH)).astype(dtype)
        A = -np.linspace(0.5, 4.0, NH).astype(dtype)
        B, C = ((rng.standard_normal((1, T, N)) / np.sqrt(N)).astype(dtype) for _ in range(2))
        auto = _tuning.automatic_chunk("ssd", N, P)
        return {"statescan": lambda: ss.ssd(x, dt, A, B, C),
                DEFAULT: lambda: ss.ssd(x, dt, A, B, C, chunk=auto)}

    return Case("tuned", "ssd", dict(NH=NH, P=P, N=N, tuned=_tuned("ssd", key)), dtype, T,
                0, make)


def _la_case(d, dtype, quick):
    NH, T = 8, 2048 if quick else 8192
    key = (d, d, dtype, ss.get_num_threads())

    def make():
        rng = np.random.default_rng(d)
        q, k = ((rng.standard_normal((1, NH, T, d)) / np.sqrt(d)).astype(dtype)
                for _ in range(2))
        v = rng.standard_normal((1, NH, T, d)).astype(dtype)
        auto = _tuning.automatic_chunk("linear_attention", d, d)
        return {"statescan": lambda: ss.linear_attention(q, k, v, decay=0.99),
                DEFAULT: lambda: ss.linear_attention(q, k, v, decay=0.99, chunk=auto)}

    return Case("tuned", "linear_attention",
                dict(NH=NH, d=d, tuned=_tuned("linear_attention", key)), dtype, T, 0, make)
