"""Continuous batching of variable-length sequences (E-BATCH): :func:`run_sequences`.

A static batch runs as long as its longest sequence while its other rows sit idle.  Here the
batch is refilled between time chunks: when a row's sequence ends, the next waiting sequence
takes its place with a zero state, and the rows that continue carry their state into the next
chunk (``state=``).  Rows that end inside a chunk are handled by ``lengths=``, which the
kernels skip at no cost.  Every row is computed as if it ran alone, so the results equal one
call per sequence, bit for bit.
"""
from collections import deque

import numpy as np

from . import _validate

def run_sequences(fn, sequences, *args, batch_size=64, min_chunk=8, **kwargs):
    """Run `fn` over many variable-length sequences, keeping the batch full.

    Parameters
    ----------
    fn : callable
        A stateful operation with the statescan convention ``fn(*inputs, *args, state=...,
        lengths=..., **kwargs)`` returning ``(y, state)`` (the cells ``lstm``, ``gru``,
        ``elman``, ``slstm``, ``selective_scan``, ``linear_attention``, ``ssd``, a
        :mod:`statescan.nn` layer) or the output alone when it is its own state
        (``linear_scan``: the state is the output at the last valid step).
    sequences : list
        One entry per sequence: an array [T_i, ...] (the first positional input), a tuple of
        arrays [T_i, ...] (the first positional inputs, e.g. ``(a_i, b_i)`` for linear_scan)
        or a dict of arrays [T_i, ...] passed by keyword (e.g. ``{"x": x_i, "dt": dt_i,
        "B": B_i, "C": C_i}`` for selective_scan, with ``A=A`` in `kwargs`).  All entries
        have the same structure.
    *args, **kwargs :
        Passed to every call (weights, options).  ``state`` and ``lengths`` are managed here.
    batch_size : int
        Rows per call.
    min_chunk : int
        Shortest time chunk while sequences wait: a chunk runs until the first row ends,
        but at least this many steps (rows that end earlier sit idle, at no kernel cost).

    Returns
    -------
    list of (y_i, state_i), in the order of `sequences`: y_i [T_i, ...] and the final state
    of sequence i with the batch axis removed (for a layer, ``h`` [num_layers*dirs, H]).
    Equal, bit for bit, to ``fn(seq_i[None], *args, **kwargs)`` row 0.

    Notes
    -----
    Layers and kernels that need the whole sequence (a bidirectional layer, ``reverse=True``)
    are not split in time: each sequence runs in one chunk, and finished rows are refilled
    before the next chunk.  The state's batch axis is ``fn.state_batch_axis`` when `fn`
    has one (1 for :mod:`statescan.nn` layers), else 0.
    """
    for name in ("state", "lengths"):
        if name in kwargs:
            raise TypeError(f"run_sequences manages {name}= itself; do not pass it")
    batch_size = _validate.positive_int("batch_size", batch_size)
    min_chunk = _validate.positive_int("min_chunk", min_chunk)
    items = [_item(i, s) for i, s in enumerate(sequences)]
    if items:
        _check_structure(items)
    axis = getattr(fn, "state_batch_axis", 0)
    whole = bool(getattr(fn, "bidirectional", False) or kwargs.get("reverse", False))
    results = [None] * len(items)
    for i, item in enumerate(items):
        if item.length == 0:           # nothing to batch: the per-sequence call itself
            y, state = _call(fn, [item], [0], 0, None, args, kwargs)
            results[i] = (y[0], _row(state, 0, axis))
    # Longest first: the long sequences then run while the batch is full, and the last
    # chunks hold short ones, so the batch drains quickly instead of finishing one long
    # latecomer almost alone.  (Results are returned in the input order regardless.)
    queue = deque(sorted((i for i, item in enumerate(items) if item.length > 0),
                         key=lambda i: -items[i].length))
    active, pos, state = [], [], None          # sequence index and position per row
    while queue or active:
        kept = len(active)
        while queue and len(active) < batch_size:
            active.append(queue.popleft())
            pos.append(0)
        if state is not None and len(active) > kept:
            state = _tree(lambda s: _append_zero_rows(s, len(active) - kept, axis), state)
        remaining = [items[i].length - p for i, p in zip(active, pos)]
        # Run until the first row ends (then it is refilled), but not in tiny chunks; with
        # nothing left to refill (or a layer that needs whole sequences) run to the end.
        if whole or not queue:
            chunk = max(remaining)
        else:
            chunk = min(max(remaining), max(min(remaining), min_chunk))
        lengths = [min(r, chunk) for r in remaining]
        y, state = _call(fn, [items[i] for i in active], pos, chunk, state, args, kwargs,
                         lengths=lengths, axis=axis)
        keep = []
        for r, (i, n) in enumerate(zip(active, lengths)):
            if results[i] is None:
                results[i] = (np.empty((items[i].length,) + y.shape[2:], y.dtype), None)
            results[i][0][pos[r]:pos[r] + n] = y[r, :n]
            pos[r] += n
            if pos[r] == items[i].length:
                results[i] = (results[i][0], _row(state, r, axis))
            else:
                keep.append(r)
        active, pos = [active[r] for r in keep], [pos[r] for r in keep]
        state = _tree(lambda s: np.take(s, keep, axis=axis), state) if keep else None
    return results


