"""Blocking parameters: which values are worth timing on this machine, and the values
:func:`statescan.tune` chose, cached per machine.

Three parts:

* machine facts, read once: CPU model, ISA extensions, logical CPUs, L1d / L2 sizes
  (:mod:`statescan._caches`) and the vector width of the active build;
* a small integer constraint model listing the feasible candidates of each tunable kernel
  (:func:`candidates`): rows per job of the RNN kernels in multiples of the micro-kernel's
  row block whose state and gate rows fit in L2, or the column split (-1) when
  threads outnumber the row jobs; chunk sizes of ``ssd`` / ``linear_attention`` whose block
  working set fits in L2;
* the cache: one JSON file per machine, ``$STATESCAN_CACHE_DIR`` (else
  ``$XDG_CACHE_HOME/statescan``, else ``~/.cache/statescan``) ``/tuning-<machine key>.json``,
  read on the first lookup and written atomically (temp file + ``os.replace``).  A corrupt
  file, or one written by another statescan version or for another machine, is ignored with
  a warning: tuning only changes speed, so it must never stop a computation.

The kernels ask :func:`chunk` / :func:`rnn_block`; with nothing cached they return the
automatic value, so results without a cache file are those of the untuned rules.
"""
import contextlib
import hashlib
import json
import os
import platform
import sys
import tempfile
import warnings

from . import _caches
from ._dispatch import build_info, get_num_threads

SCHEMA = "statescan-tuning/1"
CHUNKS = (16, 32, 48, 64, 128)   # chunk candidates of ssd / linear_attention
ROW_BLOCK = 8                    # smallest rows-per-job candidate, doubled up to B (not the
                                 # micro-kernel's block, MR: 12 rows with AVX-512 float32, 3
                                 # with AVX2; any row count runs, a short last block included)
PANEL = 32                       # columns of one packed panel (ext/_microkernel.pxd, SS_NT)
COLUMN_SPLIT = -1                # rnn block value: split each step's columns across threads
AUTOMATIC = 0                    # rnn block value: the kernel's own rule

_state = {"facts": None, "table": None, "forced": {}}
# Decisions that follow from the tuning, per shape, dtype and thread count: what chunk() /
# rnn_block() answered, and the callers' own (see remember).  A small call asks once per call,
# and working them out again (table, forced values, thread count, sizes) costs microseconds.
# Cleared whenever the table or a forced value changes.
_ANSWERS = {}


# ---- machine facts ---------------------------------------------------------------------------

def machine():
    """This machine's facts (read once): cpu, features, logical_cpus, l1d, l2 (bytes),
    vector_bytes (widest vector of the active build)."""
    if _state["facts"] is None:
        info = build_info()
        features = tuple(info["features"] or ())
        caches = _caches.cache_sizes()
        _state["facts"] = {
            "cpu": _cpu_model(), "features": features, "logical_cpus": os.cpu_count() or 1,
            "l1d": caches["l1d"], "l2": caches["l2"], "vector_bytes": _vector_bytes(features)}
    return _state["facts"]


def machine_key(facts=None):
    """A short hash of the CPU model, ISA extensions and logical CPU count."""
    facts = facts or machine()
    text = f"{facts['cpu']}|{','.join(facts['features'])}|{facts['logical_cpus']}"
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Processor") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _vector_bytes(features):
    if "avx512f" in features:
        return 64
    if "avx" in features or "avx2" in features:
        return 32
    return 16                    # sse2 / neon / the portable baseline


# ---- the constraint model --------------------------------------------------------------------

