"""Fixtures shared by every test file (helper functions: tests/_helpers.py)."""
import os
import tempfile

import pytest

import statescan as ss
from statescan import _dispatch, _threads
# Re-exported: test files written before tests/_helpers.py import these from conftest.
from _helpers import (  # noqa: F401
    CELLS,
    CELL_SIZES,
    FNS,
    STATE_NAMES,
    TOL,
    Problem,
    make_problem,
    state_parts,
    flat_outputs,
    assert_close,
    assert_all_close,
    assert_all_equal,
    using_backend,
    using_threads,
    on_backends,
    random_cotangent,
    vjp_grads,
)

# A tuning cache left by statescan.tune() in the user's home would change chunk=None blocks
# (and so rounding): the tests read none (tests/test_tune.py makes its own).
os.environ["STATESCAN_CACHE_DIR"] = os.path.join(tempfile.gettempdir(),
                                                 f"statescan-tests-{os.getpid()}")


@pytest.fixture(autouse=True)
def _restore_backend_and_threads():
    """No test leaks a backend or thread-count change into the next one."""
    backend, threads = ss.backend(), _threads._process_threads
    yield
    _dispatch._state["backend"] = backend
    _threads._process_threads = threads


@pytest.fixture(params=["compiled", "python"])
def backend(request):
    """Run the test on each backend."""
    ss.set_backend(request.param)
    return request.param


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=400,
                     help="examples for tests/test_fuzz.py (CI: a few hundred; long runs: 20000)")
