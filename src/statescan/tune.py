"""``statescan.tune()``: time the feasible blocking parameters of the kernels on this machine
and cache the winners (see :mod:`statescan._tuning` for the candidates and the cache)."""
import statistics
import time

import numpy as np

from . import _dispatch, _tuning, _validate

CELLS = ("lstm", "gru", "elman", "slstm")
KERNELS = CELLS + ("ssd", "linear_attention")
NOISE = 0.03          # a candidate replaces the default only when its median is this much faster
_AGAIN = "default again"     # the default's second timing, whose difference measures the noise
_SAMPLE_SECONDS = 0.004   # calls per timed sample: enough to last about this long

# The shapes tuned when `shapes` is not given.
_CELL_SHAPES = [{"B": B, "H": H} for B in (1, 16, 64) for H in (64, 256, 1024)]
_CHUNK_SHAPES = {
    "ssd": [{"B": 1, "T": 512, "NH": 8, "P": 64, "N": N} for N in (64, 128)],
    "linear_attention": [{"B": 1, "NH": 8, "T": 1024, "dk": d, "dv": d} for d in (64, 128)],
}


def tune(kernels=None, shapes=None, dtype="float32", repeat=7, cache=True, verbose=False):
    """Time the feasible blocking parameters of the kernels and cache the fastest ones.

    For every kernel and shape, each candidate the machine model allows (rows per job or the
    column split of the recurrent cells; the ``chunk`` of :func:`ssd` and
    :func:`linear_attention`), the default included, is timed in interleaved rounds at the
    current thread count (:func:`get_num_threads`).  The default is timed twice, and the
    relative difference of the two medians is the noise; a candidate is kept only when both
    its median and its best time beat the default's by more than 3 % and twice the noise;
    otherwise the default is recorded.
    Later calls with the same head sizes (``chunk=None``) or the same cell, batch and hidden
    size read the choice from a per-machine cache file, in this and later processes.

    Parameters
    ----------
    kernels : str or sequence of str, optional
        Among ``"lstm"``, ``"gru"``, ``"elman"``, ``"slstm"``, ``"ssd"``,
        ``"linear_attention"``; None tunes every one.
    shapes : list of dict or dict, optional
        The sizes to tune: a list applied to every kernel, or ``{kernel: list}``.  Cells take
        ``B``, ``H`` (and optionally ``heads``, ``T``); ``ssd`` takes ``B, T, NH, P, N``;
        ``linear_attention`` takes ``B, NH, T, dk, dv``.  None: cells at B in {1, 16, 64} and
        H in {64, 256, 1024}; ssd at N in {64, 128}, P=64; linear_attention at dk=dv in
        {64, 128}.
    dtype : {"float32", "float64"}
    repeat : int
        Timed rounds per candidate (at least 3); the median is compared.
    cache : bool
        Write the choices to the cache file (``$STATESCAN_CACHE_DIR`` or
        ``~/.cache/statescan/tuning-<machine>.json``) and use them from now on.  False only
        measures.
    verbose : bool
        Print one line per shape.

    Returns
    -------
    dict
        ``{"cache": path or None, "machine": {...}, "threads": n, "results": [record, ...]}``;
        a record is ``{"kernel", "key", "shape", "default", "value", "speedup", "seconds",
        "clock", "noise"}``:
        the lookup key, the sizes timed, the default and chosen values (rnn: 0 = automatic
        rows per job, > 0 rows per job, -1 column split; else the chunk), the default's
        median time over the chosen one's, and the median seconds per call of every
        candidate (keyed by ``str(value)``), and the clock: the calling thread's CPU time
        with one thread (steady on a busy machine), else wall time.  Kernels this build
        cannot tune are listed under ``"skipped"`` with the reason.
    """
    kernels = _kernels(kernels)
    dtype = _validate.choice("dtype", dtype, ("float32", "float64"))
    repeat = max(3, _validate.positive_int("repeat", repeat))
    threads = _dispatch.get_num_threads()
    results, skipped = [], {}
    for kernel in kernels:
        why = _untunable(kernel)
        if why:
            skipped[kernel] = why
            continue
        for shape in _shapes(kernel, shapes):
            record = _tune_one(kernel, dict(shape), np.dtype(dtype), threads, repeat)
            results.append(record)
            if verbose:
                print(_describe(record), flush=True)
    path = _tuning.store(results) if cache and results else None
    return {"cache": path, "machine": dict(_tuning.machine()), "threads": threads,
            "results": results, "skipped": skipped}


def _kernels(kernels):
    if kernels is None:
        return list(KERNELS)
    names = [kernels] if isinstance(kernels, str) else list(kernels)
    for name in names:
        _validate.choice("kernels", name, KERNELS)
    return names


def _untunable(kernel):
    """Why `kernel` cannot be tuned in this process (None when it can)."""
    if _dispatch.backend() != "compiled":
        return "the numpy reference backend is active (nothing to tune)"
    if kernel in CELLS and not rnn_block_supported():
        return "this build's rnn kernel takes no block argument"
    return None


def rnn_block_supported():
    """True when the compiled rnn forward takes a ``block`` argument."""
    import inspect
    try:
        forward = _dispatch.ext_module("rnn").forward
        return "block" in inspect.signature(forward).parameters
    except (ImportError, TypeError, ValueError):
        return False


def _shapes(kernel, shapes):
    if shapes is None:
        return _CELL_SHAPES if kernel in CELLS else _CHUNK_SHAPES[kernel]
    if isinstance(shapes, dict):
        return shapes.get(kernel, [])
    return shapes


