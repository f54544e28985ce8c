"""One validated call of an RNN cell and the steps every way of running it shares: input
projection, the sequential kernels, the public output structure, the cotangent and the
gradients of the arguments.  Used by ``rnn.py`` (the time loop) and ``cell_solvers.py`` (the
parallel-in-time solvers).
"""
from dataclasses import dataclass

import numpy as np

from . import _blas, _dispatch, _memory, _tuning, _validate
from ._cells import Cell
from ._reference.rnn import previous_hidden
from .autodiff import cotangent as _cotangent


@dataclass
class CellCall:
    """A validated cell call: C-contiguous arrays of one float dtype, and the sizes."""
    cell: Cell
    x: np.ndarray          # [B, T, I] (or [B, T, G*H] when W is None)
    W: object              # [G*H, I] or None
    R: np.ndarray          # [heads, G*D, D]
    b: object              # [G*H] or None
    b_r: object            # [G*H] or None
    state0: np.ndarray     # [S, B, H]
    R_ndim: int
    state_given: bool
    lengths: object = None     # int64 [B] or None (DESIGN.md "Variable lengths, ...")
    reverse: bool = False
    reset: object = None       # bool [B, T] or None

    @property
    def varlen(self):
        """True when lengths, reverse or reset change which steps run or in what order."""
        return self.lengths is not None or self.reverse or self.reset is not None

    @property
    def shape(self):
        return self.x.shape[0], self.x.shape[1], self.state0.shape[2]


def _shape(name, value):
    """The shape of an argument before validation (lists read as arrays; None raises)."""
    if isinstance(value, np.ndarray):
        return value.shape
    return _validate.float_array(name, value).shape


