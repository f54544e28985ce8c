"""Thread control: the process count, the per-thread context manager, OMP_NUM_THREADS and the
threadpoolctl controller."""
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import statescan as ss
from statescan import _threads


def _python(code, **env):
    """Run `code` in a fresh interpreter with extra environment variables; its stdout."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_set_num_threads_none_restores_the_default(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    default = _threads._default_threads()
    ss.set_num_threads(3)
    assert ss.get_num_threads() == 3
    ss.set_num_threads(None)
    assert ss.get_num_threads() == default
    monkeypatch.setenv("OMP_NUM_THREADS", "5")       # read again by set_num_threads(None)
    ss.set_num_threads(None)
    assert ss.get_num_threads() == 5


@pytest.mark.parametrize("bad", [2.7, 2.0, True, False, "2", None.__class__])
def test_set_num_threads_rejects_non_integers(bad):
    before = ss.get_num_threads()
    with pytest.raises(TypeError, match="n must be an integer"):
        ss.set_num_threads(bad)
    with pytest.raises(TypeError, match="n must be an integer"):
        with ss.threads(bad):
            pass
    assert ss.get_num_threads() == before


def test_set_num_threads_rejects_counts_below_one_and_takes_numpy_integers():
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        ss.set_num_threads(0)
    with pytest.raises(ValueError, match="n must be >= 1, got -2"):
        ss.threads(-2).__enter__()
    ss.set_num_threads(np.int64(2))
    assert ss.get_num_threads() == 2 and type(ss.get_num_threads()) is int


def test_threads_context_nests_and_restores_on_error():
    ss.set_num_threads(2)
    with ss.threads(1):
        assert ss.get_num_threads() == 1
        with ss.threads(3):
            assert ss.get_num_threads() == 3
        with ss.threads(None):               # the process count inside
            assert ss.get_num_threads() == 2
        assert ss.get_num_threads() == 1
    assert ss.get_num_threads() == 2
    with pytest.raises(RuntimeError):
        with ss.threads(1):
            raise RuntimeError
    assert ss.get_num_threads() == 2

    @ss.threads(1)
    def count():
        return ss.get_num_threads()
    assert count() == 1 and ss.get_num_threads() == 2


def test_threads_context_wins_over_set_num_threads_inside_the_block():
    with ss.threads(1):
        ss.set_num_threads(4)
        assert ss.get_num_threads() == 1
    assert ss.get_num_threads() == 4


def test_threads_in_one_python_thread_does_not_change_another():
    ss.set_num_threads(2)
    inside, entered, checked = {}, threading.Event(), threading.Event()

    def limited():
        with ss.threads(1):
            entered.set()
            inside["limited"] = ss.get_num_threads()
            checked.wait(30)

    def other():
        entered.wait(30)
        inside["other"] = ss.get_num_threads()
        # and a kernel call there still works with the process count
        x = np.ones((2, 5, 3), np.float32)
        inside["y"] = ss.linear_scan(x * 0.5, x)
        checked.set()

    workers = [threading.Thread(target=limited), threading.Thread(target=other)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert inside["limited"] == 1 and inside["other"] == 2
    assert ss.get_num_threads() == 2


def test_omp_num_threads_is_read_at_import():
    code = "import statescan as ss; print(ss.get_num_threads())"
    assert _python(code, OMP_NUM_THREADS="3") == "3"
    assert _python(code, OMP_NUM_THREADS="4,2") == "4"       # nested lists: the outer count
    fallback = _python("import os, statescan as ss; "
                       "print(ss.get_num_threads() == len(os.sched_getaffinity(0)))",
                       OMP_NUM_THREADS="lots")
    assert fallback == "True"


# ---- threadpoolctl ---------------------------------------------------------------------------

threadpoolctl = pytest.importorskip("threadpoolctl")


def _statescan_pools():
    return [p for p in threadpoolctl.threadpool_info() if p["internal_api"] == "statescan"]


@pytest.mark.skipif(not ss.build_info()["variant"], reason="compiled kernels not built")
def test_threadpool_info_lists_statescan():
    ss.set_num_threads(2)
    (pool,) = _statescan_pools()                     # the portable module only, not native
    assert pool["user_api"] == "openmp" and pool["num_threads"] == 2
    assert pool["version"] == ss.__version__
    assert os.path.basename(pool["filepath"]).startswith("_cpu.")


@pytest.mark.skipif(not ss.build_info()["variant"], reason="compiled kernels not built")
def test_threadpool_limits_limits_statescan_and_restores():
    ss.set_num_threads(2)
    with threadpoolctl.threadpool_limits(1):
        assert ss.get_num_threads() == 1
        assert _statescan_pools()[0]["num_threads"] == 1
    assert ss.get_num_threads() == 2
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert ss.get_num_threads() == 1
    # the limit was lifted, not frozen at 2: the thread follows the process setting again
    ss.set_num_threads(3)
    assert ss.get_num_threads() == 3
    with threadpoolctl.threadpool_limits(1, user_api="blas"):    # BLAS only
        assert ss.get_num_threads() == 3


@pytest.mark.skipif(not ss.build_info()["variant"], reason="compiled kernels not built")
def test_threadpool_limits_one_runs_a_kernel_on_one_core():
    # One thread can burn at most wall-clock time of CPU; two busy threads would burn ~2x.
    ss.set_num_threads(2)
    rng = np.random.default_rng(0)
    B, T, Dm, N = 16, 300, 1024, 16
    x = rng.standard_normal((B, T, Dm), dtype=np.float32)
    dt = rng.uniform(0.01, 0.1, (B, T, Dm)).astype(np.float32)
    A = -rng.uniform(0.5, 1.5, (Dm, N)).astype(np.float32)
    Bm, Cm = (rng.standard_normal((B, T, N), dtype=np.float32) for _ in range(2))
    expected = ss.selective_scan(x, dt, A, Bm, Cm)[0]
    with threadpoolctl.threadpool_limits(1):
        wall, cpu = time.perf_counter(), time.process_time()
        y = ss.selective_scan(x, dt, A, Bm, Cm)[0]
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert cpu <= 1.15 * wall + 0.02, (cpu, wall)
    assert np.array_equal(y, expected)               # the count never changes results


def test_statescan_imports_without_threadpoolctl():
    code = """
        import sys
        sys.modules["threadpoolctl"] = None         # as if not installed
        import numpy as np, statescan as ss
        from statescan import _threads
        with ss.threads(1):
            y = ss.linear_scan(np.full((1, 3, 2), 0.5), np.ones((1, 3, 2)))
        print(_threads._CONTROLLER is None, float(y[0, -1, 0]))
    """
    assert _python(code) == "True 1.75"
