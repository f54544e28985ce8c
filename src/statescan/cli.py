"""Command line: ``statescan bench`` (also ``python -m statescan bench``)."""
import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import statescan

DEFAULT_TOLERANCE = 0.25
RECHECKS = 2      # a case below the baseline is measured again up to this many times


# Shipped inside the package (package data), so --check works from any directory.
DEFAULT_BASELINE = Path(__file__).resolve().parent / "_bench" / "baseline.json"


def _parser():
    parser = argparse.ArgumentParser(prog="statescan")
    parser.add_argument("--version", action="version", version=f"statescan {statescan.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser(
        "bench", help="benchmark the kernels against the numpy reference and peer libraries",
        description="Benchmark statescan's kernels against its numpy reference and against "
                    "PyTorch / ONNX Runtime / JAX when they are installed.")
    bench.add_argument("--quick", action="store_true", help="a small grid (under a minute)")
    bench.add_argument("--family", action="append", metavar="NAME",
                       help=f"only this family ({', '.join(_bench_core().FAMILIES)}); "
                            "repeatable or comma-separated")
    bench.add_argument("--filter", action="append", metavar="TEXT",
                       help="only cases whose id contains TEXT (e.g. 'lstm B=16'); repeatable")
    bench.add_argument("--threads", type=int, default=1,
                       help="threads for statescan, BLAS and every peer (default 1)")
    bench.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    bench.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                       help="time calls by the wall clock (default) or by the process's CPU "
                            "time (every thread's): with --threads 1 on a busy machine, cpu "
                            "leaves out the time spent waiting for the core")
    bench.add_argument("--peers", metavar="LIST",
                       help="comma-separated peers to run (default: every installed one): "
                            f"{', '.join(_bench_core().PEERS)}; 'none' for statescan and its numpy "
                            "reference only")
    bench.add_argument("--json", type=Path, metavar="PATH",
                       help="results file (default bench-results/bench-<timestamp>.json)")
    bench.add_argument("--plot", type=Path, metavar="PATH",
                       help="PNG plot (default: next to the JSON; needs matplotlib)")
    bench.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    bench.add_argument("--list", action="store_true", help="list the selected cases and exit")
    guard = bench.add_argument_group("regression guard")
    guard.add_argument("--check", action="store_true",
                       help="rerun the baseline's cases; exit 1 if a ratio regressed")
    guard.add_argument("--update-baseline", action="store_true",
                       help="run the guard cases and raise this machine's ratios in the "
                            "baseline (a ratio is only replaced by a better one)")
    guard.add_argument("--baseline", type=Path, metavar="PATH",
                       help="baseline file (default: the one shipped with statescan, "
                            "statescan/_bench/baseline.json)")
    guard.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                       help="largest accepted relative drop of a ratio (default 0.25)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    return _bench(args)      # the only command (argparse requires one)


def _bench_core():
    from ._bench import core
    return core


def _split(values):
    return [v.strip() for value in values or () for v in value.split(",") if v.strip()]


def _bench(args):
    from ._bench import core, guard, machine, report
    if args.threads < 1:
        return _fail("--threads must be >= 1")
    families = _split(args.family) or list(core.FAMILIES)
    unknown = [f for f in families if f not in core.FAMILIES]
    if unknown:
        return _fail(f"unknown family {unknown[0]!r}; choose from {', '.join(core.FAMILIES)}")
    peers = _split([args.peers]) if args.peers else None
    if peers is not None and peers != ["none"]:
        unknown = [p for p in peers if p not in core.PEERS]
        if unknown:
            return _fail(f"unknown peer {unknown[0]!r}; choose from "
                         f"{', '.join(core.PEERS)}, or 'none'")
    guard_mode = args.check or args.update_baseline
    baseline_path = args.baseline or DEFAULT_BASELINE
    doc = baseline = None
    if args.check or (args.update_baseline and baseline_path.exists()):
        try:
            doc = guard.load(baseline_path)
        except (OSError, ValueError) as exc:
            return _fail(f"cannot read the baseline: {exc}")
    if args.check:
        cpu = guard.machine_key(machine.describe())
        recorded_on, baseline = guard.section(doc, cpu)
        if baseline is None:
            return _fail(f"{baseline_path} holds no machine's ratios")
        if recorded_on != cpu:
            print(f"statescan bench: {baseline_path} has no ratios from this CPU ({cpu}); "
                  f"checking against those of {recorded_on}, which may differ "
                  "(record this machine's with --update-baseline)", file=sys.stderr)

    notes = []
    statescan.set_num_threads(args.threads)
    if not machine.set_blas_threads(args.threads):
        notes.append("could not set the BLAS thread count (unknown BLAS): numpy's GEMMs may "
                     "use more threads than --threads")
    # The guard needs only statescan and its numpy reference.
    core.configure(args.threads, [] if guard_mode or peers == ["none"] else peers)
    cases, unavailable = _select_cases(args, families, baseline)
    if args.list:
        for c in cases:
            print(f"{c.id}  (T={c.steps})")
        return 0
    if not cases:
        return _fail("no case selected" + "".join(f"\n  family {f}: {why}"
                                                  for f, why in unavailable.items()))

    print(f"statescan bench: measuring the GEMM peak on {args.threads} thread(s)...",
          file=sys.stderr, flush=True)
    peak_seconds = 0.3 if args.quick else 0.8
    peak_dtypes = sorted({"float32"} | {c.dtype for c in cases})
    peaks = _peaks(peak_dtypes, peak_seconds, args.threads)
    budget = 0.5 if guard_mode else (0.15 if args.quick else 0.5)
    # The guard compares ratios across runs: best-of-repeats is steadier under a loaded CPU.
    statistic = "min" if guard_mode else "median"
    results = _run(cases, budget, core, statistic, args.clock)
    peaks = _peaks(peak_dtypes, peak_seconds, args.threads, peaks)
    gemm_peaks = {dt: p["numpy"] for dt, p in peaks.items()}    # the guard's yardstick

    meta = {"statescan": statescan.__version__,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "machine": machine.describe(), "threads": args.threads, "dtype": args.dtype,
            "gemm_peaks_gflops": gemm_peaks, "peaks_gflops": peaks, "statistic": statistic,
            "clock": args.clock,
            "quick": bool(args.quick), "families": families, "filter": _split(args.filter),
            "peer_versions": _peer_versions(), "unavailable_families": unavailable,
            "notes": notes + _run_notes(results, args)}
    print(report.format_table(results, peaks, meta))

    if args.check:
        found = guard.measured(results, gemm_peaks)
        for _ in range(RECHECKS):
            again = [c for c in cases if c.id in guard.regressed(found, baseline, args.tolerance)]
            if not again:
                break
            print(f"statescan bench: re-measuring {len(again)} case(s) below the baseline",
                  file=sys.stderr)
            found = guard.measured(_run(again, budget, core, statistic, args.clock), gemm_peaks,
                                   found)
        passed, lines = guard.report(found, baseline, args.tolerance)
        print(f"Regression check against {baseline_path} ({recorded_on}):")
        print("\n".join(f"  {line}" for line in lines))
        return 0 if passed else 1
    if args.update_baseline:
        doc = guard.updated(doc, results, gemm_peaks, meta, args.tolerance)
        report.write_json(doc, baseline_path)
        key = guard.machine_key(meta["machine"])
        cases = doc["machines"][key]["cases"]
        print(f"baseline of {key} with {len(cases)} case(s) written to {baseline_path}")
        return 0
    _write_outputs(args, results, peaks, meta, report)
    return 0


