"""PyTorch-compatible recurrent stacks: :class:`LSTM`, :class:`GRU`, :class:`RNN` (tanh) and
:class:`SLSTM`, built on statescan's cell kernels.

Same constructor arguments, parameter names and shapes as ``torch.nn.LSTM`` & co., batch-first
numpy in and out, torch's state layout ``[num_layers * num_directions, B, H]``.  Each layer
and direction runs as one kernel call; the next layer's input projection is one GEMM over
both directions' outputs.
"""
import numpy as np

from .. import _validate
from .. import rnn as _kernels
from . import _stack

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class _RecurrentStack:
    """Shared implementation; the subclasses name the cell."""
    _cell = None            # kernel function name in statescan
    _gates = None
    _state_names = None
    _torch_name = None      # torch.nn class that from_torch accepts (None: no torch twin)
    state_batch_axis = 1    # axis of the batch in every state array (run_sequences reads it)

    def __init__(self, input_size, hidden_size, num_layers=1, *, bias=True,
                 bidirectional=False, heads=1, dtype="float32", seed=None):
        self.input_size = _validate.positive_int("input_size", input_size)
        self.hidden_size = _validate.positive_int("hidden_size", hidden_size)
        self.num_layers = _validate.positive_int("num_layers", num_layers)
        self.bias = _validate.boolean("bias", bias)
        self.bidirectional = _validate.boolean("bidirectional", bidirectional)
        self.heads = _validate.positive_int("heads", heads)
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by heads "
                             f"({self.heads})")
        self.dtype = _float_dtype(dtype)
        rng = np.random.default_rng(seed)
        bound = 1.0 / np.sqrt(self.hidden_size)
        self._params = [self._empty_layer(layer) for layer in range(self.num_layers)]
        # torch's initialisation: every parameter uniform in [-1/sqrt(H), 1/sqrt(H)], drawn
        # in state_dict order
        for name, view in self._views(self._params):
            view[...] = rng.uniform(-bound, bound, view.shape)

    # ---- configuration -----------------------------------------------------------------------

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    @property
    def _cell_fn(self):
        return getattr(_kernels, self._cell)

    def _recurrent_shape(self):
        G, H, k = self._gates, self.hidden_size, self.heads
        return (G * H, H) if k == 1 else (k, G * (H // k), H // k)

    def _empty_layer(self, layer):
        dirs, GH = self.num_directions, self._gates * self.hidden_size
        I = self.input_size if layer == 0 else dirs * self.hidden_size
        z = lambda *shape: np.zeros(shape, self.dtype)   # noqa: E731
        return [z(dirs * GH, I), z(dirs, *self._recurrent_shape()),
                z(dirs * GH) if self.bias else None, z(dirs, GH) if self.bias else None]

    def _views(self, params):
        """(torch name, view into `params`), in torch's state_dict order; `params` holds per
        layer (W_ih [dirs*G*H, I], R [dirs, ...], b_ih [dirs*G*H], b_hh [dirs, G*H])."""
        GH = self._gates * self.hidden_size
        kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if self.bias else \
                ("weight_ih", "weight_hh")
        for layer, (W_ih, R, b_ih, b_hh) in enumerate(params):
            for d in range(self.num_directions):
                suffix = f"_l{layer}" + ("_reverse" if d else "")
                arrays = (W_ih[d * GH:(d + 1) * GH], R[d],
                          None if b_ih is None else b_ih[d * GH:(d + 1) * GH],
                          None if b_hh is None else b_hh[d])
                for kind, view in zip(kinds, arrays):
                    yield kind + suffix, view

    def __repr__(self):
        opts = [f"num_layers={self.num_layers}"] if self.num_layers != 1 else []
        if not self.bias:
            opts.append("bias=False")
        if self.bidirectional:
            opts.append("bidirectional=True")
        if self.heads != 1:
            opts.append(f"heads={self.heads}")
        opts.append(f"dtype={self.dtype.name}")
        return f"{type(self).__name__}({self.input_size}, {self.hidden_size}, {', '.join(opts)})"

    # ---- parameters --------------------------------------------------------------------------

    def state_dict(self):
        """The parameters by torch's names (``weight_ih_l0``, ``weight_hh_l0_reverse``, ...),
        as new ndarrays of torch's shapes (``weight_hh`` is [heads, G*D, D] when heads > 1)."""
        return {name: view.copy() for name, view in self._views(self._params)}

    def load_state_dict(self, state_dict):
        """Load parameters from a dict with torch's names and shapes (values: anything
        ``np.asarray`` accepts, e.g. ``{k: v.numpy() for k, v in module.state_dict().items()}``).

        Raises KeyError naming missing or unexpected entries and ValueError naming an entry
        of the wrong shape; nothing is changed then.  Values are converted to the layer's dtype.
        """
        views = dict(self._views(self._params))
        missing = [k for k in views if k not in state_dict]
        extra = [k for k in state_dict if k not in views]
        if missing or extra:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                    ([f"unexpected {', '.join(extra)}"] if extra else [])
            raise KeyError(f"load_state_dict: {'; '.join(parts)}")
        arrays = {}
        for name, view in views.items():
            value = state_dict[name]
            value = value.detach().cpu().numpy() if hasattr(value, "detach") else value
            arr = _validate.float_array(name, value, self.dtype)
            if arr.shape != view.shape:
                raise ValueError(f"{name} must have shape {list(view.shape)}, got "
                                 f"{list(arr.shape)}")
            arrays[name] = arr
        for name, view in views.items():
            view[...] = arrays[name]

    def to(self, dtype):
        """Convert the parameters to float32 or float64 (in place; returns the layer)."""
        dtype = _float_dtype(dtype)
        if dtype != self.dtype:
            self._params = [[None if p is None else p.astype(dtype) for p in layer]
                            for layer in self._params]
            self.dtype = dtype
        return self

    @classmethod
    def from_torch(cls, module):
        """A layer with the configuration and weights of a ``torch.nn`` module.

        ``nn.LSTM.from_torch(torch.nn.LSTM(...))``, likewise GRU and RNN (tanh).  The module's
        ``batch_first`` does not matter: statescan layers are always batch-first.  Dropout
        between layers is a training-time option (inactive in torch's eval mode) and is not
        applied.  ``proj_size``, ``nonlinearity="relu"`` and non-float32/float64 weights raise
        NotImplementedError naming the option.  torch is imported only here.
        """
        from ._torch_import import from_torch
        return from_torch(cls, module)

    # ---- running -----------------------------------------------------------------------------

    def _check(self, x, state, lengths):
        """Validated x, per (layer, direction) initial states (None: zeros) and lengths."""
        x = _validate.float_array("x", x, self.dtype)
        if x.dtype != self.dtype:
            raise TypeError(f"x is {x.dtype} but the layer is {self.dtype.name} "
                            f"(convert x or use layer.to({x.dtype.name!r}))")
        _validate.check_shape("x", x, (None, None, self.input_size),
                              f"[B, T, input_size] = [B, T, {self.input_size}]")
        x = _validate.contiguous(x, self.dtype)
        B, T = x.shape[:2]
        lengths = _validate.lengths(lengths, B, T)
        n = self.num_layers * self.num_directions
        if state is None:
            return x, [None] * n, lengths
        names = self._state_names
        parts = (state,) if len(names) == 1 else state
        if len(names) > 1 and (not isinstance(state, (tuple, list)) or len(state) != len(names)):
            raise TypeError(f"state must be a tuple ({', '.join(names)}) for "
                            f"{type(self).__name__}, got {type(state).__name__}")
        arrays = []
        for name, part in zip(names, parts):
            part = _validate.float_array(f"state {name}", part, self.dtype)
            if part.dtype != self.dtype:
                raise TypeError(f"state {name} is {part.dtype} but the layer is "
                                f"{self.dtype.name}")
            _validate.check_shape(f"state {name}", part, (n, B, self.hidden_size),
                                  f"[num_layers*num_directions, B, H] = "
                                  f"[{n}, {B}, {self.hidden_size}]")
            arrays.append(part)
        per_cell = [arrays[0][i] if len(names) == 1 else tuple(a[i] for a in arrays)
                    for i in range(n)]
        return x, per_cell, lengths

    def _state_out(self, finals):
        """Per (layer, direction) cell states -> torch's layout."""
        if len(self._state_names) == 1:
            return np.stack(finals)
        return tuple(np.stack([f[s] for f in finals]) for s in range(len(self._state_names)))

    def __call__(self, x, state=None, lengths=None):
        """Run the stack over a batch.

        Parameters
        ----------
        x : ndarray [B, T, input_size]
            Batch-first input of the layer's dtype.
        state : optional
            Initial state in torch's layout: an array [num_layers*num_directions, B, H]
            (GRU, RNN), ``(h, c)`` (LSTM) or ``(h, c, n, m)`` (SLSTM); zeros when None.
        lengths : int array-like [B], optional
            Valid steps of each row (0 <= lengths[b] <= T); the padded steps' outputs are 0
            and the returned state of a row is the one after its last valid step (torch's
            result on ``pack_padded_sequence`` input).  The backward direction of a
            bidirectional layer starts at each row's last valid step.

        Returns
        -------
        y : ndarray [B, T, num_directions*H]
            The last layer's outputs (forward direction first).
        state :
            Final state in the layout of `state`.
        """
        x, state0, lengths = self._check(x, state, lengths)
        y, finals, _ = _stack.forward(self, self._params, x, state0, lengths)
        return y, self._state_out(finals)

    def _vjp(self, x, state=None, lengths=None):
        """``statescan.vjp(layer, x, state=..., lengths=...)``: pullback((dy, dstate)) returns
        (dx, grads) with grads a dict keyed like state_dict, then dstate when state was given."""
        from ..autodiff import cotangent
        given = state is not None
        x, state0, lengths = self._check(x, state, lengths)
        B, n, H = x.shape[0], len(state0), self.hidden_size
        if not given:       # explicit zeros: each cell pullback then returns its state grad
            zeros = np.zeros((B, H), self.dtype)
            state0 = [zeros if len(self._state_names) == 1
                      else (zeros,) * len(self._state_names)] * n
        y, finals, tape = _stack.forward(self, self._params, x, state0, lengths, save=True)
        names = self._state_names
        y_shape = y.shape

        def pullback(cot):
            state_leaves = [(f"d{s}", (n, B, H)) for s in names]
            structure = [("dy", y_shape), state_leaves[0] if len(names) == 1 else state_leaves]
            dy, dstate = cotangent(cot, structure, self.dtype)
            dstate = [dstate] if len(names) == 1 else dstate
            per_cell = [dstate[0][i] if len(names) == 1 else tuple(d[i] for d in dstate)
                        for i in range(n)]
            dx, grads, dstate0 = _stack.backward(self, self._params, tape, dy, per_cell)
            out = (dx, self._grads_dict(grads))
            return out + (self._state_out(dstate0),) if given else out

        return (y, self._state_out(finals)), pullback

    def _grads_dict(self, grads):
        """Per-layer gradient arrays (stored layout) -> dict keyed like state_dict."""
        return {name: np.ascontiguousarray(view) for name, view in self._views(grads)}

    def stream(self):
        """One token (or a few) per call with every layer's weights packed once.

        Unidirectional layers only.  ``s = layer.stream(); y_t, state = s(x_t, state)`` with
        x_t [B, T, input_size] gives bit for bit the outputs of ``layer(x)`` on the whole
        sequence.  The stream copies the weights: build a new one after loading new weights.
        """
        if self.bidirectional:
            raise ValueError("stream() needs a unidirectional layer: the backward direction "
                             "of a bidirectional layer needs the whole sequence")
        return LayerStream(self)


class LayerStream:
    """A unidirectional stack with its weights packed once (made by ``layer.stream()``).

    ``s(x, state=None) -> (y, state)`` exactly like ``layer(x, state)``; pickles and
    deep-copies (the packed weights are rebuilt on loading).
    """

    def __init__(self, layer):
        self._layer = layer
        self._build()

    def _build(self):
        layer = self._layer
        self._cells = []
        for W_ih, R, b_ih, b_hh in layer._params:
            self._cells.append(_kernels.stream(layer._cell_fn, W_ih, R[0], b_ih,
                                               None if b_hh is None else b_hh[0],
                                               heads=layer.heads))

    def __getstate__(self):
        return {"layer": self._layer}

    def __setstate__(self, state):
        self._layer = state["layer"]
        self._build()

    def __repr__(self):
        return f"LayerStream({self._layer!r})"

    def __call__(self, x, state=None):
        """Advance: x [B, T, input_size] (T is usually 1) -> (y [B, T, H], state)."""
        layer = self._layer
        x, state0, lengths = layer._check(x, state, None)
        finals = []
        for cell, s0 in zip(self._cells, state0):
            x, s = cell(x, s0)
            finals.append(s)
        return x, layer._state_out(finals)


def _float_dtype(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


class LSTM(_RecurrentStack):
    """Multi-layer LSTM with PyTorch's equations, parameter names and state layout (h, c).

    Parameters
    ----------
    input_size, hidden_size, num_layers, bias, bidirectional :
        As for ``torch.nn.LSTM`` (always batch-first; no ``proj_size``).
    heads : int
        Block-diagonal recurrence with `heads` blocks (``weight_hh`` [heads, 4*D, D]).
    dtype : "float32" or "float64"
    seed : int, optional
        Seed of torch-style initialisation, uniform in [-1/sqrt(H), 1/sqrt(H)].

    Call ``layer(x, state=None, lengths=None) -> (y, (h, c))``; see ``__call__``.
    """
    _cell, _gates, _state_names, _torch_name = "lstm", 4, ("h", "c"), "LSTM"


class GRU(_RecurrentStack):
    """Multi-layer GRU with PyTorch's equations (gates r, z, n), names and state layout.

    Same arguments as :class:`LSTM`; the state is one array h.
    """
    _cell, _gates, _state_names, _torch_name = "gru", 3, ("h",), "GRU"


class RNN(_RecurrentStack):
    """Multi-layer Elman RNN with tanh (``torch.nn.RNN(nonlinearity="tanh")``).

    Same arguments as :class:`LSTM`, plus ``nonlinearity`` which must be "tanh".
    """
    _cell, _gates, _state_names, _torch_name = "elman", 1, ("h",), "RNN"

    def __init__(self, input_size, hidden_size, num_layers=1, *, nonlinearity="tanh",
                 **kwargs):
        if nonlinearity != "tanh":
            raise NotImplementedError(f"nonlinearity={nonlinearity!r} is not supported "
                                      "(statescan's Elman cell is tanh)")
        super().__init__(input_size, hidden_size, num_layers, **kwargs)


class SLSTM(_RecurrentStack):
    """Multi-layer sLSTM (xLSTM's scalar LSTM with exponential gating), state (h, c, n, m).

    Same arguments and parameter names as :class:`LSTM` (gates i, f, z, o); ``heads`` gives
    xLSTM's block-diagonal multi-head recurrence.  No torch twin (``from_torch`` raises).
    """
    _cell, _gates, _state_names = "slstm", 4, ("h", "c", "n", "m")
