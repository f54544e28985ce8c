"""Reporting a benchmark run: the text table, the JSON document and the PNG plot."""
import json
from collections import Counter

from .core import OWN, RUNNER_ORDER, STATESCAN, threads

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
    lines = [title(meta),
             "measured GEMM peak (the faster of numpy's and statescan's GEMM, same threads): " +
             ", ".join(f"{dt} {p['peak']:.1f} GFLOP/s ({_peak_sources(p)})"
                       for dt, p in peaks.items()),
             *_column_legend(runner_columns(results), meta), ""]
    families = []
    for r in results:
        if r.case.family not in families:
            families.append(r.case.family)
    for family in families:
        rows = [r for r in results if r.case.family == family]
        lines += _family_table(family, rows, peak_of(peaks)) + [""]
    lines += _notes(results, meta)
    return "\n".join(lines).rstrip() + "\n"


def title(meta):
    """One line: statescan's version, the machine, threads and dtype of the run."""
    machine = meta["machine"]
    return (f"statescan {meta['statescan']} bench -- {machine['cpu']}, "
            f"{machine['logical_cpus']} logical CPUs; threads={meta['threads']}, "
            f"dtype={meta['dtype']}" + ("; cpu clock" if meta.get("clock") == "cpu" else ""))


def _column_legend(runners, meta):
    """What every column of the tables means."""
    rows = [("case", "kernel and sizes: B batch rows, H hidden units, heads, D/Dm channels, "
                     "N state size, NH heads, d/P head size, K blocks, m block size"),
            ("T", "time steps (tokens) per statescan call"),
            ("us/step", f"statescan's {meta['statistic']} {meta.get('clock', 'wall')} time per "
                        "call / T"),
            ("GFLOP/s", "statescan's floating-point rate"),
            ("%peak", "GFLOP/s as a fraction of the measured GEMM peak of its dtype (above)")]
    rows += [(f"{name} x", f"{OWN.get(name, 'a peer library')}: its time per step / "
                           "statescan's (>1: statescan is faster)") for name in runners]
    rows.append(("cpu/wall", "each runner's process CPU time / wall time over its timed calls; "
                             "! marks a runner that used more cores than the run's threads "
                             f"({meta['threads']}): its time is not comparable"))
    rows.append(("check", "each runner's output compared with statescan's on the same input: "
                          "ok, or MISMATCH and the largest error; OVER-SHARE names runners "
                          "marked !"))
    width = max(len(key) for key, _ in rows)
    return ["columns:"] + [f"  {key.ljust(width)}  {text}" for key, text in rows]


def _family_table(family, rows, peaks):
    peers = runner_columns(rows)
    header = (["case", "T", "us/step", "GFLOP/s", "%peak"] + [f"{p} x" for p in peers]
              + ["cpu/wall", "check"])
    table = [header]
    for r in rows:
        case, ours = r.case, r.runs.get(STATESCAN)
        label = f"{case.name} " + " ".join(f"{k}={v}" for k, v in case.params.items())
        if ours is None:
            reason = r.error or r.skipped.get(STATESCAN, "not run")
            table.append([label, str(case.steps), "error", "", ""] + [""] * len(peers)
                         + ["", reason[:60]])
            continue
        gf, peak = ours.gflops, peaks.get(case.dtype)
        cells = [label, str(ours.steps), _num(ours.us_per_step),
                 "" if gf is None else f"{gf:.1f}",
                 "" if gf is None or not peak else f"{100 * gf / peak:.0f}%"]
        for p in peers:
            ratio = r.ratio(p)
            cells.append("-" if ratio is None else f"{ratio:.2f}" if ratio >= 0.1
                         else f"{ratio:.2g}")
        cells.append(_cpu_cell(r))
        bad = [f"{p} err={m.max_error:.1e}" for p, m in r.runs.items() if m.ok is False]
        check = ["MISMATCH " + ", ".join(bad)] if bad else []
        over = over_share(r)
        check += ["OVER-SHARE " + ", ".join(over)] if over else []
        cells.append("; ".join(check) or "ok")
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    out = [f"== {family} =="]
    for i, row in enumerate(table):
        out.append("  ".join(c.ljust(w) if j == 0 or j == len(row) - 1 else c.rjust(w)
                             for j, (c, w) in enumerate(zip(row, widths))).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def over_share(result):
    """Runners of `result` that used more cores than the run's thread count."""
    return [name for name, m in result.runs.items() if m.over_share]


def _cpu_cell(result):
    """'statescan 1.00 torch 1.02 jax 1.48!': every runner's CPU/wall ratio, in table order."""
    names = [STATESCAN] + [n for n in runner_columns([result]) if n in result.runs]
    parts = []
    for name in names:
        m = result.runs.get(name)
        if m is not None and m.cpu_ratio is not None:
            parts.append(f"{name} {m.cpu_ratio:.2f}{'!' if m.over_share else ''}")
    return " ".join(parts)


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
    over = Counter(name for r in results for name in over_share(r))
    for name, n in sorted(over.items()):
        notes.append(f"{name} used more CPU than {threads()} core(s) in {n} case(s) (cpu/wall "
                     "marked !): it ignored the thread setting and the pinning, so its times "
                     "are not comparable")
    for family, reason in meta.get("unavailable_families", {}).items():
        notes.append(f"family {family} not benchmarked: {reason}")
    notes += meta.get("notes", [])
    return ["Notes:"] + [f"  - {n}" for n in notes] if notes else []


def peak_of(peaks):
    """{dtype: the machine's measured peak} of the CLI's {dtype: {"numpy", "compiled",
    "peak"}}."""
    return {dt: p["peak"] for dt, p in peaks.items()}


def _peak_sources(p):
    compiled = "" if p["compiled"] is None else f"statescan {p['compiled']:.1f}, "
    return f"{compiled}numpy {p['numpy']:.1f}"


def to_json(results, peaks, meta):
    doc = dict(meta)
    doc["schema"] = SCHEMA
    best = peak_of(peaks)
    doc["results"] = [_result_json(r, best.get(r.case.dtype)) for r in results]
    return doc


def _result_json(r, peak):
    runs = {}
    for name, m in r.runs.items():
        gf = m.gflops
        runs[name] = {"us_per_step": m.us_per_step, "seconds_per_call": m.seconds,
                      "steps": m.steps, "repeats": m.repeats, "gflops": gf,
                      "peak_fraction": gf / peak if gf is not None and peak else None,
                      "max_error": m.max_error, "verified": m.ok,
                      "cpu_ratio": m.cpu_ratio, "over_share": m.over_share}
        if name != STATESCAN:
            runs[name]["ratio"] = r.ratio(name)
    return {"id": r.case.id, "family": r.case.family, "name": r.case.name,
            "params": r.case.params, "dtype": r.case.dtype, "steps": r.case.steps,
            "flops_per_call": r.case.flops, "runners": runs, "skipped": r.skipped,
            "over_share": over_share(r), "error": r.error}


def write_json(doc, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=float) + "\n")


