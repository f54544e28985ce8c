"""Chunked causal linear attention, and the linear recurrence it shares with SSD.

The recurrence ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t`` runs in blocks of
``chunk`` rows (intra-block masked quadratic part plus the carried state): constant work per
token for any T.  Variable lengths and resets are handled inside the kernel (a reset is a
zero decay at its step); ``reverse=`` reads each row's valid steps backwards through a
per-row permutation of the inputs.
"""
import numpy as np

from . import _dispatch, _tuning, _validate
from ._reference import linear_attention as _ref
from .autodiff import cotangent, defvjp

_FAMILY = "linear_attention"


# ---- the shared recurrence (also SSD's) ------------------------------------------------------

def recurrence_forward(q, k, v, g, S0, chunk, group=1, lengths=None, reset=None, out=None):
    """(o [B,NH,T,dv], S_T) of the recurrence; q, k [B,G,T,dk] (head h reads group
    h // group), v [B,NH,T,dv] and g [B,NH,T] (None: no decay) strided with a contiguous last
    axis; S0 contiguous; lengths int64 [B] / reset bool [B,T] or None.  `out` optionally
    gives o as a (strided) view to write into."""
    B, NH, T, dv = v.shape
    dk = S0.shape[2]
    if reset is not None and g is None:      # a reset is a zero decay: the kernel needs g
        g = np.broadcast_to(np.zeros((), S0.dtype), (B, NH, T))

    def alloc():
        return (np.empty((B, NH, T, dv), S0.dtype) if out is None else out), np.empty_like(S0)

    o, S = _dispatch.run(_FAMILY, "linear_forward", q, k, v, g, S0, chunk, group, lengths,
                         _as_bytes(reset), out=alloc, empty=B * NH * T * dk * dv == 0,
                         work=recurrence_work(B, NH, T, dk, dv, chunk))
    if out is not None and o is not out:
        out[...] = o
        o = out
    return o, S


def recurrence_backward(q, k, v, g, S0, S_T, do, dS, chunk, group=1, lengths=None,
                        reset=None, need_dg=True):
    """(dq, dk, dv, dS0, dg) of `recurrence_forward`: dq, dk [B,NH,T,dk] per head (the
    caller sums a group's heads), dg [B,NH,T] (None without decay or when not `need_dg`)."""
    B, NH, T, dv = v.shape
    dk = S0.shape[2]
    g_kernel = g
    if reset is not None and g is None:
        g_kernel = np.broadcast_to(np.zeros((), S0.dtype), (B, NH, T))
    dtype = S0.dtype

    def alloc():
        return (np.empty((B, NH, T, dk), dtype), np.empty((B, NH, T, dk), dtype),
                np.empty((B, NH, T, dv), dtype), np.empty_like(S0))

    dq, dk_, dv_, dS0 = _dispatch.run(_FAMILY, "linear_backward", q, k, v, g_kernel, S0, chunk,
                                      group, lengths, _as_bytes(reset), do,
                                      np.ascontiguousarray(dS), out=alloc,
                                      empty=B * NH * T * dk * dv == 0,
                                      work=3 * recurrence_work(B, NH, T, dk, dv, chunk))
    dg = None
    if g is not None and need_dg:
        dg = _ref.log_decay_grad(q, k, dq, dk_, dS, S_T, group, lengths, reset)
    return dq, dk_, dv_, dS0, dg


def recurrence_work(B, NH, T, dk, dv, chunk):
    """About the multiply-adds of the forward recurrence: per step the state update and
    its read-out (2 dk dv) and the block's quadratic part (chunk (dk + dv))."""
    return B * NH * T * (2 * dk * dv + min(chunk, T) * (dk + dv))


def _as_bytes(reset):
    """The kernel reads resets as uint8 (same bytes as numpy's bool)."""
    return reset.view(np.uint8) if reset is not None and _dispatch.use_compiled() else reset


# ---- options shared with SSD -------------------------------------------------------------------

def steps(lengths, reverse, reset, B, T):
    """Validated (lengths, reverse, reset, permutation): `permutation` [B, T] (or None) maps
    processing order to time (an involution: each row's valid part reversed, padding kept)."""
    lengths = _validate.lengths(lengths, B, T)
    reverse = _validate.boolean("reverse", reverse)
    reset = _validate.reset(reset, B, T)
    perm = None
    if reverse and B * T:
        t = np.arange(T)
        n = np.full((B, 1), T) if lengths is None else lengths[:, None]
        perm = np.where(t < n, n - 1 - t, t)
        if reset is not None:
            reset = np.take_along_axis(reset, perm, axis=1)
    return lengths, reverse, reset, perm


