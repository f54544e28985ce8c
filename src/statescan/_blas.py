"""numpy's BLAS as statescan's gradients use it.

OpenBLAS (0.3.30 and 0.3.31, numpy 2.4's and scipy's wheels) on an AMD EPYC of the first Zen
generation ran float32 products with 256 output columns and a long inner dimension -- the
parameter gradients' shapes, e.g. dx = dgx W at H = 256 -- at a third of its speed (12 against
35 GFLOP/s on one thread) in every process until that process had run one product of 512 output
columns or more; from then on they ran at full speed, with the same bits.  :func:`prepare` runs
such a product (0.3 ms) once per process before the first gradients.
"""
import numpy as np

_prepared = False


def prepare():
    """Run one small product of 512 output columns if this process has not yet."""
    global _prepared
    if not _prepared:
        np.ones((128, 128), np.float32) @ np.ones((128, 512), np.float32)
        _prepared = True