# One colour per runner in every panel: peers in colour, statescan's own runners in greys.
_COLOURS = {"torch": "#1f77b4", "torch-loop": "#17becf", "torch-packed": "#9467bd",
            "onnxruntime": "#ff7f0e", "jax": "#2ca02c", "jax-loop": "#98df8a",
            "transformers": "#d62728",
            "numpy-ref": "#8c8c8c", "sequential": "#404040", "padded-static": "#b0b0b0",
            "padded-lengths": "#6e6e6e", "ideal": "#d6d6d6"}
_SPARE = ("#8c564b", "#e377c2", "#bcbd22", "#7f7f7f", "#aec7e8")
_PANEL_NOTES = {"parallel": "statescan = a parallel-in-time solver; sequential = statescan's own "
                            "sequential kernel, not a peer"}


def runner_colours(names):
    """{runner: colour}: fixed for the known runners, spare colours for others in order."""
    spare = iter(_SPARE * (1 + len(names) // len(_SPARE)))
    return {n: _COLOURS[n] if n in _COLOURS else next(spare) for n in names}


def _label(name):
    return f"{name}: {OWN[name]}" if name in OWN else name


def write_plot(results, path, meta):
    """Speed-up of statescan over each other runner, one panel per family (log scale), one
    colour per runner across the panels, a legend and a title with the machine, threads and
    dtype.  Returns False when matplotlib is not installed."""
    try:
        import matplotlib
        import matplotlib.patches
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
    ran = [p for p in runner_columns(results)
           if any(r.ratio(p) is not None for r in results)]
    colours = runner_colours(ran)
    heights = [max(1.6, 0.22 * sum(r.case.family == f for r in results)) for f in families]
    fig, axes = plt.subplots(len(families), 1, figsize=(10, sum(heights) + 2.2),
                             gridspec_kw={"height_ratios": heights}, squeeze=False,
                             layout="constrained")
    for ax, family in zip(axes[:, 0], families):
        rows = [r for r in results if r.case.family == family and STATESCAN in r.runs]
        _panel(ax, family, rows, [p for p in ran if any(r.ratio(p) is not None for r in rows)],
               colours, matplotlib)
    handles = [matplotlib.patches.Patch(facecolor=colours[p],
                                        hatch="//" if p in OWN else None, label=_label(p))
               for p in ran]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(2, len(handles)),
                   fontsize=7, frameon=False)
    fig.suptitle(title(meta) + "\nbars: other runner's time / statescan's time per step "
                 "(log scale; right of 1: statescan is faster)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")     # long legend labels stay whole
    plt.close(fig)
    return True


def _panel(ax, family, rows, runners, colours, matplotlib):
    width = 0.8 / max(len(runners), 1)
    for k, name in enumerate(runners):
        ys, xs = [], []
        for i, r in enumerate(rows):
            ratio = r.ratio(name)
            if ratio is not None:
                ys.append(i + (k - (len(runners) - 1) / 2) * width)
                xs.append(ratio)
        # bars grow from 1 (parity): right when statescan is faster, left when slower
        ax.barh(ys, [x - 1 for x in xs], left=1.0, height=width, color=colours[name],
                hatch="//" if name in OWN else None, edgecolor="white", linewidth=0.3)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ratios = [r.ratio(p) for r in rows for p in runners if r.ratio(p) is not None]
    if ratios:   # at least 0.5..2 so that a panel of near-parity bars still has ticks
        ax.set_xlim(min(0.5, min(ratios) / 1.2), max(2.0, max(ratios) * 1.2))
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.tick_params(axis="x", labelsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r.case.name} " + " ".join(f"{k}={v}" for k, v in
                                                     r.case.params.items()) for r in rows],
                       fontsize=6)
    ax.set_ylim(len(rows) - 0.5, -0.5)          # first case on top, no empty margins
    note = _PANEL_NOTES.get(family)
    ax.set_title(family + (f": {note}" if note else ""), fontsize=8, loc="left")