# ---- one shape -------------------------------------------------------------------------------

def _tune_one(kernel, shape, dtype, threads, repeat):
    if kernel in CELLS:
        key, call, values = _cell_problem(kernel, shape, dtype, threads)
        run = {v: _forced_rnn(call, v) for v in values}
    else:
        key, call, values = _chunk_problem(kernel, shape, dtype, threads)
        run = {v: (lambda c=v: call(c)) for v in values}
    # one thread: its own CPU time, which other processes on a busy machine do not inflate;
    # several threads: wall time (a worker's time is not the calling thread's)
    clock = time.thread_time if threads == 1 else time.perf_counter
    default = values[0]
    run[_AGAIN] = run[default]          # the default timed twice: the noise of this machine
    seconds, fastest = _time(run, repeat, clock)
    noise = abs(seconds.pop(_AGAIN) / seconds[default] - 1)
    fastest.pop(_AGAIN)
    margin = 1 - max(NOISE, 2 * noise)
    # beating the default must show in the median and in the best sample alike (a loaded
    # machine can hand one candidate a lucky median), by more than the noise
    wins = [v for v in values if seconds[v] < seconds[default] * margin
            and fastest[v] < fastest[default] * margin]
    best = min(wins, key=seconds.get) if wins else default
    return {"kernel": "rnn" if kernel in CELLS else kernel, "key": list(key), "shape": shape,
            "default": default, "value": best, "speedup": seconds[default] / seconds[best],
            "seconds": {str(v): s for v, s in seconds.items()},
            "clock": "thread cpu" if threads == 1 else "wall", "noise": noise}


def _forced_rnn(call, value):
    def run():
        with _tuning.forcing("rnn", value):
            return call()
    return run


def _cell_problem(cell, shape, dtype, threads):
    """The recurrence alone (W=None: x holds the pre-activations), which `block` affects."""
    from . import rnn
    from ._cells import CELLS as REGISTRY
    B, H, heads = int(shape["B"]), int(shape["H"]), int(shape.get("heads", 1))
    G = REGISTRY[cell].gates
    per_step = 2.0 * B * G * H * H / heads
    T = int(shape.get("T", max(8, min(256, 1e8 // max(per_step, 1)))))
    shape.update(heads=heads, T=T)
    rng = np.random.default_rng(0)
    x = (0.5 * rng.standard_normal((B, T, G * H))).astype(dtype)
    R = (rng.standard_normal((heads, G * H // heads, H // heads))
         / np.sqrt(H // heads)).astype(dtype)
    if heads == 1:
        R = R[0]
    fn = getattr(rnn, cell)
    key = (cell, B, H, heads, dtype.name, threads)
    return key, (lambda: fn(x, None, R, heads=heads)), _tuning.candidates("rnn", key)


def _chunk_problem(kernel, shape, dtype, threads):
    rng = np.random.default_rng(0)
    if kernel == "ssd":
        from .ssd import ssd
        B, T, NH, P, N = (int(shape[n]) for n in ("B", "T", "NH", "P", "N"))
        x = rng.standard_normal((B, T, NH, P)).astype(dtype)
        dt = rng.uniform(0.01, 0.1, (B, T, NH)).astype(dtype)
        A = -rng.uniform(0.5, 2.0, NH).astype(dtype)
        Bm, Cm = (rng.standard_normal((B, T, N)).astype(dtype) for _ in range(2))
        key = (N, P, dtype.name, threads)
        return key, (lambda c: ssd(x, dt, A, Bm, Cm, chunk=c)), _tuning.candidates(kernel, key)
    from .linear_attention import linear_attention
    B, NH, T, dk, dv = (int(shape[n]) for n in ("B", "NH", "T", "dk", "dv"))
    q, k = ((rng.standard_normal((B, NH, T, dk)) / np.sqrt(dk)).astype(dtype) for _ in range(2))
    v = rng.standard_normal((B, NH, T, dv)).astype(dtype)
    decay = rng.uniform(0.9, 1.0, NH).astype(dtype)
    key = (dk, dv, dtype.name, threads)
    return key, (lambda c: linear_attention(q, k, v, decay=decay, chunk=c)), \
        _tuning.candidates(kernel, key)


def _time(run, repeat, clock):
    """({value: median seconds per call}, {value: best}): a warm-up call each, then
    `repeat` interleaved rounds (a change of the machine's load hits every candidate alike),
    each sample a few calls long."""
    calls = {}
    for value, fn in run.items():
        t0 = clock()
        fn()
        first = clock() - t0
        calls[value] = max(1, int(_SAMPLE_SECONDS / max(first, 1e-7)))
    samples = {value: [] for value in run}
    order = list(run)
    for r in range(repeat):
        for value in order[r % len(order):] + order[:r % len(order)]:
            fn, n = run[value], calls[value]
            t0 = clock()
            for _ in range(n):
                fn()
            samples[value].append((clock() - t0) / n)
    return ({value: statistics.median(s) for value, s in samples.items()},
            {value: min(s) for value, s in samples.items()})


def _describe(record):
    shape = " ".join(f"{k}={v}" for k, v in record["shape"].items())
    name = record["key"][0] if record["kernel"] == "rnn" else record["kernel"]
    return (f"{name} {shape}: default {record['default']} -> {record['value']} "
            f"({record['speedup']:.2f}x; " + ", ".join(
                f"{v}: {1e3 * s:.3g} ms" for v, s in record["seconds"].items()) + ")")
