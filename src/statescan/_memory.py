"""Allocation of the large arrays statescan's kernels produce.

Arrays come from a cache of mapped blocks (``statescan._ext.pool``) so that repeated calls do
not pay a page fault per 4 KiB of fresh memory; without the compiled extension, plain numpy.
"""
import math

import numpy as np

from . import _dispatch


def _pool():
    try:
        return _dispatch.ext_module("pool")
    except ImportError:
        return None


_POOL = _pool()


def empty(shape, dtype, name=None):
    """numpy.empty(shape, dtype), C order.  `name` ("y [B, T, H]") is what the MemoryError
    of an allocation that cannot succeed calls the array."""
    try:
        return np.empty(shape, dtype) if _POOL is None else _POOL.empty(shape, dtype)
    except MemoryError:
        raise _no_memory(name, shape, dtype) from None


def zeros(shape, dtype, name=None):
    """numpy.zeros(shape, dtype), C order (`name`: as for :func:`empty`)."""
    try:
        return np.zeros(shape, dtype) if _POOL is None else _POOL.zeros(shape, dtype)
    except MemoryError:
        raise _no_memory(name, shape, dtype) from None


def _no_memory(name, shape, dtype):
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    return MemoryError(f"{name or 'an array'} of shape {list(shape)} ({np.dtype(dtype)}) "
                       f"needs {nbytes} bytes, more than can be allocated")


def set_cache_limit(nbytes):
    """Keep at most `nbytes` of freed kernel memory for reuse (0: return it to the system
    at once).  Returns the previous limit.  The default is 256 MiB."""
    return 0 if _POOL is None else _POOL.set_limit(int(nbytes))