def permute(a, perm, axis):
    """`a` with its time axis (`axis`) read in the order `perm` [B, T] (None: unchanged)."""
    if perm is None or a is None:
        return a
    shape = [1] * a.ndim
    shape[0], shape[axis] = perm.shape
    return np.ascontiguousarray(np.take_along_axis(a, perm.reshape(shape), axis=axis))


def zero_padding(a, lengths, axis):
    """Set the padded steps (t >= lengths[b] along `axis`) of `a` to exactly 0, in place."""
    if lengths is not None and a is not None:
        valid = np.arange(a.shape[axis])[None, :] < lengths[:, None]
        np.moveaxis(a, axis, 1)[~valid] = 0
    return a


# Blocks longer than this are no faster (the block's quadratic part grows) and their
# chunk x chunk scratch would not fit in any cache: larger `chunk` values act as this one.
MAX_CHUNK = 2048


def check_chunk(chunk, T):
    """`chunk` as an int in [1, min(T, MAX_CHUNK)] (a block longer than T is one of T rows)."""
    return min(_validate.positive_int("chunk", chunk), max(T, 1), MAX_CHUNK)


def fast_call_blocking(kernel, B, NH, T, dk, dv, dtype, chunk):
    """(chunk, threads) of a fast call of `kernel` ("ssd": dk = N, dv = P, or
    "linear_attention"; T >= 1): `chunk` as the general path settles it (None: the tuned or
    automatic one) and the threads for the recurrence's work.  Remembered per sizes, dtype,
    chunk and thread count (see _tuning.remember) when `chunk` is None or an int; any other
    `chunk` gets check_chunk's error or answer each time."""
    key = ("fast_call_blocking", kernel, B, NH, T, dk, dv, dtype, chunk,
           _dispatch.get_num_threads())
    cacheable = chunk is None or type(chunk) is int
    decided = _tuning.remembered(key) if cacheable else None
    if decided is None:
        chunk = (min(_tuning.chunk(kernel, dk, dv, dtype), T, MAX_CHUNK) if chunk is None
                 else check_chunk(chunk, T))
        decided = chunk, _dispatch.threads_for(recurrence_work(B, NH, T, dk, dv, chunk))
        if cacheable:
            _tuning.remember(key, decided)
    return decided


def out_state_array(out_state, shape, dtype):
    """`out_state=` checked: a writeable C-contiguous ndarray of the state's shape and dtype."""
    if out_state is None:
        return None
    if not isinstance(out_state, np.ndarray):
        raise TypeError(f"out_state must be an ndarray, got {type(out_state).__name__}")
    if out_state.dtype != dtype:
        raise TypeError(f"out_state must be {dtype}, got {out_state.dtype}")
    if out_state.shape != tuple(shape):
        raise ValueError(f"out_state must have shape {list(shape)}, got {out_state.shape}")
    if not out_state.flags.c_contiguous or not out_state.flags.writeable:
        raise ValueError("out_state must be a writeable C-contiguous array")
    return out_state


def store_state(S, out_state):
    """The final state, written into `out_state` when one was given."""
    if out_state is None or S is out_state:
        return S
    out_state[...] = S
    return out_state


# ---- linear attention --------------------------------------------------------------------------

def _prepare(q, k, v, decay, state, chunk, lengths, reverse, reset):
    arr, dims, dtype = _validate.arrays(
        {"q": "B NH T dk", "k": "B NH T dk", "v": "B NH T dv", "decay?": "~NH",
         "state?": "B NH dk dv"},
        {"q": q, "k": k, "v": v, "decay": decay, "state": state})
    B, NH, T = dims["B"], dims["NH"], dims["T"]
    lam = arr["decay"]
    if lam is not None and not np.all((lam > 0) & (lam <= 1)):
        raise ValueError(f"decay must lie in (0, 1], got {lam}")
    if chunk is None:                     # the cached choice of statescan.tune(), if any
        chunk = _tuning.chunk("linear_attention", dims["dk"], dims["dv"], dtype)
    chunk = check_chunk(chunk, T)
    lengths, reverse, reset, perm = steps(lengths, reverse, reset, B, T)
    q, k, v = (permute(arr[n], perm, 2) for n in ("q", "k", "v"))
    S0 = arr["state"]
    if S0 is None:
        S0 = np.zeros((B, NH, dims["dk"], dims["dv"]), dtype)
    g = None
    if lam is not None:
        g = np.broadcast_to(np.log(lam)[None, :, None], (B, NH, T))
    return q, k, v, lam, g, S0, chunk, lengths, reset, perm


