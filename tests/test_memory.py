"""The block cache behind statescan's large arrays (statescan._memory)."""
import gc

import numpy as np
import pytest

from statescan import _memory


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cached_arrays_behave_like_numpy_arrays_and_outlive_their_views(dtype):
    a = _memory.empty((300, 700), dtype)
    assert a.shape == (300, 700) and a.dtype == dtype and a.flags.c_contiguous
    a[:] = np.arange(700, dtype=dtype)
    view = a[5:7]
    del a
    gc.collect()
    b = _memory.empty((300, 700), dtype)        # may reuse a block, but never the live one
    b.fill(-1)
    assert np.array_equal(view, np.broadcast_to(np.arange(700, dtype=dtype), (2, 700)))
    z = _memory.zeros((257, 513), dtype)
    assert not z.any()


def test_cache_limit_releases_free_blocks():
    old = _memory.set_cache_limit(1 << 30)
    try:
        a = _memory.empty((1 << 20,), np.float64)
        del a
        gc.collect()
        _memory.set_cache_limit(0)
        if _memory._POOL is not None:
            assert _memory._POOL.cached_bytes() == 0
    finally:
        _memory.set_cache_limit(old)