def prepare(cell, x, W, R, b, b_r, heads, state, lengths=None, reverse=False, reset=None):
    """Validate a call of `cell` (a :class:`Cell`) and return a :class:`CellCall`.

    R fixes H (and D, the head size) and W fixes I before x is read, so a wrong size of x
    is blamed on x.  Errors name the argument and the expected shape.
    """
    if lengths is None and reset is None and reverse is False:
        call = _prepare_valid(cell, x, W, R, b, b_r, heads, state)
        if call is not None:
            return call
    G = cell.gates
    heads = _validate.positive_int("heads", heads)
    R_shape = _shape("R", R)
    if len(R_shape) == 2:
        if heads != 1:
            raise ValueError(f"R must have shape [heads, {G}*D, D] = [{heads}, {G}*D, D] when "
                             f"heads={heads}, got {R_shape}")
        R_spec, H = "G*H H", R_shape[1]
    elif len(R_shape) == 3:
        R_spec, H = "heads G*D D", heads * R_shape[2]
    else:
        raise ValueError(f"R must have shape [{G}*H, H] or [heads, {G}*D, D], got {R_shape}")
    spec = {"R": R_spec, "W?": "G*H I", "b?": "G*H", "b_r?": "G*H",
            "x": "B T I" if W is not None else "B T G*H"}
    arrs, dims, dtype = _validate.arrays(spec, {"R": R, "W": W, "b": b, "b_r": b_r, "x": x},
                                         dims={"G": G, "H": H, "heads": heads})
    B = dims["B"]
    state0 = state_array(cell, state, B, H, dtype)
    R3 = arrs["R"].reshape(heads, G * H // heads, H // heads)
    T = arrs["x"].shape[1]
    return CellCall(cell, arrs["x"], arrs["W"], R3, arrs["b"], arrs["b_r"], state0,
                    len(R_shape), state is not None, _validate.lengths(lengths, B, T),
                    _validate.boolean("reverse", reverse), _validate.reset(reset, B, T))


def _prepare_valid(cell, x, W, R, b, b_r, heads, state):
    """The :class:`CellCall` of a call whose arguments are already valid (see
    :func:`_valid_sizes`), checked in about a microsecond (small calls: streaming, decoding).
    None for any other call, which then gets the full validation and its error messages."""
    sizes = _valid_sizes(cell, x, W, R, b, b_r, heads, state)
    if sizes is None:
        return None
    B, _, H, D, S, parts = sizes
    shape = (S, B, H)
    state0 = np.zeros(shape, x.dtype) if state is None else _stacked(parts, shape, x.dtype)
    return CellCall(cell, x, W, R.reshape(heads, cell.gates * D, D), b, b_r, state0, R.ndim,
                    state is not None)


def _valid_sizes(cell, x, W, R, b, b_r, heads, state):
    """(B, T, H, D, S, state parts) when the arguments are already valid -- C-contiguous ndarrays
    of one float dtype with matching nonzero sizes (see :func:`_validate.match`), an int
    `heads`, the state None or the cell's structure (a tuple when it has several parts);
    else None."""
    matched = _matched(cell, x, W, R, b, b_r, heads, state)
    if matched is None:
        return None
    parts, sizes = matched
    if R.ndim == 3:
        NH, GD, D, GH, I, B, T = sizes[:7]
    else:
        GD, D, GH, I, B, T = sizes[:6]
        NH = 1
    H = heads * D
    G = cell.gates
    if (NH != heads or GD != G * D or GH not in (-1, G * H)
            or (W is None and I != G * H) or (parts and sizes[-1] != H)):
        return None
    return B, T, H, D, cell.states, parts


def _matched(cell, x, W, R, b, b_r, heads, state):
    """(state parts, :func:`_validate.match`'s sizes of the plan these arrays take) -- the
    first half of :func:`_valid_sizes`, all that :func:`plain_forward` runs on every call --
    else None."""
    if type(heads) is not int or heads < 1 or type(R) is not np.ndarray:
        return None
    parts = () if state is None else (state,) if cell.states == 1 else state
    plans = _PLANS.get(R.ndim)
    if type(parts) is not tuple or plans is None or len(parts) not in (0, cell.states):
        return None
    sizes = _validate.match(plans[len(parts)], R, W, b, b_r, x, *parts)
    return None if sizes is None else (parts, sizes)


def _plan(R_ndim, nparts):
    """The fast check's plan of a cell call.  Its sizes come in the order (NH,) GD, D, GH, I,
    B, T (, H): NH only when R has the heads axis, H only with a state; GH is -1 when none
    of W, b, b_r is given."""
    spec = {"R": "NH GD D" if R_ndim == 3 else "GD D", "W?": "GH I", "b?": "GH", "b_r?": "GH",
            "x": "B T I"}
    spec.update((f"state{k}", "B H") for k in range(nparts))
    return _validate.plan(spec)[0]


# {R.ndim: [the plan of _valid_sizes with k state parts given, k = 0..4]}
_PLANS = {ndim: [_plan(ndim, k) for k in range(5)] for ndim in (2, 3)}


def _stacked(parts, shape, dtype):
    """The state parts [B, H] as one [S, B, H] array."""
    state0 = np.empty(shape, dtype)
    for s, part in enumerate(parts):
        state0[s] = part
    return state0


def plain_forward(cell, x, W, R, b, b_r, heads, state):
    """The public (y, state) of a plain sequential call -- compiled backend, arguments
    already valid (see :func:`_valid_sizes`), no lengths, reverse or reset -- running
    the compiled project and forward kernels directly: the same kernels, arguments and bits
    as :func:`prepare`, :func:`input_preactivation`, :func:`forward` and :func:`outputs`, in
    a few microseconds less (small calls).  None for any other call, which then takes that
    general path (and its error messages)."""
    if not _dispatch.use_compiled():
        return None
    matched = _matched(cell, x, W, R, b, b_r, heads, state)
    if matched is None:
        return None
    parts, sizes = matched
    # the sizes settle everything else: worked out once per shape (see _plain_decisions)
    key = ("plain_forward", cell.name, heads, R.ndim, len(parts), sizes, x.dtype, W is None,
           b is None, b_r is None, _dispatch.get_num_threads())
    decided = _tuning.remembered(key)
    if decided is None:
        decided = _tuning.remember(key, _plain_decisions(cell, x, W, R, b, b_r, heads, state,
                                                         key[-1]))
    if decided is False:
        return None
    seq_shape, final_shape, b_r_shape, zero_state, zero_b_r, block, threads = decided
    ext = _dispatch.ext_module("rnn")
    dtype = x.dtype
    if state is not None:
        state0 = _stacked(parts, final_shape, dtype)
    else:
        state0 = _dispatch.zeros_input(final_shape, dtype) if zero_state is None else zero_state
    if b_r is None:
        b_r = _dispatch.zeros_input(b_r_shape, dtype) if zero_b_r is None else zero_b_r
    seq = _memory.empty(seq_shape, dtype, "y [1, B, T, H]")      # as forward(save=False)
    final = np.empty(final_shape, dtype)
    R = R if R.ndim == 3 else R[None]             # [1, G*H, H]: one head
    if W is None and b is None:                       # as input_preactivation
        ext.forward(cell.name, x, R, b_r, state0, False, None, False, None, block, seq, None,
                    final, threads)
    else:       # project + forward, W x + b (or x + b) made inside the time loop (same bits)
        ext.forward_projected(cell.name, x, W, b, R, b_r, state0, None, False, None, block, seq,
                              final, threads)
    return outputs(cell, seq[0], final)


def _plain_decisions(cell, x, W, R, b, b_r, heads, state, threads):
    """What :func:`plain_forward` runs for arrays of these sizes, dtype and thread count: (y's
    [1, B, T, H], the state's [S, B, H] and b_r's [G*H] shapes, the zero state when none is
    given and the zero b_r when None -- small ones only (shared, read-only), else None: a
    large zero array is made per call rather than kept -- block, threads); False when the
    arrays are not valid (see :func:`_valid_sizes`)."""
    sizes = _valid_sizes(cell, x, W, R, b, b_r, heads, state)
    if sizes is None:
        return False
    B, T, H, _, S, _ = sizes
    dtype = x.dtype
    final_shape, b_r_shape = (S, B, H), (cell.gates * H,)
    return ((1, B, T, H), final_shape, b_r_shape,
            _shared_zeros(final_shape, dtype) if state is None else None,
            _shared_zeros(b_r_shape, dtype) if b_r is None else None,
            _tuning.rnn_block(cell.name, B, H, heads, dtype), threads)


def _shared_zeros(shape, dtype):
    """The zero input _dispatch.zeros_input shares for `shape` (a read-only array), else None."""
    zeros = _dispatch.zeros_input(shape, dtype)
    return None if zeros.flags.writeable else zeros


def state_array(cell, state, B, H, dtype):
    """`state=` (None, an array, or a tuple of `cell.states` arrays) as one [S, B, H] array."""
    S = cell.states
    if state is None:
        return np.zeros((S, B, H), dtype=dtype)
    names = cell.state_names
    if S > 1 and (not isinstance(state, (tuple, list)) or len(state) != S):
        got = (f"{len(state)} parts" if isinstance(state, (tuple, list))
               else type(state).__name__)
        raise TypeError(f"state must be a tuple ({', '.join(names)}) for {cell.name}, got {got}")
    parts = (state,) if S == 1 else state
    spec = {f"state {name}": "B H" for name in names}
    arrs, _, _ = _validate.arrays(spec, dict(zip(spec, parts)), dims={"B": B, "H": H},
                                  dtype=dtype)
    return np.stack(list(arrs.values()))


def outputs(cell, y, state):
    """Public return value: (y, state) with state an array or a tuple as for PyTorch."""
    if cell.states == 1:
        return y, state[0]
    if cell.states == 2:                      # (h, c): indexing is cheaper than tuple(state)
        return y, (state[0], state[1])
    return y, tuple(state)


_PROJECTION = "W x + b [B, T, G*H]"     # (how a MemoryError names the arrays)


def input_preactivation(call):
    """W x + b over all B*T rows, [B, T, G*H] (x itself, or x + b, when W is None)."""
    x, W, b = call.x, call.W, call.b
    if W is None:
        return x if b is None else x + b
    B, T, _ = x.shape
    if call.lengths is not None:          # padded steps are never read: not projected
        return _dispatch.run("rnn", "project_valid", x, W, b, call.lengths,
                             out=lambda: _memory.empty((B, T, W.shape[0]), x.dtype,
                                                       _PROJECTION),
                             empty=x.size == 0 or W.size == 0, work=x.size * W.shape[0])
    return _dispatch.run("rnn", "project", x, W, b,
                         out=lambda: _memory.empty((B, T, W.shape[0]), x.dtype,
                                                   _PROJECTION),
                         empty=x.size == 0 or W.size == 0, work=x.size * W.shape[0])


def forward(call, ax, save, block=0):
    """The time loop: (seq [S_save,B,T,H], ar_seq [B,T,G*H] or None, final state [S,B,H]);
    seq holds every state component when `save` (for :func:`backward`), else only h.
    block: the compiled kernel's work split (0 automatic, > 0 rows per job, -1 split each
    step's hidden units across threads); the same bits whatever it is.  0 takes
    statescan.tune()'s cached choice for this cell and shape, if any."""
    B, T, H = call.shape
    S = call.cell.states
    dtype = ax.dtype
    if not block:
        block = _tuning.rnn_block(call.cell.name, B, H, call.R.shape[0], dtype)
    b_r = np.zeros(ax.shape[2], dtype) if call.b_r is None else call.b_r

    def out():
        return (_memory.empty((S if save else 1, B, T, H), dtype,
                              "states [S, B, T, H]" if save else "y [1, B, T, H]"),
                _memory.empty(ax.shape, dtype, "R h + b_r [B, T, G*H]") if save else None,
                np.empty_like(call.state0))

    return _dispatch.run("rnn", "forward", call.cell.name, ax, call.R, b_r, call.state0, save,
                         call.lengths, call.reverse, call.reset, block, out=out,
                         empty=B == 0 or T == 0 or H == 0)


def projected_forward(call):
    """:func:`input_preactivation` then :func:`forward` (save=False) in one compiled pass:
    (y [B,T,H], final state [S,B,H]), the same bits, without the W x + b [B,T,G*H] array
    (the compiled forward projects each job's rows a block of steps at a time; with W None it
    adds b to x there).  None without W and b, or on the python backend: those calls take
    the two steps."""
    if (call.W is None and call.b is None) or not _dispatch.use_compiled():
        return None
    B, T, H = call.shape
    dtype = call.x.dtype
    seq = _memory.empty((1, B, T, H), dtype, "y [1, B, T, H]")
    final = np.empty_like(call.state0)
    _dispatch.ext_module("rnn").forward_projected(
        call.cell.name, call.x, call.W, call.b, call.R,
        (_dispatch.zeros_input((call.R.shape[0] * call.R.shape[1],), dtype) if call.b_r is None
         else call.b_r),
        call.state0, call.lengths, call.reverse, call.reset,
        _tuning.rnn_block(call.cell.name, B, H, call.R.shape[0], dtype), seq, final,
        _dispatch.get_num_threads())
    return seq[0], final


def backward(call, ax, ar_seq, seq, dy, dstate, consume=False):
    """Backpropagate through :func:`forward` (save=True): dgx, dgr [B,T,G*H] (the gradients
    of the input-side and recurrent-side pre-activations) and dstate0 [S,B,H].

    consume: write dgx over `ax` (which must then be the caller's own array, not needed after).
    Each step's cell reads its entries of ax before it writes the same entries of dgx, so the
    bits are the same; the lines are in cache when written (a separate dgx costs a read of
    every line it writes: 1.13-1.16x slower kernel at H=64, 1.03-1.05x at H=256)."""
    B, T, H = call.shape

    def out():
        dgx = ax if consume else _memory.empty(ax.shape, ax.dtype)
        dgr = _memory.empty(ax.shape, ax.dtype) if call.cell.separate_dgr else dgx
        return dgx, dgr, np.empty_like(dstate)

    return _dispatch.run("rnn", "backward", call.cell.name, ax, ar_seq, call.R, call.state0,
                         seq, dy, dstate, call.lengths, call.reverse, call.reset, out=out,
                         empty=B == 0 or T == 0 or H == 0)


def owns_preactivation(call):
    """Whether :func:`input_preactivation` returns a new array (W x + b, or x + b) rather than x
    itself (or a view of it), so the backward may write over it (`consume`)."""
    return call.W is not None or call.b is not None


def pullback(call, ax, ar_seq, seq):
    """The pullback of a sequential vjp whose forward saved ax, ar_seq and seq (with y =
    seq[0]): cotangent -> the gradients of :func:`parameter_grads`.  The first call writes
    dgx over ax when ax is its own array (:func:`backward`'s `consume`); a later call (the
    pullback may be called again) projects ax again -- the same bits."""
    saved = {"ax": ax}

    def run(value):
        dy, dstate = cotangent(call, value)
        ax_ = saved.pop("ax", None)
        if ax_ is None:
            ax_ = input_preactivation(call)
        dgx, dgr, dstate0 = backward(call, ax_, ar_seq, seq, dy, dstate,
                                     consume=owns_preactivation(call))
        return parameter_grads(call, seq[0], dgx, dgr, dstate0)
    return run


def cotangent(call, value):
    """The cotangent of (y, state) as dy [B,T,H] and dstate [S,B,H]; None parts mean zero."""
    B, T, H = call.shape
    names = call.cell.state_names
    state = ("dstate", (B, H)) if len(names) == 1 else [(f"dstate {n}", (B, H)) for n in names]
    dy, dstate = _cotangent(value, [("dy", (B, T, H)), state], call.state0.dtype)
    return dy, (dstate[None] if len(names) == 1 else np.stack(dstate))


# Rows (B*T) from which the compiled backend computes dx, dW and dR with its own kernels
# (input_grads, weight_grads) rather than numpy's BLAS: below, the fixed costs of packing and
# transposing outweigh the micro-kernel's faster multiply-adds.  Measured (1 core, float32,
# lstm shapes G*H x H): at 16 rows and H = 1024 numpy took 0.75x the time of dW and dx; at
# 32 rows even for dW (dx 0.6-1.0x of numpy's time); from 64 rows the kernels won at
# H = 64, 256, 1024 (dW 0.8-0.9x, dx 0.6-0.85x).
COMPILED_GRADS_MIN_ROWS = 32


def _compiled_grads(N):
    """Whether the parameter gradients of N = B*T rows run in the compiled kernels."""
    return N >= COMPILED_GRADS_MIN_ROWS and _dispatch.use_compiled()


def parameter_grads(call, y, dgx, dgr, dstate0):
    """Gradients of the positional arguments (and of state=) from the pre-activation gradients
    dgx, dgr [B,T,G*H] and dstate0 [S,B,H]; y [B,T,H] is the forward output."""
    _blas.prepare()
    W, b, b_r = call.W, call.b, call.b_r
    B, T, H = call.shape
    heads_, GD, D = call.R.shape
    G = call.cell.gates
    N = B * T
    gx = dgx.reshape(N, G * H)
    compiled = _compiled_grads(N)
    if W is None:
        dx, dW = dgx, None
    elif compiled:
        I = W.shape[1]
        dx = _memory.empty(call.x.shape, gx.dtype)
        gx = np.ascontiguousarray(gx)
        _dispatch.ext_module("rnn").input_grads(gx, W, dx.reshape(N, I),
                                                _dispatch.threads_for(N * I * G * H))
        dW = _memory.empty((1, G * H, I), gx.dtype)        # below, with dR
    else:
        dx = _memory.empty(call.x.shape, gx.dtype)
        np.matmul(gx, W, out=dx.reshape(N, W.shape[1]))
        dW = gx.T @ call.x.reshape(N, call.x.shape[2])
    if call.varlen:
        h_prev = previous_hidden(y, call.state0, call.lengths, call.reverse, call.reset)
    else:
        h_prev = _memory.empty((B, T, H), y.dtype)
        if T:
            h_prev[:, 0] = call.state0[0]
            h_prev[:, 1:] = y[:, :-1]
    if compiled:        # every head's gr^T h_prev read in place (groups: G gate blocks)
        ext = _dispatch.ext_module("rnn")
        dR = _memory.empty((heads_, GD, D), dgr.dtype)
        h2 = np.ascontiguousarray(h_prev.reshape(N, H))
        if W is not None and dgr is dgx and heads_ == 1:
            # dW = gx^T x and dR = gx^T h_prev in one pass, gx's panels packed once (at H = 64
            # packing them from memory took a quarter of each product's time)
            ext.weight_grads(gx, call.x.reshape(N, I), 1, dW,
                             _dispatch.threads_for(N * G * H * (I + H)), h2, dR)
        else:
            if W is not None:
                ext.weight_grads(gx, call.x.reshape(N, I), 1, dW,
                                 _dispatch.threads_for(N * I * G * H))
            ext.weight_grads(np.ascontiguousarray(dgr.reshape(N, G * H)), h2,
                             G if heads_ > 1 else 1, dR,
                             _dispatch.threads_for(N * GD * D * heads_))
        if W is not None:
            dW = dW[0]
    else:
        gr = dgr.reshape(N, G, heads_, D).transpose(2, 0, 1, 3).reshape(heads_, N, GD)
        dR = gr.transpose(0, 2, 1) @ h_prev.reshape(N, heads_, D).transpose(1, 0, 2)
    if call.R_ndim == 2:
        dR = dR[0]
    db = None if b is None else gx.sum(axis=0)
    if b_r is None:
        db_r = None
    elif dgr is dgx and db is not None:      # every cell but the GRU: the same gradient
        db_r = db.copy()
    else:
        db_r = dgr.reshape(N, G * H).sum(axis=0)
    # x, W, R always; b and b_r count when passed (positionally or by keyword).
    n_positional = 5 if b_r is not None else (4 if b is not None else 3)
    grads = (dx, dW, dR, db, db_r)[:n_positional]
    if call.state_given:
        grads = grads + (outputs(call.cell, None, dstate0)[1],)
    return grads