def linear_attention(q, k, v, *, decay=None, chunk=None, state=None, lengths=None,
                     reverse=False, reset=None, out_state=None):
    """Causal linear attention with an optional per-head decay, in O(T) time and memory.

    ``S_t = decay * S_{t-1} + k_t v_t^T``,  ``o_t = S_t^T q_t``  (no softmax, no scaling).
    Evaluated in blocks of ``chunk`` rows (Lightning Attention-2 tiling): the intra-block part
    ``((Q K^T) * M) V`` with ``M[s, t] = decay**(s - t)`` for ``s >= t``, plus the carried
    state's contribution; the result does not depend on ``chunk`` (up to rounding).

    Parameters
    ----------
    q, k : ndarray [B, NH, T, dk]
        Queries and keys (float32 or float64).
    v : ndarray [B, NH, T, dv]
        Values.
    decay : float, sequence or ndarray [NH], optional
        Per-head decay lambda in (0, 1] (a scalar applies to every head); None means 1
        (plain linear attention).
    chunk : int, optional
        Block size of the tiled algorithm (speed only; values above 2048 act as 2048);
        None: the one :func:`statescan.tune` cached for dk, dv, the dtype and the thread
        count on this machine, else 64.
    state : ndarray [B, NH, dk, dv], optional
        Initial state S_0 (zeros when None); passing the returned state back continues the
        sequence exactly.
    lengths : int array-like [B], optional
        Valid steps per row; steps t >= lengths[b] are padding: their outputs are 0, they do
        not touch the state, and the returned state is the one after the last valid step.
    reverse : bool
        Process each row's valid steps from the last to the first (the output at t is the
        state after processing step t).
    reset : bool array-like [B, T], optional
        True at (b, t) zeroes row b's state before step t (in processing order).
    out_state : ndarray [B, NH, dk, dv], optional
        A C-contiguous array of the call's dtype that receives the final state and is
        returned as it; it may be ``state`` itself (an in-place update, e.g. when decoding).

    Returns
    -------
    o : ndarray [B, NH, T, dv]
    state : ndarray [B, NH, dk, dv]
        The final state S_T.

    Notes
    -----
    T = 1 with ``state`` and contiguous arrays runs a dedicated decoding step on the state
    in place of its layout (no transposes or copies).
    ``statescan.vjp(linear_attention, q, k, v, decay=..., state=...)`` returns a pullback
    taking ``(do, dstate)`` (either may be None) and returning ``(dq, dk, dv)``, followed by
    ``ddecay`` when ``decay`` was passed and ``dstate`` when ``state`` was passed.
    Memory, measured as the peak RSS increase in units of the output o (float64, B=8, NH=8,
    T=2048, dk=dv=32, a decay): the forward 1.0x (o plus one ``chunk x chunk`` block per
    thread); vjp with its pullback 5.1x (the inputs are kept, gradients of their size).
    """
    if lengths is None and reset is None and reverse is False:
        fast = (_decode(q, k, v, decay, state, out_state)
                if state is not None and type(q) is np.ndarray and q.shape[2:3] == (1,)
                else _fast_call(q, k, v, decay, state, chunk, out_state))
        if fast is not None:
            return fast
    q, k, v, lam, g, S0, chunk, lengths, reset, perm = _prepare(q, k, v, decay, state, chunk,
                                                                lengths, reverse, reset)
    out_state = out_state_array(out_state, S0.shape, S0.dtype)
    o, S = recurrence_forward(q, k, v, g, S0, chunk, 1, lengths, reset)
    return permute(o, perm, 2), store_state(S, out_state)