class _Item:
    """One sequence: its positional and keyword input arrays, all [T, ...]."""
    __slots__ = ("positional", "keywords", "length")

    def __init__(self, positional, keywords, length):
        self.positional, self.keywords, self.length = positional, keywords, length


def _item(index, seq):
    if isinstance(seq, dict):
        positional, keywords = (), {k: np.asarray(v) for k, v in seq.items()}
    elif isinstance(seq, (tuple, list)):
        positional, keywords = tuple(np.asarray(v) for v in seq), {}
    else:
        positional, keywords = (np.asarray(seq),), {}
    arrays = list(positional) + list(keywords.values())
    if not arrays:
        raise ValueError(f"sequences[{index}] holds no array")
    for a in arrays:
        if a.ndim < 1 or a.shape[0] != arrays[0].shape[0]:
            raise ValueError(f"sequences[{index}]: every array must have shape [T_i, ...] with "
                             f"one T_i, got shapes {[list(b.shape) for b in arrays]}")
    return _Item(positional, keywords, arrays[0].shape[0])


def _check_structure(items):
    first = items[0]
    for index, item in enumerate(items):
        same = (len(item.positional) == len(first.positional)
                and item.keywords.keys() == first.keywords.keys()
                and all(a.shape[1:] == b.shape[1:] and a.dtype == b.dtype
                        for a, b in zip(item.positional + tuple(item.keywords.values()),
                                        first.positional + tuple(first.keywords.values()))))
        if not same:
            raise ValueError(f"sequences[{index}] differs from sequences[0] in structure, "
                             "feature shape or dtype; every sequence must match the first "
                             "except in length")


def _gather(arrays, pos, chunk, lengths):
    """Rows' segments [pos, pos + n) of one input, zero-padded to [rows, chunk, ...]."""
    first = arrays[0]
    out = np.zeros((len(arrays), chunk) + first.shape[1:], first.dtype)
    for r, (a, p, n) in enumerate(zip(arrays, pos, lengths)):
        out[r, :n] = a[p:p + n]
    return out


def _call(fn, items, pos, chunk, state, args, kwargs, lengths=None, axis=0):
    """One batched call; returns (y, state) with the state derived from y for functions
    whose output is their state."""
    n = lengths if lengths is not None else [chunk] * len(items)
    positional = [_gather([it.positional[k] for it in items], pos, chunk, n)
                  for k in range(len(items[0].positional))]
    keywords = {k: _gather([it.keywords[k] for it in items], pos, chunk, n)
                for k in items[0].keywords}
    extra = {}
    if lengths is not None and min(lengths) < chunk:
        extra["lengths"] = np.asarray(lengths, np.int64)
    out = fn(*positional, *args, state=state, **keywords, **extra, **kwargs)
    if isinstance(out, tuple):
        return out[0], out[1]
    # The output is the state sequence (linear_scan): a row's state is its last valid output.
    last = np.asarray([max(m, 1) - 1 for m in n])
    return out, out[np.arange(len(items)), last] if chunk else state


def _tree(f, state):
    if isinstance(state, (tuple, list)):
        return type(state)(_tree(f, s) for s in state)
    return f(state)


def _row(state, r, axis):
    return _tree(lambda s: np.take(s, r, axis=axis), state)


def _append_zero_rows(s, count, axis):
    shape = list(s.shape)
    shape[axis] = count
    return np.concatenate([s, np.zeros(shape, s.dtype)], axis=axis)
