"""Regression guard: ratios that transfer across machines, compared with a committed baseline.

Absolute times depend on the machine; two ratios mostly do not: statescan's speed-up over its
own numpy reference (same machine, same run) and its GFLOP/s as a fraction of the GEMM peak
measured in the same run.  A case regresses when either falls by more than the tolerance.
"""
import json
import time

from .core import NUMPY_REF, STATESCAN

SCHEMA = "statescan-bench-baseline/1"
METRICS = ("vs_numpy_ref", "peak_fraction")


def metrics(result, peaks):
    """{metric: value} of one case result (a metric is None when it could not be measured);
    `peaks` maps dtype -> measured GEMM GFLOP/s."""
    ours = result.runs.get(STATESCAN)
    gf = ours.gflops if ours is not None else None
    peak_gflops = peaks.get(result.case.dtype)
    return {"vs_numpy_ref": result.ratio(NUMPY_REF),
            "peak_fraction": gf / peak_gflops if gf is not None and peak_gflops else None}


def baseline_doc(results, peaks, meta, tolerance):
    cases = {}
    for r in results:
        m = metrics(r, peaks)
        if all(v is not None for v in m.values()):
            cases[r.case.id] = m
    return {"schema": SCHEMA, "tolerance": tolerance,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "machine": meta["machine"]["cpu"], "threads": meta["threads"],
            "gemm_peaks_gflops": peaks, "cases": cases}


def load(path):
    doc = json.loads(path.read_text())
    if doc.get("schema") != SCHEMA or not isinstance(doc.get("cases"), dict):
        raise ValueError(f"{path} is not a statescan benchmark baseline ({SCHEMA})")
    return doc


def compare(results, peaks, baseline, tolerance):
    """(passed, report lines): every baseline case must be run and keep each metric above
    (1 - tolerance) times its baseline value."""
    by_id = {r.case.id: r for r in results}
    lines, passed = [], True
    for case_id, old in baseline["cases"].items():
        r = by_id.get(case_id)
        if r is None or STATESCAN not in r.runs:
            why = "not found in this statescan" if r is None else (r.error or "did not run")
            lines.append(f"FAIL {case_id}: {why}")
            passed = False
            continue
        new = metrics(r, peaks)
        parts, ok = [], True
        for key in METRICS:
            if key not in old:
                continue
            if new[key] is None:
                parts.append(f"{key} not measured")
                ok = False
                continue
            change = new[key] / old[key] - 1 if old[key] else 0.0
            parts.append(f"{key} {new[key]:.3g} (baseline {old[key]:.3g}, {change:+.0%})")
            ok &= new[key] >= (1 - tolerance) * old[key]
        passed &= ok
        lines.append(f"{'ok  ' if ok else 'FAIL'} {case_id}: " + "; ".join(parts))
    verdict = ("passed" if passed else "FAILED") + \
        f": no ratio may fall by more than {tolerance:.0%} from the baseline"
    return passed, lines + [verdict]
