"""Property-based fuzzing of every public function (run by tests/test_fuzz.py in a subprocess,
so that a crash of the interpreter fails that test instead of killing the test run).

    python tests/_fuzz.py --examples 20000 [--seed 0] [--only lstm,ssd] [--trace FILE]

Each example draws a function, sizes (0 and 1 included), argument dtypes (float32/64 mostly;
float16, int, complex, object, bool sometimes), layouts (C, Fortran, negative strides,
stride-0 broadcasts), lists and scalars, values (NaN, inf, +-1e30) and keyword values, then
calls the function on both backends.  The call must either return on both, with the compiled
result equal to the numpy reference (NaN and inf patterns always; the values too unless an
input holds a finite value beyond 1e6, whose magnitude amplifies one rounding difference
between the backends' summation orders), or raise on both
TypeError / ValueError / MemoryError / NotImplementedError with a message naming an argument
(arity errors of Python itself aside).  Exits 1 with a report of the first failures.
"""
import argparse
import inspect
import re
import sys
import traceback
import warnings

import numpy as np
from hypothesis import HealthCheck, given, seed, settings, strategies as st
from hypothesis.errors import HypothesisException

import statescan as ss

OUTCOMES = {}          # (function, "returned" | "raised") -> calls, for the summary
ALLOWED = (TypeError, ValueError, MemoryError, NotImplementedError)
FLOATS = ("float32", "float64")
TOL = {"float32": 2e-3, "float64": 1e-8}


# ---- what each function takes: sizes, then arguments built from them ------------------------

def _rnn_case(name, G):
    def build(d, draw):
        H = d["heads"] * d["D"]
        args = {"x": ("B T I", None), "W": ("GH I", None), "R": ("GH H", None),
                "b": ("GH", "opt"), "b_r": ("GH", "opt")}
        if d["heads"] > 1:
            args["R"] = ("heads GD D", None)
        sizes = dict(d, H=H, GH=G * H, GD=G * d["D"], I=d["I"])
        kw = {"heads": d["heads"]}
        return args, sizes, kw, {"state": _state_parts(name, "B H")}
    return build


def _state_parts(cell, shape):
    return {"elman": [shape], "gru": [shape], "lstm": [shape] * 2, "slstm": [shape] * 4}[cell]


CASES = {
    "lstm": (_rnn_case("lstm", 4), ss.lstm),
    "gru": (_rnn_case("gru", 3), ss.gru),
    "elman": (_rnn_case("elman", 1), ss.elman),
    "slstm": (_rnn_case("slstm", 4), ss.slstm),
}


def _linear_scan(d, draw):
    return ({"a": ("B T D", None), "b": ("B T D", None)}, d, {}, {"state": ["B D"]})


def _selective_scan(d, draw):
    args = {"x": ("B T D", None), "dt": ("B T D", "pos"), "A": ("D N", "neg"),
            "B": ("B T N", None), "C": ("B T N", None), "D": ("D", "opt")}
    kw_arrays = {"z": "B T D", "dt_bias": "D"}
    return args, d, {"dt_softplus": draw(st.booleans()), "_kw_arrays": kw_arrays}, \
        {"state": ["B D N"]}


def _linear_attention(d, draw):
    args = {"q": ("B NH T K", None), "k": ("B NH T K", None), "v": ("B NH T V", None)}
    kw = {"chunk": draw(st.sampled_from([1, 2, 3, 64]))}
    if draw(st.booleans()):
        kw["decay"] = draw(st.sampled_from([0.9, [0.5, 0.9][:d["NH"]] * 1, 1.0]))
        if isinstance(kw["decay"], list) and len(kw["decay"]) != d["NH"]:
            kw["decay"] = 0.8
    return args, d, kw, {"state": ["B NH K V"]}


