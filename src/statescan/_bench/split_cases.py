"""Benchmark family ``split``: one sequence on every core (the column split of the cells).

Batches too small to give every thread its own rows (B=1 at H=256 and 1024, B=4 at H=1024,
one head): the same call with the run's thread count (``statescan``) and with one thread
(``statescan-1t``), in one run, so "statescan-1t x" is the speed-up of the extra threads.
Run it with ``--threads 2`` (or more); with ``--threads 1`` both runners are the same.  The
outputs are compared too: they are bit-identical for any thread count.  On a busy machine a
team hands its job to one thread and the automatic rule stays on one thread for a while (up to
a second), so the ratio there measures that fallback, not the split: check the cpu/wall column.
"""
import numpy as np

import statescan as ss

from .._cells import CELLS
from .core import STATESCAN, Case, Runner

_SHAPES = ((1, 256, 400), (1, 1024, 40), (4, 1024, 40))      # (B, H, T)


def cases(quick):
    out = []
    for dtype in ("float32",) if quick else ("float32", "float64"):
        for cell in ("lstm",) if quick else ("lstm", "gru", "slstm", "elman"):
            for B, H, T in _SHAPES[:1] if quick else _SHAPES:
                G = CELLS[cell].gates
                flops = 2.0 * B * G * H * 2 * H * T            # W x (I = H) and R h per step
                out.append(Case("split", cell, {"B": B, "H": H}, dtype, T, flops,
                                lambda cell=cell, B=B, H=H, T=T, dtype=dtype:
                                _runners(cell, B, H, T, np.dtype(dtype))))
    return out


def _runners(cell, B, H, T, dtype):
    G = CELLS[cell].gates
    rng = np.random.default_rng(B * 31 + H)
    x = rng.standard_normal((B, T, H)).astype(dtype)
    W = (rng.standard_normal((G * H, H)) / np.sqrt(H)).astype(dtype)
    R = (rng.standard_normal((G * H, H)) / np.sqrt(H)).astype(dtype)
    fn = getattr(ss, cell)

    def run():
        return fn(x, W, R)[0]

    def one_thread():
        with ss.threads(1):
            return run()

    return {STATESCAN: run, "statescan-1t": Runner(one_thread)}
