"""Robustness: bounded memory over many calls, Python threads calling kernels concurrently,
MemoryError (not a crash) for impossible sizes, pickling of stream objects.

The memory and resource-limit checks run in a subprocess so that they measure (and limit) a
fresh interpreter, and a crash fails the test instead of killing the run.
"""
import os
import pickle
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import statescan as ss


# Under tools/asan.sh the sanitizer's allocator (redzones, quarantine, a shadow of the address
# space) is what RSS and RLIMIT_AS would measure, not statescan's memory.
_SANITIZED = pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                                reason="memory use of the AddressSanitizer runtime")


def _run_script(code, timeout=300):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (f"exit code {proc.returncode}\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-3000:]}")
    return proc.stdout


@_SANITIZED
def test_rss_flat_over_many_small_calls():
    out = _run_script("""
        import numpy as np, statescan as ss

        def rss_mb():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096 / 2**20

        rng = np.random.default_rng(0)
        f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
        x, W, R, b = f32(1, 1, 8), f32(32, 8), f32(32, 8), f32(32)
        a, u = np.full((1, 1, 16), 0.9, np.float32), f32(1, 1, 16)
        sx, sdt, sA, sB, sC = f32(1, 1, 8), np.abs(f32(1, 1, 8)), -np.abs(f32(8, 4)), f32(1, 1, 4), f32(1, 1, 4)
        q = f32(1, 2, 1, 4)
        step = ss.stream(ss.lstm, W, R, b)

        def calls(n):
            state = None
            for _ in range(n):
                y, state = ss.lstm(x, W, R, b, state=state)
                ss.linear_scan(a, u)
                ss.selective_scan(sx, sdt, sA, sB, sC)
                ss.linear_attention(q, q, q)
                y, _ = step(x, None)
                out, pullback = ss.vjp(ss.lstm, x, W, R, b)
                pullback((y, None))

        calls(2000)                       # warm up: caches, pools, lazy imports
        before = rss_mb()
        calls(100000 // 6)                # 10^5 kernel calls in all
        print(before, rss_mb())
    """)
    before, after = map(float, out.split())
    assert after - before < 16, f"RSS grew from {before:.1f} MB to {after:.1f} MB"


def _thread_work(seed):
    rng = np.random.default_rng(seed)
    f64 = lambda *s: rng.standard_normal(s)
    x, W, R, b = f64(3, 20, 5), f64(16, 5) * 0.3, f64(16, 4) * 0.3, f64(16)
    sx, sdt, sA = f64(2, 30, 6), np.abs(f64(2, 30, 6)), -np.abs(f64(6, 3))
    sB, sC = f64(2, 30, 3), f64(2, 30, 3)
    return x, (W, R, b), (sx, sdt, sA, sB, sC)


def test_eight_python_threads_bit_identical():
    shared_W = _thread_work(99)[1]
    shared = ss.stream(ss.lstm, *shared_W)
    inputs = [_thread_work(i) for i in range(8)]

    def compute(x, weights, scan_args):
        outs = []
        for _ in range(25):
            outs.append(ss.lstm(x, *weights))
            outs.append(ss.selective_scan(*scan_args))
            y, s = shared(x[:, :10], None)
            y2, s2 = shared(x[:, 10:], s)              # continue from this thread's own state
            outs.append((y, y2, s2))
        return outs

    expected = [compute(*args) for args in inputs]
    results = [None] * 8
    errors = []

    def worker(i):
        try:
            results[i] = compute(*inputs[i])
        except Exception as exc:     # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, expected):
        flat_got = _flatten(got)
        flat_want = _flatten(want)
        assert len(flat_got) == len(flat_want)
        assert all(np.array_equal(g, w) for g, w in zip(flat_got, flat_want))


def _flatten(value):
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in _flatten(v)]
    return [value]


@_SANITIZED
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is Linux's")
def test_impossible_sizes_raise_memory_error():
    out = _run_script("""
        import resource
        import numpy as np, statescan as ss
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
        big = lambda *shape: np.broadcast_to(np.float32(0.5), shape)   # no memory behind it
        calls = {
            "lstm": lambda: ss.lstm(big(16, 2**16, 8), big(4 * 1024, 8), big(4 * 1024, 1024)),
            "linear_scan": lambda: ss.linear_scan(big(64, 2**16, 1024), big(64, 2**16, 1024)),
            "selective_scan": lambda: ss.selective_scan(
                big(8, 2**14, 4096), big(8, 2**14, 4096), -big(4096, 16),
                big(8, 2**14, 16), big(8, 2**14, 16)),
            "linear_attention": lambda: ss.linear_attention(
                big(16, 16, 2**14, 64), big(16, 16, 2**14, 64), big(16, 16, 2**14, 64)),
            "attention": lambda: ss.attention(
                big(16, 16, 2**14, 64), big(16, 16, 2**14, 64), big(16, 16, 2**14, 64)),
        }
        if hasattr(ss, "causal_conv1d"):
            calls["causal_conv1d"] = lambda: ss.causal_conv1d(big(64, 2**16, 1024), big(1024, 4))
        for name, call in calls.items():
            for backend in ("compiled", "python"):
                ss.set_backend(backend)
                try:
                    call()
                except MemoryError:
                    continue
                raise SystemExit(f"{name} ({backend}) did not raise MemoryError")
        print("ok")
    """)
    assert out.strip() == "ok"


@_SANITIZED
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is Linux's")
def test_memory_error_names_the_array():
    """An output that cannot be allocated raises MemoryError at once (before any step runs),
    naming the array, its shape and its size (compiled backend: the numpy references
    allocate with numpy's own message)."""
    out = _run_script("""
        import resource
        import numpy as np, statescan as ss
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
        big = lambda *shape: np.broadcast_to(np.float32(0.5), shape)   # no memory behind it
        try:
            ss.lstm(big(16, 2**16, 8), big(4 * 1024, 8), big(4 * 1024, 1024))
        except MemoryError as e:
            print(e)
    """)
    assert out.strip() == (f"y [1, B, T, H] of shape [1, 16, 65536, 1024] (float32) needs "
                           f"{2**32} bytes, more than can be allocated")


@pytest.mark.parametrize("cell", ["lstm", "gru", "elman", "slstm"])
def test_stream_pickles(cell):
    G = {"lstm": 4, "gru": 3, "elman": 1, "slstm": 4}[cell]
    rng = np.random.default_rng(0)
    W, R, b = rng.standard_normal((G * 8, 3)), 0.3 * rng.standard_normal((G * 8, 8)), \
        rng.standard_normal(G * 8)
    step = ss.stream(getattr(ss, cell), W, R, b)
    x = rng.standard_normal((2, 5, 3))
    clone = pickle.loads(pickle.dumps(step))
    a, b_ = step(x), clone(x)
    assert all(np.array_equal(p, q) for p, q in zip(_flatten(a), _flatten(b_)))
