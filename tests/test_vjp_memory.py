"""The bounded-memory vjp of the RNN cells (statescan._cell_checkpoint): time blocks with
recomputation give the unblocked outputs bit for bit and its gradients to rounding, for
every cell and every way of running one; and its peak memory stays a few outputs' worth."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import statescan as ss
from statescan import _cell_call, _cell_checkpoint
from statescan._cells import CELLS as REGISTRY
from _helpers import (CELLS, assert_all_close, assert_all_equal, flat_outputs, make_problem,
                      random_cotangent, state_parts, using_threads)

B, T = 3, 7
CASES = [
    ("plain", dict(), dict()),
    ("state", dict(state=True), dict()),
    ("heads2_state", dict(heads=2, state=True), dict()),
    ("W_none_no_b", dict(W=False, b=False, state=True), dict()),
    ("lengths", dict(state=True), dict(lengths=[7, 0, 4])),
    ("reset", dict(state=True), dict(reset="some")),
    ("lengths_reset", dict(), dict(lengths=[5, 7, 1], reset="some")),
    ("reverse", dict(state=True), dict(reverse=True)),
    ("reverse_reset", dict(state=True), dict(reverse=True, reset="some")),
]


def _kwargs(p, extra):
    kw = p.kwargs()
    kw.update(extra)
    if kw.get("reset") == "some":
        reset = np.zeros((B, T), bool)
        reset[0, 3] = reset[1, 1] = reset[1, 5] = reset[2, 6] = True
        kw["reset"] = reset
    return kw


def _run(p, kw, blocked, monkeypatch):
    """(out, grads, number of blocked vjp calls) of statescan.vjp with blocking on or off."""
    monkeypatch.setattr(_cell_checkpoint, "THRESHOLD_BYTES", 0 if blocked else 1 << 62)
    calls = []
    real = _cell_checkpoint.vjp

    def spy(call):
        calls.append(call)
        return real(call)

    monkeypatch.setattr(_cell_checkpoint, "vjp", spy)
    out, pb = ss.vjp(p.fn, *p.args(), **kw)
    grads = pb(random_cotangent(p.cell, out, seed=2))
    return out, grads, len(calls)


@pytest.mark.parametrize("blocks", [3, 16])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("cell", CELLS)
def test_blocked_vjp_equals_unblocked(cell, case, blocks, backend, monkeypatch):
    monkeypatch.setattr(_cell_checkpoint, "BLOCKS", blocks)     # 3: uneven blocks of 3, 3, 1
    p = make_problem(cell, B=B, T=T, I=3, H=4, **case[1])
    kw = _kwargs(p, case[2])
    out_b, grads_b, n_blocked = _run(p, kw, True, monkeypatch)
    out_u, grads_u, n_unblocked = _run(p, kw, False, monkeypatch)
    assert (n_blocked, n_unblocked) == (1, 0)
    assert_all_equal(flat_outputs(cell, out_b), flat_outputs(cell, out_u), "outputs")
    assert_all_equal(flat_outputs(cell, out_b), flat_outputs(cell, p.fn(*p.args(), **kw)),
                     "outputs vs the plain call")
    assert len(grads_b) == len(grads_u)
    assert_all_close(list(grads_b), list(grads_u), what=f"{cell} {case[0]} grads")


@pytest.mark.parametrize("cell", CELLS)
def test_blocked_vjp_equals_unblocked_float32(cell, backend, monkeypatch):
    monkeypatch.setattr(_cell_checkpoint, "BLOCKS", 3)
    p = make_problem(cell, B=B, T=T, I=3, H=4, dtype=np.float32, state=True)
    kw = _kwargs(p, dict(lengths=[5, 7, 1], reset="some"))
    out_b, grads_b, n_blocked = _run(p, kw, True, monkeypatch)
    out_u, grads_u, _ = _run(p, kw, False, monkeypatch)
    assert n_blocked == 1
    assert_all_equal(flat_outputs(cell, out_b), flat_outputs(cell, out_u))
    assert_all_close(list(grads_b), list(grads_u), what=f"{cell} float32 grads")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocked_vjp_is_the_same_for_any_thread_count(dtype, monkeypatch):
    monkeypatch.setattr(_cell_checkpoint, "BLOCKS", 3)
    p = make_problem("lstm", B=5, T=T, I=3, H=8, heads=2, dtype=dtype, state=True)
    results = []
    for n in (1, 2):
        with using_threads(n):
            out, grads, n_blocked = _run(p, p.kwargs(), True, monkeypatch)
        assert n_blocked == 1
        results.append(flat_outputs("lstm", out) + tuple(grads[:5]) + grads[5])
    assert_all_equal(results[0], results[1])


@pytest.mark.parametrize("cell", CELLS)
def test_reverse_with_lengths_keeps_the_unblocked_path(cell, monkeypatch):
    p = make_problem(cell, B=B, T=T, I=3, H=4, state=True)
    kw = _kwargs(p, dict(lengths=[7, 2, 0], reverse=True))
    out_b, grads_b, n_blocked = _run(p, kw, True, monkeypatch)
    out_u, grads_u, _ = _run(p, kw, False, monkeypatch)
    assert n_blocked == 0
    assert_all_equal(flat_outputs(cell, out_b), flat_outputs(cell, out_u))
    assert_all_equal(list(grads_b), list(grads_u))


def _loss(p, kw, cot, args, state):
    y, st = p.fn(*args, **dict(kw, state=state))
    dy, dst = cot
    return np.sum(y * dy) + sum(np.sum(s * d) for s, d in zip(state_parts(p.cell, st),
                                                               state_parts(p.cell, dst)))


@pytest.mark.parametrize("cell", CELLS)
def test_blocked_gradients_match_finite_differences(cell, backend, monkeypatch):
    """A directional derivative of sum(y*dy) + sum(state*dstate) along a random direction
    of every argument at once, against the blocked pullback (float64 central differences)."""
    monkeypatch.setattr(_cell_checkpoint, "BLOCKS", 3)
    p = make_problem(cell, B=B, T=T, I=3, H=4, state=True)
    kw = _kwargs(p, dict(lengths=[7, 5, 2], reset="some"))
    out, grads, n_blocked = _run(p, kw, True, monkeypatch)
    assert n_blocked == 1
    cot = random_cotangent(cell, out, seed=2)
    args, parts = list(p.args()), list(state_parts(cell, p.state))
    rng = np.random.default_rng(7)
    dirs = [rng.standard_normal(a.shape) for a in args + parts]
    predicted = sum(np.sum(g * d) for g, d in
                    zip(list(grads[:5]) + list(state_parts(cell, grads[-1])), dirs))

    def shifted(eps):
        moved = [a + eps * d for a, d in zip(args + parts, dirs)]
        st = moved[5] if len(parts) == 1 else tuple(moved[5:])
        return _loss(p, kw, cot, moved[:5], st)

    eps = 1e-6
    fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
    assert abs(predicted - fd) <= 1e-6 * max(1.0, abs(fd)), (predicted, fd)


def test_small_calls_keep_the_unblocked_path():
    p = make_problem("lstm", B=2, T=50, I=8, H=16)
    call = _cell_call.prepare(REGISTRY["lstm"], *p.args(), 1, None)
    assert not _cell_checkpoint.applies(call)


_PEAK_SCRIPT = textwrap.dedent("""
    import numpy as np, statescan as ss
    from statescan import _memory
    B, T, H, dt = {B}, {T}, {H}, np.float32
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, H), dtype=dt)
    W = rng.standard_normal((4 * H, H), dtype=dt) / H ** 0.5
    R = rng.standard_normal((4 * H, H), dtype=dt) / H ** 0.5
    dy = rng.standard_normal((B, T, H), dtype=dt)
    _memory.set_cache_limit(0)          # freed kernel blocks go back to the system at once
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    open("/proc/self/clear_refs", "w").write("5")       # reset the RSS high-water mark
    base = status("VmRSS:")
    out, pullback = ss.vjp(ss.lstm, x, W, R)
    grads = pullback((dy, None))
    print((status("VmHWM:") - base) / dy.nbytes)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),   # tools/asan.sh
                    reason="RSS would measure the AddressSanitizer allocator's redzones and "
                           "quarantine, not statescan's memory")
def test_lstm_vjp_peak_memory_is_a_few_outputs():
    """vjp + pullback of an LSTM with a 48 MiB output: the peak RSS increase (y, dx and one
    time block's buffers) stays under 5 outputs; unblocked it was about 15."""
    script = _PEAK_SCRIPT.format(B=48, T=2048, H=128)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    ratio = float(run.stdout.split()[-1])
    assert ratio <= 5.0, f"peak memory {ratio:.2f} x the output"