def _ssd(d, draw):
    args = {"x": ("B T NH P", None), "dt": ("B T NH", "pos"), "A": ("NH", "neg"),
            "B": ("B T N", None), "C": ("B T N", None)}
    return args, d, {"chunk": draw(st.sampled_from([1, 2, 3, 64]))}, {"state": ["B NH P N"]}


def _attention(d, draw):
    args = {"q": ("B NH T K", None), "k": ("B NH T K", None), "v": ("B NH T V", None)}
    kw = {"causal": draw(st.booleans()), "chunk": draw(st.sampled_from([None, 1, 2, 5]))}
    return args, d, kw, None


def _matrix_scan(d, draw):
    if draw(st.booleans()):
        return {"A": ("B T N N", None), "b": ("B T N", None)}, d, {}, {"state": ["B N"]}
    return {"A": ("B T N", None), "b": ("B T N", None)}, d, {}, {"state": ["B N"]}


def _causal_conv1d(d, draw):
    args = {"x": ("B T C", None), "weight": ("C K", None), "bias": ("C", "opt")}
    kw = {"activation": draw(st.sampled_from([None, "silu"]))}
    return args, d, kw, {"state": ["B C Km1"]}


for _name, _build in (("linear_scan", _linear_scan), ("selective_scan", _selective_scan),
                      ("linear_attention", _linear_attention), ("ssd", _ssd),
                      ("attention", _attention), ("matrix_scan", _matrix_scan),
                      ("causal_conv1d", _causal_conv1d)):
    if hasattr(ss, _name):
        CASES[_name] = (_build, getattr(ss, _name))


def _layer_case(cls_name):
    """A statescan.nn recurrent layer built from the drawn sizes, called as layer(x, ...)."""
    def build(d, draw):
        from statescan import nn
        cls = getattr(nn, cls_name)
        heads = d["heads"] if cls_name == "SLSTM" else 1
        H = heads * max(d["D"], 1)
        layer = cls(max(d["I"], 1), H, num_layers=draw(st.sampled_from([1, 2])),
                    bidirectional=cls_name != "SLSTM" and draw(st.booleans()),
                    **({"heads": heads} if cls_name == "SLSTM" else {}),
                    dtype=draw(st.sampled_from(FLOATS)), seed=0)
        d = dict(d, I=max(d["I"], 1))
        return {"x": ("B T I", None)}, d, {"_callable": layer}, None
    return build


def _stream_case(cell, G):
    """ss.stream(cell, W, R, b) built from the drawn sizes, called as step(x, state)."""
    def build(d, draw):
        rng = np.random.default_rng(0)
        dtype = draw(st.sampled_from(FLOATS))
        H, I = max(d["D"], 1), max(d["I"], 1)
        W, R, b = (rng.standard_normal(s).astype(dtype) * 0.5
                   for s in ((G * H, I), (G * H, H), (G * H,)))
        step = ss.stream(getattr(ss, cell), W, R, b)
        return {"x": ("B T I", None)}, dict(d, I=I, H=H), {"_callable": step}, None
    return build


try:
    from statescan import nn as _nn
except ImportError:
    _nn = None
for _cls in ("LSTM", "GRU", "RNN", "SLSTM"):
    if _nn is not None and hasattr(_nn, _cls):
        CASES[f"nn.{_cls}"] = (_layer_case(_cls), None)
for _cell, _G in (("lstm", 4), ("gru", 3)):
    CASES[f"stream.{_cell}"] = (_stream_case(_cell, _G), None)


# ---- drawing arguments ------------------------------------------------------------------------

SPECIALS = (np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0)


@st.composite
def sizes(draw):
    small = st.sampled_from([0, 1, 1, 2, 2, 3, 5])
    d = {k: draw(small) for k in ("B", "T", "I", "D", "N", "P", "K", "V", "C")}
    d["T"] = draw(st.sampled_from([0, 1, 2, 3, 7, 70]))
    d["NH"] = draw(st.sampled_from([1, 2]))
    d["heads"] = draw(st.sampled_from([1, 1, 2]))
    d["K"] = max(d["K"], 1) if draw(st.booleans()) else d["K"]
    d["Km1"] = max(d["K"] - 1, 0)
    return d


