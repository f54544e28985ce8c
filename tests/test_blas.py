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


@pytest.mark.parametrize("call", ["ssd", "linear_attention", "selective_scan"])
def test_small_call_fast_paths_prepare(monkeypatch, call):
    # the fast paths of already-valid arrays run their kernels without _dispatch.run: they
    # must prepare the BLAS libraries too (ssd's prefill ran 9% slower without)
    import numpy as np
    import statescan as ss
    from statescan import _dispatch
    if not _dispatch.compiled_available():
        pytest.skip("the compiled kernels are not built")
    monkeypatch.setattr(_blas, "_prepared", False)
    rng = np.random.default_rng(0)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    calls = {
        "ssd": lambda: ss.ssd(r(1, 4, 2, 8), r(1, 4, 2), -np.ones(2, np.float32), r(1, 4, 8),
                              r(1, 4, 8)),
        "linear_attention": lambda: ss.linear_attention(r(1, 2, 4, 8), r(1, 2, 4, 8),
                                                        r(1, 2, 4, 8)),
        "selective_scan": lambda: ss.selective_scan(r(1, 4, 8), np.abs(r(1, 4, 8)), -np.ones(
            (8, 4), np.float32), r(1, 4, 4), r(1, 4, 4)),
    }
    calls[call]()
    assert _blas._prepared


def test_kernel_names_agree_with_threadpoolctl():
    """kernel_names() and avx512_kernels() read OpenBLAS's own kernel names: the same as
    threadpoolctl's "architecture" of every OpenBLAS loaded."""
    names = {str(i.get("architecture")) for i in threadpoolctl.threadpool_info()
             if i["user_api"] == "blas" and i["internal_api"] == "openblas"}
    assert names, "no OpenBLAS found"
    assert _blas.kernel_names() == sorted(names)
    assert _blas.avx512_kernels() == ({n.lower() for n in names} <= _blas._AVX512_CORES)
