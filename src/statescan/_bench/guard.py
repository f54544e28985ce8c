"""Regression guard: ratios that transfer across machines, compared with a committed baseline.

Absolute times depend on the machine; two ratios mostly do not: statescan's speed-up over its
own numpy reference (same machine, same run) and its GFLOP/s as a fraction of the GEMM peak
measured in the same run.  A case regresses when either falls by more than the tolerance
and stays there when measured again (the CLI re-measures failing cases: on a busy machine
single measurements swing by 30%).

They do move between CPUs, though (another ISA, cache sizes, BLAS), so a baseline file holds
one section per machine, keyed by the CPU's name, its SIMD features and the kernels of its BLAS
(:func:`machine_key`: one model name covers CPUs of several generations -- "AMD EPYC" is a Zen 1
with AVX2, or a Zen 4 or a Zen 5 with AVX-512 -- and the peak fractions are measured against
numpy's GEMM, which OpenBLAS runs with AVX-512 kernels on a Zen 4 and with AVX2 ones on a Zen 5,
at half their speed): a check compares with this machine's section when there is one, and an
update only raises this machine's ratios.
"""
import json
import time

from .core import NUMPY_REF, STATESCAN

SCHEMA = "statescan-bench-baseline/2"
METRICS = ("vs_numpy_ref", "peak_fraction")


def metrics(result, peaks):
    """{metric: value} of one case result (a metric is None when it could not be measured);
    `peaks` maps dtype -> measured GEMM GFLOP/s."""
    ours = result.runs.get(STATESCAN)
    gf = ours.gflops if ours is not None else None
    peak_gflops = peaks.get(result.case.dtype)
    return {"vs_numpy_ref": result.ratio(NUMPY_REF),
            "peak_fraction": gf / peak_gflops if gf is not None and peak_gflops else None}


def machine_key(machine):
    """A baseline section's key for `machine` (``machine.describe()``): the CPU's name, its
    SIMD features and, when known, its BLAS kernels, e.g.
    ``"AMD EPYC [avx2 fma avx512f avx512_bf16] blas SkylakeX"``."""
    key = f"{machine['cpu']} [{' '.join(machine['cpu_flags'])}]"
    kernels = machine.get("blas_kernels")
    return f"{key}{BLAS}{','.join(kernels)}" if kernels else key


BLAS = " blas "


def updated(doc, results, peaks, meta, tolerance):
    """`doc` (a baseline document, or None for a new one) with this machine's section raised
    to the ratios of `results`: per case and metric the better of the old and the new value,
    so a baseline only moves up; other machines' sections are kept as they are."""
    doc = doc or {"schema": SCHEMA, "machines": {}}
    cpu = machine_key(meta["machine"])
    old = doc["machines"].get(cpu, {}).get("cases", {})
    cases = dict(old)
    for r in results:
        new = metrics(r, peaks)
        if all(v is not None for v in new.values()):
            kept = old.get(r.case.id, {})
            cases[r.case.id] = {k: max(v, kept.get(k, v)) for k, v in new.items()}
    doc["machines"][cpu] = {"tolerance": tolerance,
                            "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
                            "cpu_flags": meta["machine"]["cpu_flags"],
                            "threads": meta["threads"], "gemm_peaks_gflops": peaks,
                            "cases": cases}
    return doc


def load(path):
    doc = json.loads(path.read_text())
    machines = doc.get("machines")
    if doc.get("schema") != SCHEMA or not isinstance(machines, dict) or not all(
            isinstance(m, dict) and isinstance(m.get("cases"), dict) for m in machines.values()):
        raise ValueError(f"{path} is not a statescan benchmark baseline ({SCHEMA})")
    return doc


def section(doc, cpu):
    """(machine key, section) of baseline `doc` to check a run on machine `cpu` (its
    :func:`machine_key`) against: its own section, else one recorded before the BLAS kernels
    were part of the key for its CPU name and SIMD features, else the first one (whose ratios
    may differ from this machine's), or (None, None) when the document has no section."""
    for key in (cpu, cpu.split(BLAS)[0]):
        if key in doc["machines"]:
            return key, doc["machines"][key]
    return next(iter(doc["machines"].items()), (None, None))


def measured(results, peaks, previous=None):
    """{case id: metrics} of `results`, keeping per metric the better of this measurement and
    `previous` (a re-measurement must reproduce a regression before it counts)."""
    out = dict(previous or {})
    for r in results:
        if STATESCAN not in r.runs:
            continue
        new, old = metrics(r, peaks), out.get(r.case.id, {})
        out[r.case.id] = {k: max((v for v in (new[k], old.get(k)) if v is not None),
                                 default=None) for k in METRICS}
    return out


def regressed(measured_metrics, baseline, tolerance):
    """Ids of the baseline's cases that are missing or fall below (1 - tolerance) x baseline."""
    bad = []
    for case_id, old in baseline["cases"].items():
        new = measured_metrics.get(case_id)
        if new is None or any(new.get(k) is None or new[k] < (1 - tolerance) * old[k]
                              for k in METRICS if k in old):
            bad.append(case_id)
    return bad


def report(measured_metrics, baseline, tolerance):
    """(passed, report lines)."""
    bad = set(regressed(measured_metrics, baseline, tolerance))
    lines = []
    for case_id, old in baseline["cases"].items():
        new = measured_metrics.get(case_id)
        if new is None:
            lines.append(f"FAIL {case_id}: not run (no such case in this statescan, or it failed)")
            continue
        parts = []
        for key in METRICS:
            if key in old:
                if new.get(key) is None:
                    parts.append(f"{key} not measured")
                else:
                    change = new[key] / old[key] - 1 if old[key] else 0.0
                    parts.append(f"{key} {new[key]:.3g} (baseline {old[key]:.3g}, {change:+.0%})")
        lines.append(f"{'FAIL' if case_id in bad else 'ok  '} {case_id}: " + "; ".join(parts))
    verdict = ("FAILED" if bad else "passed") + \
        f": no ratio may fall by more than {tolerance:.0%} from the baseline"
    return not bad, lines + [verdict]
