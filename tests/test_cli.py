"""Smoke tests of ``statescan bench``: table and JSON structure, the regression guard, and the
benchmark core's verification.  Tiny cases, no peers (torch/jax are not needed)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import statescan
from statescan import cli
import statescan._bench.machine
from statescan._bench import core, guard, load_cases, report

TINY = ["--quick", "--family", "rnn", "--peers", "none", "--no-plot"]
GUARD_CASE = "lstm B=16 H=256 heads=1"


def run_cli(capsys, *args):
    code = cli.main(["bench", *TINY, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bench_table_and_json(tmp_path, capsys):
    path = tmp_path / "r.json"
    code, out, err = run_cli(capsys, "--filter", "lstm B=1 H=64", "--json", str(path))
    assert code == 0
    assert "== rnn ==" in out and "us/step" in out and "GFLOP/s" in out and "numpy-ref x" in out
    assert "lstm B=1 H=64 heads=1" in out
    assert "[1/1] rnn/lstm B=1 H=64 heads=1 float32" in err      # progress goes to stderr
    doc = json.loads(path.read_text())
    assert doc["schema"] == "statescan-bench/1"
    assert doc["machine"]["cpu"] and doc["machine"]["logical_cpus"] >= 1
    assert doc["gemm_peaks_gflops"]["float32"] > 0
    peak = doc["peaks_gflops"]["float32"]      # the faster of numpy's and statescan's GEMM
    assert peak["numpy"] == doc["gemm_peaks_gflops"]["float32"]
    assert peak["peak"] == max(peak["numpy"], peak["compiled"] or 0)
    assert (peak["compiled"] is None) == (statescan.backend() == "python")
    assert doc["threads"] == 1 and doc["dtype"] == "float32" and doc["statistic"] == "median"
    (result,) = doc["results"]
    assert result["id"] == "rnn/lstm B=1 H=64 heads=1 float32"
    ours, ref = result["runners"]["statescan"], result["runners"]["numpy-ref"]
    assert ours["us_per_step"] > 0 and 0 < ours["peak_fraction"]
    assert ours["peak_fraction"] == pytest.approx(ours["gflops"] / peak["peak"])
    assert ref["verified"] is True and ref["max_error"] < 1e-3
    assert ref["ratio"] == pytest.approx(ref["us_per_step"] / ours["us_per_step"])
    assert set(result["runners"]) == {"statescan", "numpy-ref"}


def _cases(doc):
    """The cases of this machine's section of a baseline document."""
    return doc["machines"][guard.machine_key(statescan._bench.machine.describe())]["cases"]


def test_check_against_fresh_and_doctored_baseline(tmp_path, capsys):
    base = tmp_path / "baseline.json"
    code, out, _ = run_cli(capsys, "--update-baseline", "--baseline", str(base),
                           "--filter", GUARD_CASE)
    assert code == 0 and base.exists()
    doc = json.loads(base.read_text())
    assert list(_cases(doc)) == [f"rnn/{GUARD_CASE} float32"]
    assert set(_cases(doc)[f"rnn/{GUARD_CASE} float32"]) == {"vs_numpy_ref", "peak_fraction"}

    # A loaded CI box is noisy: the pass check only asks for no ten-fold slowdown.
    code, out, _ = run_cli(capsys, "--check", "--baseline", str(base), "--tolerance", "0.9")
    assert code == 0, out
    assert "passed" in out

    for metrics in _cases(doc).values():
        metrics["vs_numpy_ref"] *= 100
    doctored = tmp_path / "doctored.json"
    doctored.write_text(json.dumps(doc))
    code, out, _ = run_cli(capsys, "--check", "--baseline", str(doctored))
    assert code == 1
    assert "FAIL" in out and "vs_numpy_ref" in out


def test_update_only_raises_this_machines_ratios(tmp_path, capsys):
    case = f"rnn/{GUARD_CASE} float32"
    cpu = guard.machine_key(statescan._bench.machine.describe())
    other = {"cases": {case: {"vs_numpy_ref": 1e-9, "peak_fraction": 1e-9}}}
    base = tmp_path / "baseline.json"
    base.write_text(json.dumps({"schema": guard.SCHEMA, "machines": {
        "Another CPU": other,
        cpu: {"cases": {case: {"vs_numpy_ref": 1e9, "peak_fraction": 1e-9},
                        "rnn/not run here float32": {"vs_numpy_ref": 2.0}}}}}))
    code, out, _ = run_cli(capsys, "--update-baseline", "--baseline", str(base),
                           "--filter", GUARD_CASE)
    assert code == 0, out
    doc = json.loads(base.read_text())
    assert doc["machines"]["Another CPU"] == other
    mine = doc["machines"][cpu]["cases"]
    assert mine[case]["vs_numpy_ref"] == 1e9                  # a better old ratio stays
    assert 1e-9 < mine[case]["peak_fraction"] < 10            # a worse one is replaced
    assert mine["rnn/not run here float32"] == {"vs_numpy_ref": 2.0}