def _fail(message):
    print(f"statescan bench: {message}", file=sys.stderr)
    return 2


def _select_cases(args, families, baseline):
    """(cases to run, {family: why it is unavailable})."""
    from ._bench import load_cases
    guard_mode = args.check or args.update_baseline
    cases, unavailable = load_cases(families, quick=args.quick or guard_mode)
    if args.check:
        cases = [c for c in cases if c.id in baseline["cases"]]
    elif args.update_baseline:
        cases = [c for c in cases if c.guard and c.dtype == args.dtype]
    else:
        cases = [c for c in cases if c.dtype == args.dtype]
    filters = _split(args.filter)
    if filters:
        cases = [c for c in cases if any(f in c.id for f in filters)]
    return cases, unavailable


def _peaks(dtypes, seconds, threads, before=None):
    """{dtype: {"numpy": GEMM GFLOP/s through numpy, "compiled": through statescan's kernel
    (None without it), "peak": the larger}}, each the best of this measurement and `before`'s:
    measured before and after the cases, so that other processes sharing the CPU at one
    moment do not deflate it."""
    from ._bench import machine
    out = {}
    for dt in dtypes:
        old = (before or {}).get(dt, {})
        ours = machine.compiled_gemm_peak(dt, seconds=seconds, threads=threads)
        numpy_peak = max(machine.gemm_peak(dt, seconds=seconds), old.get("numpy") or 0)
        compiled = max(ours, old.get("compiled") or 0) if ours is not None else None
        out[dt] = {"numpy": numpy_peak, "compiled": compiled,
                   "peak": max(numpy_peak, compiled or 0)}
    return out


def _write_outputs(args, results, peaks, meta, report):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = args.json or Path("bench-results") / f"bench-{stamp}.json"
    report.write_json(report.to_json(results, peaks, meta), json_path)
    print(f"results written to {json_path}")
    if not args.no_plot:
        plot_path = args.plot or json_path.with_suffix(".png")
        if report.write_plot(results, plot_path, meta):
            print(f"plot written to {plot_path}")
        elif args.plot:
            print("no plot: matplotlib is not installed", file=sys.stderr)


def _run(cases, budget, core, statistic, clock):
    results = []
    started = time.perf_counter()
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.id} (T={case.steps}):", end="", file=sys.stderr,
              flush=True)

        def progress(name, outcome):
            text = ("skipped" if isinstance(outcome, core.Skipped)
                    else f"{outcome.us_per_step:.3g}us")
            print(f" {name} {text}", end="", file=sys.stderr, flush=True)
        result = core.run_case(case, budget, on_runner=progress, statistic=statistic,
                               clock=clock)
        if result.error:
            print(f" error: {result.error}", end="", file=sys.stderr)
        print(f"  [{time.perf_counter() - started:.0f}s]", file=sys.stderr, flush=True)
        results.append(result)
    return results


def _peer_versions():
    versions = {}
    for name in ("torch", "onnxruntime", "jax"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    return versions


def _run_notes(results, args):
    notes = []
    if args.clock == "cpu" and args.threads > 1:
        notes.append(f"--clock cpu with {args.threads} threads: times are CPU time summed over "
                     "the threads (work done, not time to the result)")
    if any(m.steps != r.case.steps for r in results for m in r.runs.values()):
        notes.append("slow runners (numpy-ref, python step loops, jax) run shorter sequences "
                     "(steps in the JSON); per-step times compare across T, and their outputs "
                     "are verified against statescan on the same prefix")
    return notes


if __name__ == "__main__":
    sys.exit(main())
