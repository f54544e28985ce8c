"""The benchmark interface: cases, runners, and how one case is measured.

Writing a family module
-----------------------
A family module is ``statescan/_bench/<family>_cases.py`` (``rnn_cases``, ``scan_cases``,
``attention_cases``, ``parallel_cases``).  ``statescan bench`` finds it by name (see
:data:`FAMILIES`); if it fails to import, that family is reported as skipped and the others run.
It defines one function::

    def cases(quick: bool) -> list[Case]

returning the grid for BOTH dtypes (float32 and float64: the runner keeps the ``--dtype`` one).
``quick=True`` is the ``--quick`` grid (the whole ``statescan bench --quick`` must stay under a
minute, so a few small cases per family).  Building the list must be cheap: allocate nothing
there, do it in ``make``.

A :class:`Case` is one grid point::

    Case(family="scan", name="linear_scan", params={"B": 16, "T": 4096, "D": 256},
         dtype="float32", steps=4096, flops=2 * 16 * 4096 * 256, make=build)

* ``steps``: time steps (or tokens) per call of the ``"statescan"`` runner; tables report
  microseconds per step = seconds per call / steps, so cases with different T compare.
  Pick T so one statescan call takes ~0.05-0.3 s (quick mode: ~0.01-0.05 s).
* ``flops``: floating-point operations per call of the ``"statescan"`` runner (for GFLOP/s
  and the fraction of the machine's measured GEMM peak); 0 when not meaningful.
* ``make()``: builds the inputs (outside the timing) and returns ``{runner name: runner}``.
  A runner is a zero-argument callable returning the output to verify (an array, a tuple of
  arrays, or None to skip verification), or a :class:`Runner` when its sequence length
  differs from ``steps`` or it needs its own expected output, or a :class:`Skipped`.
  Names: ``"statescan"`` (required), ``"numpy-ref"`` (the numpy reference, wrap it with
  :func:`numpy_reference`; cap its T with ``Runner(steps=...)`` so a call stays < ~0.5 s),
  and peers ``"torch"``, ``"torch-loop"``, ``"onnxruntime"``, ``"jax"``, ``"jax-loop"``...
  Add peers with ``add_peer(runners, name, build, *args)``: it calls ``build(*args)`` (which
  returns the runner) only when the peer is enabled by ``--peers``, and turns a missing
  package or a failing build into a :class:`Skipped` note.  Keep a family's peer builders in
  its own module (``peers.py`` holds the RNN ones and shows the pattern).  Import peer
  packages with :func:`import_peer` (it applies the thread count); :func:`threads` is the
  thread count of the run (for e.g. ONNX Runtime's ``intra_op_num_threads``).
* ``guard=True`` marks a quick-grid case used by the regression guard (``--check``): keep its
  sizes fixed forever, and keep a ``"numpy-ref"`` runner.
* ``atol``: largest accepted ``max|out - expected| / max(1, max|expected|)`` of a runner's
  output against the expected one (default: 2e-3 for float32, 1e-8 for float64).

Verification: every runner's output is compared with the ``"statescan"`` runner's output
(or with ``Runner.expected()`` when given; a runner with a different ``steps`` and no
``expected`` is not compared).  Mismatches are reported, not fatal.

Example (a runner per peer, numpy reference on a shorter sequence)::

    def build():
        a, b = ...                                   # [B, T, D]
        ar, br = a[:, :Tr].copy(), b[:, :Tr].copy()  # a shorter sequence for the reference
        runners = {"statescan": lambda: ss.linear_scan(a, b),
                   "numpy-ref": Runner(numpy_reference(lambda: ss.linear_scan(ar, br)),
                                       steps=Tr, expected=lambda: ss.linear_scan(ar, br))}
        add_peer(runners, "torch", _torch_scan, a, b)  # _torch_scan calls import_peer("torch")
        return runners
"""
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

import statescan

FAMILIES = ("rnn", "scan", "attention", "parallel", "layers", "batching", "lengths", "conv",
            "mamba", "tuned", "calls", "split")
STATESCAN = "statescan"
NUMPY_REF = "numpy-ref"
# Other libraries, the names `add_peer` and ``--peers`` take (a new peer is added here).
PEERS = ("torch", "torch-loop", "torch-packed", "onnxruntime", "jax", "jax-loop", "transformers")
# Runners that are statescan itself in another form: compared with, but not peers.
OWN = {NUMPY_REF: "statescan's numpy reference",
       "sequential": "statescan's sequential kernel (the solver cases)",
       "padded-static": "statescan, padded static batches",
       "padded-lengths": "statescan, padded batches with lengths=",
       "ideal": "statescan, one full batch (the bound)",
       "weight-streaming": "one GEMV over the weight bytes a decode step reads (the bound)",
       "default": "statescan with its automatic blocking, ignoring statescan.tune()'s cache",
       "statescan-1t": "statescan with one thread (the calls and split cases)",
       "weights-packed": "statescan with its weights packed once (statescan.stream), as ONNX "
                         "Runtime packs them when its session is made (the rnn cases)",
       "kernel-only": "the compiled kernels of the call alone, outputs ready (the calls cases)"}
