"""The two builds of the kernels (native and portable) and the choice between them at import."""
import json
import os
import platform
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import statescan as ss
from statescan import _dispatch

INFO = ss.build_info()
needs_compiled = pytest.mark.skipif(INFO["variant"] is None, reason="no compiled kernels")
needs_native = pytest.mark.skipif(INFO["variant"] not in ("native", "mixed"),
                                  reason=f"native kernels not in use: {INFO['reason']}")

# Runs in a fresh interpreter (the variant is chosen at import): an LSTM on a small problem,
# printed as JSON with the build the interpreter chose.
_LSTM_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import statescan as ss
    rng = np.random.default_rng(0)
    out = {"info": ss.build_info()}
    for dtype in ("float32", "float64"):
        x = rng.standard_normal((3, 7, 5)).astype(dtype)
        W = (rng.standard_normal((4 * 16, 5)) / 3).astype(dtype)
        R = (rng.standard_normal((4 * 16, 16)) / 4).astype(dtype)
        b = (rng.standard_normal(4 * 16) / 2).astype(dtype)
        y, (h, c) = ss.lstm(x, W, R, b)
        out[dtype] = [y.tolist(), h.tolist(), c.tolist()]
    json.dump(out, sys.stdout)
""")


def _run(check=True, **switches):
    """_LSTM_SCRIPT's output in an interpreter whose only STATESCAN_* variables are `switches`
    (with check=False: the finished process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATESCAN_")}
    proc = subprocess.run([sys.executable, "-c", _LSTM_SCRIPT], env={**env, **switches},
                          capture_output=True, text=True, timeout=120)
    if not check:
        return proc
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_build_info_is_consistent():
    info = ss.build_info()
    assert set(info) == {"variant", "features", "cpu_features", "openmp", "modules", "reason",
                         "backend"}
    assert info["backend"] == ss.backend()
    assert isinstance(info["reason"], str) and info["reason"]
    if info["variant"] is None:
        assert not _dispatch.compiled_available()
        return
    assert info["variant"] in ("native", "portable", "mixed")
    assert set(info["modules"]) == set(_dispatch._EXT)
    for name, variant in info["modules"].items():
        prefix = "statescan._ext.native." if variant == "native" else "statescan._ext."
        assert _dispatch.ext_module(name).__name__ == prefix + name
    used = set(info["modules"].values())
    assert used == {"native", "portable"} if info["variant"] == "mixed" else {info["variant"]}
    if info["variant"] != "portable" and info["cpu_features"] is not None:
        assert set(info["features"]) <= set(info["cpu_features"])


def test_build_info_is_a_copy():
    info = ss.build_info()
    info["modules"].clear()
    assert ss.build_info()["modules"] == INFO["modules"]


@needs_native
def test_recorded_native_features_match_the_native_compile():
    """setup.py's _features.py (read before importing native code) says what the native
    modules were really compiled for."""
    from statescan._ext.native import _cpu, _features
    assert tuple(_features.FEATURES) == _cpu.compiled_features() == INFO["features"]


@needs_compiled
def test_portable_build_uses_only_the_baseline():
    from statescan._ext import _cpu
    baseline = {"x86_64": {"sse2"}, "AMD64": {"sse2"}, "aarch64": {"asimd"}, "arm64": {"asimd"}}
    expected = baseline.get(platform.machine())
    if expected is None:
        pytest.skip(f"no baseline known for {platform.machine()}")
    assert set(_cpu.compiled_features()) == expected
    if INFO["variant"] != "portable":
        assert len(INFO["features"]) > len(expected)


def test_choose_variant():
    choose = _dispatch._choose_variant
    native, cpu = ("sse2", "avx2", "avx512f"), ("sse2", "avx2", "avx512f", "fma")
    assert choose("", native, cpu, {"rnn"})[0] == "native"
    assert choose("native", native, cpu, {"rnn"})[0] == "native"
    assert choose("portable", native, cpu, {"rnn"}) == ("portable", "STATESCAN_VARIANT=portable")
    variant, reason = choose("", native, ("sse2", "avx2"), {"rnn"})
    assert variant == "portable" and "avx512f" in reason
    assert choose("", None, cpu, set())[0] == "portable"
    assert choose("", native, None, {"rnn"})[0] == "portable"
    with pytest.raises(ImportError, match="avx512f"):
        choose("native", native, ("sse2", "avx2"), {"rnn"})
    with pytest.raises(ImportError, match="no native build"):
        choose("native", None, cpu, set())


def test_module_names_strip_the_extension_suffix(tmp_path):
    import importlib.machinery
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for name in (f"rnn{suffix}", f"_cpu{suffix}", "_features.py", f"scan{suffix}.tmp12"):
        (tmp_path / name).write_text("")
    assert _dispatch._module_names(tmp_path) == {"rnn", "_cpu"}
    assert _dispatch._module_names(tmp_path / "missing") == set()


@needs_compiled
def test_forced_portable_matches_native_lstm():
    portable = _run(STATESCAN_VARIANT="portable")
    assert portable["info"]["variant"] == "portable"
    assert set(portable["info"]["modules"].values()) == {"portable"}
    chosen = _run()
    assert chosen["info"]["variant"] == INFO["variant"]
    # Different ISAs contract a*b+c into FMAs differently: close, not bit-identical.
    for dtype, rtol in (("float32", 1e-6), ("float64", 1e-13)):
        for a, b in zip(portable[dtype], chosen[dtype]):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)


@needs_native
def test_forced_native():
    """Native everywhere, or an ImportError naming what a partial build lacks."""
    if INFO["variant"] == "native":
        assert _run(STATESCAN_VARIANT="native")["info"]["modules"] == INFO["modules"]
    else:
        proc = _run(STATESCAN_VARIANT="native", check=False)
        absent = sorted(m for m, v in INFO["modules"].items() if v == "portable")
        assert proc.returncode != 0
        assert f"statescan._ext.native lacks {', '.join(absent)}" in proc.stderr


def test_unknown_variant_warns_and_is_ignored():
    proc = subprocess.run(
        [sys.executable, "-W", "always", "-c",
         "import statescan as ss; print(ss.build_info()['variant'])"],
        env=dict(os.environ, STATESCAN_VARIANT="fastest"), capture_output=True, text=True,
        timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "STATESCAN_VARIANT='fastest'" in proc.stderr
    assert proc.stdout.strip() == str(INFO["variant"])


@needs_compiled
def test_python_backend_matches_compiled():
    python = _run(STATESCAN_BACKEND="python")
    assert python["info"]["backend"] == "python"
    compiled = _run()
    for dtype, rtol in (("float32", 1e-5), ("float64", 1e-12)):
        for a, b in zip(python[dtype], compiled[dtype]):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)