def test_check_uses_this_machines_section(tmp_path, capsys):
    case = f"rnn/{GUARD_CASE} float32"
    cpu = guard.machine_key(statescan._bench.machine.describe())
    impossible = {"cases": {case: {"vs_numpy_ref": 1e9, "peak_fraction": 1e9}}}
    easy = {"cases": {case: {"vs_numpy_ref": 1e-9, "peak_fraction": 1e-9}}}
    base = tmp_path / "baseline.json"
    base.write_text(json.dumps({"schema": guard.SCHEMA,
                                "machines": {"Another CPU": impossible, cpu: easy}}))
    code, out, err = run_cli(capsys, "--check", "--baseline", str(base))
    assert code == 0 and f"({cpu})" in out and "no ratios from this CPU" not in err

    base.write_text(json.dumps({"schema": guard.SCHEMA, "machines": {"Another CPU": easy}}))
    code, out, err = run_cli(capsys, "--check", "--baseline", str(base))
    assert code == 0 and "(Another CPU)" in out
    assert f"no ratios from this CPU ({cpu}); checking against those of Another CPU" in err


def test_check_fails_on_a_case_that_no_longer_exists(tmp_path, capsys):
    base = tmp_path / "baseline.json"
    base.write_text(json.dumps({"schema": guard.SCHEMA, "machines": {"Some CPU": {"cases": {
        "rnn/nonexistent B=1 float32": {"vs_numpy_ref": 1.0, "peak_fraction": 0.1}}}}}))
    code, out, err = run_cli(capsys, "--check", "--baseline", str(base))
    assert code == 2 and "no case selected" in err


def test_unreadable_baselines_are_errors(tmp_path, capsys):
    base = tmp_path / "baseline.json"
    for doc in ({"schema": "statescan-bench-baseline/1", "cases": {}},      # the old layout
                {"schema": guard.SCHEMA, "machines": {"A": {"no cases": 1}}}):
        base.write_text(json.dumps(doc))
        for mode in ("--check", "--update-baseline"):
            assert cli.main(["bench", mode, "--baseline", str(base)]) == 2
            assert "is not a statescan benchmark baseline" in capsys.readouterr().err
    base.write_text(json.dumps({"schema": guard.SCHEMA, "machines": {}}))
    assert cli.main(["bench", "--check", "--baseline", str(base)]) == 2
    assert "holds no machine's ratios" in capsys.readouterr().err


def test_bad_arguments(tmp_path, capsys):
    assert cli.main(["bench", "--family", "nope"]) == 2
    assert "unknown family" in capsys.readouterr().err
    assert cli.main(["bench", "--check", "--baseline", str(tmp_path / "missing.json")]) == 2
    assert "cannot read the baseline" in capsys.readouterr().err


def test_list_filters_by_dtype(capsys):
    code, out, _ = run_cli(capsys, "--list", "--dtype", "float64")
    assert code == 0
    ids = out.strip().splitlines()
    assert ids and all("float64" in line and line.startswith("rnn/") for line in ids)


def test_broken_family_module_does_not_stop_the_others(monkeypatch):
    monkeypatch.setitem(sys.modules, "statescan._bench.scan_cases", None)   # import fails
    cases, unavailable = load_cases(("rnn", "scan"), quick=True)
    assert "scan" in unavailable
    assert cases and all(c.family == "rnn" for c in cases)


def _fake_case(make):
    return core.Case("fake", "ones", {"n": 4}, "float64", steps=10, flops=100.0, make=make)


def test_run_case_verifies_and_skips():
    ones = np.ones((2, 10, 3))

    def make():
        return {"statescan": lambda: ones,
                "good": lambda: ones + 1e-12,
                "bad": lambda: ones + 1.0,
                "short": core.Runner(lambda: ones[:, :5], steps=5, expected=lambda: ones[:, :5]),
                "missing": core.Skipped("not installed"),
                "broken": lambda: 1 / 0}
    result = core.run_case(_fake_case(make), budget=0.0)
    assert result.runs["good"].ok is True
    assert result.runs["bad"].ok is False and result.runs["bad"].max_error == pytest.approx(1.0)
    assert result.runs["short"].ok is True and result.runs["short"].steps == 5
    assert result.skipped["missing"] == "not installed"
    assert "ZeroDivisionError" in result.skipped["broken"]
    assert result.runs["statescan"].flops == 100.0 and result.runs["short"].flops == 50.0