# Column order in tables; unknown runner names follow in the order cases return them.
RUNNER_ORDER = (STATESCAN, *OWN, *PEERS)


@dataclass
class Case:
    family: str
    name: str
    params: dict
    dtype: str
    steps: int
    flops: float
    make: Callable[[], dict]
    guard: bool = False
    atol: Optional[float] = None

    @property
    def id(self):
        """Stable identifier: used by --filter and as the regression baseline's key."""
        sizes = " ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.family}/{self.name} {sizes} {self.dtype}".replace("  ", " ")

    @property
    def tolerance(self):
        if self.atol is not None:
            return self.atol
        return 2e-3 if self.dtype == "float32" else 1e-8


@dataclass
class Runner:
    fn: Callable[[], Any]
    steps: Optional[int] = None              # None: the case's steps
    flops: Optional[float] = None            # None: the case's flops scaled by steps
    expected: Optional[Callable[[], Any]] = None


@dataclass
class Skipped:
    reason: str


@dataclass
class Measurement:
    """One runner on one case."""
    seconds: float                   # median seconds per call
    steps: int
    repeats: int
    flops: float
    max_error: Optional[float] = None
    ok: Optional[bool] = None       # None: not verified
    cpu_ratio: Optional[float] = None   # process CPU time / wall time over the timed calls

    @property
    def over_share(self):
        """True when the runner used more cores than the run's thread count allows (a peer
        that ignored its thread setting: its time is not comparable)."""
        return self.cpu_ratio is not None and self.cpu_ratio > threads() * 1.15 + 0.05

    @property
    def us_per_step(self):
        return self.seconds / max(self.steps, 1) * 1e6

    @property
    def gflops(self):
        return self.flops / self.seconds / 1e9 if self.flops and self.seconds > 0 else None


@dataclass
class CaseResult:
    case: Case
    runs: dict = field(default_factory=dict)       # name -> Measurement
    skipped: dict = field(default_factory=dict)    # name -> reason
    error: Optional[str] = None                    # the case could not be built or run

    def ratio(self, peer):
        """peer time per step / statescan time per step (> 1: statescan is faster)."""
        ours, theirs = self.runs.get(STATESCAN), self.runs.get(peer)
        if ours is None or theirs is None or ours.us_per_step <= 0:
            return None
        return theirs.us_per_step / ours.us_per_step


# ---- run-wide settings (set by the CLI before cases are built) -------------------------------

_settings = {"threads": 1, "peers": None}   # peers: None = all, else a set of enabled names


def configure(threads, peers=None):
    """Set the run's thread count and peers; pin the process to that many cores (Linux).

    Pinning happens before any peer is imported, so the threads a peer starts (JAX, ONNX
    Runtime, OpenMP pools) inherit it: statescan and every peer then share the same cores,
    whatever thread settings a peer honours."""
    _settings["threads"] = int(threads)
    _settings["peers"] = None if peers is None else set(peers)
    _settings["cores"] = pin_to_cores(int(threads))


def pin_to_cores(n):
    """Restrict this process to `n` of the cores it may run on; the cores used, or None where
    affinity cannot be set."""
    import os
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if n >= len(allowed):
        return tuple(allowed)
    cores = tuple(allowed[:n])
    os.sched_setaffinity(0, cores)
    # On Linux that moves only the calling thread: threads started earlier (a BLAS pool
    # started when numpy was imported, OpenMP workers) are moved one by one.
    for tid in _thread_ids():
        try:
            os.sched_setaffinity(tid, cores)
        except OSError:             # the thread has exited meanwhile
            pass
    return cores


def _thread_ids():
    """The ids of this process's threads (Linux /proc; none elsewhere)."""
    import os
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return []


def cores():
    """The cores the run is pinned to (None when not pinned)."""
    return _settings.get("cores")


def threads():
    """Thread count of the current run."""
    return _settings["threads"]


def peer_enabled(name):
    enabled = _settings["peers"]
    return enabled is None or name in enabled


def import_peer(name):
    """Import a peer package and apply the run's thread count to it."""
    import importlib
    module = importlib.import_module(name)
    if name == "torch":
        if module.get_num_threads() != threads():
            module.set_num_threads(threads())
    return module


def add_peer(runners, name, build, *args, **kwargs):
    """``runners[name] = build(*args, **kwargs)`` if peer `name` (one of :data:`PEERS`) is
    enabled; a missing package or a failing build becomes a :class:`Skipped` with the reason."""
    if name not in PEERS:
        raise ValueError(f"peer {name!r} is not in statescan._bench.core.PEERS")
    if not peer_enabled(name):
        return
    try:
        runners[name] = build(*args, **kwargs)
    except ImportError as exc:
        runners[name] = Skipped(f"not installed ({exc.name or exc})")
    except Exception as exc:  # a peer that cannot express this case must not stop the others
        runners[name] = Skipped(f"build failed: {type(exc).__name__}: {exc}")


