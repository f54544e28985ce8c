"""Reporting a benchmark run: the text table, the JSON document and the PNG plot."""
import json
from collections import Counter

from .core import RUNNER_ORDER, STATESCAN

SCHEMA = "statescan-bench/1"


def runner_columns(results):
    """Peer names present in `results`, in table order."""
    names = []
    for r in results:
        for name in list(r.runs) + list(r.skipped):
            if name != STATESCAN and name not in names:
                names.append(name)
    return sorted(names, key=lambda n: (RUNNER_ORDER.index(n) if n in RUNNER_ORDER
                                        else len(RUNNER_ORDER), names.index(n)))


def format_table(results, peaks, meta):
    """The human-readable report: one table per family, then notes."""
    lines = [f"statescan {meta['statescan']} bench -- {meta['machine']['cpu']}, "
             f"{meta['machine']['logical_cpus']} logical CPUs; threads={meta['threads']}, "
             f"dtype={meta['dtype']}",
             "measured GEMM peak (numpy, same threads): " +
             ", ".join(f"{dt} {v:.1f} GFLOP/s" for dt, v in peaks.items()),
             f"us/step: statescan's {meta['statistic']} time per call / steps;  %peak: its "
             "GFLOP/s as a fraction of the peak of its dtype;",
             "peer columns: peer time per step / statescan time per step "
             "(>1 = statescan is faster).", ""]
    families = []
    for r in results:
        if r.case.family not in families:
            families.append(r.case.family)
    for family in families:
        rows = [r for r in results if r.case.family == family]
        lines += _family_table(family, rows, peaks) + [""]
    lines += _notes(results, meta)
    return "\n".join(lines).rstrip() + "\n"


def _family_table(family, rows, peaks):
    peers = runner_columns(rows)
    header = ["case", "T", "us/step", "GFLOP/s", "%peak"] + [f"{p} x" for p in peers] + ["check"]
    table = [header]
    for r in rows:
        case, ours = r.case, r.runs.get(STATESCAN)
        label = f"{case.name} " + " ".join(f"{k}={v}" for k, v in case.params.items())
        if ours is None:
            reason = r.error or r.skipped.get(STATESCAN, "not run")
            table.append([label, str(case.steps), "error", "", ""] + [""] * len(peers)
                         + [reason[:60]])
            continue
        gf, peak = ours.gflops, peaks.get(case.dtype)
        cells = [label, str(ours.steps), _num(ours.us_per_step),
                 "" if gf is None else f"{gf:.1f}",
                 "" if gf is None or not peak else f"{100 * gf / peak:.0f}%"]
        for p in peers:
            ratio = r.ratio(p)
            cells.append("-" if ratio is None else f"{ratio:.2f}")
        bad = [f"{p} err={m.max_error:.1e}" for p, m in r.runs.items() if m.ok is False]
        cells.append("MISMATCH " + ", ".join(bad) if bad else "ok")
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    out = [f"== {family} =="]
    for i, row in enumerate(table):
        out.append("  ".join(c.ljust(w) if j == 0 or j == len(row) - 1 else c.rjust(w)
                             for j, (c, w) in enumerate(zip(row, widths))).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def _num(v):
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _notes(results, meta):
    notes = []
    skipped = Counter((name, reason) for r in results for name, reason in r.skipped.items())
    for (name, reason), n in sorted(skipped.items()):
        notes.append(f"{name} skipped in {n} case(s): {reason}")
    for r in results:
        if r.error:
            notes.append(f"{r.case.id}: could not run: {r.error}")
    for family, reason in meta.get("unavailable_families", {}).items():
        notes.append(f"family {family} not benchmarked: {reason}")
    notes += meta.get("notes", [])
    return ["Notes:"] + [f"  - {n}" for n in notes] if notes else []


def to_json(results, peaks, meta):
    doc = dict(meta)
    doc["schema"] = SCHEMA
    doc["results"] = [_result_json(r, peaks.get(r.case.dtype)) for r in results]
    return doc


def _result_json(r, peak):
    runs = {}
    for name, m in r.runs.items():
        gf = m.gflops
        runs[name] = {"us_per_step": m.us_per_step, "seconds_per_call": m.seconds,
                      "steps": m.steps, "repeats": m.repeats, "gflops": gf,
                      "peak_fraction": gf / peak if gf is not None and peak else None,
                      "max_error": m.max_error, "verified": m.ok}
        if name != STATESCAN:
            runs[name]["ratio"] = r.ratio(name)
    return {"id": r.case.id, "family": r.case.family, "name": r.case.name,
            "params": r.case.params, "dtype": r.case.dtype, "steps": r.case.steps,
            "flops_per_call": r.case.flops, "runners": runs, "skipped": r.skipped,
            "error": r.error}


def write_json(doc, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=float) + "\n")


def write_plot(results, path):
    """Speed-up of statescan over each peer, one panel per family (log scale).  Returns False
    when matplotlib is not installed."""
    try:
        import matplotlib
        import matplotlib.ticker
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    families = []
    for r in results:
        if r.case.family not in families and STATESCAN in r.runs:
            families.append(r.case.family)
    if not families:
        return False
    heights = [max(2.0, 0.22 * sum(r.case.family == f for r in results)) for f in families]
    fig, axes = plt.subplots(len(families), 1, figsize=(10, sum(heights) + 1.5),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, family in zip(axes[:, 0], families):
        rows = [r for r in results if r.case.family == family and STATESCAN in r.runs]
        # only peers that ran somewhere in this family get a bar colour and a legend entry
        peers = [p for p in runner_columns(rows) if any(r.ratio(p) is not None for r in rows)]
        width = 0.8 / max(len(peers), 1)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for k, peer in enumerate(peers):
            ys, xs = [], []
            for i, r in enumerate(rows):
                ratio = r.ratio(peer)
                if ratio is not None:
                    ys.append(i + (k - (len(peers) - 1) / 2) * width)
                    xs.append(ratio)
            # bars grow from 1 (parity): right when statescan is faster, left when slower
            ax.barh(ys, [x - 1 for x in xs], left=1.0, height=width, label=peer,
                    color=colors[k % len(colors)])
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ratios = [r.ratio(p) for r in rows for p in peers if r.ratio(p) is not None]
        if ratios:   # at least 0.5..2 so that a panel of near-parity bars still has ticks
            ax.set_xlim(min(0.5, min(ratios) / 1.2), max(2.0, max(ratios) * 1.2))
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([f"{r.case.name} " + " ".join(f"{k}={v}" for k, v in
                                                         r.case.params.items()) for r in rows],
                           fontsize=6)
        ax.set_ylim(len(rows) - 0.5, -0.5)          # first case on top, no empty margins
        ax.set_title(f"{family}: peer time / statescan time (>1: statescan faster)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
