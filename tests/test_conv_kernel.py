"""causal_conv1d's compiled kernels against the numpy reference (forward, decode step, vjp),
with lengths and resets, on shapes with several channel blocks per row; results independent
of the thread count; decoding token by token equals one prefill call on large shapes."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import statescan as ss
from conftest import assert_all_close, assert_all_equal, on_backends, using_threads

DTYPES = (np.float64, np.float32)


def call_args(B, T, C, K, dtype, seed=0, *, bias=True, varlen=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, C)).astype(dtype)
    w = (rng.standard_normal((C, K)) / np.sqrt(K)).astype(dtype)
    b = rng.standard_normal(C).astype(dtype) if bias else None
    kw = {"state": rng.standard_normal((B, C, K - 1)).astype(dtype)}
    if varlen:
        kw["lengths"] = rng.integers(0, T + 1, B)
        kw["reset"] = rng.random((B, T)) < 0.15
    return (x, w, b), kw


def forward_and_grads(args, kw, seed=1):
    (y, st), pullback = ss.vjp(ss.causal_conv1d, *args, **kw)
    rng = np.random.default_rng(seed)
    grads = pullback((rng.standard_normal(y.shape).astype(y.dtype),
                      rng.standard_normal(st.shape).astype(st.dtype)))
    return (y, st) + tuple(grads)


SHAPES = [(3, 17, 37, 4), (2, 9, 700, 3), (1, 5, 1100, 4), (4, 6, 20, 1), (2, 3, 8, 6)]


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_matches_reference(shape, dtype, varlen, activation):
    args, kw = call_args(*shape, dtype, varlen=varlen)
    kw["activation"] = activation
    out = on_backends(forward_and_grads, args, kw)
    assert_all_close(out["compiled"], out["python"], dtype)
    assert_all_equal(out["compiled"][:2], ss.causal_conv1d(*args, **kw))


@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_without_bias_matches_reference(dtype):
    args, kw = call_args(2, 7, 40, 4, dtype, bias=False, varlen=True)
    out = on_backends(forward_and_grads, args, kw)
    assert_all_close(out["compiled"], out["python"], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_step_matches_reference(dtype):
    args, kw = call_args(3, 1, 300, 4, dtype)
    kw["activation"] = "silu"
    out = on_backends(lambda: ss.causal_conv1d(*args, **kw))
    assert_all_close(out["compiled"], out["python"], dtype)


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_and_two_threads_bit_identical(dtype, varlen):
    args, kw = call_args(3, 64, 1100, 4, dtype, varlen=varlen)
    kw["activation"] = "silu"
    step_args, step_kw = call_args(64, 1, 1100, 4, dtype, seed=2)
    out = {}
    for n in (1, 2):
        with using_threads(n):
            out[n] = forward_and_grads(args, kw) + ss.causal_conv1d(*step_args, **step_kw)
    assert_all_equal(out[2], out[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_by_token_equals_prefill_on_a_mamba_shape(dtype):
    (x, w, b), kw = call_args(2, 12, 1536, 4, dtype)
    y, st = ss.causal_conv1d(x, w, b, activation="silu", state=kw["state"])
    y0, cache = ss.causal_conv1d(x[:, :5], w, b, activation="silu", state=kw["state"])
    ys = [y0]
    for t in range(5, 12):
        yt, cache = ss.causal_conv1d(x[:, t:t + 1], w, b, activation="silu", state=cache,
                                     out_state=cache)
        ys.append(yt)
    assert_all_equal([np.concatenate(ys, axis=1), cache], [y, st])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(0, 3), T=st.integers(0, 9), C=st.integers(0, 40), K=st.integers(1, 5),
       silu=st.booleans(), bias=st.booleans(), varlen=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_random_calls_match_reference(B, T, C, K, silu, bias, varlen, dtype, seed):
    args, kw = call_args(B, T, C, K, dtype, seed, bias=bias, varlen=varlen)
    kw["activation"] = "silu" if silu else None
    out = on_backends(forward_and_grads, args, kw)
    assert_all_close(out["compiled"], out["python"], dtype)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 12), cuts=st.lists(st.integers(0, 12), max_size=4),
       K=st.integers(1, 5), seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES))
def test_random_chunkings_with_resets_equal_one_call(T, cuts, K, seed, dtype):
    (x, w, b), kw = call_args(2, T, 19, K, dtype, seed)
    reset = np.random.default_rng(seed).random((2, T)) < 0.2
    whole = ss.causal_conv1d(x, w, b, activation="silu", state=kw["state"], reset=reset)
    bounds = sorted({0, T} | {min(c, T) for c in cuts})
    ys, state = [], kw["state"]
    for a, e in zip(bounds[:-1], bounds[1:]):
        y, state = ss.causal_conv1d(x[:, a:e], w, b, activation="silu", state=state,
                                    reset=reset[:, a:e])
        ys.append(y)
    assert_all_equal([np.concatenate(ys, axis=1), state], list(whole))


def test_vjp_with_out_state_aliasing_state():
    args, kw = call_args(2, 6, 30, 4, np.float64)
    want = forward_and_grads(args, kw)
    state = kw["state"].copy()
    got = forward_and_grads(args, dict(kw, state=state, out_state=state))
    assert_all_equal(got, want)
    assert_all_equal([state], [want[1]])


@pytest.mark.torch
def test_bench_family_runs_and_agrees_with_its_peers():
    pytest.importorskip("torch")
    from statescan._bench import conv_cases, core
    core.configure(1, None)
    cases = [c for c in conv_cases.cases(quick=True) if c.dtype == "float32"]
    assert {c.name for c in cases} == {"causal_conv1d", "causal_conv1d-decode"}
    for case in cases:
        result = core.run_case(case, budget=0.0)
        assert result.error is None and not result.skipped, (case.id, result.skipped)
        assert set(result.runs) == {"statescan", "numpy-ref", "torch"}
        assert all(m.ok for name, m in result.runs.items() if name != "statescan"), case.id