def _shape(spec, sizes):
    return tuple(sizes.get(tok, 0) for tok in spec.split())


@st.composite
def array(draw, shape, dtype, kind):
    """An array argument: mostly valid, sometimes another dtype / layout / list."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    vals = rng.standard_normal(shape)
    if kind == "pos":
        vals = np.abs(vals) * 0.5
    elif kind == "neg":
        vals = -np.abs(vals)
    if vals.size and draw(st.integers(0, 3)) == 0:       # sprinkle special values
        n = draw(st.integers(1, min(3, vals.size)))
        flat = vals.reshape(-1)
        for _ in range(n):
            flat[rng.integers(vals.size)] = draw(st.sampled_from(SPECIALS))
    form = draw(st.sampled_from(["c"] * 8 + ["fortran", "negstride", "broadcast", "list",
                                             "otherdtype"]))
    if form == "otherdtype":
        other = draw(st.sampled_from(["float16", "int64", "complex128", "object", "bool",
                                      "float32", "float64"]))
        with np.errstate(all="ignore"):
            return vals.astype(other)
    arr = vals.astype(dtype)
    if form == "fortran":
        return np.asfortranarray(arr)
    if form == "negstride" and arr.ndim:
        return np.flip(arr.copy(), axis=-1)[..., ::-1][..., ::-1]
    if form == "broadcast" and arr.ndim and arr.shape[0] > 0:
        return np.broadcast_to(arr[:1], arr.shape)
    if form == "list":
        return arr.tolist()
    return arr


@st.composite
def calls(draw, names):
    name = draw(st.sampled_from(names))
    build, fn = CASES[name]
    d = draw(sizes())
    spec, d, kw, states = build(d, draw)
    kw = dict(kw)
    fn = kw.pop("_callable", fn)
    kw_arrays = kw.pop("_kw_arrays", {})
    dtype = draw(st.sampled_from(FLOATS))
    wrong = draw(st.integers(0, 9)) == 0          # perturb one argument's shape
    args = []
    for i, (arg, (shape_spec, kind)) in enumerate(spec.items()):
        if kind == "opt" and draw(st.booleans()):
            args.append(None)
            continue
        shape = _shape(shape_spec, d)
        if wrong and draw(st.booleans()):
            shape = shape[:-1] + (shape[-1] + 1,) if shape else (2,)
            wrong = False
        args.append(draw(array(shape, dtype, kind)))
    while args and args[-1] is None:
        args.pop()
    for k, shape_spec in kw_arrays.items():
        if draw(st.booleans()):
            kw[k] = draw(array(_shape(shape_spec, d), dtype, None))
    if states and draw(st.booleans()):
        parts = [draw(array(_shape(s, d), dtype, None)) for s in states["state"]]
        kw["state"] = parts[0] if len(parts) == 1 else tuple(parts)
    params = _parameters(fn)
    if "lengths" in params and "B" in d and draw(st.booleans()):
        B, T = d["B"], d["T"]
        kw["lengths"] = draw(st.sampled_from([
            np.minimum(np.arange(B), T), [T] * B, [T + 1] * B, [-1] * B, np.zeros(B),
            np.full(B, 0.5)]))
        if "reverse" in params:
            kw["reverse"] = draw(st.booleans())
    if "reset" in params and "B" in d and draw(st.integers(0, 3)) == 0:
        kw["reset"] = np.random.default_rng(0).random((d["B"], d["T"])) < 0.3
    if draw(st.integers(0, 19)) == 0 and kw:                    # a bad keyword value
        key = draw(st.sampled_from(sorted(kw)))
        kw[key] = draw(st.sampled_from([-1, 0, 2**63, 10**400, "x", 2.5, True, None, [1]]))
    differentiate = not name.startswith("stream.") and draw(st.integers(0, 2)) == 0
    cot_seed = draw(st.integers(0, 2**32 - 1)) if differentiate else None
    return name, fn, args, kw, cot_seed


def _parameters(fn):
    target = fn if inspect.isfunction(fn) or inspect.isbuiltin(fn) else fn.__call__
    return inspect.signature(target).parameters


# ---- checking one call --------------------------------------------------------------------------

def _leaves(out):
    if isinstance(out, dict):                    # a layer's parameter gradients
        return [leaf for k in sorted(out) for leaf in _leaves(out[k])]
    if isinstance(out, (tuple, list)):
        return [leaf for o in out for leaf in _leaves(o)]
    if isinstance(out, np.ndarray):
        return [out]
    return []


def _names_an_argument(fn, message):
    names = set(_parameters(fn)) | {"x", "cotangent", "dx", "do", "dh", "dweight", "dstate", "dy", "cotangent", "state",
                                                     "heads", "D", "H", "I", "T", "B"}
    words = set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", message))
    return bool(words & names)


def _arity_error(exc):
    return isinstance(exc, TypeError) and re.search(
        r"(positional argument|keyword argument|required .*argument)", str(exc))


def _cotangent_like(out, rng):
    """A random cotangent with the structure of `out`; some parts None (= zero)."""
    if isinstance(out, (tuple, list)):
        return tuple(_cotangent_like(o, rng) for o in out)
    if isinstance(out, np.ndarray):
        if rng.random() < 0.2:
            return None
        return rng.standard_normal(out.shape).astype(out.dtype)
    return None


def _run(fn, args, kw, backend, cot_seed=None):
    """fn(*args, **kw), or with cot_seed its vjp: (out, pullback(random cotangent))."""
    ss.set_backend(backend)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with np.errstate(all="ignore"):
                if cot_seed is None:
                    return fn(*args, **kw), None
                out, pullback = ss.vjp(fn, *args, **kw)
                out = out[:2] if isinstance(out, tuple) and len(out) == 3 else out
                cot = _cotangent_like(out, np.random.default_rng(cot_seed))
                return (out, pullback(cot)), None
    except Exception as exc:      # noqa: BLE001 - classified by the caller
        return None, exc


def _extreme(args, kw):
    """True when some finite input exceeds 1e6 in magnitude: then one rounding difference
    (the backends sum in different orders) is amplified by that magnitude, so only the
    NaN/inf patterns are compared, not the values."""
    for leaf in _leaves(list(args) + list(kw.values())):
        if leaf.dtype.kind == "f" and leaf.size:
            finite = np.abs(leaf[np.isfinite(leaf)])
            if finite.size and finite.max() > 1e6:
                return True
    return False


def _compare(name, out_c, out_p, dtype, values=True):
    lc, lp = _leaves(out_c), _leaves(out_p)
    if len(lc) != len(lp):
        return f"{name}: {len(lc)} outputs compiled, {len(lp)} reference"
    for k, (a, b) in enumerate(zip(lc, lp)):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{name}: output {k} {a.shape}/{a.dtype} vs reference {b.shape}/{b.dtype}"
        if not np.array_equal(np.isnan(a), np.isnan(b)):
            return f"{name}: output {k} NaN pattern differs ({np.isnan(a).sum()} vs {np.isnan(b).sum()})"
        fa, fb = np.isfinite(a), np.isfinite(b)
        if not np.array_equal(fa, fb) or not np.array_equal(a[np.isinf(a)], b[np.isinf(b)]):
            return f"{name}: output {k} inf pattern differs"
        if values and fa.any():
            a64, b64 = a[fa].astype(np.float64), b[fb].astype(np.float64)
            scale = max(1.0, float(np.max(np.abs(b64))))
            err = float(np.max(np.abs(a64 - b64)))
            if err > TOL[dtype] * scale:
                return f"{name}: output {k} differs by {err:.3e} (scale {scale:.3g})"
    return None


def check(name, fn, args, kw, cot_seed=None):
    """None when the call (or its vjp, with `cot_seed`) behaves, else what went wrong."""
    out_c, exc_c = _run(fn, args, kw, "compiled", cot_seed)
    out_p, exc_p = _run(fn, args, kw, "python", cot_seed)
    if cot_seed is not None:
        name = f"vjp({name})"
    for exc in (exc_c, exc_p):
        if exc is not None and not isinstance(exc, ALLOWED):
            return f"{name}: {type(exc).__name__}: {exc}\n" + "".join(
                traceback.format_exception(exc)[-3:])
        if exc is not None and not _arity_error(exc) and not _names_an_argument(fn, str(exc)):
            return f"{name}: message names no argument: {type(exc).__name__}: {exc}"
    if (exc_c is None) != (exc_p is None):
        which = "compiled" if exc_c is not None else "reference"
        exc = exc_c or exc_p
        if isinstance(exc, MemoryError):
            return None
        return f"{name}: only the {which} backend raised {type(exc).__name__}: {exc}"
    OUTCOMES[(name, "raised" if exc_c is not None else "returned")] = \
        OUTCOMES.get((name, "raised" if exc_c is not None else "returned"), 0) + 1
    if exc_c is not None:
        return None
    leaves = _leaves(out_p)
    dtype = leaves[0].dtype.name if leaves else "float64"
    arrays = [np.asarray(a) for a in args if isinstance(a, (np.ndarray, list))]
    return _compare(name, out_c, out_p, dtype if dtype in TOL else "float64",
                    values=not _extreme(arrays, {k: v for k, v in kw.items()
                                                 if isinstance(v, np.ndarray)}))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="")
    p.add_argument("--trace", help="write each call's description here before making it "
                                   "(read back after a crash of the interpreter)")
    opts = p.parse_args(argv)
    names = [n for n in CASES if not opts.only or n in opts.only.split(",")]
    if ss.build_info()["variant"] is None:
        print("no compiled kernels: nothing to compare", file=sys.stderr)
        return 0
    failures = []
    counts = {"calls": 0}

    @settings(max_examples=opts.examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @seed(opts.seed)        # hypothesis draws from its own generator, not from `random`
    @given(calls(names))
    def fuzz(call):
        name, fn, args, kw, cot_seed = call
        counts["calls"] += 1
        if opts.trace:
            with open(opts.trace, "w") as f:
                f.write(f"{'vjp ' if cot_seed is not None else ''}{name}({_describe(args, kw)})")
        problem = check(name, fn, args, kw, cot_seed)
        if problem is not None and len(failures) < 20 and \
                all(problem.splitlines()[0] != seen.splitlines()[0] for seen, _ in failures):
            failures.append((problem, _describe(args, kw)))

    try:
        fuzz()
    except HypothesisException:
        pass
    print(f"{counts['calls']} calls, {len(failures)} failures", file=sys.stderr)
    for fname in sorted({k[0] for k in OUTCOMES}):
        print(f"  {fname}: {OUTCOMES.get((fname, 'returned'), 0)} returned, "
              f"{OUTCOMES.get((fname, 'raised'), 0)} raised", file=sys.stderr)
    for problem, desc in failures:
        print(f"- {problem}\n  args: {desc}", file=sys.stderr)
    return 1 if failures else 0


def _describe(args, kw):
    def one(v):
        if isinstance(v, np.ndarray):
            return f"ndarray{v.shape}/{v.dtype}{'' if v.flags.c_contiguous else '/strided'}"
        if isinstance(v, tuple):
            return "(" + ", ".join(one(x) for x in v) + ")"
        if isinstance(v, list):
            return f"list(len {len(v)})"
        return repr(v)[:40]
    return ", ".join([one(a) for a in args] + [f"{k}={one(v)}" for k, v in kw.items()])


if __name__ == "__main__":
    sys.exit(main())
