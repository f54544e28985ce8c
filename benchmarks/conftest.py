"""pytest-benchmark suites: ``python -m pytest benchmarks/ --benchmark-only``.

Not collected by the main test run (``testpaths = tests``).  Everything runs on one thread
(statescan and numpy's BLAS) so numbers compare across runs; ``statescan bench`` is the
peer comparison.
"""
import numpy as np
import pytest

import statescan
from statescan._bench import machine


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    statescan.set_num_threads(1)
    machine.set_blas_threads(1)


@pytest.fixture
def kernel():
    """kernel(name) -> statescan.<name>, skipping the test when it does not exist (yet)."""
    def get(name):
        fn = getattr(statescan, name, None)
        if fn is None:
            pytest.skip(f"statescan.{name} is not available")
        return fn
    return get


@pytest.fixture
def rand():
    """rand(*shape, dtype=, scale=) -> a reproducible standard-normal array."""
    rng = np.random.default_rng(0)

    def make(*shape, dtype="float32", scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(dtype)
    return make
