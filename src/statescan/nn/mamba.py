"""Mamba and Mamba-2 mixers (mamba_ssm's ``Mamba`` / ``Mamba2``, Hugging Face's
``MambaMixer`` / ``Mamba2Mixer``) built on statescan's kernels, with a decoding cache.

Parameters carry the Hugging Face names and shapes (``in_proj.weight``, ``conv1d.weight``
[C, 1, K], ...), so ``load_state_dict`` takes the mixer's part of a checkpoint as is.

A call runs a whole sequence (prefill) or, given a cache and one time step, the decoding
step: the input projections are one GEMM over all B*T rows (one GEMV per weight at T=1),
the causal convolution and the scan are single kernel calls, and the step updates the
cache's arrays in place.
"""
import math
from typing import NamedTuple

import numpy as np

from .. import _validate, causal_conv1d, selective_scan, ssd
from ._norm import grouped_rms_norm

_DTYPES = ("float32", "float64")
_DERIVED = ("_A", "_conv_w", "_parts")
# seed value for a mixer whose parameters are loaded right after construction (MambaLM
# loading a checkpoint): skips drawing random weights that would be thrown away
NO_INIT = object()


class MambaCache(NamedTuple):
    """What a mixer needs to continue a sequence.

    A mixer call given a cache updates these arrays in place and returns the same cache;
    ``cache.copy()`` keeps a branch point.

    Attributes
    ----------
    conv_state : ndarray [B, C, K-1]
        The last K-1 inputs of the causal convolution (C = its channel count).
    ssm_state : ndarray
        The scan state: [B, d_inner, d_state] (Mamba) or [B, nheads, headdim, d_state]
        (Mamba-2).
    """
    conv_state: np.ndarray
    ssm_state: np.ndarray

    def copy(self):
        return MambaCache(self.conv_state.copy(), self.ssm_state.copy())


