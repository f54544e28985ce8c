"""statescan.tune() and its per-machine cache: the file round trip (not the speed), corrupt
and foreign files ignored, feasible candidates, tuned chunks equal to the explicit ones."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import statescan as ss
from statescan import _caches, _tuning
from _helpers import flat_outputs

SSD_SHAPE = {"B": 1, "T": 24, "NH": 2, "P": 8, "N": 8}
LA_SHAPE = {"B": 1, "NH": 2, "T": 24, "dk": 8, "dv": 4}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty cache directory for this test; the table in use is read from it."""
    monkeypatch.setenv("STATESCAN_CACHE_DIR", str(tmp_path))
    _tuning.reload()
    yield tmp_path
    _tuning.reload()


def _ssd_inputs(rng, dtype=np.float64, **sizes):
    s = dict(SSD_SHAPE, **sizes)
    B, T, NH, P, N = (s[n] for n in ("B", "T", "NH", "P", "N"))
    return (rng.standard_normal((B, T, NH, P)).astype(dtype),
            rng.uniform(0.01, 0.5, (B, T, NH)).astype(dtype),
            -rng.uniform(0.5, 2.0, NH).astype(dtype),
            rng.standard_normal((B, T, N)).astype(dtype),
            rng.standard_normal((B, T, N)).astype(dtype))


def _la_inputs(rng, dtype=np.float64):
    B, NH, T, dk, dv = (LA_SHAPE[n] for n in ("B", "NH", "T", "dk", "dv"))
    return tuple(rng.standard_normal((B, NH, T, d)).astype(dtype) for d in (dk, dk, dv))


def _key(kernel, dtype="float64"):
    if kernel == "ssd":
        return [SSD_SHAPE["N"], SSD_SHAPE["P"], dtype, ss.get_num_threads()]
    return [LA_SHAPE["dk"], LA_SHAPE["dv"], dtype, ss.get_num_threads()]


