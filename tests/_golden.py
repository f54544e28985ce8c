"""Fixed inputs for every public function, and the outputs they gave when recorded.

`python tests/_golden.py` records this machine's file in ``tests/data/golden/`` (both backends,
float32 and float64); ``test_golden.py`` checks that every output is still bit-identical to the
recording of a machine like this one (the same ISA features of the build and numpy version:
other features fuse other operations, and numpy's BLAS other sums) and the same kernels of the
BLAS libraries (OpenBLAS picks them by CPU model: an AVX-512 AMD EPYC runs its Haswell kernels,
an AVX-512 Xeon others, which sum products in another order).  Record a machine's file
once, from a commit whose results are the reference; record anew only when a change of results
is intended, and say so in the commit.
"""
import glob
import hashlib
import os
import sys

import numpy as np

import statescan as ss
from statescan import _blas

FOLDER = os.path.join(os.path.dirname(__file__), "data", "golden")


def _leaves(value):
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in _leaves(v)]
    if isinstance(value, np.ndarray):
        return [value]
    return []


def cases(dtype):
    """name -> zero-argument callable returning the output of one call."""
    rng = np.random.default_rng(1234)

    def r(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(dtype)

    out = {}
    B, T, I, H = 3, 7, 5, 8
    for cell, G in (("elman", 1), ("lstm", 4), ("gru", 3), ("slstm", 4)):
        fn = getattr(ss, cell)
        x, W, R, b, b_r = r(B, T, I), r(G * H, I, scale=0.4), r(G * H, H, scale=0.4), r(G * H), r(G * H)
        R4 = r(2, G * H // 2, H // 2, scale=0.4)
        out[f"{cell}"] = lambda fn=fn, a=(x, W, R, b, b_r): fn(*a)
        out[f"{cell}_heads"] = lambda fn=fn, a=(x, W, R4, b, b_r): fn(*a, heads=2)
        out[f"{cell}_noW"] = lambda fn=fn, a=(r(B, T, G * H), None, R): fn(*a)
        first = fn(x[:, :3], W, R, b, b_r)[1]
        out[f"{cell}_state"] = lambda fn=fn, a=(x[:, 3:], W, R, b, b_r), s=first: fn(*a, state=s)
        out[f"{cell}_vjp"] = lambda fn=fn, a=(x, W, R, b, b_r): _vjp(fn, a, {})
        out[f"{cell}_newton"] = lambda fn=fn, a=(x, W, R, b, b_r): fn(*a, solver="newton")[:2]
        out[f"{cell}_stream"] = lambda fn=fn, a=(x, W, R, b, b_r): ss.stream(fn, *a[1:])(a[0][:, :2])
    # B*T = 160 rows: the compiled backend's own parameter-gradient kernels (from
    # _cell_call.COMPILED_GRADS_MIN_ROWS on; the 21 rows above stay with numpy).  Their own
    # generator: the draws above (and the recorded values of every key before) stay as they were.
    lrng = np.random.default_rng(4321)

    def lr(*shape, scale=1.0):
        return (scale * lrng.standard_normal(shape)).astype(dtype)

    for cell, G in (("elman", 1), ("lstm", 4), ("gru", 3), ("slstm", 4)):
        fn = getattr(ss, cell)
        x, W, b, b_r = lr(4, 40, I), lr(G * H, I, scale=0.4), lr(G * H), lr(G * H)
        R, R4 = lr(G * H, H, scale=0.4), lr(2, G * H // 2, H // 2, scale=0.4)
        out[f"{cell}_vjp_long"] = lambda fn=fn, a=(x, W, R, b, b_r): _vjp(fn, a, {})
        out[f"{cell}_vjp_long_heads"] = lambda fn=fn, a=(x, W, R4, b, b_r): _vjp(
            fn, a, {"heads": 2})
    a, bb = rng.uniform(0.5, 1.0, (B, T, H)).astype(dtype), r(B, T, H)
    h0 = r(B, H)
    out["linear_scan"] = lambda: ss.linear_scan(a, bb, h0)
    out["linear_scan_vjp"] = lambda: _vjp(ss.linear_scan, (a, bb, h0), {})
    Dm, N = 6, 4
    sx, sdt, sA = r(B, T, Dm), r(B, T, Dm, scale=0.5), -np.abs(r(Dm, N))
    sB, sC, sD, sz, sbias = r(B, T, N), r(B, T, N), r(Dm), r(B, T, Dm), r(Dm)
    kw = dict(z=sz, dt_bias=sbias, dt_softplus=True)
    out["selective_scan"] = lambda: ss.selective_scan(sx, sdt, sA, sB, sC, sD, **kw)
    out["selective_scan_vjp"] = lambda: _vjp(ss.selective_scan, (sx, sdt, sA, sB, sC, sD), kw)
    NH, dk, dv = 2, 4, 3
    q, k, v = r(B, NH, T, dk), r(B, NH, T, dk), r(B, NH, T, dv)
    decay = np.array([0.9, 0.7], dtype)
    out["linear_attention"] = lambda: ss.linear_attention(q, k, v, decay=decay, chunk=3)
    out["linear_attention_vjp"] = lambda: _vjp(ss.linear_attention, (q, k, v),
                                               dict(decay=decay, chunk=3))
    P = 3
    dx, ddt, dA = r(B, T, NH, P), np.abs(r(B, T, NH, scale=0.5)), -np.abs(r(NH))
    dB, dC = r(B, T, N), r(B, T, N)
    out["ssd"] = lambda: ss.ssd(dx, ddt, dA, dB, dC, chunk=3)
    out["ssd_vjp"] = lambda: _vjp(ss.ssd, (dx, ddt, dA, dB, dC), dict(chunk=3))
    out["attention"] = lambda: ss.attention(q, k, r(B, NH, T, dk), chunk=3)
    out["attention_vjp"] = lambda: _vjp(ss.attention, (q, k, v), dict(chunk=3, causal=False))
    n = 3
    mA, mb, mh = r(B, T, n, n, scale=0.3), r(B, T, n), r(B, n)
    out["matrix_scan"] = lambda: ss.matrix_scan(mA, mb, mh)
    out["matrix_scan_diag"] = lambda: ss.matrix_scan(a, bb, h0)
    out["matrix_scan_vjp"] = lambda: _vjp(ss.matrix_scan, (mA, mb, mh), {})
    xs = r(B, T, n)
    out["solve_recurrence"] = lambda: ss.solve_recurrence(
        lambda s, x: np.tanh(0.5 * s + x), mh, xs, solver="jacobi")[0]
    return out


def _vjp(fn, args, kw):
    out, pullback = ss.vjp(fn, *args, **kw)
    rng = np.random.default_rng(7)
    cot = _like(out, rng)
    return out, pullback(cot)


def _like(value, rng):
    if isinstance(value, (tuple, list)):
        return type(value)(_like(v, rng) for v in value)
    if isinstance(value, np.ndarray):
        return rng.standard_normal(value.shape).astype(value.dtype)
    return value


def machine():
    """What the recording depends on: the compiled kernels' ISA features, numpy's version and
    the BLAS libraries' kernels (statescan._blas.kernel_names: each OpenBLAS's own name of
    its kernels, what threadpoolctl calls its "architecture")."""
    info = ss.build_info()
    return (f"{info['variant']} {','.join(info['features'] or ())} numpy {np.__version__}"
            f"{BLAS}{','.join(_blas.kernel_names())}")


BLAS = " blas "


def recording_for(key, known):
    """The path of the recording for machine `key` among `known` ({machine: path}), or None.
    Files recorded before the BLAS kernels were part of the key match any BLAS, but only when
    no file names this machine's BLAS kernels."""
    if key in known:
        return known[key]
    return known.get(key.split(BLAS)[0])


def keys_agree(recorded_machine, machine_key, recorded_keys, keys):
    """Whether a recording's keys fit today's `keys`: this machine's exact recording holds
    all of them; an older file (recorded before the BLAS kernels were part of the machine,
    on a machine we may not have) may hold a subset: cases added since, or outputs whose
    bits a kernel change altered by design, removed from it then."""
    if recorded_machine == machine_key or BLAS in recorded_machine:
        return set(recorded_keys) == set(keys)
    return set(recorded_keys) <= set(keys)


def compute():
    """{key: array} for every case, backend and dtype available here."""
    results = {}
    backends = ["python"] + (["compiled"] if ss.build_info()["variant"] else [])
    previous = ss.backend()
    try:
        for backend in backends:
            ss.set_backend(backend)
            for dtype in (np.float32, np.float64):
                for name, call in cases(dtype).items():
                    for i, leaf in enumerate(_leaves(call())):
                        results[f"{backend}/{np.dtype(dtype).name}/{name}/{i}"] = leaf
    finally:
        ss.set_backend(previous)
    return results


def recordings():
    """{machine: path} of the recorded files."""
    out = {}
    for path in sorted(glob.glob(os.path.join(FOLDER, "*.npz"))):
        with np.load(path) as f:
            out[str(f["__machine__"])] = path
    return out


def path_for(key):
    """The file a recording for machine `key` is written to (a readable prefix + a hash)."""
    prefix = "avx512" if "avx512f" in key else "avx2" if "avx2" in key else "base"
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return os.path.join(FOLDER, f"{prefix}-numpy-{np.__version__}-{digest}.npz")


if __name__ == "__main__":
    key = machine()
    known = recordings()
    path = known[key] if key in known else path_for(key)
    np.savez_compressed(path, __machine__=np.array(key), **compute())
    print(f"recorded {len(np.load(path).files)} arrays in {path}", file=sys.stderr)