def _plan(made):
    """The fast check's plan (see _validate.plan); with `made`, the initial state (zeros when
    None), the final state and o (new arrays) follow the sizes."""
    return _validate.plan({"q": "B NH T dk", "k": "B NH T dk", "v": "B NH T dv",
                           "decay?": "NH", "state?" + "+0" * made: "B NH dk dv",
                           "out_state?!": "B NH dk dv", "S+" if made else "S?": "B NH dk dv",
                           "o+" if made else "o?": "B NH T dv"})[0]


_PLAN, _MADE_PLAN = _plan(False), _plan(True)


def _sizes(q, k, v, decay, state, out_state):
    """(B, NH, T, dk, dv) when the arguments are already valid -- C-contiguous ndarrays of one
    float dtype with matching nonzero sizes (see :func:`_validate.match`), decays in (0, 1],
    out_state writeable -- else None: the general path then validates and explains."""
    checked = _validate.match(_PLAN, q, k, v, decay, state, out_state, None, None)
    if checked is None or (decay is not None and not _decays(decay)):
        return None
    return checked


def _decays(decay):
    """True when every decay lies in (0, 1] (NaN does not)."""
    return all(0 < d <= 1 for d in decay.tolist())


def _decode(q, k, v, decay, state, out_state):
    """The T = 1 step with a state on already-valid arrays (see :func:`_sizes`; the caller
    has checked that lengths, reset and reverse are not given); None otherwise."""
    sizes = _sizes(q, k, v, decay, state, out_state)
    if sizes is None or sizes[2] != 1:
        return None
    B, NH, _, _, dv = sizes
    o, S = _dispatch.run(_FAMILY, "linear_step", q, k, v, decay, state,
                         out=lambda: (np.empty((B, NH, 1, dv), q.dtype),
                                      np.empty_like(state) if out_state is None else out_state),
                         work=2 * state.size)
    return o, store_state(S, out_state)        # the reference returns a new state


def _fast_call(q, k, v, decay, state, chunk, out_state):
    """A call whose arrays are already valid (see :func:`_sizes`) on the compiled backend;
    the caller has checked that lengths, reset and reverse are not given.  Runs with the
    arguments the general path would pass: (o, final state).  None for any other call, which
    then gets the full validation and its error messages."""
    kernel = _dispatch.compiled(_FAMILY, "linear_forward")
    if kernel is None:
        return None
    # _sizes' checks, on the plan that also makes the initial state (zeros when None), the
    # final state and o -- without its call (a third of a microsecond)
    checked = _validate.match(_MADE_PLAN, q, k, v, decay, state, out_state, None, None)
    if checked is None:
        return None
    B, NH, T, dk, dv, S0, S, o = checked
    if decay is not None and not _decays(decay):
        return None
    dtype = q.dtype
    chunk, threads = fast_call_blocking("linear_attention", B, NH, T, dk, dv, dtype, chunk)
    g = None
    if decay is not None:     # _prepare's broadcast log-decays, made 2 us faster: a view
        g = np.ndarray((B, NH, T), dtype, np.log(decay), 0, (0, dtype.itemsize, 0))
    kernel(q, k, v, g, S0, chunk, 1, None, None, o, S, threads)
    return o, store_state(S, out_state)


def _linear_attention_vjp(q, k, v, *, decay=None, chunk=None, state=None, lengths=None,
                          reverse=False, reset=None):
    q, k, v, lam, g, S0, chunk, lengths, reset, perm = _prepare(q, k, v, decay, state, chunk,
                                                                lengths, reverse, reset)
    o, S_T = recurrence_forward(q, k, v, g, S0, chunk, 1, lengths, reset)

    def pullback(cot):
        do, dS = cotangent(cot, [("do", o.shape), ("dstate", S_T.shape)], o.dtype)
        do = permute(do, perm, 2)
        dq, dk, dv, dS0, dg = recurrence_backward(q, k, v, g, S0, S_T, do, dS, chunk, 1,
                                                  lengths, reset)
        grads = tuple(permute(a, perm, 2) for a in (dq, dk, dv))
        if lam is not None:
            # g = log(decay) at every step: d/d decay = sum of d/dg over steps / decay
            grads += (dg.sum(axis=(0, 2)) / lam,)
        if state is not None:
            grads += (dS0,)
        return grads

    return (permute(o, perm, 2), S_T), pullback


defvjp(linear_attention, _linear_attention_vjp)
