"""statescan._blas: the first product that keeps OpenBLAS out of its slow state runs on one BLAS
thread and leaves every library's thread count as it found it."""
import pytest

from statescan import _blas

threadpoolctl = pytest.importorskip("threadpoolctl")


def _blas_threads():
    return [(i["filepath"], i["num_threads"]) for i in threadpoolctl.threadpool_info()
            if i["user_api"] == "blas"]


def test_one_thread_inside_and_counts_restored_after():
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        assert before, "no BLAS library found"
        with _blas._one_thread():
            assert all(n == 1 for _, n in _blas_threads())
        assert _blas_threads() == before


def test_prepare_runs_once(monkeypatch):
    monkeypatch.setattr(_blas, "_prepared", False)
    entered = []
    real = _blas._one_thread
    monkeypatch.setattr(_blas, "_one_thread", lambda: entered.append(1) or real())
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        _blas.prepare()
        _blas.prepare()
        assert _blas_threads() == before
    assert entered == [1]


def test_set_threads_reaches_numpys_blas():
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        assert _blas.set_threads(1)
        assert all(n == 1 for _, n in _blas_threads())