def candidates(kernel, key, facts=None):
    """The feasible values for `kernel` at `key`, the automatic one first.

    kernel "rnn", key (cell, B, H, heads, dtype, threads): 0 (automatic), rows per job, -1
    (column split).  kernel "ssd" key (N, P, dtype, threads) or "linear_attention" key
    (dk, dv, dtype, threads): chunk sizes (the automatic chunk first)."""
    facts = facts or machine()
    if kernel == "rnn":
        return _rnn_candidates(*key, facts)
    if kernel in ("ssd", "linear_attention"):
        dk, dv, dtype, _ = key
        automatic = automatic_chunk(kernel, dk, dv)
        esize = _itemsize(dtype)
        fits = [c for c in CHUNKS if c != automatic
                and esize * (c * c + c * (2 * dk + dv) + dk * dv) <= facts["l2"]]
        return [automatic] + fits
    raise ValueError(f"kernel must be 'rnn', 'ssd' or 'linear_attention', got {kernel!r}")


def _rnn_candidates(cell, B, H, heads, dtype, threads, facts):
    from ._cells import CELLS
    spec = CELLS[cell]
    D = H // heads
    panel_cols = -(-spec.gates * D // PANEL) * PANEL
    # one row's state components and gate pre-activations, touched every step
    row_bytes = _itemsize(dtype) * (spec.states * D + panel_cols)
    most_jobs = -(-B // ROW_BLOCK) * heads
    sizes, rows = [], ROW_BLOCK
    while rows < B:
        sizes.append(rows)
        rows *= 2
    sizes.append(B)                      # one job per head: every row in one block
    # whole micro-kernel blocks that fit, and enough jobs for the threads when there can be
    out = [AUTOMATIC] + [rows for rows in sizes if rows * row_bytes <= facts["l2"]
                         and -(-B // rows) * heads >= min(threads, most_jobs)]
    # the column split pays when the row jobs leave threads idle and there are panels to share
    if threads > 1 and most_jobs < threads and spec.gates * D >= PANEL * threads:
        out.append(COLUMN_SPLIT)
    return out


def automatic_chunk(kernel, dk, dv):
    """The chunk `chunk=None` gives without a cached choice.  ssd (dk = N, dv = P): 32 for
    Mamba-2's state sizes (N or P >= 64; at N=128, P=64/80 it ran 1.2x faster than 64 on a
    2-core Xeon, the state update being cheap next to the quadratic block), else 64;
    linear_attention: 64."""
    if kernel == "ssd" and max(dk, dv) >= 64:
        return 32
    return 64


def _itemsize(dtype):
    return 4 if str(dtype) == "float32" else 8


# ---- the cache -------------------------------------------------------------------------------

def cache_path():
    """Where this machine's tuning file lives."""
    root = os.environ.get("STATESCAN_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                 ".cache")
        root = os.path.join(base, "statescan")
    return os.path.join(root, f"tuning-{machine_key()}.json")


def _version():
    # the package's version, read where it is defined without importing the package here
    # (statescan imports the kernels, which import this module)
    return sys.modules["statescan"].__version__


def _read(path):
    """{kernel: {key tuple: value}} from `path`; {} (with a warning) when the file is corrupt
    or was written by another version or for another machine; {} when there is none."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        return _ignored(path, f"unreadable ({exc})")
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        return _ignored(path, "not a statescan tuning file of this format")
    if doc.get("statescan") != _version() or doc.get("machine_key") != machine_key():
        return _ignored(path, f"written by statescan {doc.get('statescan')} for machine "
                              f"{doc.get('machine_key')}; run statescan.tune() again")
    table = {}
    try:
        for kernel, records in doc["entries"].items():
            for record in records:
                value = record["value"]
                if type(value) is not int:
                    raise TypeError(f"value {value!r} is not an integer")
                table.setdefault(kernel, {})[_key(record["key"])] = value
    except (KeyError, TypeError, AttributeError) as exc:
        return _ignored(path, f"malformed entries ({exc})")
    return table


def _key(items):
    if not isinstance(items, list) or not all(isinstance(k, (int, str)) for k in items):
        raise TypeError(f"key {items!r} is not a list of integers and strings")
    return tuple(items)


def _ignored(path, why):
    warnings.warn(f"statescan: ignoring the tuning cache {path}: {why}", RuntimeWarning,
                  stacklevel=4)
    return {}


def _table():
    if _state["table"] is None:
        _state["table"] = _read(cache_path())
    return _state["table"]


def reload():
    """Forget what was read; the next lookup reads the cache file again."""
    _state["table"] = None
    _ANSWERS.clear()


def store(records):
    """Add `records` ({"kernel", "key", "value", ...}: the JSON-serialisable records of a
    tuning run) to the cache file, replacing those with the same kernel and key, and to the
    table in use.  Returns the file's path."""
    path = cache_path()
    current = _read_records(path)
    for r in records:
        kept = [c for c in current.get(r["kernel"], []) if c["key"] != list(r["key"])]
        current[r["kernel"]] = kept + [dict(r, key=list(r["key"]))]
    doc = {"schema": SCHEMA, "statescan": _version(), "machine_key": machine_key(),
           "machine": machine(), "entries": current}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tuning-", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)            # readers see the old file or the new one, never half
    except BaseException:
        os.unlink(tmp)
        raise
    reload()
    return path


def _read_records(path):
    """The records of a valid file at `path` (to merge into), {} otherwise."""
    if not _read(path):                  # warns about a corrupt or foreign file: replaced
        return {}
    with open(path) as f:
        return json.load(f)["entries"]


# ---- lookups (the kernels' side) -------------------------------------------------------------

def lookup(kernel, key):
    """The cached value for `kernel` at `key`, or None."""
    if kernel in _state["forced"]:
        return _state["forced"][kernel]
    entries = _table().get(kernel)
    return None if entries is None else entries.get(key)


def chunk(kernel, dk, dv, dtype):
    """`chunk=None` of ``ssd`` (dk = N, dv = P) or ``linear_attention``: the tuned chunk for
    these head sizes, dtype and thread count, else the automatic one."""
    threads = get_num_threads()
    key = ("chunk", kernel, dk, dv, dtype, threads)
    value = _ANSWERS.get(key)
    if value is None:
        if kernel in _state["forced"] or _table().get(kernel):
            value = lookup(kernel, (dk, dv, dtype.name, threads))
        value = remember(key, value or automatic_chunk(kernel, dk, dv))
    return value


def rnn_block(cell, B, H, heads, dtype):
    """The rnn forward's `block` argument: the tuned rows per job (> 0) or column split (-1)
    for this cell, shape, dtype and thread count, else 0 (the kernel's own rule)."""
    threads = get_num_threads()
    key = ("rnn_block", cell, B, H, heads, dtype, threads)
    value = _ANSWERS.get(key)
    if value is None:
        if "rnn" in _state["forced"] or _table().get("rnn"):
            value = lookup("rnn", (cell, B, H, heads, dtype.name, threads))
        value = remember(key, value or AUTOMATIC)
    return value


# remembered(key): what remember() stored at `key` since the tuning last changed, else None.
# The memo's own bound get (clear() keeps the dict): a small call asks once per call, and a
# Python function around it would add a frame (~0.1 us).
remembered = _ANSWERS.get


def remember(key, value):
    """Store `value` (not None) at `key` -- a hashable tuple that starts with its user's name and
    holds every input of the decision (sizes, dtype, thread count...) -- until the tuning table
    or a forced value changes; returns `value`."""
    if len(_ANSWERS) >= 256:           # many shapes: keep the memo small
        _ANSWERS.clear()
    _ANSWERS[key] = value
    return value


@contextlib.contextmanager
def forcing(kernel, value):
    """Within the block every lookup for `kernel` returns `value` (tune's timing)."""
    previous = _state["forced"].get(kernel)
    _state["forced"][kernel] = value
    _ANSWERS.clear()
    try:
        yield
    finally:
        if previous is None:
            del _state["forced"][kernel]
        else:
            _state["forced"][kernel] = previous
        _ANSWERS.clear()