def test_add_peer_turns_missing_packages_into_notes():
    def needs_missing_package():
        import statescan_no_such_package  # noqa: F401

    runners = {}
    core.configure(1, None)
    core.add_peer(runners, "jax", needs_missing_package)
    assert isinstance(runners["jax"], core.Skipped) and "not installed" in runners["jax"].reason
    core.configure(1, [])
    core.add_peer(runners, "torch", lambda: (lambda: None))
    assert "torch" not in runners
    core.configure(1, None)
    with pytest.raises(ValueError, match="'ghost' is not in statescan._bench.core.PEERS"):
        core.add_peer(runners, "ghost", lambda: (lambda: None))


def test_every_peer_a_family_adds_is_listed():
    # --peers validates against core.PEERS: a family adding an unlisted name must fail here.
    sources = (Path(core.__file__).parent).glob("*_cases.py")
    names = {m for f in sources for m in re.findall(r'add_peer\(\w+, "([^"]+)"', f.read_text())}
    assert names and names <= set(core.PEERS), names - set(core.PEERS)


def test_unknown_peer_is_an_error_listing_the_valid_ones(capsys):
    assert cli.main(["bench", "--peers", "torch,pytorch", "--list"]) == 2
    err = capsys.readouterr().err
    assert "unknown peer 'pytorch'" in err and all(p in err for p in core.PEERS)
    assert "'none'" in err