def _fresh_lookup(cache, kernel, key):
    """lookup(kernel, key) in a new interpreter reading `cache` (warnings are errors)."""
    code = ("import warnings, json, sys; warnings.simplefilter('error');"
            "from statescan import _tuning;"
            f"print(json.dumps(_tuning.lookup({kernel!r}, tuple(json.loads(sys.argv[1])))))")
    env = dict(os.environ, STATESCAN_CACHE_DIR=str(cache))
    done = subprocess.run([sys.executable, "-c", code, json.dumps(key)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(ss.backend() != "compiled", reason="tune() times the compiled kernels")
def test_tune_writes_a_cache_that_a_new_process_reads(cache_dir):
    report = ss.tune(["ssd", "linear_attention"], {"ssd": [SSD_SHAPE], "linear_attention":
                                                   [LA_SHAPE]}, dtype="float64", repeat=3)
    assert report["cache"] == _tuning.cache_path()
    assert os.path.dirname(report["cache"]) == str(cache_dir)
    assert [r["kernel"] for r in report["results"]] == ["ssd", "linear_attention"]
    for record in report["results"]:
        key = _key(record["kernel"])
        assert record["key"] == key
        assert record["default"] == _tuning.candidates(record["kernel"], key)[0]
        assert str(record["value"]) in record["seconds"] and record["speedup"] >= 1.0
        assert record["noise"] >= 0 and record["clock"] in ("thread cpu", "wall")
        assert set(record["seconds"]) == {str(c) for c in
                                          _tuning.candidates(record["kernel"], key)}
        assert _tuning.lookup(record["kernel"], tuple(key)) == record["value"]
        assert _fresh_lookup(cache_dir, record["kernel"], key) == record["value"]
    assert not list(cache_dir.glob(".tuning-*"))          # the temp file was renamed


def test_a_stored_choice_is_used_by_the_next_import(cache_dir):
    # a value that is never the automatic one, so the round trip cannot pass by default
    _tuning.store([{"kernel": "ssd", "key": _key("ssd", "float32"), "value": 16}])
    # the same thread count as here (a pinned parent would give the child another default)
    code = ("import numpy as np; from statescan import _tuning; import statescan as ss;"
            f"ss.set_num_threads({ss.get_num_threads()});"
            f"print(_tuning.chunk('ssd', {SSD_SHAPE['N']}, {SSD_SHAPE['P']},"
            "np.dtype('float32')), _tuning.chunk('ssd', 8, 8, np.dtype('float64')))")
    env = dict(os.environ, STATESCAN_CACHE_DIR=str(cache_dir))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["16", str(_tuning.automatic_chunk("ssd", 8, 8))]


def test_store_replaces_the_same_key_and_keeps_the_others(cache_dir):
    _tuning.store([{"kernel": "ssd", "key": [8, 8, "float32", 1], "value": 16},
                   {"kernel": "linear_attention", "key": [8, 4, "float32", 1], "value": 32}])
    _tuning.store([{"kernel": "ssd", "key": [8, 8, "float32", 1], "value": 128}])
    doc = json.loads(open(_tuning.cache_path()).read())
    assert doc["schema"] == _tuning.SCHEMA and doc["machine_key"] == _tuning.machine_key()
    assert [r["value"] for r in doc["entries"]["ssd"]] == [128]
    assert _tuning.lookup("ssd", (8, 8, "float32", 1)) == 128
    assert _tuning.lookup("linear_attention", (8, 4, "float32", 1)) == 32
    assert _tuning.lookup("ssd", (8, 8, "float32", 2)) is None


@pytest.mark.parametrize("content", ["{not json", json.dumps([1, 2]),
                                     json.dumps({"schema": "statescan-tuning/0"}),
                                     "ENTRIES"])
def test_a_corrupt_or_foreign_file_is_ignored_with_a_warning(cache_dir, content):
    if content == "ENTRIES":      # right header, malformed entries
        content = json.dumps({"schema": _tuning.SCHEMA, "statescan": ss.__version__,
                              "machine_key": _tuning.machine_key(),
                              "entries": {"ssd": [{"key": [8, 8], "value": "big"}]}})
    path = _tuning.cache_path()
    with open(path, "w") as f:
        f.write(content)
    with pytest.warns(RuntimeWarning, match="ignoring the tuning cache"):
        assert _tuning.lookup("ssd", (8, 8, "float64", 1)) is None
    rng = np.random.default_rng(0)
    x, dt, A, B, C = _ssd_inputs(rng)
    y, _ = ss.ssd(x, dt, A, B, C)                 # no exception, no second warning
    np.testing.assert_array_equal(y, ss.ssd(x, dt, A, B, C, chunk=64)[0])
    with pytest.warns(RuntimeWarning):            # storing replaces the broken file
        _tuning.store([{"kernel": "ssd", "key": [8, 8, "float64", 1], "value": 16}])
    assert _tuning.lookup("ssd", (8, 8, "float64", 1)) == 16


def test_a_file_of_another_version_or_machine_is_ignored(cache_dir):
    _tuning.store([{"kernel": "ssd", "key": _key("ssd"), "value": 16}])
    path = _tuning.cache_path()
    for field, value in (("statescan", "0.0.1"), ("machine_key", "0123456789ab")):
        doc = json.loads(open(path).read())
        doc[field] = value
        with open(path, "w") as f:
            json.dump(doc, f)
        _tuning.reload()
        with pytest.warns(RuntimeWarning, match="run statescan.tune"):
            assert _tuning.lookup("ssd", tuple(_key("ssd"))) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tuned_chunk_gives_the_explicit_chunks_results(cache_dir, backend, dtype):
    rng = np.random.default_rng(1)
    x, dt, A, B, C = _ssd_inputs(rng, dtype)
    q, k, v = _la_inputs(rng, dtype)
    name = np.dtype(dtype).name
    _tuning.store([{"kernel": "ssd", "key": _key("ssd", name), "value": 16},
                   {"kernel": "linear_attention", "key": _key("la", name), "value": 16}])
    for auto, explicit in ((ss.ssd(x, dt, A, B, C), ss.ssd(x, dt, A, B, C, chunk=16)),
                           (ss.linear_attention(q, k, v, decay=0.9),
                            ss.linear_attention(q, k, v, decay=0.9, chunk=16))):
        for a, e in zip(auto, explicit):
            np.testing.assert_array_equal(a, e)
    dy = rng.standard_normal(x.shape).astype(dtype)
    grads = [ss.vjp(ss.ssd, x, dt, A, B, C, **kw)[1]((dy, None)) for kw in ({}, {"chunk": 16})]
    for a, e in zip(*grads):
        np.testing.assert_array_equal(a, e)


def test_without_a_cache_chunk_none_is_the_automatic_chunk(cache_dir, backend):
    rng = np.random.default_rng(2)
    q, k, v = _la_inputs(rng)
    for a, e in zip(ss.linear_attention(q, k, v), ss.linear_attention(q, k, v, chunk=64)):
        np.testing.assert_array_equal(a, e)
    assert _tuning.chunk("ssd", 128, 64, np.dtype("float32")) == 32
    assert _tuning.chunk("ssd", 16, 16, np.dtype("float32")) == 64
    assert _tuning.rnn_block("lstm", 16, 256, 1, np.dtype("float32")) == 0
    assert not list(cache_dir.iterdir())          # looking up writes nothing


def test_the_choice_is_per_thread_count(cache_dir):
    _tuning.store([{"kernel": "linear_attention", "key": [8, 4, "float32", 1], "value": 16}])
    with ss.threads(1):
        assert _tuning.chunk("linear_attention", 8, 4, np.dtype("float32")) == 16
    with ss.threads(2):
        assert _tuning.chunk("linear_attention", 8, 4, np.dtype("float32")) == 64


def test_remembered_answers_follow_stores_and_forced_values(cache_dir):
    """chunk() / rnn_block() remember their answers per shape, dtype and thread count; a
    store, a reload or a forced value is seen by the next call."""
    f32 = np.dtype("float32")
    with ss.threads(1):
        assert _tuning.chunk("ssd", 8, 8, f32) == 64
        assert _tuning.rnn_block("lstm", 1, 32, 1, f32) == _tuning.AUTOMATIC
        _tuning.store([{"kernel": "ssd", "key": [8, 8, "float32", 1], "value": 16},
                       {"kernel": "rnn", "key": ["lstm", 1, 32, 1, "float32", 1], "value": 8}])
        assert _tuning.chunk("ssd", 8, 8, f32) == 16
        assert _tuning.rnn_block("lstm", 1, 32, 1, f32) == 8
        with _tuning.forcing("ssd", 32):
            assert _tuning.chunk("ssd", 8, 8, f32) == 32
        assert _tuning.chunk("ssd", 8, 8, f32) == 16
        os.remove(_tuning.cache_path())
        _tuning.reload()
        assert _tuning.chunk("ssd", 8, 8, f32) == 64


def test_chunk_candidates_are_feasible():
    facts = dict(_tuning.machine(), l2=256 * 1024)
    for kernel, dk, dv in (("ssd", 128, 64), ("ssd", 16, 16), ("linear_attention", 128, 128)):
        for dtype, esize in (("float32", 4), ("float64", 8)):
            values = _tuning.candidates(kernel, (dk, dv, dtype, 2), facts)
            assert values[0] == _tuning.automatic_chunk(kernel, dk, dv)
            assert len(set(values)) == len(values) and set(values) <= set(_tuning.CHUNKS)
            for c in values[1:]:
                assert esize * (c * c + c * (2 * dk + dv) + dk * dv) <= facts["l2"]
    # a big head in float64 leaves out the chunks whose block does not fit
    assert 128 not in _tuning.candidates("ssd", (256, 256, "float64", 1), facts)


@pytest.mark.parametrize("cell, B, H, heads, threads", [
    ("lstm", 1, 256, 1, 2), ("lstm", 64, 1024, 1, 1), ("gru", 16, 64, 1, 2),
    ("slstm", 64, 256, 4, 2), ("elman", 5, 64, 1, 1), ("lstm", 200, 64, 1, 2)])
def test_rnn_candidates_are_feasible(cell, B, H, heads, threads):
    from statescan._cells import CELLS
    facts = _tuning.machine()
    spec = CELLS[cell]
    D = H // heads
    row_bytes = 4 * (spec.states * D + -(-spec.gates * D // 32) * 32)
    values = _tuning.candidates("rnn", (cell, B, H, heads, "float32", threads))
    assert values[0] == _tuning.AUTOMATIC and len(set(values)) == len(values)
    for v in values[1:]:
        if v == _tuning.COLUMN_SPLIT:
            assert threads > 1 and -(-B // 8) * heads < threads
        else:
            assert 1 <= v <= B and (v % _tuning.ROW_BLOCK == 0 or v == B)
            assert v * row_bytes <= facts["l2"]
            assert -(-B // v) * heads >= min(threads, -(-B // 8) * heads)
    if threads == 1:
        assert _tuning.COLUMN_SPLIT not in values
    if B == 1 and threads == 2:                   # one row on two threads: row or column split
        assert values == [0, 1, -1]


def test_machine_facts_and_cache_sizes(tmp_path):
    facts = _tuning.machine()
    assert facts["l1d"] >= 4096 and facts["l2"] >= facts["l1d"]
    assert facts["vector_bytes"] in (16, 32, 64) and facts["logical_cpus"] >= 1
    assert len(_tuning.machine_key()) == 12
    index = tmp_path / "index0"
    index.mkdir()
    for name, text in (("level", "1\n"), ("type", "Data\n"), ("size", "48K\n")):
        (index / name).write_text(text)
    assert _caches.cache_sizes(str(tmp_path)) == {"l1d": 48 * 1024, "l2": 1024 * 1024}
    assert _caches.cache_sizes(str(tmp_path / "missing")) == _caches.FALLBACK


def test_tune_arguments_and_measure_only(cache_dir):
    with pytest.raises(ValueError, match="kernels must be one of"):
        ss.tune("mamba")
    with pytest.raises(ValueError, match="dtype must be one of"):
        ss.tune("ssd", dtype="float16")
    with pytest.raises(TypeError, match="repeat must be an integer"):
        ss.tune("ssd", repeat=2.5)
    report = ss.tune("linear_attention", [LA_SHAPE], dtype="float64", repeat=3, cache=False)
    assert report["cache"] is None and not list(cache_dir.iterdir())
    if ss.backend() == "compiled":
        assert len(report["results"]) == 1
    with ss.threads(1):
        ss.set_backend("python")
        report = ss.tune("ssd", [SSD_SHAPE], repeat=3)
    assert report["results"] == [] and "reference" in report["skipped"]["ssd"]


def test_bench_family_compares_the_tuned_choice_with_the_default(cache_dir):
    from statescan._bench import core, load_cases
    key = [64, 64, "float32", ss.get_num_threads()]
    _tuning.store([{"kernel": "linear_attention", "key": key, "value": 32}])
    cases, unavailable = load_cases(["tuned"], quick=True)
    assert not unavailable and {c.family for c in cases} == {"tuned"}
    la = next(c for c in cases if c.name == "linear_attention" and c.dtype == "float32")
    assert la.params["tuned"] == 32
    ssd_case = next(c for c in cases if c.name == "ssd" and c.dtype == "float32")
    assert ssd_case.params["tuned"] == "auto"
    result = core.run_case(la, budget=0.0)
    assert set(result.runs) == {"statescan", "default"} and result.runs["default"].ok is True


def _rnn_blocks(monkeypatch):
    """The `block` argument of every compiled rnn forward call (a list filled as they run),
    seen at the compiled module, whichever path (general or plain fast call) reaches it."""
    from statescan import _dispatch
    seen, ext_module = [], _dispatch.ext_module

    class Spy:
        def __init__(self, module):
            self._module = module

        def __getattr__(self, name):
            kernel = getattr(self._module, name)
            block_arg = {"forward": 9, "forward_projected": 10}.get(name)
            if block_arg is None:
                return kernel

            def forward(*args):
                seen.append(args[block_arg])
                return kernel(*args)
            return forward
    monkeypatch.setattr(_dispatch, "ext_module",
                        lambda family: Spy(ext_module(family)) if family == "rnn"
                        else ext_module(family))
    return seen


@pytest.mark.parametrize("cell", ["lstm", "slstm"])
def test_a_cached_rnn_block_reaches_the_kernel_and_keeps_the_bits(cache_dir, monkeypatch, cell):
    rng = np.random.default_rng(3)
    B, T, H, I = 5, 6, 8, 3
    G = 4
    x = rng.standard_normal((B, T, I))
    W, R = rng.standard_normal((G * H, I)), rng.standard_normal((G * H, H)) / 3
    fn = getattr(ss, cell)
    seen = _rnn_blocks(monkeypatch)
    plain = fn(x, W, R)
    _tuning.store([{"kernel": "rnn", "key": [cell, B, H, 1, "float64", ss.get_num_threads()],
                    "value": 1}])
    tuned = fn(x, W, R)
    with ss.threads(ss.get_num_threads() + 1):    # another thread count: not tuned
        fn(x, W, R)
    if ss.backend() == "compiled":
        assert seen == [0, 1, 0]
    for a, e in zip(flat_outputs(cell, plain), flat_outputs(cell, tuned)):
        np.testing.assert_array_equal(a, e)


@pytest.mark.skipif(ss.backend() != "compiled", reason="tune() times the compiled kernels")
def test_tune_a_cell_round_trip(cache_dir):
    from statescan.tune import rnn_block_supported
    if not rnn_block_supported():
        pytest.skip("this build's rnn kernel takes no block argument")
    report = ss.tune("gru", [{"B": 2, "H": 8, "T": 4}], dtype="float64", repeat=3)
    (record,) = report["results"]
    key = ["gru", 2, 8, 1, "float64", ss.get_num_threads()]
    assert record["kernel"] == "rnn" and record["key"] == key and record["default"] == 0
    assert record["value"] in _tuning.candidates("rnn", tuple(key))
    assert _fresh_lookup(cache_dir, "rnn", key) == record["value"]