class _Mixer:
    """Parameters (Hugging Face names), state_dict / load_state_dict, input checks and the
    prefill / decode dispatch shared by both mixers."""

    def _init_params(self, shapes, dtype, seed):
        self.dtype = np.dtype(_validate.choice("dtype", str(np.dtype(dtype)), _DTYPES))
        self._shapes = shapes
        if seed is NO_INIT:
            return
        rng = np.random.default_rng(seed)
        self._load({name: self._init_value(name, shape, rng) for name, shape in shapes.items()})

    def _init_value(self, name, shape, rng):
        """Random initialisation like mamba_ssm / torch.nn defaults (a usable model, not a
        trained one)."""
        if name.endswith("A_log"):
            n = shape[-1] if len(shape) == 2 else shape[0]
            return np.broadcast_to(np.log(np.arange(1, n + 1)), shape)
        if name == "D" or name == "norm.weight":
            return np.ones(shape)
        if name in ("dt_proj.bias", "dt_bias"):
            dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), shape))
            return dt + np.log(-np.expm1(-dt))          # inverse of softplus
        fan_in = shape[-1] if name.endswith("weight") and len(shape) >= 2 else None
        if name.startswith("conv1d"):
            fan_in = self._shapes["conv1d.weight"][-1]
        elif name.endswith("bias"):
            fan_in = self._shapes[name[:-4] + "weight"][-1]
        bound = 1.0 / math.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape)

    # ---- parameters ----------------------------------------------------------------------

    def state_dict(self):
        """{name: ndarray} with Hugging Face / mamba_ssm names and shapes.  The arrays are the
        layer's own, read-only; change them with :meth:`load_state_dict`."""
        return dict(self._params)

    def load_state_dict(self, state_dict):
        """Replace every parameter (same names and shapes as :meth:`state_dict`; arrays are
        converted to the layer's dtype).  Missing, unexpected or misshapen entries raise
        an error naming them."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        extra = sorted(set(state_dict) - set(self._shapes))
        if extra:
            raise ValueError(f"unexpected parameter {extra[0]!r}; expected "
                             f"{', '.join(self._shapes)}")
        values = {}
        for name, shape in self._shapes.items():
            if name not in state_dict:
                raise ValueError(f"parameter {name!r} is missing from state_dict")
            arr = np.asarray(state_dict[name])
            if arr.dtype.kind not in "fiu":
                raise TypeError(f"parameter {name!r} must be real numbers, got {arr.dtype}")
            if arr.shape != shape:
                raise ValueError(f"parameter {name!r} must have shape {list(shape)}, got "
                                 f"{list(arr.shape)}")
            values[name] = arr
        self._load(values)

    def _load(self, values):
        params = {}
        for name, shape in self._shapes.items():
            arr = np.array(values[name], dtype=self.dtype, order="C")   # own copy
            arr.setflags(write=False)
            params[name] = arr
        self._params = params
        self._conv_w = params["conv1d.weight"][:, 0, :]     # [C, K], a contiguous view
        self._derive()

    def __getstate__(self):
        # derived arrays are views of the parameters: rebuilt on unpickling, not duplicated
        return {k: v for k, v in self.__dict__.items() if k not in _DERIVED}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load(self._params)

    # ---- calls ---------------------------------------------------------------------------

    def __call__(self, x, cache=None, lengths=None):
        """Run the mixer over x [B, T, d_model]; see the class docstring."""
        x = _validate.float_array("x", x)
        if x.dtype != self.dtype:
            raise TypeError(f"x is {x.dtype} but the layer is {self.dtype}")
        if x.ndim != 3 or x.shape[2] != self.d_model:
            raise ValueError(f"x must have shape [B, T, d_model] = [B, T, {self.d_model}], "
                             f"got {x.shape}")
        B, T, _ = x.shape
        lengths = _validate.lengths(lengths, B, T)
        if cache is None:
            cache = self.empty_cache(B)
        else:
            cache = self._check_cache(cache, B)
        x = np.ascontiguousarray(x)
        if T == 1 and lengths is None:
            return self._step(x, cache), cache
        if T == 0 or B == 0:
            return np.zeros((B, T, self.d_model), self.dtype), cache
        y = self._prefill(x, cache, lengths)
        if lengths is not None:
            y[np.arange(T)[None, :] >= lengths[:, None]] = 0   # padding: no bias either
        return y, cache

    def empty_cache(self, batch_size):
        """A zero cache (the state before any input) for `batch_size` sequences."""
        B = int(batch_size)
        return MambaCache(np.zeros((B,) + self._conv_state_shape, self.dtype),
                          np.zeros((B,) + self._ssm_state_shape, self.dtype))

    def _check_cache(self, cache, B):
        if not isinstance(cache, tuple) or len(cache) != 2:
            raise TypeError("cache must be a MambaCache (conv_state, ssm_state) as returned "
                            "by a previous call")
        for name, arr, shape in (("conv_state", cache[0], self._conv_state_shape),
                                 ("ssm_state", cache[1], self._ssm_state_shape)):
            if not isinstance(arr, np.ndarray) or arr.dtype != self.dtype:
                raise TypeError(f"cache.{name} must be a {self.dtype} ndarray")
            if arr.shape != (B,) + shape or not arr.flags.c_contiguous \
                    or not arr.flags.writeable:
                raise ValueError(f"cache.{name} must be a writeable C-contiguous array of "
                                 f"shape {[B, *shape]}, got {list(arr.shape)}")
        return cache if isinstance(cache, MambaCache) else MambaCache(*cache)

    def _set_parts(self, parts):
        """Projections as (W[rows].T, bias[rows] or None) per part: row slices of a
        C-contiguous weight are contiguous, so each part is one GEMM (GEMV when decoding)
        straight from the stored weight, no copies."""
        self._parts = {}
        for part, (name, rows, with_bias) in parts.items():
            W = self._params[name] if name.endswith("weight") else self._params[name + ".weight"]
            b = self._params.get(name + ".bias") if with_bias else None
            if rows is not None:
                W, b = W[rows], None if b is None else b[rows]
            self._parts[part] = (W.T, b)

    def _proj(self, part, u2):
        """u2 [rows, n] @ W.T (+ bias) for projection `part`."""
        WT, b = self._parts[part]
        y = u2 @ WT
        if b is not None:
            y += b
        return y

    def _conv(self, xc, cache, lengths):
        """silu(causal conv1d) over xc [B, T, C], continuing and updating cache.conv_state."""
        return causal_conv1d(xc, self._conv_w, self._params.get("conv1d.bias"),
                             activation="silu", state=cache.conv_state, lengths=lengths,
                             out_state=cache.conv_state)[0]


class Mamba(_Mixer):
    """Mamba-1 mixer (selective state space), mamba_ssm ``Mamba`` / HF ``MambaMixer``.

    ``x, z = in_proj(u)``; ``x = silu(conv1d(x))``; ``dt, B, C = x_proj(x)``;
    ``y = selective_scan(x, dt_proj.weight @ dt, -exp(A_log), B, C, D, z=z,
    dt_bias=dt_proj.bias, dt_softplus=True)``; ``out = out_proj(y)``.

    Parameters
    ----------
    d_model : int
    d_state : int
        N, the state size per channel.
    d_conv : int
        K, the causal convolution's width.
    expand : int
        d_inner = expand * d_model.
    dt_rank : int or "auto"
        "auto": ceil(d_model / 16).
    bias : bool
        Biases of in_proj and out_proj.
    conv_bias : bool
    dtype : "float32" or "float64"
    seed : int, optional
        Seed of the random initialisation.

    Notes
    -----
    ``y, cache = blk(x, cache=None, lengths=None)``: x [B, T, d_model] -> y [B, T, d_model].
    ``cache`` (a :class:`MambaCache`: conv_state [B, d_inner, K-1], ssm_state
    [B, d_inner, N]) continues a sequence and is updated in place; None starts from zeros and
    returns a new one.  A call with T = 1 and a cache is the decoding step.  ``lengths`` [B]:
    steps past lengths[b] are padding (output 0, state untouched).

    Parameters (``state_dict()``): in_proj.weight [2*d_inner, d_model] (in_proj.bias),
    conv1d.weight [d_inner, 1, K], conv1d.bias [d_inner], x_proj.weight
    [dt_rank + 2N, d_inner], dt_proj.weight [d_inner, dt_rank], dt_proj.bias [d_inner],
    A_log [d_inner, N], D [d_inner], out_proj.weight [d_model, d_inner] (out_proj.bias).
    """

    def __init__(self, d_model, *, d_state=16, d_conv=4, expand=2, dt_rank="auto", bias=False,
                 conv_bias=True, dtype="float32", seed=None):
        self.d_model = _validate.positive_int("d_model", d_model)
        self.d_state = _validate.positive_int("d_state", d_state)
        self.d_conv = _validate.positive_int("d_conv", d_conv)
        self.expand = _validate.positive_int("expand", expand)
        self.d_inner = self.expand * self.d_model
        self.dt_rank = (math.ceil(self.d_model / 16) if dt_rank == "auto"
                        else _validate.positive_int("dt_rank", dt_rank))
        self.bias = _validate.boolean("bias", bias)
        self.conv_bias = _validate.boolean("conv_bias", conv_bias)
        Di, N, R, K, d = self.d_inner, self.d_state, self.dt_rank, self.d_conv, self.d_model
        shapes = {"in_proj.weight": (2 * Di, d)}
        if self.bias:
            shapes["in_proj.bias"] = (2 * Di,)
        shapes["conv1d.weight"] = (Di, 1, K)
        if self.conv_bias:
            shapes["conv1d.bias"] = (Di,)
        shapes.update({"x_proj.weight": (R + 2 * N, Di), "dt_proj.weight": (Di, R),
                       "dt_proj.bias": (Di,), "A_log": (Di, N), "D": (Di,),
                       "out_proj.weight": (d, Di)})
        if self.bias:
            shapes["out_proj.bias"] = (d,)
        self._conv_state_shape = (Di, K - 1)
        self._ssm_state_shape = (Di, N)
        self._init_params(shapes, dtype, seed)

    def __repr__(self):
        return (f"Mamba({self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"expand={self.expand}, dt_rank={self.dt_rank}, dtype='{self.dtype}')")

    def _derive(self):
        self._A = -np.exp(self._params["A_log"])
        Di, R, N = self.d_inner, self.dt_rank, self.d_state
        # dt_proj's bias is not added here: the kernel adds it inside the softplus
        self._set_parts({"x": ("in_proj", slice(0, Di), True),
                         "z": ("in_proj", slice(Di, 2 * Di), True),
                         "xdbc": ("x_proj", None, False),
                         "dt_low": ("x_proj", slice(0, R), False),
                         "B": ("x_proj", slice(R, R + N), False),
                         "C": ("x_proj", slice(R + N, R + 2 * N), False),
                         "dt": ("dt_proj.weight", None, False),
                         "out": ("out_proj", None, True)})

    def _prefill(self, u, cache, lengths):
        Bt, T, d = u.shape
        Di, N = self.d_inner, self.d_state
        u2 = u.reshape(Bt * T, d)
        x = self._conv(self._proj("x", u2).reshape(Bt, T, Di), cache, lengths)
        x2 = x.reshape(Bt * T, Di)
        dt = self._proj("dt", self._proj("dt_low", x2)).reshape(Bt, T, Di)
        y = selective_scan(x, dt, self._A, self._proj("B", x2).reshape(Bt, T, N),
                           self._proj("C", x2).reshape(Bt, T, N), self._params["D"],
                           z=self._proj("z", u2).reshape(Bt, T, Di),
                           dt_bias=self._params["dt_proj.bias"], dt_softplus=True,
                           state=cache.ssm_state, lengths=lengths, out_state=cache.ssm_state)[0]
        return self._proj("out", y.reshape(Bt * T, Di)).reshape(Bt, T, d)

    def _step(self, u, cache):
        # [B, 1, n] arrays for the kernels; at B = 1 the slices below are contiguous, so the
        # kernels' one-token paths take them as they are
        Bt, R, N = u.shape[0], self.dt_rank, self.d_state
        u2 = u.reshape(Bt, -1)
        x = self._conv(self._proj("x", u2)[:, None], cache, None)
        xdbc = self._proj("xdbc", x.reshape(Bt, -1))
        y = selective_scan(x, self._proj("dt", xdbc[:, :R])[:, None], self._A,
                           xdbc[:, None, R:R + N], xdbc[:, None, R + N:], self._params["D"],
                           z=self._proj("z", u2)[:, None], dt_bias=self._params["dt_proj.bias"],
                           dt_softplus=True, state=cache.ssm_state, out_state=cache.ssm_state)[0]
        return self._proj("out", y.reshape(Bt, -1))[:, None]


class Mamba2(_Mixer):
    """Mamba-2 mixer (state-space duality), mamba_ssm ``Mamba2`` / HF ``Mamba2Mixer``.

    ``z, xBC, dt = in_proj(u)``; ``xBC = silu(conv1d(xBC))`` split into x [nheads, headdim],
    B, C [ngroups, d_state]; ``y = ssd(x, dt, -exp(A_log), B, C, D=D, z=z, dt_bias=dt_bias,
    dt_softplus=True)`` (the gate silu(z) applied before the norm); ``y = RMSNorm(y)`` over
    ngroups groups of channels, times norm.weight; ``out = out_proj(y)``.

    Parameters
    ----------
    d_model : int
    d_state : int
        N, the state size.
    d_conv : int
    expand : int
        d_inner = expand * d_model = nheads * headdim.
    headdim : int
        P; nheads = d_inner / headdim.
    ngroups : int
        Groups of heads sharing B and C (divides nheads).
    chunk_size : int or None
        Block size of the chunked SSD algorithm (speed only); None: :func:`statescan.ssd`'s
        default.
    bias, conv_bias : bool
    norm_eps : float
        Epsilon of the gated RMS norm.
    time_step_limit : (float, float)
        dt is clamped to this range after the softplus (Hugging Face's ``time_step_limit``;
        the default clamps nothing).
    dtype : "float32" or "float64"
    seed : int, optional

    Notes
    -----
    ``y, cache = blk(x, cache=None, lengths=None)`` as :class:`Mamba`; the cache holds
    conv_state [B, d_inner + 2*ngroups*N, K-1] and ssm_state [B, nheads, headdim, N].

    Parameters (``state_dict()``): in_proj.weight [2*d_inner + 2*ngroups*N + nheads,
    d_model] (in_proj.bias), conv1d.weight [conv_dim, 1, K], conv1d.bias [conv_dim], dt_bias
    [nheads], A_log [nheads], D [nheads], norm.weight [d_inner], out_proj.weight
    [d_model, d_inner] (out_proj.bias).
    """

    def __init__(self, d_model, *, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1,
                 chunk_size=256, bias=False, conv_bias=True, norm_eps=1e-5,
                 time_step_limit=(0.0, math.inf), dtype="float32", seed=None):
        self.d_model = _validate.positive_int("d_model", d_model)
        self.d_state = _validate.positive_int("d_state", d_state)
        self.d_conv = _validate.positive_int("d_conv", d_conv)
        self.expand = _validate.positive_int("expand", expand)
        self.headdim = _validate.positive_int("headdim", headdim)
        self.ngroups = _validate.positive_int("ngroups", ngroups)
        self.chunk_size = (None if chunk_size is None
                           else _validate.positive_int("chunk_size", chunk_size))
        self.bias = _validate.boolean("bias", bias)
        self.conv_bias = _validate.boolean("conv_bias", conv_bias)
        self.norm_eps = float(norm_eps)
        lo, hi = (float(v) for v in time_step_limit)
        self.time_step_limit = (lo, hi)
        self.d_inner = self.expand * self.d_model
        if self.d_inner % self.headdim:
            raise ValueError(f"headdim ({self.headdim}) must divide expand * d_model "
                             f"({self.d_inner})")
        self.nheads = self.d_inner // self.headdim
        if self.nheads % self.ngroups:
            raise ValueError(f"ngroups ({self.ngroups}) must divide nheads ({self.nheads})")
        Di, N, G, H, K, d = (self.d_inner, self.d_state, self.ngroups, self.nheads, self.d_conv,
                             self.d_model)
        self.conv_dim = Di + 2 * G * N
        proj = 2 * Di + 2 * G * N + H
        shapes = {"in_proj.weight": (proj, d)}
        if self.bias:
            shapes["in_proj.bias"] = (proj,)
        shapes["conv1d.weight"] = (self.conv_dim, 1, K)
        if self.conv_bias:
            shapes["conv1d.bias"] = (self.conv_dim,)
        shapes.update({"dt_bias": (H,), "A_log": (H,), "D": (H,), "norm.weight": (Di,),
                       "out_proj.weight": (d, Di)})
        if self.bias:
            shapes["out_proj.bias"] = (d,)
        self._conv_state_shape = (self.conv_dim, K - 1)
        self._ssm_state_shape = (H, self.headdim, N)
        self._init_params(shapes, dtype, seed)

    def __repr__(self):
        return (f"Mamba2({self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"expand={self.expand}, headdim={self.headdim}, ngroups={self.ngroups}, "
                f"dtype='{self.dtype}')")

    def _derive(self):
        self._A = -np.exp(self._params["A_log"])
        Di, GN, H = self.d_inner, self.ngroups * self.d_state, self.nheads
        self._set_parts({"z": ("in_proj", slice(0, Di), True),
                         "xbc": ("in_proj", slice(Di, 2 * Di + 2 * GN), True),
                         "dt": ("in_proj", slice(2 * Di + 2 * GN, 2 * Di + 2 * GN + H), True),
                         "out": ("out_proj", None, True)})
        self._limited = self.time_step_limit != (0.0, math.inf)

    def _run(self, u, cache, lengths):
        Bt, T, d = u.shape
        H, P, G, N, Di = self.nheads, self.headdim, self.ngroups, self.d_state, self.d_inner
        u2 = u.reshape(Bt * T, d)
        xbc = self._conv(self._proj("xbc", u2).reshape(Bt, T, -1), cache, lengths)
        # at B = T = 1 these slices are contiguous: the decoding step takes them as they are
        x = xbc[..., :Di].reshape(Bt, T, H, P)
        Bm = xbc[..., Di:Di + G * N].reshape(Bt, T, G, N)
        Cm = xbc[..., Di + G * N:].reshape(Bt, T, G, N)
        dt = self._proj("dt", u2).reshape(Bt, T, H)
        dt_kw = dict(dt_bias=self._params["dt_bias"], dt_softplus=True)
        if self._limited:        # clamp after softplus: the kernel then takes dt as is
            dt = np.clip(np.logaddexp(0, dt + self._params["dt_bias"]), *self.time_step_limit)
            dt_kw = {}
        y = ssd(x, dt, self._A, Bm, Cm, D=self._params["D"],
                z=self._proj("z", u2).reshape(Bt, T, H, P), chunk=self.chunk_size,
                state=cache.ssm_state, lengths=lengths, out_state=cache.ssm_state, **dt_kw)[0]
        y = grouped_rms_norm(y.reshape(Bt * T, Di), self._params["norm.weight"], self.norm_eps,
                             G)
        return self._proj("out", y).reshape(Bt, T, d)

    def _prefill(self, u, cache, lengths):
        return self._run(u, cache, lengths)

    def _step(self, u, cache):
        return self._run(u, cache, None)