def numpy_reference(fn):
    """Wrap `fn` so it runs with statescan's numpy reference backend, restoring the previous
    backend afterwards."""
    def run():
        previous = statescan.backend()
        statescan.set_backend("python")
        try:
            return fn()
        finally:
            statescan.set_backend(previous)
    return run


# ---- measuring -------------------------------------------------------------------------------

def repeats_for(first_seconds, budget, min_repeats=3, max_repeats=200):
    """How many timed calls fit in `budget` seconds, given the first call's duration."""
    return int(min(max_repeats, max(min_repeats, budget / max(first_seconds, 1e-9))))


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def max_error(out, expected):
    """max|out - expected| / max(1, max|expected|) over (tuples of) arrays; inf on a shape
    mismatch."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    exps = expected if isinstance(expected, (tuple, list)) else (expected,)
    if len(outs) != len(exps):
        return float("inf")
    worst = 0.0
    for o, e in zip(outs, exps):
        o, e = _to_numpy(o), _to_numpy(e)
        if o.shape != e.shape:
            return float("inf")
        if e.size == 0:
            continue
        o, e = o.astype(np.float64), e.astype(np.float64)
        scale = max(1.0, float(np.nanmax(np.abs(e))))
        diff = np.abs(o - e)
        err = float("inf") if np.isnan(diff).any() else float(diff.max())
        worst = max(worst, err / scale)
    return worst


def _to_numpy(a):
    if hasattr(a, "detach"):          # torch tensors
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def run_case(case, budget=0.6, on_runner=None, statistic="median", clock="wall"):
    """Build `case` and measure each of its runners.

    Each runner is called once to warm up (JIT compilation, caches, page faults) and to verify
    its output; then the runners' timed calls are interleaved, round by round, so a change of
    the machine's load affects all of them alike.  A runner gets about `budget` seconds of
    timed calls (3 to 200 of them); its time is their median, or with ``statistic="min"`` their
    best.  ``clock="cpu"`` times a call by the process's CPU time (every thread's) instead of
    the wall clock: on a machine other processes keep busy, the time a one-thread run spent
    waiting for the core does not count.  `on_runner(name, measurement_or_skipped)` is called
    for each runner at the end."""
    result = CaseResult(case)
    try:
        runners = case.make()
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    ordered = sorted(runners, key=lambda n: (RUNNER_ORDER.index(n) if n in RUNNER_ORDER
                                             else len(RUNNER_ORDER)))
    live, times = {}, {}                # name -> (Runner, Measurement), name -> [seconds]
    reference_out, reference_steps = None, case.steps
    for name in ordered:
        runner = runners[name]
        if isinstance(runner, Skipped):
            result.skipped[name] = runner.reason
            continue
        if not isinstance(runner, Runner):
            runner = Runner(runner)
        steps = runner.steps or case.steps
        flops = runner.flops if runner.flops is not None else case.flops * steps / case.steps
        try:
            first, out = _timed(runner.fn)
            # a runner's own expected output is computed here too: its failure skips it
            expected = (None if name == STATESCAN or out is None else
                        runner.expected() if runner.expected is not None
                        else reference_out if steps == reference_steps else None)
        except Exception as exc:
            result.skipped[name] = f"failed: {type(exc).__name__}: {exc}"
            continue
        m = Measurement(first, steps, repeats_for(first, budget), flops)
        if name == STATESCAN:
            reference_out, reference_steps = out, steps
        elif expected is not None:
            m.max_error = max_error(out, expected)
            m.ok = m.max_error <= case.tolerance
        live[name], times[name] = (runner, m), []
    del runners, reference_out

    cpu, wall = {name: 0.0 for name in live}, {name: 0.0 for name in live}
    for round_ in range(max((m.repeats for _, m in live.values()), default=0)):
        for name, (runner, m) in list(live.items()):
            if round_ >= m.repeats:
                continue
            try:
                c0 = time.process_time()
                seconds = _timed(runner.fn)[0]
                used = time.process_time() - c0
                times[name].append(used if clock == "cpu" else seconds)
                cpu[name] += used
                wall[name] += seconds
            except Exception as exc:
                result.skipped[name] = f"failed: {type(exc).__name__}: {exc}"
                del live[name]
    for name, (runner, m) in live.items():
        m.seconds = min(times[name]) if statistic == "min" else statistics.median(times[name])
        m.cpu_ratio = cpu[name] / wall[name] if wall[name] > 0 else None
        result.runs[name] = m
    if on_runner:
        for name in ordered:
            if name in result.runs:
                on_runner(name, result.runs[name])
            elif name in result.skipped:
                on_runner(name, Skipped(result.skipped[name]))
    return result