def test_the_baseline_ships_inside_the_package(tmp_path, monkeypatch, capsys):
    assert cli.DEFAULT_BASELINE.is_file()
    assert cli.DEFAULT_BASELINE.parent == Path(core.__file__).parent
    doc = guard.load(cli.DEFAULT_BASELINE)
    _, baseline = guard.section(doc, statescan._bench.machine.describe()["cpu"])
    monkeypatch.chdir(tmp_path)                      # --check from anywhere
    code = cli.main(["bench", "--check", "--list"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and sorted(line.split("  (T=")[0] for line in out) == sorted(baseline["cases"])


def test_table_header_explains_every_column(capsys):
    code, out, _ = run_cli(capsys, "--filter", "lstm B=1 H=64")
    assert code == 0
    legend, table = out.split("== rnn ==")
    header = table.strip().splitlines()[0]
    columns = re.split(r"\s{2,}", header.strip())
    assert columns[:2] == ["case", "T"] and columns[-1] == "check"
    for column in columns:
        assert re.search(rf"^  {re.escape(column)}\s{{2,}}\S", legend, flags=re.M), column


def test_plot_has_a_title_legend_and_fixed_colours(tmp_path):
    pytest.importorskip("matplotlib")
    ones = np.ones((1, 10, 2))

    def make():
        return {"statescan": lambda: ones, "numpy-ref": lambda: ones, "torch": lambda: ones}
    results = [core.run_case(_fake_case(make), budget=0.0)]
    meta = {"statescan": "0", "machine": {"cpu": "TestCPU", "logical_cpus": 3},
            "threads": 2, "dtype": "float64", "statistic": "median"}
    assert report.title(meta) == ("statescan 0 bench -- TestCPU, 3 logical CPUs; threads=2, "
                                  "dtype=float64")
    path = tmp_path / "plot.png"
    assert report.write_plot(results, path, meta)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same runner gets the same colour whatever else ran
    assert (report.runner_colours(["torch", "jax"])["jax"]
            == report.runner_colours(["jax"])["jax"])
    spare = report.runner_colours(["new-a", "new-b"])
    assert len(set(spare.values())) == 2


def test_a_runner_over_its_cpu_share_is_flagged_in_table_and_json():
    ones = np.ones((1, 10, 2))

    def make():
        return {"statescan": lambda: ones, "torch": lambda: ones, "jax": lambda: ones}
    result = core.run_case(_fake_case(make), budget=0.0)
    assert all(m.cpu_ratio is not None and m.cpu_ratio >= 0 for m in result.runs.values())
    for name, m in result.runs.items():
        m.cpu_ratio = core.threads() * 1.5 + 0.5 if name == "jax" else 1.0
    meta = {"statescan": "0", "machine": {"cpu": "TestCPU", "logical_cpus": 2},
            "threads": core.threads(), "dtype": "float64", "statistic": "median"}
    peaks = {"float64": {"numpy": 1.0, "compiled": None, "peak": 1.0}}
    table = report.format_table([result], peaks, meta)
    row = next(line for line in table.splitlines() if line.startswith("ones n=4"))
    jax_ratio = f"jax {core.threads() * 1.5 + 0.5:.2f}!"
    assert "statescan 1.00 torch 1.00 " + jax_ratio in row and row.endswith("OVER-SHARE jax")
    assert "jax used more CPU than" in table
    doc = report.to_json([result], peaks, meta)
    runners = doc["results"][0]["runners"]
    assert runners["jax"]["over_share"] is True and runners["torch"]["over_share"] is False
    assert runners["torch"]["cpu_ratio"] == 1.0 and doc["results"][0]["over_share"] == ["jax"]


def test_cpu_clock_leaves_out_time_spent_off_the_cpu(tmp_path, capsys):
    import time

    def make():
        return {"statescan": lambda: time.sleep(0.02)}
    wall = core.run_case(_fake_case(make), budget=0.0).runs["statescan"]
    cpu = core.run_case(_fake_case(make), budget=0.0, clock="cpu").runs["statescan"]
    assert wall.seconds >= 0.02 > 0.01 > cpu.seconds
    assert cpu.cpu_ratio < 0.5                  # the ratio is still CPU over wall time
    path = tmp_path / "r.json"
    code, out, _ = run_cli(capsys, "--filter", "lstm B=1 H=64", "--clock", "cpu",
                           "--json", str(path))
    assert code == 0 and "; cpu clock" in out.splitlines()[0]
    assert json.loads(path.read_text())["clock"] == "cpu"


def test_pinning_moves_every_thread_of_the_process():
    import os
    import threading
    if not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc/self/task"):
        pytest.skip("no per-thread affinity here (Linux only)")
    allowed = os.sched_getaffinity(0)
    started, stop = threading.Event(), threading.Event()
    worker = threading.Thread(target=lambda: (started.set(), stop.wait()))
    worker.start()
    started.wait()
    try:
        cores = core.pin_to_cores(1)
        assert os.sched_getaffinity(worker.native_id) == set(cores)
    finally:
        stop.set()
        worker.join()
        for tid in core._thread_ids():          # every thread back on every core
            try:
                os.sched_setaffinity(tid, allowed)
            except OSError:
                pass


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "statescan", "bench", *TINY, "--list",
                           "--filter", "gru"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "rnn/gru B=16 H=256 heads=1 float32" in proc.stdout


def test_split_family_compares_the_threads_with_one_thread():
    cases, unavailable = load_cases(["split"], quick=True)
    assert not unavailable and {c.family for c in cases} == {"split"}
    with statescan.threads(2):
        result = core.run_case(cases[0], budget=0.0)
    assert set(result.runs) == {"statescan", "statescan-1t"}
    assert result.runs["statescan-1t"].ok is True       # the outputs agree across threads


def test_one_cpu_name_of_two_generations_keeps_two_sections():
    # "AMD EPYC" names a Zen 1 with AVX2 and a Zen 4 with AVX-512: their ratios differ
    zen1 = {"cpu": "AMD EPYC", "cpu_flags": ["avx2", "fma"]}
    zen4 = {"cpu": "AMD EPYC", "cpu_flags": ["avx2", "fma", "avx512f", "avx512_bf16"]}
    doc = {"schema": guard.SCHEMA, "machines": {guard.machine_key(zen4): {"cases": {}}}}
    assert guard.section(doc, guard.machine_key(zen1))[0] != guard.machine_key(zen1)
    assert guard.section(doc, guard.machine_key(zen4))[0] == guard.machine_key(zen4)


def test_machine_key_names_the_blas_kernels():
    """Two machines whose CPU name and SIMD features agree but whose numpy GEMM runs other
    BLAS kernels (a Zen 4's SkylakeX, a Zen 5's Haswell) measure their peak fractions against
    different peaks: they get different sections; a section recorded before the BLAS kernels
    were in the key still serves its CPU when no section names this machine's kernels."""
    machine = {"cpu": "AMD EPYC", "cpu_flags": ["avx2", "avx512f"]}
    zen4 = guard.machine_key({**machine, "blas_kernels": ["SkylakeX"]})
    zen5 = guard.machine_key({**machine, "blas_kernels": ["Haswell"]})
    legacy = guard.machine_key(machine)
    assert len({zen4, zen5, legacy}) == 3
    assert zen4 == "AMD EPYC [avx2 avx512f] blas SkylakeX"
    doc = {"machines": {"Another CPU": {}, zen5: {"cases": 5}}}
    assert guard.section(doc, zen4)[0] == "Another CPU"
    assert guard.section(doc, zen5) == (zen5, {"cases": 5})
    doc["machines"][legacy] = {"cases": 0}
    assert guard.section(doc, zen4) == (legacy, {"cases": 0})
    assert guard.section(doc, zen5)[0] == zen5
    here = statescan._bench.machine.describe()
    assert here["blas_kernels"] == statescan._blas.kernel_names()
